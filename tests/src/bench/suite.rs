//! `lb-bench all|throughput|connrate|latency|memory`: the contestants of
//! [`contestants`](super::contestants) on the same topology, one fresh cell per contestant and
//! round, rounds interleaved (round 1 of everyone, then round 2, ...) so that drifts of the machine
//! hit everyone alike. In each cell, in this order: iperf3 with 1 and 4 streams, a persistent
//! ping-pong, short Bolt sessions (connection rate and connect + first-byte latency), memory. The
//! sessions come last: a balancer that runs out of ports there (lb holds a closed flow's SNAT port
//! for its close timeout) would refuse the measurements after them.
//!
//! Around every measurement the cell is probed ([`probe::Snapshot`]): whole-machine busy CPU,
//! the XDP program's `bpf_stats`, the balancer process's CPU, lb's `new_flows` and the lb
//! namespace's `Ip: ForwDatagrams`. Honesty checks: in lb's cells, `new_flows` rose by at least the
//! connections the client opened and `ForwDatagrams` did not move (else the kernel, not lb, carried
//! the traffic); in every cell, each measurement produced data.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::contestants::{self, Balancer, Cell, Contestant};
use super::loadgen::{self, quantile, Sessions};
use super::probe::{self, MapMemory, Snapshot, Usage};

/// Sizes and durations of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    pub rounds: usize,
    /// iperf3 `-t` (whole seconds).
    pub iperf_s: u32,
    pub sessions_ms: u64,
    pub clients: usize,
    pub ping_ms: u64,
    pub throughput: bool,
    pub connrate: bool,
    pub latency: bool,
    pub memory: bool,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            rounds: 3,
            iperf_s: 4,
            sessions_ms: 4000,
            clients: 16,
            ping_ms: 2000,
            throughput: true,
            connrate: true,
            latency: true,
            memory: true,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            rounds: 1,
            iperf_s: 2,
            sessions_ms: 2000,
            ping_ms: 1000,
            ..Plan::full()
        }
    }

    /// Tiny durations: proves every cell runs, measures nothing worth reading.
    pub fn smoke() -> Plan {
        Plan {
            rounds: 1,
            iperf_s: 1,
            sessions_ms: 400,
            clients: 4,
            ping_ms: 200,
            ..Plan::full()
        }
    }
}

/// One honesty or completeness check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub phase: String,
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// One iperf3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub streams: u32,
    pub gbps: f64,
    pub retransmits: u64,
    pub usage: Usage,
}

/// Short sessions, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct SessionFigures {
    pub sessions: Sessions,
    pub per_s: f64,
    pub first_byte_p50_us: Option<u32>,
    pub first_byte_p99_us: Option<u32>,
    pub first_byte_p999_us: Option<u32>,
    pub session_p50_us: Option<u32>,
    pub usage: Usage,
}

/// Ping-pong, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct PingFigures {
    pub round_trips: u64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub usage: Usage,
}

/// Memory of the balancer.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// RSS of the balancer process (lb's agent or HAProxy), KiB.
    pub rss_kib: Option<u64>,
    /// lb: the XDP program's maps (configured table sizes).
    pub maps: Vec<MapMemory>,
    pub maps_bytes: u64,
}

/// Everything one cell recorded.
#[derive(Debug, Clone, Serialize)]
pub struct CellRecord {
    pub contestant: Contestant,
    pub round: usize,
    pub setup_s: f64,
    /// Busy CPUs (0..=cpus) of the whole machine over [`BACKGROUND`] with no traffic, right after
    /// setup: other work on the machine, subtracted from each measurement's busy time.
    pub background_busy_cpus: f64,
    /// `/proc/loadavg` after setup.
    pub loadavg: String,
    pub bolt_target: String,
    pub iperf_target: String,
    pub offloads: Vec<String>,
    pub throughput: Vec<Throughput>,
    pub sessions: Option<SessionFigures>,
    pub ping: Option<PingFigures>,
    pub memory: Option<Memory>,
    pub checks: Vec<Check>,
    pub errors: Vec<String>,
    pub config: String,
}

impl CellRecord {
    pub fn throughput(&self, streams: u32) -> Option<&Throughput> {
        self.throughput.iter().find(|t| t.streams == streams)
    }
}

/// Runs `plan` for `contestants`; `progress` gets a line per measurement.
pub fn run(plan: &Plan, contestants: &[Contestant]) -> Vec<CellRecord> {
    let mut out = Vec::new();
    for round in 0..plan.rounds {
        for &c in contestants {
            let t = Instant::now();
            let rec = run_cell(plan, c, round);
            eprintln!(
                "  {} round {}: {} ({:.1} s)",
                c.id(),
                round + 1,
                brief(&rec),
                t.elapsed().as_secs_f64()
            );
            out.push(rec);
        }
    }
    out
}

