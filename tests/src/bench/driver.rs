//! `lb-bench all|throughput|connrate|latency|cost|memory`: runs the [`suite`] and the [`cost`]
//! measurement, prints the markdown report, writes the raw JSON to `target/bench/<name>.json` and,
//! for a non-smoke `all`, the report to `BENCHMARKS.md`.
//!
//! The exit status is non-zero when a cell is missing (a contestant failed to set up or a
//! measurement produced nothing) or an honesty check failed; never because of a number.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use super::contestants::Contestant;
use super::cost::{self, CostPlan, CostRound};
use super::probe::BpfStats;
use super::report::{self, Summary};
use super::suite::{self, CellRecord, Check, Plan};
use crate::harness;

/// Which figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    All,
    Throughput,
    Connrate,
    Latency,
    Cost,
    Memory,
}

impl Which {
    pub fn id(self) -> &'static str {
        match self {
            Which::All => "all",
            Which::Throughput => "throughput",
            Which::Connrate => "connrate",
            Which::Latency => "latency",
            Which::Cost => "cost",
            Which::Memory => "memory",
        }
    }
}

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    pub which: Which,
    pub quick: bool,
    pub smoke: bool,
    pub rounds: Option<usize>,
    pub only: Vec<String>,
    /// The command line, for the report.
    pub command: String,
}

#[derive(Serialize)]
struct Machine {
    cpu_model: String,
    cpus: usize,
    mem_total: String,
    kernel: String,
    haproxy: Option<String>,
    iperf3: Option<String>,
    nft: Option<String>,
    bpftool: Option<String>,
    lb_bin: String,
    lb_commit: Option<String>,
}

#[derive(Serialize)]
struct Raw<'a> {
    bench: &'static str,
    command: &'a str,
    unix_time: u64,
    date_utc: String,
    machine: &'a Machine,
    plan: Plan,
    cost_plan: Option<CostPlan>,
    summaries: &'a [Summary],
    cost: Option<&'a [CostRound]>,
    cost_error: Option<String>,
    cells: &'a [CellRecord],
}

