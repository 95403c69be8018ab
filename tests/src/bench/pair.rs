//! `lb-bench pair`: a pair of lb hosts (one-armed topology with a standby) under the churn
//! generator of [`handshakes`](super::handshakes), and takeovers by keepalived.
//!
//! Sync rows: lb1 holds the VIP and balances the write VIP for N s; in the `single` row it runs
//! without `[pair]` (lb2 not started), in the `pair` row both agents stream to each other. Per
//! row: connections per second and failures, each agent's CPU per connection (the sync's cost
//! is the difference), and the standby's sync lag (wall clock from a flow's handshake on lb1 to
//! its install on lb2, its own histogram).
//!
//! Takeover rows (keepalived with `advert_int` 1 and 0.2): while the generator runs and 20
//! persistent Bolt sessions write every 20 ms, lb1's link goes down. Per row: how long new
//! connections found no host (a prober opens one every 10 ms with a 100 ms timeout), how many
//! generator connections failed, and how many persistent sessions died (flows lost at takeover).
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::handshakes::{self, Handshakes};
use super::probe::process_cpu_s;
use crate::harness::pair::{holds_both, links, wait_for, Pair};
use crate::sim::bolt_client::{Access, BoltClient, Negotiation};

/// Sizes of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub seconds: u64,
    pub threads: usize,
    /// Only these rows (`single`, `pair`, `takeover-1`, `takeover-0.2`); all when empty.
    pub only: Vec<String>,
}

impl Plan {
    fn runs(&self, row: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == row)
    }
}

/// One sync row.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SyncRecord {
    pub row: String,
    pub handshakes: Option<Handshakes>,
    pub active_agent_us: Option<f64>,
    pub standby_agent_us: Option<f64>,
    pub lag_p50_us: Option<u64>,
    pub lag_p99_us: Option<u64>,
    pub lag_max_us: Option<u64>,
    pub lag_count: u64,
    pub flows_received: u64,
    /// Sessions (connections that stay open) opened through the VIP during the churn, every
    /// 100 ms: from `connect` returning on the client to both entries of the flow in lb2's
    /// table, µs (p50, p99, max), and how many were measured / not seen on lb2 within 1 s.
    pub session_lag_us: Option<(u64, u64, u64)>,
    pub sessions_measured: usize,
    pub sessions_missing: usize,
    pub errors: Vec<String>,
}

/// One takeover row.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TakeoverRecord {
    pub advert_int: f64,
    /// From lb1's link going down to the first new connection that completed.
    pub takeover_ms: Option<u64>,
    /// When keepalived had put the VIP on lb2.
    pub vip_moved_ms: Option<u64>,
    pub handshakes: Option<Handshakes>,
    pub sessions: usize,
    pub sessions_lost: usize,
    pub session_writes: u64,
    pub errors: Vec<String>,
}

/// Records of a run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Records {
    pub sync: Vec<SyncRecord>,
    pub takeover: Vec<TakeoverRecord>,
}

/// A pair whose client reuses TIME_WAIT tuples and has the ports, as in every connection-rate
/// bench.
fn pair(name: &str) -> Result<Pair> {
    let pair = Pair::new(name)?;
    pair.topo.client.ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ])?;
    Ok(pair)
}

fn without_maxconn(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.starts_with("maxconn ="))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn without_pair(config: &str) -> String {
    config[..config.find("[pair]").unwrap_or(config.len())].to_string()
}

/// Runs every row.
pub fn run(plan: &Plan) -> Records {
    let mut r = Records::default();
    for paired in [false, true] {
        if !plan.runs(if paired { "pair" } else { "single" }) {
            continue;
        }
        let mut rec = SyncRecord {
            row: if paired { "pair" } else { "single" }.into(),
            ..Default::default()
        };
        if let Err(e) = sync_row(plan, paired, &mut rec) {
            rec.errors.push(format!("{e:#}"));
        }
        eprintln!(
            "  sync {}: {:.0} conn/s, agents {:?} / {:?} µs/conn, lag p50/p99 {:?}/{:?} µs, errors {:?}",
            rec.row,
            rec.handshakes.as_ref().map_or(0.0, |h| h.rate()),
            rec.active_agent_us,
            rec.standby_agent_us,
            rec.lag_p50_us,
            rec.lag_p99_us,
            rec.errors
        );
        r.sync.push(rec);
    }
    for advert_int in [1.0, 0.2] {
        if !plan.runs(&format!("takeover-{advert_int}")) {
            continue;
        }
        let mut rec = TakeoverRecord {
            advert_int,
            ..Default::default()
        };
        if let Err(e) = takeover_row(plan, &mut rec) {
            rec.errors.push(format!("{e:#}"));
        }
        eprintln!(
            "  takeover advert_int {advert_int}: VIP moved {:?} ms, new connections back {:?} ms, sessions lost {}, errors {:?}",
            rec.vip_moved_ms, rec.takeover_ms, rec.sessions_lost, rec.errors
        );
        r.takeover.push(rec);
    }
    r
}

