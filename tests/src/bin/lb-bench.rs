//! `cargo xtask bench`: benchmarks of lb against the HAProxy setup it replaces, in network namespaces.
//!
//! `lb-bench failover [--runs N] [--quick] [--only ID,...]`: failover timing (see
//! `lb_tests::bench::failover`). Prints a markdown table of medians over the runs and writes the raw
//! records to `target/bench/failover.json`. Numbers are reported, never asserted; the exit status is
//! non-zero only when a contestant produced no data at all.
//!
//! `lb-bench churn [--seconds N] [--threads N] [--rounds N] [--quick] [--only ROW,...]`: the
//! machine's full connection rate for a minute (see `lb_tests::bench::churn`); writes its section
//! of `BENCHMARKS.md` unless --quick or --only.
//!
//! `lb-bench synflood [--seconds N] [--rates R,...] [--quick] [--only ROW,...]`: spoofed SYNs
//! against lb and HAProxy (see `lb_tests::bench::synflood`).
//!
//! `lb-bench idle [--flows N] [--idle-seconds S]`: idle flows in the tables (see
//! `lb_tests::bench::idle`).
//!
//! `lb-bench all|throughput|connrate|latency|cost|memory [--quick] [--smoke] [--rounds N] [--only
//! ID,...]`: lb against direct, HAProxy and nftables (see `lb_tests::bench::driver`); `all` also
//! writes `BENCHMARKS.md`. Non-zero exit on a missing cell or a failed honesty check.
//!
//! Environment (set by xtask): LB_BIN, LB_SIM_BIN (release builds), LB_REPO; LB_HAPROXY optional.