fn cmd_out(prog: &str, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new(prog).args(args).output().ok()?;
    let text = if o.stdout.is_empty() {
        o.stderr
    } else {
        o.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpu_model: field(&cpuinfo, "model name"),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total: field(&meminfo, "MemTotal"),
        kernel: cmd_out("uname", &["-srm"]).unwrap_or_default(),
        haproxy: super::failover::haproxy_version(),
        iperf3: cmd_out("iperf3", &["--version"]),
        nft: cmd_out("nft", &["--version"]),
        bpftool: cmd_out("bpftool", &["--version"]),
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

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
pub fn date_utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Runs the selection; `Ok(false)` when a cell is missing or an honesty check failed.
pub fn run(o: &Options) -> Result<bool> {
    let started = Instant::now();
    let mut plan = if o.smoke {
        Plan::smoke()
    } else if o.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(r) = o.rounds {
        plan.rounds = r.max(1);
    }
    let w = o.which;
    plan.throughput = matches!(w, Which::All | Which::Throughput);
    plan.connrate = matches!(w, Which::All | Which::Connrate);
    plan.latency = matches!(w, Which::All | Which::Latency);
    plan.memory = matches!(w, Which::All | Which::Memory);
    let cost_plan = matches!(w, Which::All | Which::Cost).then(|| {
        if o.smoke {
            CostPlan::smoke()
        } else if o.quick {
            CostPlan::quick()
        } else {
            CostPlan::full()
        }
    });
    let contestants: Vec<Contestant> = if o.only.is_empty() {
        match w {
            Which::Cost => Vec::new(),
            Which::Memory => vec![Contestant::LbNative, Contestant::Haproxy],
            _ => Contestant::ALL.to_vec(),
        }
    } else {
        o.only
            .iter()
            .map(|s| Contestant::parse(s))
            .collect::<Result<_>>()?
    };
    let machine = machine();
    let _stats = BpfStats::enable();
    eprintln!(
        "lb-bench {}: {} contestants x {} rounds; lb {}",
        w.id(),
        contestants.len(),
        plan.rounds,
        harness::lb_bin().display()
    );

    let (cost, cost_error) = match cost_plan {
        Some(cp) => {
            let t = Instant::now();
            match cost::measure(&cp) {
                Ok(c) => {
                    eprintln!(
                        "  XDP cost per packet: {} rounds ({:.1} s)",
                        c.len(),
                        t.elapsed().as_secs_f64()
                    );
                    (Some(c), None)
                }
                Err(e) => {
                    eprintln!("  XDP cost per packet: FAILED: {e:#}");
                    (None, Some(format!("{e:#}")))
                }
            }
        }
        None => (None, None),
    };
    let cells = suite::run(&plan, &contestants);
    let summaries = report::summarize(&cells, &contestants, plan.rounds);

    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut md = String::new();
    md += &format!(
        "## lb-bench {}{} ({} round{}, medians, min-max in brackets)\n\n",
        w.id(),
        if o.smoke {
            " --smoke (tiny durations: numbers not meaningful)"
        } else if o.quick {
            " --quick"
        } else {
            ""
        },
        plan.rounds,
        if plan.rounds == 1 { "" } else { "s" }
    );
    md += &report::tables(&cells, &summaries, plan.rounds, cost.as_deref());
    let failed: Vec<(&CellRecord, &Check)> = cells
        .iter()
        .flat_map(|r| r.checks.iter().filter(|c| !c.ok).map(move |c| (r, c)))
        .collect();
    let checks = cells.iter().map(|r| r.checks.len()).sum::<usize>();
    let errors: Vec<(&CellRecord, &String)> = cells
        .iter()
        .flat_map(|r| r.errors.iter().map(move |e| (r, e)))
        .collect();
    md += "\n### Honesty checks\n\n";
    md += &format!(
        "{} of {checks} checks passed (in lb's cells: `new_flows` rose by at least the client's connections and the lb namespace's `Ip: ForwDatagrams` stayed put; in every cell: each measurement produced data).\n",
        checks - failed.len()
    );
    for (r, c) in &failed {
        md += &format!(
            "- FAILED: {} round {}, {}: {} ({})\n",
            r.contestant.id(),
            r.round + 1,
            c.phase,
            c.what,
            c.detail
        );
    }
    for (r, e) in &errors {
        md += &format!(
            "- MISSING: {} round {}: {}\n",
            r.contestant.id(),
            r.round + 1,
            e.lines().next().unwrap_or("")
        );
    }
    if let Some(e) = &cost_error {
        md += &format!("- MISSING: XDP cost: {}\n", e.lines().next().unwrap_or(""));
    }
    md += &setup_notes(
        &plan,
        cost_plan.as_ref(),
        &cells,
        &machine,
        &o.command,
        unix_time,
    );
    println!("\n{md}");

    let dir = harness::repo_root().join("target").join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = if o.smoke {
        format!("{}-smoke", w.id())
    } else {
        w.id().to_string()
    };
    let path = dir.join(format!("{name}.json"));
    let raw = Raw {
        bench: w.id(),
        command: &o.command,
        unix_time,
        date_utc: date_utc(unix_time),
        machine: &machine,
        plan,
        cost_plan,
        summaries: &summaries,
        cost: cost.as_deref(),
        cost_error: cost_error.clone(),
        cells: &cells,
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&raw)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("Raw records: {}", path.display());
    if w == Which::All && !o.smoke {
        let bm = harness::repo_root().join("BENCHMARKS.md");
        super::benchmarks_md::write_section(&bm, "## lb-bench all", &md)?;
        println!("Report: {}", bm.display());
    }
    eprintln!(
        "lb-bench {}: done in {:.1} s",
        w.id(),
        started.elapsed().as_secs_f64()
    );
    let cost_missing = cost_plan.is_some() && cost.is_none();
    for (r, e) in &errors {
        eprintln!("--- {} round {} ---\n{e}", r.contestant.id(), r.round + 1);
    }
    Ok(failed.is_empty() && errors.is_empty() && !cost_missing)
}

fn setup_notes(
    plan: &Plan,
    cost: Option<&CostPlan>,
    cells: &[CellRecord],
    m: &Machine,
    command: &str,
    unix_time: u64,
) -> String {
    let mut s = String::from("\n### Setup\n\n");
    s += &format!(
        "- Date: {}; machine: {} × {} ({}), {} RAM; {}.\n",
        date_utc(unix_time),
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.mem_total,
        "all contestants share the machine with the client and the servers"
    );
    s += &format!(
        "- Versions: lb {} ({}); {}; {}; {}; {}.\n",
        m.lb_commit.as_deref().unwrap_or("?"),
        m.lb_bin,
        m.haproxy.as_deref().unwrap_or("haproxy ?"),
        m.iperf3.as_deref().unwrap_or("iperf3 ?"),
        m.nft.as_deref().unwrap_or("nft ?"),
        m.bpftool.as_deref().unwrap_or("bpftool ?")
    );
    s += &format!("- Command: `{command}`.\n");
    s += "- Topology: the netns harness, two-armed (client -- lb -- bridge -- db01..db03) plus a direct leg from the client namespace to the bridge for the no-balancer baseline; one fresh topology per contestant and round; rounds interleaved. The balancers see the manual's services (write 7680 -> db01, read 7681 -> db02/db03) plus 5201 -> db01 only for iperf3; lb with static sets, HAProxy with the manual's config (checks on), nftables with DNAT + masquerade. The direct path crosses one veth pair fewer than the balanced ones.\n";
    let offloads = cells
        .iter()
        .find(|c| c.contestant == Contestant::Direct)
        .or_else(|| cells.first())
        .map(|c| c.offloads.join("; "))
        .unwrap_or_default();
    let on = cells
        .iter()
        .find(|c| c.contestant == Contestant::DirectOffloads)
        .map(|c| c.offloads.join("; "))
        .unwrap_or_default();
    s += &format!(
        "- Offloads, identical for every contestant but `direct, sender offloads on`: tx checksum offload off on the senders (native XDP on veth needs it); `ethtool -k` of the client's `c0`/`c1` and db01's `eth0`: {offloads}. With offloads on: {on}.\n"
    );
    s += &format!(
        "- Durations: iperf3 -t {} s with 1 and 4 streams; Bolt short sessions (connect, handshake, HELLO -> SUCCESS, close) from {} parallel tokio clients for {:.1} s; ping-pong (RESET -> SUCCESS on one connection) for {:.1} s. Client namespace: tcp_tw_reuse=1, ports 1024-65000 (HAProxy's namespace too).\n",
        plan.iperf_s,
        plan.clients,
        plan.sessions_ms as f64 / 1000.0,
        plan.ping_ms as f64 / 1000.0
    );
    let bg: Vec<Option<f64>> = cells.iter().map(|c| Some(c.background_busy_cpus)).collect();
    if let Some(b) = super::stats::spread(&bg) {
        s += &format!(
            "- Other work on the machine (it is shared: other builds and tests may run): busy CPUs with no benchmark traffic, measured for {:.1} s after each cell's setup, median {:.2} ({:.2}-{:.2}) of {}; that background rate times the wall time is subtracted from each measurement's busy CPU time. Load averages per cell are in the JSON.\n",
            super::suite::BACKGROUND.as_secs_f64(),
            b.median,
            b.min,
            b.max,
            m.cpus
        );
    }
    s += "- CPU: whole-machine busy time from /proc/stat over each measurement (XDP and the kernel's forwarding run in softirq, not in a process), per Gbit moved by iperf3 -P 4 and per completed session; `added` subtracts direct's figure of the same round. XDP run time from `bpf_stats` (kernel.bpf_stats_enabled=1 during the run); HAProxy's and lb's own process CPU from /proc/PID/stat.\n";
    if let Some(c) = cost {
        s += &format!(
            "- XDP cost per packet: BPF_PROG_TEST_RUN in the packet fixture's namespace, {} rounds; rewriting paths once each over {} distinct flows (median), floor `lb_pass` measured likewise over the same SYN frames; non-modifying paths with repeat = {}.\n",
            c.rounds, c.frames, c.repeat
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::date_utc;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(date_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(date_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(date_utc(1_795_000_000), "2026-11-18 11:06 UTC");
    }
}
