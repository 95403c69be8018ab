//! `lb-bench churn`: the machine's full connection rate, sustained. The native client of
//! [`handshakes`](super::handshakes) opens handshake-only Bolt connections from N threads for a
//! minute against: the direct path (db01, no balancer; routed by the kernel through the lb
//! namespace, the baseline, and over a leg that bypasses it), lb's write VIP (one backend), lb's
//! `read-all` VIP (three backends) and HAProxy 2.6 with the manual's configuration (write VIP).
//! One fresh cell per row and round, rounds interleaved.
//!
//! Per row: connections per second over the run and its slowest and fastest 10-second window
//! (ports that run out over time show as a sagging window), failures by kind, connect-to-answer
//! p50/p99, the whole machine's busy CPU per connection and what the balancer adds to the direct
//! path's, the balancer process's own CPU per connection (lb's agent: the flow lifecycle's cost
//! in userspace) and the XDP program's run time per packet (`bpf_stats`).

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::contestants::{self, Cell, Contestant, READ_ALL_PORT, WRITE_PORT};
use super::handshakes::{self, Handshakes};
use super::loadgen::quantile;
use super::probe::{self, Usage};
use super::report::fmt;
use super::stats::{median, spread, Spread};
use crate::harness::xdp_pass::XdpPass;

/// The rows of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Row {
    Routed,
    RoutedAll,
    Direct,
    LbWrite,
    LbRead,
    HaproxyWrite,
    /// The write VIP with lb attached in generic (skb) mode: only when named (`--only`).
    LbWriteGeneric,
    /// [`Row::Routed`] with `lb_pass` (XDP_PASS, nothing else) attached natively to the lb
    /// namespace's interfaces: what any native XDP program costs on veth before it does
    /// anything (the frame's conversion to and from an XDP buffer). Only when named.
    RoutedXdpPass,
}

impl Row {
    /// Every row a run without `--only` measures: all but the last two.
    pub const ALL: &[Row] = Row::NAMED.split_at(6).0;