fn sync_row(plan: &Plan, paired: bool, rec: &mut SyncRecord) -> Result<()> {
    let pair = pair(if paired { "bench_pair" } else { "bench_single" })?;
    let (topo, standby) = (&pair.topo, pair.standby.clone());
    pair.hold(&topo.lb)?;
    // No maxconn, as in the churn bench: what is measured is the sync (a standby under a
    // global maxconn also takes a slot for each synced flow).
    let (c1, c2) = pair.configs();
    let (c1, c2) = (without_maxconn(&c1), without_maxconn(&c2));
    let lb1 = topo.start_lb(&if paired { c1 } else { without_pair(&c1) }, &[])?;
    let lb2_agent = if paired {
        Some(topo.start_standby_lb(&c2, &[])?)
    } else {
        None
    };
    if paired {
        wait_for("lb2 synced", Duration::from_secs(10), || {
            Ok(lb_user::pair::read_status(&standby).is_some_and(|(s, _)| s.synced))
        })?;
    }
    let vip = SocketAddrV4::new(topo.vip, 7680);
    topo.client
        .ns
        .run_in(move || {
            handshakes::one(
                SocketAddr::V4(vip),
                &handshakes::bolt_handshake(),
                Duration::from_secs(3),
            )
        })?
        .map_err(|e| anyhow::anyhow!("a first connection through the VIP: {e}"))?;
    let cpu = |p: Option<u32>| p.map(process_cpu_s).transpose();
    let (pid1, pid2) = (lb1.pid(), lb2_agent.as_ref().map(|p| p.pid()));
    let before = (process_cpu_s(pid1)?, cpu(pid2)?);
    let (threads, dur) = (plan.threads, Duration::from_secs(plan.seconds));
    let probe = paired.then(|| {
        let (ns, standby) = (topo.client.ns.clone(), standby.clone());
        std::thread::spawn(move || ns.run_in(move || session_lags(vip, &standby, dur)))
    });
    let h = topo
        .client
        .ns
        .run_in(move || handshakes::run(&[vip], threads, dur))??;
    let after = (process_cpu_s(pid1)?, cpu(pid2)?);
    if let Some(p) = probe {
        let (mut lags, missing) = p
            .join()
            .map_err(|_| anyhow::anyhow!("the session probe panicked"))???;
        lags.sort_unstable();
        let q = |f: f64| lags[((lags.len() - 1) as f64 * f).round() as usize];
        if !lags.is_empty() {
            rec.session_lag_us = Some((q(0.5), q(0.99), *lags.last().unwrap_or(&0)));
        }
        rec.sessions_measured = lags.len();
        rec.sessions_missing = missing;
    }
    let per = |cpu: f64| (h.completed > 0).then(|| cpu * 1e6 / h.completed as f64);
    rec.active_agent_us = per(after.0 - before.0);
    if let (Some(x), Some(y)) = (before.1, after.1) {
        rec.standby_agent_us = per(y - x);
    }
    if paired {
        // The status file is written every 500 ms.
        std::thread::sleep(Duration::from_millis(1200));
        let (s, _) = lb_user::pair::read_status(&standby).context("lb2's pair status")?;
        rec.lag_p50_us = s.lag_p50_us;
        rec.lag_p99_us = s.lag_p99_us;
        rec.lag_max_us = Some(s.lag_max_us);
        rec.lag_count = s.lag_count;
        rec.flows_received = s.flows_received;
    }
    rec.handshakes = Some(h);
    Ok(())
}

