//! `lb-bench idle`: a million idle established flows in lb's tables. The flows are written
//! straight into the running agent's pinned table (fake clients and backends: nothing sends on
//! them) with the checks running at `inter 250ms rise 1 fall 1`; then the bench watches: the
//! checks' latency and whether any backend changed state (a GC pass that held up the checks
//! would show as a late check or a flap), the agent's CPU and RSS, new connections through the
//! write VIP, and how long after the idle timeout the table drained.

use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::contestants::WRITE_PORT;
use super::failover;
use super::handshakes::{self, bolt_handshake};
use super::probe;
use crate::harness::{Shape, Topology, TopologyOptions};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub flows: u32,
    /// `[timeouts] idle`, seconds.
    pub idle_s: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    pub flows: u32,
    pub fill_s: f64,
    pub rss_before_kib: u64,
    pub rss_full_kib: u64,
    /// The agent's peak RSS (VmHWM) by the end of the watch: a pass holds a snapshot of the
    /// table while it runs.
    pub rss_peak_kib: u64,
    /// Agent CPU, fraction of one CPU, with empty tables and with the flows (before they expire).
    pub agent_cpu_empty: f64,
    pub agent_cpu_full: f64,
    /// Largest check latency seen per (service, backend) while the flows were in the table.
    pub max_check_latency_ms: BTreeMap<String, f64>,
    /// (up, in set) changes of any (service, backend) while the flows were in the table.
    pub state_changes: u64,
    pub health_samples: u64,
    /// New connections through the write VIP while the flows were in the table.
    pub connections_ok: u64,
    pub connections_failed: u64,
    /// Seconds from the fill to a table below 1 % of the flows (the idle timeout plus the GC's
    /// lag).
    pub drained_after_s: Option<f64>,
    pub error: Option<String>,
}

/// Per (service, backend): (up, in set) and the last check's latency.
fn health(instance: &str) -> Result<Vec<(String, bool, bool, f64)>> {
    let s = lb_user::status::snapshot(instance)?;
    Ok(s.health
        .iter()
        .map(|h| {
            (
                format!("{}/{}", h.service, h.backend),
                h.up,
                h.in_set,
                h.latency_ms,
            )
        })
        .collect())
}

fn established_entries(instance: &str) -> Result<usize> {
    Ok(lb_user::status::census(instance)?.established.entries)
}

pub fn run(plan: &Plan) -> Record {
    let mut rec = Record {
        flows: plan.flows,
        ..Record::default()
    };
    if let Err(e) = measure(plan, &mut rec) {
        rec.error = Some(format!("{e:#}"));
    }
    rec
}