fn brief(r: &CellRecord) -> String {
    let mut parts = Vec::new();
    for t in &r.throughput {
        parts.push(format!("{}x {:.2} Gbit/s", t.streams, t.gbps));
    }
    if let Some(s) = &r.sessions {
        parts.push(format!(
            "{:.0} conn/s, p99 {} us",
            s.per_s,
            s.first_byte_p99_us.unwrap_or(0)
        ));
    }
    if let Some(p) = &r.ping {
        parts.push(format!("ping p50 {:.1} us", p.p50_us.unwrap_or(0.0)));
    }
    let failed: Vec<&Check> = r.checks.iter().filter(|c| !c.ok).collect();
    if !failed.is_empty() {
        parts.push(format!("{} FAILED CHECKS", failed.len()));
    }
    for e in &r.errors {
        parts.push(format!("ERROR {}", e.lines().next().unwrap_or("")));
    }
    parts.join(", ")
}

fn run_cell(plan: &Plan, c: Contestant, round: usize) -> CellRecord {
    let start = Instant::now();
    let mut rec = CellRecord {
        contestant: c,
        round,
        setup_s: 0.0,
        background_busy_cpus: 0.0,
        loadavg: String::new(),
        bolt_target: String::new(),
        iperf_target: String::new(),
        offloads: Vec::new(),
        throughput: Vec::new(),
        sessions: None,
        ping: None,
        memory: None,
        checks: Vec::new(),
        errors: Vec::new(),
        config: String::new(),
    };
    let cell = match contestants::setup(c, round) {
        Ok(cell) => cell,
        Err(e) => {
            rec.errors.push(format!("setup: {e:#}"));
            return rec;
        }
    };
    rec.setup_s = start.elapsed().as_secs_f64();
    rec.bolt_target = cell.bolt.to_string();
    rec.iperf_target = cell.iperf.to_string();
    rec.offloads = cell.offloads();
    rec.config = cell.config.clone();
    rec.loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    match background() {
        Ok(b) => rec.background_busy_cpus = b,
        Err(e) => rec.errors.push(format!("background CPU: {e:#}")),
    }
    let bg = rec.background_busy_cpus;
    let xdp_id = if c.is_lb() {
        match probe::xdp_prog_id(&cell.topo.lb.ns, &cell.topo.lb.ifaces[0]) {
            Ok(id) => Some(id),
            Err(e) => {
                rec.errors.push(format!("finding lb's XDP program: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    if plan.throughput {
        for streams in [1, 4] {
            let phase = format!("iperf3 -P {streams}");
            match measured(&cell, xdp_id, bg, || iperf(&cell, plan.iperf_s, streams)) {
                Ok(((gbps, retransmits), usage)) => {
                    honesty(&mut rec, &cell, &phase, &usage, u64::from(streams) + 1);
                    rec.checks.push(Check {
                        phase: phase.clone(),
                        what: "data".into(),
                        ok: gbps > 0.0,
                        detail: format!("{gbps:.3} Gbit/s"),
                    });
                    rec.throughput.push(Throughput {
                        streams,
                        gbps,
                        retransmits,
                        usage,
                    });
                }
                Err(e) => rec.errors.push(format!("{phase}: {e:#}")),
            }
        }
    }
    if plan.latency {
        let phase = "ping-pong".to_string();
        let (addr, dur) = (cell.bolt, Duration::from_millis(plan.ping_ms));
        let r = measured(&cell, xdp_id, bg, || {
            cell.topo
                .client
                .ns
                .run_in(move || loadgen::ping_pong(addr, dur))?
        });
        match r {
            Ok((mut p, usage)) => {
                honesty(&mut rec, &cell, &phase, &usage, 1);
                rec.checks.push(Check {
                    phase: phase.clone(),
                    what: "data".into(),
                    ok: p.round_trips > 0,
                    detail: format!("{} round trips", p.round_trips),
                });
                let (p50, p99) = (quantile(&mut p.rtt_us, 0.5), quantile(&mut p.rtt_us, 0.99));
                rec.ping = Some(PingFigures {
                    round_trips: p.round_trips,
                    p50_us: p50,
                    p99_us: p99,
                    usage,
                });
            }
            Err(e) => rec.errors.push(format!("{phase}: {e:#}")),
        }
    }
    if plan.connrate {
        let phase = "short sessions".to_string();
        let (addr, clients, dur) = (
            cell.bolt,
            plan.clients,
            Duration::from_millis(plan.sessions_ms),
        );
        let r = measured(&cell, xdp_id, bg, || {
            cell.topo
                .client
                .ns
                .run_in(move || loadgen::short_sessions(addr, clients, dur))?
        });
        match r {
            Ok((mut s, usage)) => {
                honesty(&mut rec, &cell, &phase, &usage, s.completed);
                rec.checks.push(Check {
                    phase: phase.clone(),
                    what: "data".into(),
                    ok: s.completed > 0,
                    detail: format!(
                        "{} completed, {} failed {:?}",
                        s.completed, s.failed, s.errors
                    ),
                });
                let per_s = s.completed as f64 / s.seconds.max(1e-9);
                let fb = &mut s.first_byte_us;
                let (p50, p99, p999) = (quantile(fb, 0.5), quantile(fb, 0.99), quantile(fb, 0.999));
                let session_p50 = quantile(&mut s.session_us, 0.5);
                rec.sessions = Some(SessionFigures {
                    sessions: s,
                    per_s,
                    first_byte_p50_us: p50,
                    first_byte_p99_us: p99,
                    first_byte_p999_us: p999,
                    session_p50_us: session_p50,
                    usage,
                });
            }
            Err(e) => rec.errors.push(format!("{phase}: {e:#}")),
        }
    }
    if plan.memory && round == 0 {
        match memory(&cell, xdp_id) {
            Ok(m) => rec.memory = m,
            Err(e) => rec.errors.push(format!("memory: {e:#}")),
        }
    }
    if let Err(e) = cell.ensure_alive() {
        rec.errors.push(format!("balancer died: {e:#}"));
    }
    rec
}

/// Runs `f` between two snapshots.
/// Runs `f` between two snapshots; the busy time of `background` CPUs over the wall time is
/// taken off the machine's busy time.
fn measured<T>(
    cell: &Cell,
    xdp_id: Option<u64>,
    background: f64,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Usage)> {
    let before = Snapshot::take(cell, xdp_id, true)?;
    let t = Instant::now();
    let out = f()?;
    let wall = t.elapsed().as_secs_f64();
    let after = Snapshot::take(cell, xdp_id, false)?;
    let mut usage = before.usage(&after, wall);
    usage.raw_busy_cpu_s = usage.busy_cpu_s;
    usage.busy_cpu_s = (usage.busy_cpu_s - background * wall).max(0.0);
    Ok((out, usage))
}

/// How long the machine is watched with no traffic before a cell's measurements.
pub const BACKGROUND: Duration = Duration::from_millis(500);

/// Busy CPUs of the whole machine over [`BACKGROUND`].
pub fn background() -> Result<f64> {
    let a = probe::machine_cpu()?;
    let t = Instant::now();
    std::thread::sleep(BACKGROUND);
    let b = probe::machine_cpu()?;
    Ok((b.busy_s - a.busy_s) / t.elapsed().as_secs_f64())
}

/// The honesty checks of lb's cells; other cells only record `ForwDatagrams`.
fn honesty(rec: &mut CellRecord, cell: &Cell, phase: &str, usage: &Usage, connections: u64) {
    if !cell.contestant.is_lb() {
        return;
    }
    let flows = usage.new_flows.unwrap_or(0);
    rec.checks.push(Check {
        phase: phase.to_string(),
        what: "lb new_flows rose by the client's connections".into(),
        ok: flows >= connections,
        detail: format!("new_flows +{flows}, connections {connections}"),
    });
    rec.checks.push(Check {
        phase: phase.to_string(),
        what: "lb namespace Ip: ForwDatagrams did not rise".into(),
        ok: usage.lb_ns_forw_datagrams == 0,
        detail: format!("ForwDatagrams +{}", usage.lb_ns_forw_datagrams),
    });
}

/// iperf3 from the client namespace: (Gbit/s received, retransmits).
fn iperf(cell: &Cell, seconds: u32, streams: u32) -> Result<(f64, u64)> {
    let target: SocketAddrV4 = cell.iperf;
    let out = cell.topo.client.ns.exec(&[
        "iperf3",
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ])?;
    let v: Value = serde_json::from_slice(&out.stdout).context("parsing iperf3 -J")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no sum_received")?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    ensure!(bps > 0.0, "iperf3 moved no data");
    Ok((bps / 1e9, retransmits))
}

fn memory(cell: &Cell, xdp_id: Option<u64>) -> Result<Option<Memory>> {
    let rss = cell.balancer_pid().map(probe::rss_kib).transpose()?;
    let maps = match (&cell.balancer, xdp_id) {
        (Balancer::Lb(_), Some(id)) => probe::prog_maps(id)?,
        _ => Vec::new(),
    };
    if rss.is_none() && maps.is_empty() {
        return Ok(None);
    }
    let maps_bytes = maps.iter().map(|m| m.bytes_memlock).sum();
    Ok(Some(Memory {
        rss_kib: rss,
        maps,
        maps_bytes,
    }))
}