/// Opens a session to `vip` every 100 ms for `dur` and measures, for each, how long after
/// `connect` returned its flow is in the `standby` instance's table (polled every 200 µs, up
/// to 1 s). The sessions stay open until the end. Returns the lags (µs) and how many were
/// never seen.
fn session_lags(vip: SocketAddrV4, standby: &str, dur: Duration) -> Result<(Vec<u64>, usize)> {
    use aya::maps::HashMap;
    use lb_common::{names, Flow, FlowKey, IPPROTO_TCP};
    let map = lb_user::dataplane::open_pinned(
        &lb_user::dataplane::pin_dir(standby),
        names::CT_ESTABLISHED,
    )?;
    let table: HashMap<_, FlowKey, Flow> = HashMap::try_from(map)?;
    let (mut lags, mut missing, mut open) = (Vec::new(), 0, Vec::new());
    let start = Instant::now();
    while start.elapsed() < dur {
        let s = std::net::TcpStream::connect_timeout(&SocketAddr::V4(vip), Duration::from_secs(1))?;
        let connected = Instant::now();
        let SocketAddr::V4(local) = s.local_addr()? else {
            anyhow::bail!("not IPv4");
        };
        let key = FlowKey {
            saddr: u32::from_ne_bytes(local.ip().octets()),
            daddr: u32::from_ne_bytes(vip.ip().octets()),
            sport: local.port().to_be(),
            dport: vip.port().to_be(),
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let seen = loop {
            if let Ok(f) = table.get(&key, 0) {
                if table.get(&f.partner_key(IPPROTO_TCP), 0).is_ok() {
                    break Some(connected.elapsed());
                }
            }
            if connected.elapsed() > Duration::from_secs(1) {
                break None;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        match seen {
            Some(d) => lags.push(d.as_micros() as u64),
            None => missing += 1,
        }
        open.push(s);
        std::thread::sleep(Duration::from_millis(100).saturating_sub(connected.elapsed()));
    }
    Ok((lags, missing))
}

fn takeover_row(plan: &Plan, rec: &mut TakeoverRecord) -> Result<()> {
    let pair = pair("bench_takeover")?;
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    let _running = pair.with_keepalived(rec.advert_int)?;
    let vip = SocketAddrV4::new(topo.vip, 7680);
    let target = SocketAddr::V4(vip);

    // Persistent sessions, each writing every 20 ms from its own thread.
    rec.sessions = 20;
    let sessions: Vec<BoltClient> = topo.client.ns.run_in(move || {
        (0..20)
            .map(|_| BoltClient::connect(target, Negotiation::Classic, None))
            .collect::<Result<Vec<_>>>()
    })??;
    wait_for("the sessions on lb2", Duration::from_secs(5), || {
        Ok(crate::harness::pair::established(&standby)?.len() >= 40)
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = sessions
        .into_iter()
        .map(|mut c| {
            let stop = stop.clone();
            std::thread::spawn(move || -> (bool, u64) {
                let mut writes = 0;
                while !stop.load(Ordering::Relaxed) {
                    if c.run("CREATE (n)", Access::Write).is_err() {
                        return (false, writes);
                    }
                    writes += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (true, writes)
            })
        })
        .collect();

    // The generator, and the prober, in the client's namespace.
    let (threads, dur) = (
        plan.threads.saturating_sub(1).max(1),
        Duration::from_secs(plan.seconds.max(8)),
    );
    let ns = topo.client.ns.clone();
    let churn =
        std::thread::spawn(move || ns.run_in(move || handshakes::run(&[vip], threads, dur)));
    std::thread::sleep(Duration::from_secs(3));
    let down = Instant::now();
    links(&topo.lb, false)?;
    let ns = topo.client.ns.clone();
    let prober = std::thread::spawn(move || {
        ns.run_in(move || -> Option<Duration> {
            let hs = handshakes::bolt_handshake();
            while down.elapsed() < Duration::from_secs(20) {
                if handshakes::one(target, &hs, Duration::from_millis(100)).is_ok() {
                    return Some(down.elapsed());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        })
    });
    let moved = wait_for("lb2 to take the VIP", Duration::from_secs(20), || {
        holds_both(topo, lb2)
    });
    rec.vip_moved_ms = moved.ok().map(|()| down.elapsed().as_millis() as u64);
    rec.takeover_ms = prober
        .join()
        .map_err(|_| anyhow::anyhow!("prober panicked"))?
        .ok()
        .flatten()
        .map(|d| d.as_millis() as u64);
    rec.handshakes = Some(
        churn
            .join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))???,
    );
    // The sessions keep writing a second after the generator ends.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let (alive, writes) = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
        rec.sessions_lost += usize::from(!alive);
        rec.session_writes += writes;
    }
    Ok(())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// The markdown section (heading included).
pub fn report(plan: &Plan, r: &Records, command: &str, date: &str) -> String {
    let mut md = format!(
        "## lb-bench pair: flow sync under churn ({} s, {} client threads) and takeovers\n\n",
        plan.seconds, plan.threads
    );
    md += "| row | connections/s | failed | active agent CPU µs/conn | standby agent CPU µs/conn | session lag p50 / p99 / max, µs (sessions measured, not seen) | sync lag of churn flows p50 / p99 / max, µs (flows measured) | flows received by the standby |\n|---|---|---|---|---|---|---|---|\n";
    for s in &r.sync {
        let (rate, failed) = s.handshakes.as_ref().map_or(("-".into(), "-".into()), |h| {
            (format!("{:.0}", h.rate()), h.failed.to_string())
        });
        md += &format!(
            "| {} | {rate} | {failed} | {} | {} | {} | {} / {} / {} ({}) | {} |\n",
            if s.row == "pair" {
                "pair (lb1 active, lb2 standby, both `[pair]`)"
            } else {
                "single (lb1 alone, no `[pair]`)"
            },
            opt(s.active_agent_us.map(|v| format!("{v:.2}"))),
            opt(s.standby_agent_us.map(|v| format!("{v:.2}"))),
            s.session_lag_us
                .map_or("-".into(), |(p50, p99, max)| format!(
                    "{p50} / {p99} / {max} ({}, {})",
                    s.sessions_measured, s.sessions_missing
                )),
            opt(s.lag_p50_us),
            opt(s.lag_p99_us),
            opt(s.lag_max_us),
            s.lag_count,
            if s.row == "pair" {
                s.flows_received.to_string()
            } else {
                "-".into()
            },
        );
        for e in &s.errors {
            md += &format!("\nERROR in {}: {e}\n", s.row);
        }
    }
    md += "\n| keepalived advert_int | VIP on lb2 after, ms | new connections failed for, ms | generator: completed / failed | persistent sessions lost (of 20, writing every 20 ms) | their writes |\n|---|---|---|---|---|---|\n";
    for t in &r.takeover {
        let (done, failed) = t.handshakes.as_ref().map_or(("-".into(), "-".into()), |h| {
            (h.completed.to_string(), h.failed.to_string())
        });
        md += &format!(
            "| {} s | {} | {} | {done} / {failed} | {} | {} |\n",
            t.advert_int,
            opt(t.vip_moved_ms),
            opt(t.takeover_ms),
            t.sessions_lost,
            t.session_writes
        );
        for e in &t.errors {
            md += &format!("\nERROR in advert_int {}: {e}\n", t.advert_int);
        }
    }
    md += &format!(
        "\nOne-armed topology: client, lb1, lb2 and db01..db03 on one bridge; the write VIP :7680 to db01 (the simulator); lb1 holds the VIP and the floating SNAT address first. Session lag: a session opened through the VIP every 100 ms during the churn (kept open), from `connect` returning on the client to both its entries in lb2's table (polled every 200 µs): what a takeover loses is the sessions younger than this. Sync lag of churn flows: lb2's histogram (eight buckets per octave) of wall-clock time from a flow's handshake on lb1 to its install on lb2, live stream only; only flows still open when lb1 drains its ring are sent, so these are the young ones (a biased view: the session lag is the one to read). Agent CPU from /proc/PID/stat over the generator's run; the sync rows run without `maxconn` (as the churn bench), the takeover rows with a global one. Client namespace: tcp_tw_reuse=1, ports 1024-65000. Takeover: lb1's link goes down 3 s into the generator's run; a prober opens a new connection every 10 ms (100 ms timeout) until one completes. {date}. Command: `{command}`.\n"
    );
    md
}