use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_tests::bench::driver::{self, Which};
use lb_tests::bench::failover::{self, Contestant, RunRecord, Scenario};
use lb_tests::bench::probe::BpfStats;
use lb_tests::bench::{churn, idle, synflood};
use lb_tests::harness;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "lb benchmarks (run through `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Failover timing: roles flip db01 -> db02 under load; lb vs HAProxy 2.6, two timings each.
    Failover {
        /// Runs per contestant (the table shows medians).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// One run each, shorter steady state and fast-timing windows (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Only these contestants (comma-separated): lb-manual, lb-fast, lb-imported,
        /// lb-imported-shutdown, lb-imported-faithful, haproxy-manual, haproxy-fast.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The machine's full connection rate for a minute: handshake-only connections from a native
    /// multi-threaded client; direct, lb's write and read VIPs, HAProxy.
    Churn {
        /// Seconds per row.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Client threads (blocking sockets).
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Rounds (rows interleaved).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// 10 s per row, one round (the section of BENCHMARKS.md is not written).
        #[arg(long)]
        quick: bool,
        /// Only these rows: routed, routed-all, direct, lb-write, lb-read, haproxy-write, and lb-write-generic (generic XDP; run only when named), routed-xdp-pass (routing with an XDP_PASS program on the lb namespace's veths: the native-XDP floor; only when named).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Spoofed SYNs at the write VIP while a legitimate client connects every 10 ms and an
    /// established connection talks; lb (manual config + maxconn 256, and with backend_maxconn)
    /// and HAProxy.
    Synflood {
        /// Seconds of flood per row and rate.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Flood rates, SYN/s.
        #[arg(long, value_delimiter = ',', default_values_t = [20000u32, 50])]
        rates: Vec<u32>,
        /// 10 s floods (the section of BENCHMARKS.md is not written).
        #[arg(long)]
        quick: bool,
        /// Only these rows: lb-imported, lb-backend-maxconn, haproxy.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// A pair of lb hosts: the flow sync's lag and CPU under the churn generator, and takeovers
    /// by keepalived (advert_int 1 and 0.2) while the generator and 20 sessions run.
    Pair {
        /// Seconds of generator per row.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Client threads (blocking sockets).
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Only these rows: single, pair, takeover-1, takeover-0.2 (BENCHMARKS.md is then not written).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// A million idle established flows in the tables: check timing, agent CPU and RSS, expiry.
    Idle {
        /// Idle flows written into the table.
        #[arg(long, default_value_t = 1_000_000)]
        flows: u32,
        /// `[timeouts] idle` of the agent, seconds (the watch lasts this long).
        #[arg(long, default_value_t = 30)]
        idle_seconds: u64,
    },
    /// Every figure below (not failover): the report goes to stdout and BENCHMARKS.md.
    All(PerfArgs),
    /// Bulk throughput with iperf3, 1 and 4 streams.
    Throughput(PerfArgs),
    /// Bolt short sessions: connections per second, connect + first-byte latency.
    Connrate(PerfArgs),
    /// Ping-pong on a persistent connection.
    Latency(PerfArgs),
    /// XDP program cost per packet (BPF_PROG_TEST_RUN).
    Cost(PerfArgs),
    /// Agent RSS and BPF map memory (and HAProxy's RSS).
    Memory(PerfArgs),
}

#[derive(clap::Args)]
struct PerfArgs {
    /// One round, shorter measurements (under 2 minutes for `all`).
    #[arg(long)]
    quick: bool,
    /// Tiny durations: checks that every cell runs (used by `cargo xtask test`).
    #[arg(long)]
    smoke: bool,
    /// Rounds per contestant (default 3, 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Only these contestants: direct, direct-offloads, lb-native, lb-generic, haproxy, nftables.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    bench: &'static str,
    command: String,
    unix_time: u64,
    machine: Machine,
    scenario: Scenario,
    runs_per_contestant: usize,
    /// How the client reaches each balancer.
    addressing: &'static str,
    summaries: Vec<failover::Summary>,
    errors: Vec<RunError>,
    runs: Vec<&'a RunRecord>,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpus: usize,
    haproxy: Option<String>,
    lb_bin: String,
    lb_commit: Option<String>,
}

#[derive(Serialize)]
struct RunError {
    contestant: Contestant,
    run: usize,
    error: String,
}

const ADDRESSING: &str = "the client namespace sends to the VIP 198.18.0.10:7680; lb answers it in \
XDP, HAProxy (`bind *:7680`) gets it as a /32 on the lb namespace's l0; lb run --haproxy-config \
serves `bind *:7680` on its first interface's address (the client-facing l0's), so the client sends \
there; the imported rows map the manual's db01..db03 addresses to the simulators' and change \
nothing else";

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    let cli = Cli::parse();
    match cli.bench {
        Bench::Failover { runs, quick, only } => failover_bench(runs, quick, &only),
        Bench::Churn {
            seconds,
            threads,
            rounds,
            quick,
            only,
        } => churn_bench(seconds, threads, rounds, quick, &only),
        Bench::Synflood {
            seconds,
            rates,
            quick,
            only,
        } => synflood_bench(seconds, rates, quick, &only),
        Bench::Idle {
            flows,
            idle_seconds,
        } => idle_bench(flows, idle_seconds),
        Bench::Pair {
            seconds,
            threads,
            only,
        } => pair_bench(seconds, threads, only),
        Bench::All(a) => perf(Which::All, a),
        Bench::Throughput(a) => perf(Which::Throughput, a),
        Bench::Connrate(a) => perf(Which::Connrate, a),
        Bench::Latency(a) => perf(Which::Latency, a),
        Bench::Cost(a) => perf(Which::Cost, a),
        Bench::Memory(a) => perf(Which::Memory, a),
    }
}

fn perf(which: Which, a: PerfArgs) -> Result<bool> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    driver::run(&driver::Options {
        which,
        quick: a.quick,
        smoke: a.smoke,
        rounds: a.rounds,
        only: a.only,
        command: format!("cargo xtask bench {} -- {}", which.id(), args.join(" "))
            .trim_end_matches(" -- ")
            .to_string(),
    })
}

/// When and how a bench ran, for its report and its raw record.
struct RunInfo {
    bench: &'static str,
    unix_time: u64,
    /// `cargo xtask bench BENCH -- ARGS`.
    command: String,
    /// Date, CPUs, kernel, lb commit (and HAProxy's version, for a bench that runs it).
    date: String,
}

impl RunInfo {
    fn now(bench: &'static str, with_haproxy: bool) -> RunInfo {
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let command = format!(
            "cargo xtask bench {bench} -- {}",
            std::env::args().skip(2).collect::<Vec<_>>().join(" ")
        )
        .trim_end()
        .to_string();
        let m = machine();
        let mut date = format!(
            "{}, {} CPUs, {}, lb {}",
            driver::date_utc(unix_time),
            m.cpus,
            m.kernel,
            m.lb_commit.as_deref().unwrap_or("?")
        );
        if let Some(h) = m.haproxy.as_ref().filter(|_| with_haproxy) {
            date += &format!(", {h}");
        }
        RunInfo {
            bench,
            unix_time,
            command,
            date,
        }
    }

    /// Prints the report, writes its section of BENCHMARKS.md when `write` (a full run), and
    /// the raw record (`fields` plus bench, command and time) to `target/bench/BENCH.json`.
    fn publish(
        &self,
        heading: &str,
        md: &str,
        write: bool,
        fields: serde_json::Value,
    ) -> Result<()> {
        println!("\n{md}");
        if write {
            let bm = harness::repo_root().join("BENCHMARKS.md");
            lb_tests::bench::benchmarks_md::write_section(&bm, heading, md)?;
            println!("Report: {}", bm.display());
        }
        let mut raw = serde_json::json!({
            "bench": self.bench,
            "command": self.command,
            "unix_time": self.unix_time,
        });
        if let (Some(raw), serde_json::Value::Object(fields)) = (raw.as_object_mut(), fields) {
            raw.extend(fields);
        }
        let dir = harness::repo_root().join("target").join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.bench));
        std::fs::write(&path, serde_json::to_vec_pretty(&raw)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("Raw records: {}", path.display());
        Ok(())
    }
}