    /// Rows `--only` may name: [`Row::ALL`], then the generic-mode write row and the XDP floor.
    pub const NAMED: [Row; 8] = [
        Row::Routed,
        Row::RoutedAll,
        Row::Direct,
        Row::LbWrite,
        Row::LbRead,
        Row::HaproxyWrite,
        Row::LbWriteGeneric,
        Row::RoutedXdpPass,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Row::Routed => "routed",
            Row::RoutedAll => "routed-all",
            Row::Direct => "direct",
            Row::LbWrite => "lb-write",
            Row::LbRead => "lb-read",
            Row::HaproxyWrite => "haproxy-write",
            Row::LbWriteGeneric => "lb-write-generic",
            Row::RoutedXdpPass => "routed-xdp-pass",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Routed => "direct: kernel routing through the lb namespace (no balancer, db01)",
            Row::RoutedAll => {
                "direct to db01..db03 in turn, routed the same way (the read VIP's baseline)"
            }
            Row::Direct => {
                "direct leg: client to the backends' segment, bypassing the lb namespace"
            }
            Row::LbWrite => "lb, write VIP (1 backend)",
            Row::LbRead => "lb, read VIP (3 backends)",
            Row::HaproxyWrite => "HAProxy 2.6, manual config, write VIP",
            Row::LbWriteGeneric => "lb, write VIP (1 backend), generic XDP",
            Row::RoutedXdpPass => {
                "direct, routed as above, with an XDP_PASS program on the lb namespace's veths"
            }
        }
    }

    pub fn parse(s: &str) -> Result<Row> {
        Row::NAMED
            .into_iter()
            .find(|r| r.id() == s)
            .with_context(|| {
                let ids: Vec<&str> = Row::NAMED.iter().map(|r| r.id()).collect();
                format!("unknown row {s:?} (one of {})", ids.join(", "))
            })
    }

    fn contestant(self) -> Contestant {
        match self {
            Row::Routed | Row::RoutedAll | Row::Direct | Row::RoutedXdpPass => Contestant::Direct,
            Row::LbWrite | Row::LbRead => Contestant::LbNative,
            Row::LbWriteGeneric => Contestant::LbGeneric,
            Row::HaproxyWrite => Contestant::Haproxy,
        }
    }

    fn targets(self, cell: &Cell) -> Result<Vec<SocketAddrV4>> {
        Ok(match self {
            Row::LbRead => vec![SocketAddrV4::new(cell.topo.vip, READ_ALL_PORT)],
            Row::LbWrite | Row::LbWriteGeneric | Row::HaproxyWrite => {
                vec![SocketAddrV4::new(cell.topo.vip, WRITE_PORT)]
            }
            Row::Routed | Row::Direct | Row::RoutedXdpPass => vec![cell.bolt],
            Row::RoutedAll => ["db01", "db02", "db03"]
                .iter()
                .map(|n| {
                    Ok(SocketAddrV4::new(
                        cell.topo.backend(n)?.addr,
                        cell.bolt.port(),
                    ))
                })
                .collect::<Result<_>>()?,
        })
    }

    /// The routed rows' extra setup: the client reaches the backends through the lb namespace,
    /// which forwards (no balancer there), and they answer back the same way. The XDP floor
    /// row's programs stay attached while the returned value lives.
    fn prepare(self, cell: &Cell) -> Result<Option<XdpPass>> {
        let backends: &[&str] = match self {
            Row::Routed | Row::RoutedXdpPass => &["db01"],
            Row::RoutedAll => &["db01", "db02", "db03"],
            _ => return Ok(None),
        };
        let topo = &cell.topo;
        for name in backends {
            let b = topo.backend(name)?;
            topo.client.ns.ip(&[
                "route",
                "add",
                &format!("{}/32", b.addr),
                "via",
                &topo.lb.client_addr.to_string(),
            ])?;
            b.ns.ip(&[
                "route",
                "add",
                &format!("{}/32", topo.client.addr),
                "via",
                &topo.lb.backend_addr.to_string(),
            ])?;
        }
        topo.lb.ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.conf.l0.forwarding=1",
            "net.ipv4.conf.l1.forwarding=1",
        ])?;
        if self != Row::RoutedXdpPass {
            return Ok(None);
        }
        let mut pass = XdpPass::load()?;
        for iface in &topo.lb.ifaces {
            pass.attach(&topo.lb.ns, iface)?;
        }
        Ok(Some(pass))
    }
}

/// Sizes of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub seconds: u64,
    pub threads: usize,
    pub rounds: usize,
    pub rows: Vec<Row>,
}

/// One row's run.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub row: Row,
    pub round: usize,
    pub target: String,
    pub handshakes: Option<Handshakes>,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
    pub usage: Option<Usage>,
    /// Busy CPUs with no traffic before the run (subtracted from `usage`).
    pub background_busy_cpus: f64,
    pub errors: Vec<String>,
    pub checks: Vec<(String, bool)>,
    /// lb: refusals, drops and flow-lifecycle counters that moved during the run.
    pub lb_counters: Vec<(String, u64)>,
}

impl Record {
    fn rate(&self) -> Option<f64> {
        self.handshakes.as_ref().map(Handshakes::rate)
    }

    /// Machine busy CPU per completed connection, µs.
    fn machine_us(&self) -> Option<f64> {
        let (h, u) = (self.handshakes.as_ref()?, self.usage.as_ref()?);
        (h.completed > 0).then(|| u.busy_cpu_s * 1e6 / h.completed as f64)
    }

    fn balancer_us(&self) -> Option<f64> {
        let (h, u) = (self.handshakes.as_ref()?, self.usage.as_ref()?);
        let cpu = u.balancer_cpu_s?;
        (h.completed > 0).then(|| cpu * 1e6 / h.completed as f64)
    }

    fn xdp_ns_per_packet(&self) -> Option<f64> {
        let u = self.usage.as_ref()?;
        let (t, n) = (u.xdp_run_time_ns?, u.xdp_run_cnt?);
        (n > 0).then(|| t as f64 / n as f64)
    }

