//! `lb status`: reads an instance's pinned counter maps (works while the agent runs and after
//! it stopped, as long as the pins exist) and prints them.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use lb_common::{names, BackendStats, ServiceStats, COUNTER_MAX, COUNTER_NAMES};
use serde::{Deserialize, Serialize};

use crate::dataplane::{open_pinned, pin_dir};

/// Names of an instance's services and backends by id, written by the agent at start
/// (the pinned maps only know ids).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub instance: String,
    /// Service names by id (an id no configured service holds: empty).
    pub services: Vec<String>,
    /// Backend names by id (an id no configured backend holds: empty).
    pub backends: Vec<String>,
    /// The global `maxconn` (0: none).
    #[serde(default)]
    pub maxconn: u32,
    /// Each service's `backend_maxconn` (0: none), by service id.
    #[serde(default)]
    pub backend_maxconn: Vec<u32>,
    pub ifaces: Vec<String>,
    pub mode: String,
}

impl InstanceInfo {
    /// What `lb status` and `lb capture` need to know of a running `cfg`: names by id (an
    /// adopted instance's ids may leave gaps: empty names).
    pub fn new(cfg: &crate::config::Config, ifaces: &[String], mode: &str) -> Self {
        fn by_id<T: Clone + Default>(items: impl Iterator<Item = (u32, T)>) -> Vec<T> {
            let mut v = Vec::new();
            for (id, x) in items {
                let i = id as usize;
                if v.len() <= i {
                    v.resize(i + 1, T::default());
                }
                v[i] = x;
            }
            v
        }
        InstanceInfo {
            instance: cfg.instance.clone(),
            services: by_id(cfg.services.iter().map(|s| (s.id, s.name.clone()))),
            backends: by_id(cfg.backends.iter().map(|b| (b.id, b.name.clone()))),
            maxconn: cfg.maxconn,
            backend_maxconn: by_id(cfg.services.iter().map(|s| (s.id, s.backend_maxconn))),
            ifaces: ifaces.to_vec(),
            mode: mode.to_string(),
        }
    }
}

pub fn info_path(instance: &str) -> PathBuf {
    Path::new("/run/lb").join(format!("{instance}.json"))
}

pub fn write_info(info: &InstanceInfo) -> Result<()> {
    let p = info_path(&info.instance);
    fs::create_dir_all("/run/lb").context("create /run/lb")?;
    fs::write(&p, serde_json::to_vec_pretty(info)?)
        .with_context(|| format!("write {}", p.display()))
}

fn open<T: aya::Pod>(dir: &Path, name: &str) -> Result<PerCpuArray<MapData, T>> {
    PerCpuArray::try_from(open_pinned(dir, name)?)
        .with_context(|| format!("{name}: unexpected map type or layout"))
}

fn sum<T: aya::Pod + Default + Copy>(
    m: &PerCpuArray<MapData, T>,
    i: u32,
    add: impl Fn(&mut T, &T),
) -> Result<T> {
    let mut total = T::default();
    for v in m.get(&i, 0)?.iter() {
        add(&mut total, v);
    }
    Ok(total)
}

/// Counters of an instance, summed over CPUs.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub instance: String,
    pub global: Vec<(String, u64)>,
    pub services: Vec<(String, ServiceStats)>,
    pub backends: Vec<(String, BackendStats)>,
    /// Whether an agent serves the instance now (its operator socket answers). Without one
    /// the data path keeps forwarding, but sets are frozen and no failover happens.
    pub agent_running: bool,
    /// The health mirror: every configured (service, backend) pair.
    pub health: Vec<HealthRow>,
    /// Connection slots held against `maxconn` limits: the global count and every limited
    /// (service, backend) pair's (or one still holding slots).
    pub maxconn: MaxconnView,
    /// The connection tables (read by `lb status`; the admin server takes the GC's last pass).
    pub tables: Option<crate::gc::TableFill>,
    /// In a pair: its streams as the agent last wrote them.
    pub pair: Option<crate::pair::stream::PairStatus>,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct MaxconnView {
    /// The global limit (0: none) and the connections counted against it.
    pub limit: u32,
    pub active: u64,
    pub pairs: Vec<MaxconnRow>,
}

#[derive(Debug, Serialize, Clone)]
pub struct MaxconnRow {
    pub service: String,
    pub backend: String,
    /// `backend_maxconn` (0: none).
    pub limit: u32,
    pub active: u64,
}