fn measure(plan: &Plan, rec: &mut Record) -> Result<()> {
    let topo = Topology::new("idle_flows", Shape::TwoArmed, TopologyOptions::default())?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let entries = u64::from(plan.flows) * 2 + 100_000;
    let cfg = format!(
        "{}\n[tables]\nestablished = {entries}\n[timeouts]\nidle = \"{}s\"\n",
        failover::lb_config(&topo, true),
        plan.idle_s
    );
    let lb = topo
        .start_lb(&cfg, &["--xdp-mode", "native"])
        .context("lb did not start")?;
    let pid = lb.process.pid();
    let target = SocketAddr::V4(SocketAddrV4::new(topo.vip, WRITE_PORT));
    let hs = bolt_handshake();
    // Checks settled: every configured pair checked.
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&topo.instance)?.len() < 6 {
        if Instant::now() > deadline {
            bail!("the checks did not settle within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    rec.rss_before_kib = probe::rss_kib(pid)?;
    let (c0, t0) = (probe::process_cpu_s(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    rec.agent_cpu_empty = (probe::process_cpu_s(pid)? - c0) / t0.elapsed().as_secs_f64();

    let t = Instant::now();
    topo.fill_with_idle_flows(plan.flows, WRITE_PORT, 0, 0)?;
    rec.fill_s = t.elapsed().as_secs_f64();
    let filled = Instant::now();
    eprintln!("  {} idle flows written in {:.1} s", plan.flows, rec.fill_s);

    // Watch until the flows are about to expire.
    let watch_until = filled + Duration::from_secs(plan.idle_s.saturating_sub(2).max(1));
    let mut last: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let (c0, t0) = (probe::process_cpu_s(pid)?, Instant::now());
    while Instant::now() < watch_until {
        for (pair, up, in_set, latency) in health(&topo.instance)? {
            rec.health_samples += 1;
            let m = rec.max_check_latency_ms.entry(pair.clone()).or_default();
            *m = m.max(latency);
            if let Some(prev) = last.insert(pair, (up, in_set)) {
                if prev != (up, in_set) {
                    rec.state_changes += 1;
                }
            }
        }
        let ok = topo
            .client
            .ns
            .run_in(|| handshakes::one(target, &hs, Duration::from_secs(3)).is_ok())?;
        if ok {
            rec.connections_ok += 1;
        } else {
            rec.connections_failed += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    rec.agent_cpu_full = (probe::process_cpu_s(pid)? - c0) / t0.elapsed().as_secs_f64();
    rec.rss_full_kib = probe::rss_kib(pid)?;
    rec.rss_peak_kib = probe::peak_rss_kib(pid)?;

    // Expiry: the table drains after the idle timeout.
    let give_up = filled + Duration::from_secs(plan.idle_s + 30);
    while Instant::now() < give_up {
        let n = established_entries(&topo.instance)?;
        if n < (plan.flows as usize) / 50 {
            rec.drained_after_s = Some(filled.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    lb.process.stop()?;
    for suffix in ["json", "host.json"] {
        let _ = std::fs::remove_file(format!("/run/lb/{}.{suffix}", topo.instance));
    }
    Ok(())
}

/// The markdown section (heading included).
pub fn report(plan: &Plan, r: &Record, command: &str, date: &str) -> String {
    let mut md = format!(
        "## lb-bench idle: {} idle established flows in the tables\n\n",
        plan.flows
    );
    if let Some(e) = &r.error {
        md += &format!("MISSING: {}\n", e.lines().next().unwrap_or(""));
        return md;
    }
    let worst = r
        .max_check_latency_ms
        .values()
        .copied()
        .fold(0.0_f64, f64::max);
    md += "| figure | value |\n|---|---|\n";
    md += &format!(
        "| flows written (2 entries each, through the pinned map) | {} in {:.1} s |\n",
        r.flows, r.fill_s
    );
    md += &format!(
        "| agent RSS, empty tables / with the flows between passes / peak (during a pass) | {:.1} MiB / {:.1} MiB / {:.1} MiB |\n",
        r.rss_before_kib as f64 / 1024.0,
        r.rss_full_kib as f64 / 1024.0,
        r.rss_peak_kib as f64 / 1024.0
    );
    md += &format!(
        "| agent CPU, empty tables / with the flows | {:.1} % / {:.1} % of one CPU |\n",
        100.0 * r.agent_cpu_empty,
        100.0 * r.agent_cpu_full
    );
    md += &format!(
        "| slowest check seen (6 checks every 250 ms, timeout 250 ms; {} samples) | {worst:.1} ms |\n",
        r.health_samples
    );
    md += &format!(
        "| backend state changes while the flows were in the table | {} |\n",
        r.state_changes
    );
    md += &format!(
        "| new connections through the write VIP meanwhile | {} ok, {} failed |\n",
        r.connections_ok, r.connections_failed
    );
    md += &format!(
        "| table below 2 % of the flows (idle timeout {} s) | {} |\n",
        plan.idle_s,
        r.drained_after_s
            .map_or("not within 30 s after the timeout".into(), |s| format!(
                "{s:.1} s after the fill"
            ))
    );
    md += &format!(
        "\nlb with the failover bench's configuration at `inter 250ms rise 1 fall 1` (the manual's checks, faster), `[tables] established` sized for the flows, `[timeouts] idle = \"{}s\"`; the flows are fake (10.111.x.x clients, 10.222.x.x backends) and idle from the moment they are written. Health read from the agent's pinned mirror every 100 ms, one handshake-only connection through the write VIP each time. {date}. Command: `{command}`.\n",
        plan.idle_s
    );
    md
}
