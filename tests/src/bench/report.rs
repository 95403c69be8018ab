//! The markdown report of `lb-bench all`: medians over rounds with their spread, every figure
//! also as a ratio (or difference) against the baseline measured in the same round.

use std::collections::BTreeMap;

use serde::Serialize;

use super::contestants::Contestant;
use super::cost::CostRound;
use super::stats::{spread, Spread};
use super::suite::CellRecord;

/// The per-round values of `f` for contestant `c`, in round order.
fn values(
    recs: &[CellRecord],
    c: Contestant,
    rounds: usize,
    f: &dyn Fn(&CellRecord) -> Option<f64>,
) -> Vec<Option<f64>> {
    (0..rounds)
        .map(|r| {
            recs.iter()
                .find(|x| x.contestant == c && x.round == r)
                .and_then(f)
        })
        .collect()
}

/// Per-round `op(f(c), f(base))`, summarised.
fn against(
    recs: &[CellRecord],
    c: Contestant,
    base: Contestant,
    rounds: usize,
    f: &dyn Fn(&CellRecord) -> Option<f64>,
    op: fn(f64, f64) -> f64,
) -> Option<Spread> {
    let a = values(recs, c, rounds, f);
    let b = values(recs, base, rounds, f);
    spread(
        &a.iter()
            .zip(&b)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => Some(op(*a, *b)),
                _ => None,
            })
            .collect::<Vec<_>>(),
    )
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

fn minus(a: f64, b: f64) -> f64 {
    a - b
}

/// `median` with `(min-max)` over several rounds; `-` when absent.
pub fn fmt(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n > 1 => format!(
            "{:.d$} ({:.d$}-{:.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        Some(s) => format!("{:.d$}", s.median, d = decimals),
    }
}

fn fmt_ratio(s: Option<Spread>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n > 1 => format!("×{:.2} ({:.2}-{:.2})", s.median, s.min, s.max),
        Some(s) => format!("×{:.2}", s.median),
    }
}

fn fmt_diff(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n > 1 => format!(
            "{:+.d$} ({:+.d$} to {:+.d$})",
            s.median,
            s.min,
            s.max,
            d = decimals
        ),
        Some(s) => format!("{:+.d$}", s.median, d = decimals),
    }
}

// The figures, per cell.
fn gbps(streams: u32) -> impl Fn(&CellRecord) -> Option<f64> {
    move |r| r.throughput(streams).map(|t| t.gbps)
}
fn conn_rate(r: &CellRecord) -> Option<f64> {
    r.sessions.as_ref().map(|s| s.per_s)
}
/// Percentage of session attempts that failed (refused, reset, timed out).
fn failed_pct(r: &CellRecord) -> Option<f64> {
    let s = &r.sessions.as_ref()?.sessions;
    let n = s.attempts();
    (n > 0).then(|| s.failed as f64 * 100.0 / n as f64)
}
fn fb(q: u8) -> impl Fn(&CellRecord) -> Option<f64> {
    move |r| {
        let s = r.sessions.as_ref()?;
        match q {
            50 => s.first_byte_p50_us,
            99 => s.first_byte_p99_us,
            _ => s.first_byte_p999_us,
        }
        .map(f64::from)
    }
}
fn ping(q: u8) -> impl Fn(&CellRecord) -> Option<f64> {
    move |r| {
        let p = r.ping.as_ref()?;
        if q == 50 {
            p.p50_us
        } else {
            p.p99_us
        }
    }
}
/// Whole-machine busy CPU milliseconds per Gbit moved (4 streams).
fn cpu_ms_per_gbit(r: &CellRecord) -> Option<f64> {
    let t = r.throughput(4)?;
    let gbit = t.gbps * t.usage.wall_s;
    (gbit > 0.0).then(|| t.usage.busy_cpu_s * 1000.0 / gbit)
}
/// Whole-machine busy CPU microseconds per short session.
fn cpu_us_per_conn(r: &CellRecord) -> Option<f64> {
    let s = r.sessions.as_ref()?;
    (s.sessions.completed > 0).then(|| s.usage.busy_cpu_s * 1e6 / s.sessions.completed as f64)
}
/// XDP run time per packet (bpf_stats) during the sessions.
fn xdp_ns_sessions(r: &CellRecord) -> Option<f64> {
    let u = &r.sessions.as_ref()?.usage;
    let (t, n) = (u.xdp_run_time_ns?, u.xdp_run_cnt?);
    (n > 0).then(|| t as f64 / n as f64)
}
/// XDP run time per packet during iperf3 -P 4.
fn xdp_ns_bulk(r: &CellRecord) -> Option<f64> {
    let u = &r.throughput(4)?.usage;
    let (t, n) = (u.xdp_run_time_ns?, u.xdp_run_cnt?);
    (n > 0).then(|| t as f64 / n as f64)
}
/// XDP CPU microseconds per session (bpf_stats run time / sessions).
fn xdp_us_per_conn(r: &CellRecord) -> Option<f64> {
    let s = r.sessions.as_ref()?;
    let t = s.usage.xdp_run_time_ns?;
    (s.sessions.completed > 0).then(|| t as f64 / 1000.0 / s.sessions.completed as f64)
}
/// The balancer process's CPU microseconds per session.
fn proc_us_per_conn(r: &CellRecord) -> Option<f64> {
    let s = r.sessions.as_ref()?;
    let t = s.usage.balancer_cpu_s?;
    (s.sessions.completed > 0).then(|| t * 1e6 / s.sessions.completed as f64)
}
/// The balancer process's CPU milliseconds per Gbit (4 streams).
fn proc_ms_per_gbit(r: &CellRecord) -> Option<f64> {
    let t = r.throughput(4)?;
    let gbit = t.gbps * t.usage.wall_s;
    let cpu = t.usage.balancer_cpu_s?;
    (gbit > 0.0).then(|| cpu * 1000.0 / gbit)
}