/// Reads the pinned `MAXCONN_ACTIVE` counts.
fn maxconn_view(dir: &Path, info: Option<&InstanceInfo>, health: &[HealthRow]) -> MaxconnView {
    let Some(info) = info else {
        return MaxconnView::default();
    };
    let Ok(a) = open_pinned(dir, names::MAXCONN_ACTIVE)
        .and_then(|m| Ok(aya::maps::Array::<MapData, u64>::try_from(m)?))
    else {
        return MaxconnView::default();
    };
    let mut v = MaxconnView {
        limit: info.maxconn,
        active: a.get(&lb_common::MAXCONN_GLOBAL, 0).unwrap_or(0),
        pairs: vec![],
    };
    for (si, sname) in info
        .services
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
    {
        let limit = info.backend_maxconn.get(si).copied().unwrap_or(0);
        for (bi, bname) in info
            .backends
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.is_empty())
        {
            let active = a
                .get(&lb_common::epoch_index(si as u32, bi as u32), 0)
                .unwrap_or(0);
            let configured = health
                .iter()
                .any(|h| &h.service == sname && &h.backend == bname);
            if (limit != 0 && configured) || active != 0 {
                v.pairs.push(MaxconnRow {
                    service: sname.clone(),
                    backend: bname.clone(),
                    limit,
                    active,
                });
            }
        }
    }
    v
}

#[derive(Debug, Serialize, Clone)]
pub struct HealthRow {
    pub service: String,
    pub backend: String,
    pub up: bool,
    pub in_set: bool,
    pub checked: bool,
    pub admin: String,
    pub last_check: String,
    pub latency_ms: f64,
    /// Seconds since the last transition (wall clock), if known.
    pub since_s: Option<f64>,
}

fn health_rows(dir: &Path, services: &[String], backends: &[String]) -> Vec<HealthRow> {
    let Ok(map) = crate::mirror::open(dir) else {
        return vec![];
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut rows = Vec::new();
    for (si, sname) in services.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
        for (bi, bname) in backends.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
            let Ok(r) = map.get(&lb_common::epoch_index(si as u32, bi as u32), 0) else {
                continue;
            };
            if r.flags & lb_common::HEALTH_F_CONFIGURED == 0 {
                continue;
            }
            let end = r.last.iter().position(|&c| c == 0).unwrap_or(r.last.len());
            rows.push(HealthRow {
                service: sname.clone(),
                backend: bname.clone(),
                up: r.flags & lb_common::HEALTH_F_UP != 0,
                in_set: r.flags & lb_common::HEALTH_F_IN_SET != 0,
                checked: r.flags & lb_common::HEALTH_F_CHECKED != 0,
                admin: ["ready", "drain", "disable"]
                    .get(r.admin as usize)
                    .unwrap_or(&"?")
                    .to_string(),
                last_check: String::from_utf8_lossy(&r.last[..end]).to_string(),
                latency_ms: r.latency_us as f64 / 1000.0,
                since_s: (r.since_unix_ms > 0)
                    .then(|| now_ms.saturating_sub(r.since_unix_ms) as f64 / 1000.0),
            });
        }
    }
    rows
}

pub fn snapshot(instance: &str) -> Result<Snapshot> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        anyhow::bail!("no instance {instance:?}: {} does not exist (is `lb run` running with --instance {instance}?)", dir.display());
    }
    let info: Option<InstanceInfo> = fs::read(info_path(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let g = open::<u64>(&dir, names::STATS_GLOBAL)?;
    let mut global = Vec::new();
    for i in 0..COUNTER_MAX {
        global.push((
            COUNTER_NAMES[i as usize].to_string(),
            sum(&g, i, |t, v| *t += *v)?,
        ));
    }
    let s = open::<ServiceStats>(&dir, names::STATS_SERVICE)?;
    let b = open::<BackendStats>(&dir, names::STATS_BACKEND)?;
    let (snames, bnames) = match &info {
        Some(i) => (i.services.clone(), i.backends.clone()),
        None => (vec![], vec![]),
    };
    let mut services = Vec::new();
    for (i, name) in snames.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
        services.push((name.clone(), sum(&s, i as u32, ServiceStats::add)?));
    }
    let mut backends = Vec::new();
    for (i, name) in bnames.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
        backends.push((name.clone(), sum(&b, i as u32, BackendStats::add)?));
    }
    let health = health_rows(&dir, &snames, &bnames);
    let maxconn = maxconn_view(&dir, info.as_ref(), &health);
    let agent_running =
        std::os::unix::net::UnixStream::connect(crate::ops::socket_path(instance)).is_ok();
    Ok(Snapshot {
        instance: instance.to_string(),
        global,
        services,
        backends,
        agent_running,
        health,
        maxconn,
        tables: None,
        pair: crate::pair::read_status(instance).map(|(p, _)| p),
    })
}

/// Walks the pinned connection tables (read only) for `lb status`.
pub fn census(instance: &str) -> Result<crate::gc::TableFill> {
    let dir = pin_dir(instance);
    let cfg = open_pinned(&dir, names::CONFIG)
        .and_then(|m| Ok(aya::maps::Array::<MapData, lb_common::Config>::try_from(m)?))
        .and_then(|a| Ok(a.get(&0, 0)?))
        .context("read the pinned CONFIG")?;
    let timeouts = crate::gc::Timeouts::new(cfg.embryonic_timeout_ns, 0, 0);
    let mut gc = crate::gc::Gc::from_pins(&dir, timeouts)?;
    Ok(gc.census(crate::gc::monotonic_now()?))
}

