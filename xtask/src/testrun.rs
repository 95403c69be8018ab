//! `cargo xtask test`: lint, build, then run every test binary of the workspace ourselves, privileged
//! (`#[ignore]`d) tests included, one test at a time, timing each suite.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cmd::{cargo, describe, repo};

/// One test binary to run.
#[derive(Debug, Clone)]
pub struct Suite {
    /// `package::target` (`package (lib)` for unit tests of a library).
    pub name: String,
    pub executable: PathBuf,
    /// Directory of the package's manifest (cargo runs tests from there).
    pub package_dir: PathBuf,
    pub package: String,
}

/// Counts read from libtest's `test result:` lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// One line of the summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub counts: Counts,
    pub secs: f64,
}

/// Which kernels `cargo xtask test` runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernels {
    /// The host's kernel, then the VM subset on every VM kernel (the default; CI).
    All,
    /// Only the host's kernel (quick local runs).
    Host,
    /// Only the VM subset, on this kernel (e.g. `debian-6.1`).
    Vm(String),
}

impl Kernels {
    /// `all`, `host` or a VM kernel's name.
    pub fn parse(s: &str) -> Result<Kernels> {
        match s {
            "all" => Ok(Kernels::All),
            "host" => Ok(Kernels::Host),
            _ => Ok(Kernels::Vm(crate::vm::spec(s)?.name.to_string())),
        }
    }
}

/// The suites that also run in the VM, each with the tests a default `cargo xtask test` (CI)
/// runs there; `--kernel <vm>` runs them whole unless `--ci-subset` is given. The packet suites run the XDP program
/// through BPF_PROG_TEST_RUN on the guest kernel; nat_e2e and failover forward real connections
/// through it in namespaces. Under TCG every program load costs seconds of verification (13 s
/// on 6.1), so CI takes the tests that cover each path of the program once: forward and reply
/// translation, XDP_TX, generated RSTs, ICMP errors, the FIB's no-neighbour answer, pass-through,
/// connection ends and GC, the ring buffer, the maxconn atomics, a pair's flow reports and a
/// standby's batch installs, and one end-to-end run of each kind (native and generic XDP,
/// one-armed, neighbour flush, failover with resets).
pub const VM_SUITES: &[(&str, &[&str])] = &[
    (
        "lb-tests::packet",
        &[
            "syn_to_vip_is_dnatted_and_snatted_to_the_master",
            "backend_syn_ack_is_translated_back_to_the_client",
            "the_clients_ack_establishes_the_flow_and_data_takes_the_established_path",
            "a_backend_behind_the_ingress_interface_gets_the_syn_by_xdp_tx",
            "a_non_syn_segment_to_a_vip_without_a_flow_is_answered_with_a_rst",
            "a_syn_to_a_backend_without_a_neighbour_entry_is_dropped_without_a_flow",
            "frag_needed_about_a_forwarded_packet_is_translated_to_the_client",
            "traffic_not_for_a_service_passes_byte_for_byte",
            "the_fib_source_probe_tells_whether_this_kernel_has_bpf_fib_lookup_src",
            "without_fib_lookup_src_a_new_flow_takes_the_source_the_agent_resolved_for_its_backend",
            "with_90_percent_of_the_snat_ports_taken_every_new_flow_finds_a_free_one_through_the_port_hints",
            "a_client_segment_finds_its_handshake_only_through_a_way_whose_record_points_back",
            "a_cpu_reuses_a_backends_next_hop_for_100_ms_and_never_a_failed_lookup",
            "a_handshake_slot_shared_by_two_ports_is_kept_by_a_live_handshake_and_given_up_by_an_expired_one",
            "a_handshake_slot_being_written_is_invisible_to_lookups_and_taken_for_claims",
            "when_the_ports_run_out_a_handshake_the_backend_left_unanswered_for_over_a_second_gives_its_port_to_a_new_flow",
            "a_handshake_stamped_ahead_of_the_data_paths_clock_is_young_not_expired",
            "the_agent_reads_handshake_records_in_place_and_skips_a_slot_being_written",
            "a_flow_sets_its_ports_bit_when_it_is_established_even_if_the_bit_was_cleared_since_its_syn",
            "a_backend_segment_on_a_port_with_a_clear_bit_finds_its_handshake_and_a_flow_established_since",
            "a_cpu_takes_a_backends_free_ports_in_order_from_its_cursor",
        ],
    ),
    (
        "lb-tests::packet_lifecycle",
        &[
            "fins_both_ways_mark_the_flow_closing_and_a_retransmitted_fin_translates",
            "a_client_closed_flow_ends_at_its_last_ack_and_its_port_is_free_at_once",
            "a_late_ack_of_an_earlier_connection_on_a_reused_tuple_is_dropped_not_forwarded_on_the_new_flow",
            "gc_deletes_closed_flows_after_the_close_timeout_and_keeps_open_and_half_closed_ones",
            "the_data_path_reports_the_flows_it_deletes_itself_for_the_connection_log",
            "an_agent_that_adopts_tables_holds_every_port_until_its_gc_has_looked_at_them",
        ],
    ),
    (
        "lb-tests::packet_maxconn",
        &[
            "a_syn_over_the_backend_limit_is_dropped_and_a_close_frees_the_slot",
            "the_verified_program_uses_the_fetch_form_of_the_atomic_add_and_stays_small",
        ],
    ),
    (
        "lb-tests::nat_e2e",
        &[
            "native_1000_sequential_connections_reach_the_master_intact_via_snat",
            "generic_with_sender_offloads_1000_sequential_connections_reach_the_master",
            "one_armed_topology_balances_through_a_single_nic",
            "replies_still_flow_after_the_neighbor_tables_are_flushed",
        ],
    ),
    (
        "lb-tests::failover",
        &[
            "writes_go_to_the_master_reads_split_evenly_over_the_slaves",
            "failover_moves_new_writes_without_overlap_and_resets_the_demoted_masters_flows",
        ],
    ),
    (
        "lb-tests::restart_ids",
        &["a_restart_with_services_swapped_a_backend_inserted_and_a_service_removed_keeps_every_identity"],
    ),
    (
        "lb-tests::pair",
        &["in_a_two_armed_pair_a_session_carries_on_through_the_standby"],
    ),
    (
        "lb-tests::packet_pair",
        &[
            "each_flow_established_in_a_pair_is_reported_once_with_its_entries",
            "a_standby_applies_a_batch_of_installs_and_ends_in_order",
        ],
    ),
];