/// One contestant's row of summaries (also written to the JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub contestant: Contestant,
    pub label: &'static str,
    pub figures: BTreeMap<&'static str, Option<Spread>>,
}

/// Summaries of every contestant over `rounds`.
pub fn summarize(recs: &[CellRecord], contestants: &[Contestant], rounds: usize) -> Vec<Summary> {
    use Contestant::{Direct, Haproxy};
    contestants
        .iter()
        .map(|&c| {
            let mut m: BTreeMap<&'static str, Option<Spread>> = BTreeMap::new();
            let own = |f: &dyn Fn(&CellRecord) -> Option<f64>| spread(&values(recs, c, rounds, f));
            let vs = |base, f: &dyn Fn(&CellRecord) -> Option<f64>, op| {
                against(recs, c, base, rounds, f, op)
            };
            m.insert("gbps_1", own(&gbps(1)));
            m.insert("gbps_1_x_direct", vs(Direct, &gbps(1), ratio));
            m.insert("gbps_4", own(&gbps(4)));
            m.insert("gbps_4_x_direct", vs(Direct, &gbps(4), ratio));
            m.insert("conn_per_s", own(&conn_rate));
            m.insert("conn_per_s_x_direct", vs(Direct, &conn_rate, ratio));
            m.insert("sessions_failed_pct", own(&failed_pct));
            m.insert("conn_per_s_x_haproxy", vs(Haproxy, &conn_rate, ratio));
            m.insert("first_byte_p50_us", own(&fb(50)));
            m.insert("first_byte_p99_us", own(&fb(99)));
            m.insert("first_byte_p999_us", own(&fb(250)));
            m.insert("first_byte_p50_x_direct", vs(Direct, &fb(50), ratio));
            m.insert("ping_p50_us", own(&ping(50)));
            m.insert("ping_p99_us", own(&ping(99)));
            m.insert("ping_p50_added_us", vs(Direct, &ping(50), minus));
            m.insert("ping_p99_added_us", vs(Direct, &ping(99), minus));
            m.insert("cpu_ms_per_gbit", own(&cpu_ms_per_gbit));
            m.insert("cpu_ms_per_gbit_added", vs(Direct, &cpu_ms_per_gbit, minus));
            m.insert("cpu_us_per_conn", own(&cpu_us_per_conn));
            m.insert("cpu_us_per_conn_added", vs(Direct, &cpu_us_per_conn, minus));
            m.insert("xdp_ns_per_packet_sessions", own(&xdp_ns_sessions));
            m.insert("xdp_ns_per_packet_bulk", own(&xdp_ns_bulk));
            m.insert("xdp_us_per_conn", own(&xdp_us_per_conn));
            m.insert("process_us_per_conn", own(&proc_us_per_conn));
            m.insert("process_ms_per_gbit", own(&proc_ms_per_gbit));
            Summary {
                contestant: c,
                label: c.label(),
                figures: m,
            }
        })
        .collect()
}