pub fn print(s: &Snapshot) {
    println!("instance {}", s.instance);
    if let Some(p) = &s.pair {
        println!(
            "pair: {}{}, peer {} ({}), {}: {}; flows sent {}, received {} (ends {}), last snapshot {} flows, sync lag p50/p99 {}{}",
            p.role,
            p.vrrp_state
                .as_ref()
                .map(|v| format!(" (keepalived: {v})"))
                .unwrap_or_default(),
            p.peer,
            match (p.sending, p.receiving, p.synced) {
                (_, true, true) => "streams both ways, synced",
                (_, true, false) => "receiving its snapshot",
                (true, false, _) => "reachable, streams nothing to this node",
                (false, false, _) => "unreachable",
            },
            if p.eligible { "eligible" } else { "NOT eligible" },
            p.why,
            p.flows_sent,
            p.flows_received,
            p.ends_received,
            p.last_snapshot_flows,
            match (p.lag_p50_us, p.lag_p99_us) {
                (Some(a), Some(b)) => format!("{a}/{b} µs over {} flows", p.lag_count),
                _ => "-".into(),
            },
            p.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        if let Some(at) = p.split_brain_at {
            println!(
                "pair: SPLIT BRAIN: the peer opened {} flows while this host held the VIPs too (last at {} s since the epoch)",
                p.split_brain_flows, at
            );
        }
    }
    if s.agent_running {
        println!("agent: running");
    } else {
        println!(
            "agent: NOT running: the data path keeps forwarding with the last sets, but they are frozen and no \
             failover happens until `lb run` runs again (or `lb detach --instance {}` stops it)",
            s.instance
        );
    }
    println!();
    if !s.health.is_empty() {
        println!(
            "{:<10} {:<8} {:<6} {:<7} {:<8} {:>9} {:>10}  last check",
            "service", "backend", "state", "in set", "admin", "latency", "since"
        );
        for h in &s.health {
            let state = if h.up { "UP" } else { "DOWN" };
            let since = h
                .since_s
                .map(|x| format!("{x:.1}s"))
                .unwrap_or_else(|| "-".into());
            let last = if h.checked {
                h.last_check.as_str()
            } else {
                "no check"
            };
            println!(
                "{:<10} {:<8} {:<6} {:<7} {:<8} {:>7.1}ms {:>10}  {}",
                h.service,
                h.backend,
                state,
                if h.in_set { "yes" } else { "no" },
                h.admin,
                h.latency_ms,
                since,
                last
            );
        }
        println!();
    }
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10} {:>8}",
        "service", "new flows", "pkts in", "bytes in", "pkts out", "bytes out", "drops"
    );
    for (n, c) in &s.services {
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10} {:>8}",
            n, c.new_flows, c.packets, c.bytes, c.reply_packets, c.reply_bytes, c.drops
        );
    }
    println!();
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10}",
        "backend", "new flows", "pkts in", "bytes in", "pkts out", "bytes out"
    );
    for (n, c) in &s.backends {
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10}",
            n, c.new_flows, c.packets, c.bytes, c.reply_packets, c.reply_bytes
        );
    }
    println!();
    if let Some(t) = &s.tables {
        let pct = |e: usize, c: usize| {
            if c == 0 {
                0.0
            } else {
                100.0 * e as f64 / c as f64
            }
        };
        println!(
            "tables: established {} / {} entries ({:.1} %), embryonic {} / {} ({:.1} %), {} connection slots",
            t.established.entries,
            t.established.capacity,
            pct(t.established.entries, t.established.capacity),
            t.embryonic.entries,
            t.embryonic.capacity,
            pct(t.embryonic.entries, t.embryonic.capacity),
            t.slots
        );
        for p in &t.pairs {
            let svc: Vec<&str> = s.services.iter().map(|(n, _)| n.as_str()).collect();
            let be: Vec<&str> = s.backends.iter().map(|(n, _)| n.as_str()).collect();
            let name = |v: &[&str], i: u32| {
                v.get(i as usize)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| format!("#{i}"))
            };
            println!(
                "  {:<12} {:<10} {:>8} established {:>6} in handshake",
                name(&svc, p.service),
                name(&be, p.backend),
                p.established,
                p.embryonic
            );
        }
        println!();
    }
    if s.maxconn.limit != 0 || !s.maxconn.pairs.is_empty() {
        let lim = |l: u32| {
            if l == 0 {
                "-".to_string()
            } else {
                l.to_string()
            }
        };
        println!(
            "maxconn: {} connections held, global limit {}",
            s.maxconn.active,
            lim(s.maxconn.limit)
        );
        for r in &s.maxconn.pairs {
            println!(
                "  {:<12} {:<10} {:>6} / {}",
                r.service,
                r.backend,
                r.active,
                lim(r.limit)
            );
        }
        println!();
    }
    println!("data path counters (non-zero):");
    for (n, v) in &s.global {
        if *v != 0 {
            println!("  {n:<24} {v}");
        }
    }
}