    fn xdp_packets_per_connection(&self) -> Option<f64> {
        let (h, u) = (self.handshakes.as_ref()?, self.usage.as_ref()?);
        let n = u.xdp_run_cnt?;
        (h.completed > 0).then(|| n as f64 / h.completed as f64)
    }
}

/// Runs the plan; one record per row and round.
pub fn run(plan: &Plan) -> Vec<Record> {
    let mut out = Vec::new();
    for round in 0..plan.rounds {
        for &row in &plan.rows {
            let t = Instant::now();
            let rec = run_row(plan, row, round);
            eprintln!(
                "  {} round {}: {} ({:.1} s)",
                row.id(),
                round + 1,
                brief(&rec),
                t.elapsed().as_secs_f64()
            );
            out.push(rec);
        }
    }
    out
}

fn brief(r: &Record) -> String {
    let mut parts = Vec::new();
    if let Some(h) = &r.handshakes {
        parts.push(format!(
            "{:.0} conn/s, {} failed {:?}, p50 {} us",
            h.rate(),
            h.failed,
            h.errors,
            r.p50_us.unwrap_or(0)
        ));
    }
    if !r.lb_counters.is_empty() {
        parts.push(format!("{:?}", r.lb_counters));
    }
    if let Some(us) = r.balancer_us() {
        parts.push(format!("balancer process {us:.2} us/conn"));
    }
    if let Some(us) = r.machine_us() {
        parts.push(format!("machine {us:.1} us/conn"));
    }
    for e in &r.errors {
        parts.push(format!("ERROR {}", e.lines().next().unwrap_or("")));
    }
    parts.join(", ")
}

fn run_row(plan: &Plan, row: Row, round: usize) -> Record {
    let mut rec = Record {
        row,
        round,
        target: String::new(),
        handshakes: None,
        p50_us: None,
        p99_us: None,
        usage: None,
        background_busy_cpus: 0.0,
        errors: Vec::new(),
        checks: Vec::new(),
        lb_counters: Vec::new(),
    };
    if let Err(e) = measure(plan, row, round, &mut rec) {
        rec.errors.push(format!("{e:#}"));
    }
    rec
}

fn measure(plan: &Plan, row: Row, round: usize, rec: &mut Record) -> Result<()> {
    let cell = contestants::setup(row.contestant(), round)
        .with_context(|| format!("setting up {}", row.id()))?;
    let _xdp_floor = row.prepare(&cell)?;
    let targets = row.targets(&cell)?;
    // One answered connection per target before the clock starts: the routed rows' first
    // SYNs meet unresolved neighbours and wait for their retransmit (1 s), which would cost
    // the baseline a whole second of its run.
    let warm = targets.clone();
    cell.topo.client.ns.run_in(move || -> Result<()> {
        let hs = handshakes::bolt_handshake();
        for t in &warm {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) =
                handshakes::one(std::net::SocketAddr::V4(*t), &hs, Duration::from_secs(2))
            {
                if Instant::now() > deadline {
                    bail!("{t} did not answer within 5 s: {e}");
                }
            }
        }
        Ok(())
    })??;
    rec.target = targets
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    rec.background_busy_cpus = super::suite::background()?;
    let xdp_id = if row.contestant().is_lb() {
        Some(probe::xdp_prog_id(
            &cell.topo.lb.ns,
            &cell.topo.lb.ifaces[0],
        )?)
    } else {
        None
    };
    let (threads, dur) = (plan.threads, Duration::from_secs(plan.seconds));
    let counters_before = if row.contestant().is_lb() {
        Some(probe::lb_counters(&cell.topo)?)
    } else {
        None
    };
    let before = probe::Snapshot::take(&cell, xdp_id, true)?;
    let t = Instant::now();
    let mut h = cell
        .topo
        .client
        .ns
        .run_in(move || handshakes::run(&targets, threads, dur))??;
    let wall = t.elapsed().as_secs_f64();
    let after = probe::Snapshot::take(&cell, xdp_id, false)?;
    let mut usage = before.usage(&after, wall);
    usage.busy_cpu_s = (usage.busy_cpu_s - rec.background_busy_cpus * wall).max(0.0);
    if h.completed == 0 {
        bail!("no connection completed: {:?}", h.errors);
    }
    if row.contestant().is_lb() {
        let flows = usage.new_flows.unwrap_or(0);
        rec.checks.push((
            format!("lb new_flows +{flows} >= {} connections", h.completed),
            flows >= h.completed,
        ));
        rec.checks.push((
            format!(
                "lb namespace ForwDatagrams +{} (the kernel forwarded nothing)",
                usage.lb_ns_forw_datagrams
            ),
            usage.lb_ns_forw_datagrams == 0,
        ));
    }
    if let Some(b) = &counters_before {
        rec.lb_counters = probe::lifecycle_moves(b, &probe::lb_counters(&cell.topo)?);
    }
    cell.ensure_alive().context("the balancer died")?;
    rec.p50_us = quantile(&mut h.latency_us, 0.5);
    rec.p99_us = quantile(&mut h.latency_us, 0.99);
    rec.handshakes = Some(h);
    rec.usage = Some(usage);
    Ok(())
}