/// The added CPU per connection (or Gbit) of `c` as a ratio to HAProxy's, per round.
fn added_vs_haproxy(
    recs: &[CellRecord],
    c: Contestant,
    rounds: usize,
    f: &dyn Fn(&CellRecord) -> Option<f64>,
) -> Option<Spread> {
    let direct = values(recs, Contestant::Direct, rounds, f);
    let mine = values(recs, c, rounds, f);
    let hap = values(recs, Contestant::Haproxy, rounds, f);
    spread(
        &(0..rounds)
            .map(|i| match (mine[i], hap[i], direct[i]) {
                (Some(m), Some(h), Some(d)) if h - d > 0.0 => Some((m - d) / (h - d)),
                _ => None,
            })
            .collect::<Vec<_>>(),
    )
}

/// A row of the cost table: name, the path's figure, whether its floor is the repeat-1 one.
type CostRow<'a> = (&'a str, &'a dyn Fn(&CostRound) -> f64, bool);

/// The markdown tables.
pub fn tables(
    recs: &[CellRecord],
    summaries: &[Summary],
    rounds: usize,
    cost: Option<&[CostRound]>,
) -> String {
    let g = |s: &Summary, k: &str| s.figures.get(k).copied().flatten();
    let mut out = String::new();
    out += "### Throughput, connections, latency\n\n\
        | contestant | iperf3 1 stream, Gbit/s | 4 streams, Gbit/s | Bolt sessions/s (completed) | sessions failed | connect+first byte p50 / p99 / p999, µs | ping-pong p50 / p99, µs | ping-pong added vs direct p50 / p99, µs |\n\
        |---|---|---|---|---|---|---|---|\n";
    for s in summaries {
        out += &format!(
            "| {} | {} {} | {} {} | {} {} {} | {} | {} / {} / {} | {} / {} | {} / {} |\n",
            s.label,
            fmt(g(s, "gbps_1"), 2),
            fmt_ratio(g(s, "gbps_1_x_direct")),
            fmt(g(s, "gbps_4"), 2),
            fmt_ratio(g(s, "gbps_4_x_direct")),
            fmt(g(s, "conn_per_s"), 0),
            fmt_ratio(g(s, "conn_per_s_x_direct")),
            match g(s, "conn_per_s_x_haproxy") {
                Some(x) if s.contestant != Contestant::Haproxy =>
                    format!("[{} HAProxy]", fmt_ratio(Some(x))),
                _ => String::new(),
            },
            match g(s, "sessions_failed_pct") {
                Some(x) => format!("{} %", fmt(Some(x), 1)),
                None => "-".into(),
            },
            fmt(g(s, "first_byte_p50_us"), 0),
            fmt(g(s, "first_byte_p99_us"), 0),
            fmt(g(s, "first_byte_p999_us"), 0),
            fmt(g(s, "ping_p50_us"), 1),
            fmt(g(s, "ping_p99_us"), 1),
            fmt_diff(g(s, "ping_p50_added_us"), 1),
            fmt_diff(g(s, "ping_p99_added_us"), 1),
        );
    }
    out += "\n### CPU\n\n\
        | contestant | machine CPU ms per Gbit (4 streams) | added vs direct | machine CPU µs per session | added vs direct | added, × HAProxy's added (per session / per Gbit) | XDP ns per packet, bpf_stats (sessions / bulk) | XDP µs per session | balancer process CPU µs per session / ms per Gbit |\n\
        |---|---|---|---|---|---|---|---|---|\n";
    for s in summaries {
        let c = s.contestant;
        out += &format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} / {} |\n",
            s.label,
            fmt(g(s, "cpu_ms_per_gbit"), 1),
            fmt_diff(g(s, "cpu_ms_per_gbit_added"), 1),
            fmt(g(s, "cpu_us_per_conn"), 1),
            fmt_diff(g(s, "cpu_us_per_conn_added"), 1),
            if c.is_direct() {
                "-".to_string()
            } else {
                fmt_ratio(added_vs_haproxy(recs, c, rounds, &cpu_us_per_conn))
            },
            if c.is_direct() {
                "-".to_string()
            } else {
                fmt_ratio(added_vs_haproxy(recs, c, rounds, &cpu_ms_per_gbit))
            },
            fmt(g(s, "xdp_ns_per_packet_sessions"), 0),
            fmt(g(s, "xdp_ns_per_packet_bulk"), 0),
            fmt(g(s, "xdp_us_per_conn"), 2),
            fmt(g(s, "process_us_per_conn"), 1),
            fmt(g(s, "process_ms_per_gbit"), 1),
        );
    }
    if let Some(cost) = cost.filter(|c| !c.is_empty()) {
        let sp = |f: &dyn Fn(&CostRound) -> f64| {
            spread(&cost.iter().map(|r| Some(f(r))).collect::<Vec<_>>())
        };
        out += "\n### XDP program cost per packet (BPF_PROG_TEST_RUN)\n\n\
            | path | lb_xdp, ns | floor (lb_pass, same method), ns | lb_xdp minus floor, ns |\n\
            |---|---|---|---|\n";
        let rows: [CostRow; 7] = [
            (
                "new flow (client SYN), repeat 1 over N flows",
                &|r| r.syn_ns,
                true,
            ),
            (
                "its SYN-ACK (backend), repeat 1 over N flows",
                &|r| r.syn_ack_ns,
                true,
            ),
            (
                "its handshake ACK (client; establishes the flow), repeat 1 over N flows",
                &|r| r.handshake_ack_ns,
                true,
            ),
            (
                "new flow with 90 % of the SNAT ports taken, repeat 1 over 500 flows",
                &|r| r.syn_busy_ns,
                true,
            ),
            (
                "established (client PSH/ACK, 64 B), repeat 1 over N flows",
                &|r| r.established_ns,
                true,
            ),
            (
                "reply (backend PSH/ACK, 64 B), repeat 1 over N flows",
                &|r| r.reply_ns,
                true,
            ),
            (
                "non-VIP pass (SYN to the host's own address), repeat R",
                &|r| r.non_vip_ns,
                false,
            ),
        ];
        for (name, f, once) in rows {
            let floor = |r: &CostRound| {
                if once {
                    r.floor_once_ns
                } else {
                    r.floor_repeat_ns
                }
            };
            let name = if name.starts_with("new flow with 90 %") {
                let refused = sp(&|r| 100.0 * r.syn_busy_refused);
                format!(
                    "{name} ({} % of them refused: no free port among those tried)",
                    fmt(refused, 1)
                )
            } else {
                name.to_string()
            };
            out += &format!(
                "| {name} | {} | {} | {} |\n",
                fmt(sp(&|r| f(r)), 0),
                fmt(sp(&floor), 0),
                fmt(sp(&|r| f(r) - floor(r)), 0),
            );
        }
    }
    let mem: Vec<&CellRecord> = recs.iter().filter(|r| r.memory.is_some()).collect();
    if !mem.is_empty() {
        out += "\n### Memory\n\n| contestant | process RSS | BPF maps (bytes_memlock) |\n|---|---|---|\n";
        for r in mem {
            let Some(m) = &r.memory else { continue };
            let maps = if m.maps.is_empty() {
                "-".to_string()
            } else {
                let big: Vec<String> = m
                    .maps
                    .iter()
                    .filter(|x| x.bytes_memlock >= 1 << 20)
                    .map(|x| {
                        format!(
                            "{} {} × {} = {:.1} MiB",
                            x.name,
                            x.kind,
                            x.max_entries,
                            x.bytes_memlock as f64 / 1048576.0
                        )
                    })
                    .collect();
                format!(
                    "{:.1} MiB in {} maps ({})",
                    m.maps_bytes as f64 / 1048576.0,
                    m.maps.len(),
                    big.join("; ")
                )
            };
            out += &format!(
                "| {} | {} | {maps} |\n",
                r.contestant.label(),
                m.rss_kib
                    .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
            );
        }
    }
    out
}