/// Parses `test result: ok. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; ...`.
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        // "ok. 3 passed" or "3 failed"
        let (num, what) = match words.as_slice() {
            [_, n, w, ..] if n.parse::<u64>().is_ok() => (*n, *w),
            [n, w, ..] => (*n, *w),
            _ => continue,
        };
        let Ok(n) = num.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

/// The package name in a cargo package id (`path+file:///x/tests#lb-tests@0.1.0`, or the old
/// `lb-tests 0.1.0 (path+file:///x/tests)`).
pub fn package_name(id: &str) -> String {
    if let Some((url, frag)) = id.rsplit_once('#') {
        match frag.split_once('@') {
            Some((name, _)) => name.to_string(),
            // `...#0.1.0`: the name is the last path segment
            None => url.rsplit('/').next().unwrap_or(url).to_string(),
        }
    } else {
        id.split_whitespace().next().unwrap_or(id).to_string()
    }
}

/// Builds the test binaries (`cargo test --workspace --no-run --message-format=json`) and lists them.
pub fn build_suites() -> Result<Vec<Suite>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--workspace",
        "--no-run",
        "--message-format=json-diagnostic-rendered-ansi",
    ])
    .stdout(Stdio::piped());
    eprintln!("xtask$ {}", describe(&cmd));
    let mut child = cmd.spawn().context("running cargo test --no-run")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut suites = Vec::new();
    let mut seen = BTreeSet::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo output")?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                if let Some(r) = msg["message"]["rendered"].as_str() {
                    eprint!("{r}");
                }
            }
            Some("compiler-artifact") if msg["profile"]["test"].as_bool() == Some(true) => {
                let Some(exe) = msg["executable"].as_str() else {
                    continue;
                };
                if !seen.insert(exe.to_string()) {
                    continue;
                }
                let package = package_name(msg["package_id"].as_str().unwrap_or("?"));
                let target = msg["target"]["name"].as_str().unwrap_or("?");
                let kinds: Vec<&str> = msg["target"]["kind"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let name = if kinds.iter().any(|k| k.contains("lib")) {
                    format!("{package} (lib)")
                } else if kinds.contains(&"bin") {
                    format!("{package} (bin {target})")
                } else {
                    format!("{package}::{target}")
                };
                let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or("."));
                suites.push(Suite {
                    name,
                    executable: PathBuf::from(exe),
                    package_dir: manifest.parent().unwrap_or(Path::new(".")).to_path_buf(),
                    package,
                });
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("building the tests failed ({status})");
    }
    suites.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(suites)
}