fn spread_of(records: &[&Record], f: impl Fn(&Record) -> Option<f64>) -> Option<Spread> {
    spread(&records.iter().map(|r| f(r)).collect::<Vec<_>>())
}

/// The row `row` is compared with: kernel routing through the lb namespace (the same hops as
/// through a balancer) to the same backends, else the direct leg.
fn baseline(records: &[Record], row: Row) -> Row {
    let has = |r: Row| records.iter().any(|x| x.row == r);
    if row == Row::LbRead && has(Row::RoutedAll) {
        Row::RoutedAll
    } else if has(Row::Routed) {
        Row::Routed
    } else {
        Row::Direct
    }
}

/// Per round, `f` of this row's record combined (`op`) with `f` of the baseline's record.
fn against(
    records: &[Record],
    row: Row,
    f: impl Fn(&Record) -> Option<f64> + Copy,
    op: impl Fn(f64, f64) -> f64,
) -> Option<Spread> {
    let base = baseline(records, row);
    let per_round: Vec<Option<f64>> = records
        .iter()
        .filter(|r| r.row == row)
        .map(|r| {
            let d = records
                .iter()
                .find(|d| d.row == base && d.round == r.round)?;
            Some(op(f(r)?, f(d)?))
        })
        .collect();
    spread(&per_round)
}

/// Per round, `f` of this row's record minus the baseline's.
fn added(
    records: &[Record],
    row: Row,
    f: impl Fn(&Record) -> Option<f64> + Copy,
) -> Option<Spread> {
    against(records, row, f, |a, b| a - b)
}