fn churn_bench(
    seconds: u64,
    threads: usize,
    rounds: usize,
    quick: bool,
    only: &[String],
) -> Result<bool> {
    let rows = if only.is_empty() {
        churn::Row::ALL.to_vec()
    } else {
        only.iter()
            .map(|s| churn::Row::parse(s))
            .collect::<Result<_>>()?
    };
    let plan = churn::Plan {
        seconds: if quick { 10 } else { seconds.max(1) },
        threads,
        rounds: if quick { 1 } else { rounds.max(1) },
        rows,
    };
    eprintln!(
        "lb-bench churn: {} rows x {} rounds, {} s each, {} client threads; lb {}",
        plan.rows.len(),
        plan.rounds,
        plan.seconds,
        plan.threads,
        harness::lb_bin().display()
    );
    let _stats = BpfStats::enable();
    let records = churn::run(&plan);
    let run = RunInfo::now("churn", false);
    let md = churn::report(&plan, &records, &run.command, &run.date);
    run.publish(
        "## lb-bench churn",
        &md,
        !quick && only.is_empty(),
        serde_json::json!({ "plan": plan, "records": records }),
    )?;
    Ok(records
        .iter()
        .all(|r| r.errors.is_empty() && r.checks.iter().all(|c| c.1)))
}

fn synflood_bench(seconds: u64, rates: Vec<u32>, quick: bool, only: &[String]) -> Result<bool> {
    let rows = if only.is_empty() {
        synflood::Row::ALL.to_vec()
    } else {
        only.iter()
            .map(|s| synflood::Row::parse(s))
            .collect::<Result<_>>()?
    };
    let plan = synflood::Plan {
        seconds: if quick { 10 } else { seconds.max(1) },
        rates,
        rows,
    };
    eprintln!(
        "lb-bench synflood: {} rows x {} rates, {} s each; lb {}",
        plan.rows.len(),
        plan.rates.len(),
        plan.seconds,
        harness::lb_bin().display()
    );
    let records = synflood::run(&plan);
    let run = RunInfo::now("synflood", true);
    let md = synflood::report(&plan, &records, &run.command, &run.date);
    run.publish(
        "## lb-bench synflood",
        &md,
        !quick && only.is_empty(),
        serde_json::json!({ "plan": plan, "records": records }),
    )?;
    Ok(records.iter().all(|r| r.error.is_none()))
}

fn pair_bench(seconds: u64, threads: usize, only: Vec<String>) -> Result<bool> {
    let plan = lb_tests::bench::pair::Plan {
        seconds: seconds.max(1),
        threads,
        only,
    };
    eprintln!(
        "lb-bench pair: {} s per row, {} client threads; lb {}",
        plan.seconds,
        plan.threads,
        harness::lb_bin().display()
    );
    let records = lb_tests::bench::pair::run(&plan);
    let run = RunInfo::now("pair", false);
    let md = lb_tests::bench::pair::report(&plan, &records, &run.command, &run.date);
    let ok = records.sync.iter().all(|r| r.errors.is_empty())
        && records.takeover.iter().all(|r| r.errors.is_empty());
    run.publish(
        "## lb-bench pair",
        &md,
        ok && plan.only.is_empty(),
        serde_json::json!({ "plan": plan, "records": records }),
    )?;
    Ok(ok)
}

fn idle_bench(flows: u32, idle_seconds: u64) -> Result<bool> {
    let plan = idle::Plan {
        flows,
        idle_s: idle_seconds.max(3),
    };
    eprintln!(
        "lb-bench idle: {} flows, idle timeout {} s; lb {}",
        plan.flows,
        plan.idle_s,
        harness::lb_bin().display()
    );
    let rec = idle::run(&plan);
    let run = RunInfo::now("idle", false);
    let md = idle::report(&plan, &rec, &run.command, &run.date);
    run.publish(
        "## lb-bench idle",
        &md,
        flows == 1_000_000 && rec.error.is_none(),
        serde_json::json!({ "plan": plan, "record": rec }),
    )?;
    Ok(rec.error.is_none())
}