/// Per-suite time limit: `$LB_SUITE_TIMEOUT_SECS`, default 20 minutes.
fn suite_timeout() -> Duration {
    let secs = std::env::var("LB_SUITE_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20 * 60);
    Duration::from_secs(secs)
}

/// Runs `cmd`, echoing its stdout line by line and summing its `test result:` lines. A run that
/// fails without any result line (a crash, a build error) counts as one failure.
fn run_streaming(cmd: &mut Command) -> Result<Counts> {
    eprintln!("xtask$ {}", describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", describe(cmd)))?;
    let stdout = child.stdout.take().context("test stdout")?;
    // A hung suite must not eat CI's whole budget: kill it after the timeout, count a failure.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    let limit = suite_timeout();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(RecvTimeoutError::Timeout) {
            eprintln!("xtask: suite exceeded {limit:?} (LB_SUITE_TIMEOUT_SECS), killing pid {pid}");
            // SAFETY: plain kill(2) on our own child's pid; it is not reaped before done_tx fires.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let mut counts = Counts::default();
    let mut saw_result = false;
    let out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        {
            let mut out = out.lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if let Some(c) = parse_result_line(&line) {
            counts.add(c);
            saw_result = true;
        }
    }
    // Output closed: the child exited (or closed stdout); stop the watchdog before reaping.
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let status = child.wait()?;
    if timed_out {
        counts.failed += 1;
    } else if !status.success() && (!saw_result || counts.failed == 0) {
        eprintln!("xtask: {} exited with {status}", describe(cmd));
        counts.failed += 1;
    }
    Ok(counts)
}

/// Lint, build the test binaries, run them all; prints the table and the final summary line.
/// `vm_subset`: the VM runs only the tests of [`VM_SUITES`] (unless `filter` chooses).
pub fn test(filter: &[String], lint: bool, kernels: &Kernels, vm_subset: bool) -> Result<bool> {
    let repo = repo();
    if lint {
        if crate::cmd::status(cargo().args(["fmt", "--all", "--check"]))
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("formatting differs: run `cargo fmt --all` (or pass --no-lint to skip lints)");
        }
        if crate::cmd::status(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .map(|s| !s.success())
        .unwrap_or(true)
        {
            bail!("clippy found problems (see above); fix them or pass --no-lint to skip lints");
        }
        // The workspace run above sees only lb-ebpf's host stub: lint the data path as it is
        // built, for the BPF target with the pinned nightly.
        let mut bpf = ebpf_cargo_command("clippy", &repo, &repo.join("target/bpf-clippy"), &[]);
        bpf.args(["--", "-D", "warnings"]);
        if crate::cmd::status(&mut bpf)
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("clippy found problems in the XDP program (BPF target, see above); fix them or pass --no-lint to skip lints");
        }
    }
    crate::build(false)?;
    let suites = build_suites()?;
    let env = [
        ("LB_BIN", repo.join("target/debug/lb")),
        ("LB_SIM_BIN", repo.join("target/debug/neo4j-sim")),
        ("LB_PYTHON", repo.join(".venv/bin/python")),
        ("LB_REPO", repo.clone()),
    ];
    let mut rows: Vec<Row> = Vec::new();
    if !matches!(kernels, Kernels::Vm(_)) {
        run_on_host(&suites, filter, &env, &mut rows)?;
    }
    let vm_kernels: Vec<&str> = match kernels {
        Kernels::Host => vec![],
        Kernels::All => vec![crate::vm::DEBIAN_6_1],
        Kernels::Vm(name) => vec![name.as_str()],
    };
    for name in vm_kernels {
        let mut done = Vec::new();
        let kernel = crate::vm::ensure_kernel(name, &mut done)?;
        let runs = vm_runs(&suites, filter, vm_subset)?;
        rows.extend(crate::vm::run_suites(
            &kernel,
            &runs,
            &env,
            suite_timeout(),
        )?);
    }
    Ok(print_summary(&rows))
}

/// Every suite on the host's kernel, then the doctests; one row each.
fn run_on_host(
    suites: &[Suite],
    filter: &[String],
    env: &[(&str, PathBuf)],
    rows: &mut Vec<Row>,
) -> Result<()> {
    for suite in suites {
        println!("\n=== {} ===", suite.name);
        let mut cmd = Command::new(&suite.executable);
        cmd.args(filter)
            .args(["--include-ignored", "--test-threads=1"])
            .current_dir(&suite.package_dir)
            .env("CARGO_MANIFEST_DIR", &suite.package_dir)
            .env("CARGO_PKG_NAME", &suite.package);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let start = Instant::now();
        let counts = run_streaming(&mut cmd)?;
        rows.push(Row {
            name: suite.name.clone(),
            counts,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    // Doc tests are not in --no-run's artifacts; cargo runs them.
    println!("\n=== doctests ===");
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc", "--"])
        .args(filter)
        .args(["--include-ignored", "--test-threads=1"]);
    for (k, v) in env {
        doc.env(k, v);
    }
    let start = Instant::now();
    let counts = run_streaming(&mut doc)?;
    rows.push(Row {
        name: "doctests".into(),
        counts,
        secs: start.elapsed().as_secs_f64(),
    });
    Ok(())
}

/// The VM's suites with their arguments: the command line's filter if any, else with `ci_subset`
/// each suite's CI choice of tests ([`VM_SUITES`]), else all; privileged tests included, one at
/// a time, as on the host.
fn vm_runs(
    suites: &[Suite],
    filter: &[String],
    ci_subset: bool,
) -> Result<Vec<crate::vm::GuestRun>> {
    let mut runs = Vec::new();
    for (name, tests) in VM_SUITES {
        let suite = suites
            .iter()
            .find(|s| s.name == *name)
            .with_context(|| format!("the VM suite {name} was not built"))?;
        let mut args: Vec<String> = if !filter.is_empty() {
            filter.to_vec()
        } else if ci_subset {
            let mut a: Vec<String> = tests.iter().map(|t| t.to_string()).collect();
            a.push("--exact".into());
            a
        } else {
            Vec::new()
        };
        // The guest's output port is a tty: no colour codes, as on the host's pipe.
        args.extend(["--include-ignored", "--test-threads=1", "--color=never"].map(String::from));
        runs.push(crate::vm::GuestRun {
            suite: suite.clone(),
            args,
        });
    }
    Ok(runs)
}

/// Prints the table and the final `N passed, N failed, N skipped` line; true when none failed.
fn print_summary(rows: &[Row]) -> bool {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    println!();
    println!(
        "{:<width$}  {:>6}  {:>6}  {:>7}  {:>8}",
        "suite", "passed", "failed", "ignored", "seconds"
    );
    let mut total = Counts::default();
    let mut total_secs = 0.0;
    for Row {
        name,
        counts: c,
        secs,
    } in rows
    {
        println!(
            "{name:<width$}  {:>6}  {:>6}  {:>7}  {secs:>8.1}",
            c.passed, c.failed, c.ignored
        );
        total.add(*c);
        total_secs += secs;
    }
    println!(
        "{:<width$}  {:>6}  {:>6}  {:>7}  {total_secs:>8.1}",
        "total", total.passed, total.failed, total.ignored
    );
    println!(
        "{} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    total.failed == 0
}

// The XDP object's build recipe (`ebpf_cargo_command`), for the BPF-target clippy run.
include!("../../lb-user/ebpf_build.rs");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_yield_passed_failed_and_ignored() {
        let c = parse_result_line(
            "test result: FAILED. 5 passed; 2 failed; 1 ignored; 0 measured; 3 filtered out; finished in 3.98s",
        );
        assert_eq!(
            c,
            Some(Counts {
                passed: 5,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(parse_result_line("test foo ... ok"), None);
    }

    #[test]
    fn every_vm_ci_test_exists_in_its_suite() {
        for (suite, tests) in VM_SUITES {
            let target = suite.strip_prefix("lb-tests::").unwrap();
            let path = repo().join("tests/tests").join(format!("{target}.rs"));
            let src = std::fs::read_to_string(&path).unwrap();
            for t in *tests {
                assert!(
                    src.contains(&format!("fn {t}(")),
                    "{t} not in {}",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn package_names_come_from_both_id_formats() {
        assert_eq!(
            package_name("path+file:///work/main/tests#lb-tests@0.1.0"),
            "lb-tests"
        );
        assert_eq!(package_name("path+file:///work/main/xtask#0.1.0"), "xtask");
        assert_eq!(
            package_name("lb-user 0.1.0 (path+file:///work/main/lb-user)"),
            "lb-user"
        );
    }
}
