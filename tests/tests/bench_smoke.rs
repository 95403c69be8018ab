//! `lb-bench all --quick --smoke` runs every cell of the benchmark (direct, lb native and generic,
//! HAProxy, nftables; throughput, short sessions, ping-pong, memory, XDP cost per packet) with tiny
//! durations. It fails on a missing cell or a failed honesty check (lb's `new_flows` did not rise
//! by the client's connections, or the kernel forwarded the traffic), never on a number.
use std::process::Command;

use anyhow::{ensure, Context, Result};

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn every_benchmark_cell_runs_and_passes_its_honesty_checks() -> Result<()> {
    // Cargo builds the bench binary for integration tests of its package.
    let bin = env!("CARGO_BIN_EXE_lb-bench");
    let out = Command::new(bin)
        .args(["all", "--quick", "--smoke"])
        .output()
        .with_context(|| format!("running {bin}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "lb-bench all --quick --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for heading in [
        "### Throughput, connections, latency",
        "### CPU",
        "### XDP program cost per packet",
        "### Memory",
        "passed (in lb's cells",
    ] {
        ensure!(stdout.contains(heading), "no {heading:?} in:\n{stdout}");
    }
    ensure!(
        !stdout.contains("FAILED:") && !stdout.contains("MISSING:"),
        "{stdout}"
    );
    let raw = lb_tests::harness::repo_root().join("target/bench/all-smoke.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&raw)?)?;
    let cells = v["cells"].as_array().context("no cells")?;
    ensure!(cells.len() == 6, "{} cells instead of 6", cells.len());
    Ok(())
}

/// Runs `lb-bench ARGS` and returns its stdout; fails on a non-zero exit.
fn lb_bench(args: &[&str]) -> Result<String> {
    let bin = env!("CARGO_BIN_EXE_lb-bench");
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {bin}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "lb-bench {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_churn_and_syn_flood_benches_run_end_to_end() -> Result<()> {
    // One second per row, the rows that exercise the most code: a ratio against the routed
    // baseline, lb's counters; 2,000 SYN/s against lb importing the manual.
    let churn = lb_bench(&["churn", "--seconds", "1", "--only", "routed,lb-write"])?;
    ensure!(
        churn.contains("| lb, write VIP (1 backend) |") && !churn.contains("MISSING:"),
        "{churn}"
    );
    ensure!(churn.contains("2 of 2 honesty checks passed"), "{churn}");
    let flood = lb_bench(&[
        "synflood",
        "--seconds",
        "1",
        "--rates",
        "2000",
        "--only",
        "lb-imported",
    ])?;
    ensure!(
        flood.contains("kept,") && !flood.contains("MISSING:"),
        "{flood}"
    );
    Ok(())
}