/// The markdown section (heading included).
pub fn report(plan: &Plan, records: &[Record], command: &str, date: &str) -> String {
    let mut md = format!(
        "## lb-bench churn: handshake-only connections for {} s ({} round{}, medians, min-max in brackets)\n\n",
        plan.seconds,
        plan.rounds,
        if plan.rounds == 1 { "" } else { "s" }
    );
    md += "| path | connections/s | × direct | slowest / fastest 10 s window, conn/s | failed | connect→answer p50 / p99, µs | p50 added vs direct, µs | machine CPU µs per connection | added vs direct | added × HAProxy's added | balancer process CPU µs per connection | XDP ns per packet (packets per connection) | lb's refusals, drops and flow ends (all rounds) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let haproxy_added = added(records, Row::HaproxyWrite, Record::machine_us).map(|s| s.median);
    for &row in &plan.rows {
        let rs: Vec<&Record> = records.iter().filter(|r| r.row == row).collect();
        if rs.is_empty() {
            continue;
        }
        let ratio = against(records, row, Record::rate, |a, b| a / b);
        let is_base =
            matches!(row, Row::Routed | Row::RoutedAll) || row == baseline(records, Row::LbWrite);
        let windows: Vec<(f64, f64)> = rs
            .iter()
            .filter_map(|r| r.handshakes.as_ref()?.window_rates(10))
            .collect();
        let window = match (
            median(&windows.iter().map(|w| w.0).collect::<Vec<_>>()),
            median(&windows.iter().map(|w| w.1).collect::<Vec<_>>()),
        ) {
            (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
            _ => "-".into(),
        };
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed = 0;
        for r in &rs {
            if let Some(h) = &r.handshakes {
                failed += h.failed;
                for (k, n) in &h.errors {
                    *failures.entry(k.clone()).or_default() += n;
                }
            }
        }
        let failed = if failed == 0 {
            "0".to_string()
        } else {
            let kinds: Vec<String> = failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("{failed} ({})", kinds.join(", "))
        };
        let added_machine = added(records, row, Record::machine_us);
        let vs_haproxy = match (added_machine, haproxy_added) {
            (Some(a), Some(h)) if h > 0.0 && row.contestant() != Contestant::Direct => {
                format!("×{:.2}", a.median / h)
            }
            _ => "-".into(),
        };
        let xdp = match (
            spread_of(&rs, Record::xdp_ns_per_packet),
            spread_of(&rs, Record::xdp_packets_per_connection),
        ) {
            (Some(ns), Some(p)) => format!("{} ({:.1})", fmt(Some(ns), 0), p.median),
            _ => "-".into(),
        };
        let mut moved: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &rs {
            for (n, d) in &r.lb_counters {
                *moved.entry(n).or_default() += d;
            }
        }
        let moved = if row.contestant().is_lb() {
            let v: Vec<String> = moved.iter().map(|(n, d)| format!("{n} +{d}")).collect();
            v.join(", ")
        } else {
            "-".into()
        };
        md += &format!(
            "| {} | {} | ×{} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.label(),
            fmt(spread_of(&rs, Record::rate), 0),
            fmt(ratio, 2),
            window,
            failed,
            fmt(spread_of(&rs, |r| r.p50_us.map(f64::from)), 0),
            fmt(spread_of(&rs, |r| r.p99_us.map(f64::from)), 0),
            if is_base {
                "-".into()
            } else {
                fmt(added(records, row, |r| r.p50_us.map(f64::from)), 0)
            },
            fmt(spread_of(&rs, Record::machine_us), 1),
            if is_base {
                "-".into()
            } else {
                fmt(added_machine, 1)
            },
            vs_haproxy,
            fmt(spread_of(&rs, Record::balancer_us), 2),
            xdp,
            moved,
        );
    }
    let checks: Vec<&(String, bool)> = records.iter().flat_map(|r| &r.checks).collect();
    let failed_checks: Vec<&&(String, bool)> = checks.iter().filter(|c| !c.1).collect();
    md += &format!(
        "\n{} of {} honesty checks passed (lb's `new_flows` rose by at least the connections completed; the lb namespace's `Ip: ForwDatagrams` stayed put).\n",
        checks.len() - failed_checks.len(),
        checks.len()
    );
    for c in failed_checks {
        md += &format!("- FAILED: {}\n", c.0);
    }
    for r in records {
        for e in &r.errors {
            md += &format!(
                "- MISSING: {} round {}: {}\n",
                r.row.id(),
                r.round + 1,
                e.lines().next().unwrap_or("")
            );
        }
    }
    md += &format!(
        "\n{} client threads, each: connect, send the 20-byte Bolt handshake, read the 4-byte answer, close (client first), in a loop; blocking sockets, one OS thread each, 3 s timeout per step. Server: the simulator on db01 (db01..db03 for the read VIP). lb: native XDP, static sets (write 7680 -> db01, read-all 7682 -> db01, db02, db03), default tables and SNAT range. HAProxy: the manual's configuration, checks on. Client namespace: tcp_tw_reuse=1, ports 1024-65000. Machine CPU: /proc/stat busy time over the run less the idle machine's background, per completed connection; `× direct` and `added` compare with kernel routing through the lb namespace (the same hops as through a balancer) in the same round: to db01 for the write rows, to db01..db03 in turn for the read VIP; the direct leg crosses one veth pair fewer. Balancer process: lb's agent or HAProxy, /proc/PID/stat. {date}. Command: `{command}`.\n",
        plan.threads
    );
    md
}