fn failover_bench(runs: usize, quick: bool, only: &[String]) -> Result<bool> {
    let started = Instant::now();
    let (runs, scenario) = if quick {
        (1, Scenario::quick())
    } else {
        (runs.max(1), Scenario::full())
    };
    let contestants: Vec<Contestant> = if only.is_empty() {
        Contestant::ALL.to_vec()
    } else {
        only.iter()
            .map(|s| Contestant::parse(s))
            .collect::<Result<_>>()?
    };
    eprintln!(
        "lb-bench failover: {} contestants x {runs} runs; lb {}, sims {}",
        contestants.len(),
        harness::lb_bin().display(),
        harness::sim_bin().display()
    );
    let mut records: Vec<RunRecord> = Vec::new();
    let mut errors: Vec<RunError> = Vec::new();
    // Interleaved (run 1 of each, run 2 of each, ...) so slow drifts of the machine hit everyone.
    for run in 0..runs {
        for &c in &contestants {
            let t = Instant::now();
            match failover::run_once(c, &scenario, run, runs) {
                Ok(r) => {
                    let f = &r.figures;
                    eprintln!(
                        "  {} run {}: first new {} / last old {}{} / overlap {} / failed {} ({:.1} s)",
                        c.id(),
                        run + 1,
                        secs(f.first_new_master_s),
                        secs(f.last_old_master_s),
                        if f.old_master_until_end { " (until end)" } else { "" },
                        secs(f.overlap_s),
                        f.failed_after_t0,
                        t.elapsed().as_secs_f64()
                    );
                    records.push(r);
                }
                Err(e) => {
                    eprintln!("  {} run {}: FAILED: {e:#}", c.id(), run + 1);
                    errors.push(RunError {
                        contestant: c,
                        run,
                        error: format!("{e:#}"),
                    });
                }
            }
        }
    }

    let summaries: Vec<failover::Summary> = contestants
        .iter()
        .map(|&c| {
            let mine: Vec<RunRecord> = records
                .iter()
                .filter(|r| r.contestant == c)
                .cloned()
                .collect();
            let failed = errors.iter().filter(|e| e.contestant == c).count();
            failover::summarize(c, &mine, failed)
        })
        .collect();

    let command = format!(
        "cargo xtask bench failover -- {}",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    let md = format!(
        "## lb-bench failover: roles flip db01 -> db02 at T0 (median over {runs} run{}, min-max in brackets)\n\n{}\nNew Bolt write connection every {} ms, {} pooled connections writing every {} ms; T0 after a steady state of {} s plus (run + 0.5) / runs of the contestant's check interval (the runs sample the check phase evenly); window {} s after T0 ({} s for the fast timings); {ADDRESSING}. Times are client send times relative to T0; a NotALeader from db01 counts as reaching db01. {}. Command: `{}`.\n",
        if runs == 1 { "" } else { "s" },
        failover::table(&summaries),
        scenario.new_every_ms,
        scenario.pooled,
        scenario.pooled_every_ms,
        scenario.steady_ms as f64 / 1000.0,
        scenario.window_ms as f64 / 1000.0,
        scenario.fast_window_ms as f64 / 1000.0,
        failover::RUN_NOTE,
        command.trim_end()
    );
    println!("\n{md}");
    if !quick && only.is_empty() {
        let bm = harness::repo_root().join("BENCHMARKS.md");
        lb_tests::bench::benchmarks_md::write_section(&bm, "## lb-bench failover", &md)?;
        println!("Report: {}", bm.display());
    }

    let report = Report {
        bench: "failover",
        command: command.trim_end().to_string(),
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        machine: machine(),
        scenario,
        runs_per_contestant: runs,
        addressing: ADDRESSING,
        summaries: summaries.clone(),
        errors,
        runs: records.iter().collect(),
    };
    let dir = harness::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("failover.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nRaw records: {}", path.display());
    eprintln!(
        "lb-bench failover: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let empty: Vec<&failover::Summary> = summaries.iter().filter(|s| s.runs_ok == 0).collect();
    for s in &empty {
        eprintln!("lb-bench: {} produced no data; errors:", s.contestant.id());
        for e in report
            .errors
            .iter()
            .filter(|e| e.contestant == s.contestant)
        {
            eprintln!("--- run {} ---\n{}", e.run + 1, e.error);
        }
    }
    Ok(empty.is_empty())
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3} s"))
}

fn machine() -> Machine {
    let cmd_out = |prog: &str, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    Machine {
        kernel: cmd_out("uname", &["-srm"]).unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        haproxy: failover::haproxy_version(),
        lb_bin: harness::lb_bin().display().to_string(),
        lb_commit: cmd_out(
            "git",
            &[
                "-C",
                &harness::repo_root().display().to_string(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        ),
    }
}
