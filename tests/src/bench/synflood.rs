//! `lb-bench synflood`: spoofed SYNs at the write VIP while a legitimate client keeps opening
//! connections and an established one keeps talking; lb and HAProxy 2.6 with the manual's
//! configuration and `global maxconn 256`.
//!
//! The flood: SYNs from random 198.18.128.0/17 sources and ports (a test range; the client
//! namespace has no such address and drops the SYN-ACKs, so every handshake stays half open,
//! as a real flood's do), paced at the row's rate from an AF_PACKET socket in the client
//! namespace, for the run's duration. The legitimate client: a new handshake-only Bolt
//! connection every 10 ms (3.5 s to connect and answer), during the flood and for 2 s after
//! it. The established connection: Bolt RESET -> SUCCESS every 100 ms throughout.
//!
//! Rows: lb importing the manual's configuration (`lb run --haproxy-config`, with the issue's
//! `global maxconn 256`), lb with a TOML configuration that also sets `backend_maxconn = 32` on
//! the write service, and HAProxy with the same manual configuration (the kernel's SYN cookies
//! are its defence); each at 20,000 and at 50 SYN/s.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::contestants::{self, WRITE_PORT};
use super::failover;
use super::handshakes::{self, bolt_handshake};
use super::loadgen::{self, quantile};
use super::probe;
use crate::harness::{LbProcess, Ns, Process, Shape, SimProcess, Topology, TopologyOptions};
use crate::sim::bolt::tag;

/// Interval between the legitimate client's new connections.
const LEGIT_EVERY: Duration = Duration::from_millis(10);
/// The legitimate client's patience (connect and answer).
const LEGIT_TIMEOUT: Duration = Duration::from_millis(3500);
/// How long the legitimate client goes on after the flood.
const AFTER: Duration = Duration::from_secs(2);
/// The established connection's rhythm.
const PING_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Row {
    LbImported,
    LbBackendMaxconn,
    Haproxy,
}

impl Row {
    pub const ALL: [Row; 3] = [Row::LbImported, Row::LbBackendMaxconn, Row::Haproxy];

    pub fn id(self) -> &'static str {
        match self {
            Row::LbImported => "lb-imported",
            Row::LbBackendMaxconn => "lb-backend-maxconn",
            Row::Haproxy => "haproxy",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::LbImported => "lb run --haproxy-config, the manual's + global maxconn 256",
            Row::LbBackendMaxconn => "lb, maxconn 256 and backend_maxconn 32 on the write service",
            Row::Haproxy => "HAProxy 2.6, the manual's + global maxconn 256 (kernel SYN cookies)",
        }
    }

    pub fn parse(s: &str) -> Result<Row> {
        Row::ALL.into_iter().find(|r| r.id() == s).with_context(|| {
            let ids: Vec<&str> = Row::ALL.iter().map(|r| r.id()).collect();
            format!("unknown row {s:?} (one of {})", ids.join(", "))
        })
    }

    fn is_lb(self) -> bool {
        self != Row::Haproxy
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub seconds: u64,
    pub rates: Vec<u32>,
    pub rows: Vec<Row>,
}

/// The legitimate client's connections in one phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub attempts: u64,
    pub ok: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
}

impl Phase {
    fn of(outcomes: &[(Duration, std::result::Result<u32, String>)]) -> Phase {
        let mut p = Phase::default();
        let mut lat = Vec::new();
        for (_, o) in outcomes {
            p.attempts += 1;
            match o {
                Ok(us) => {
                    p.ok += 1;
                    lat.push(*us);
                }
                Err(k) => *p.errors.entry(k.clone()).or_default() += 1,
            }
        }
        p.p50_us = quantile(&mut lat, 0.5);
        p.p99_us = quantile(&mut lat, 0.99);
        p
    }

    fn pct(&self) -> f64 {
        if self.attempts == 0 {
            return 0.0;
        }
        100.0 * self.ok as f64 / self.attempts as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub row: Row,
    pub rate: u32,
    pub syns_sent: u64,
    pub during: Phase,
    pub after: Phase,
    pub pings_ok: u64,
    pub ping_error: Option<String>,
    /// lb: global counters that moved during the run.
    pub counters: Vec<(String, u64)>,
    /// lb: `maxconn` slots held right after the flood (the legitimate client holds none: its
    /// connections are closed; the established one holds one).
    pub slots_after: Option<u64>,
    pub machine_busy_cpus: f64,
    pub error: Option<String>,
}

struct Setup {
    balancer: Balancer,
    target: SocketAddrV4,
    _sims: Vec<SimProcess>,
    topo: Topology,
}

enum Balancer {
    Lb(LbProcess),
    /// Kept to keep it running (killed on drop).
    Haproxy {
        _process: Process,
    },
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Balancer::Lb(lb) = &self.balancer {
            let _ = lb.process.stop();
        }
        for suffix in ["json", "host.json"] {
            let _ = std::fs::remove_file(format!("/run/lb/{}.{suffix}", self.topo.instance));
        }
    }
}

/// The manual's Bolt configuration for this topology with `global maxconn 256` in front.
fn manual_with_maxconn(topo: &Topology) -> Result<String> {
    Ok(format!(
        "global\n    maxconn 256\n\n{}",
        failover::haproxy_config(topo, false)?
    ))
}

fn setup(row: Row, n: usize) -> Result<Setup> {
    let topo = Topology::new(
        &format!("flood_{}_{n}", row.id().replace('-', "_")),
        Shape::TwoArmed,
        TopologyOptions::default(),
    )?;
    let sims = topo.start_sims(&["master", "slave", "slave"])?;
    let (balancer, target) = match row {
        Row::LbImported => {
            let cfg = manual_with_maxconn(&topo)?;
            let path = topo.log_dir.join("haproxy.cfg");
            std::fs::write(&path, &cfg)?;
            let path = path.display().to_string();
            let lb = topo
                .start_lb_args(&["--haproxy-config", &path, "--xdp-mode", "native"])
                .context("lb run --haproxy-config did not start")?;
            // `bind *:7680` is served on the first interface's address.
            let target = SocketAddrV4::new(topo.lb.client_addr, WRITE_PORT);
            (Balancer::Lb(lb), target)
        }
        Row::LbBackendMaxconn => {
            let mut cfg = contestants::lb_config(&topo);
            cfg = cfg.replacen('\n', "\nmaxconn = 256\n", 1);
            cfg = cfg.replacen(
                "backends = [\"db01\"]\n",
                "backends = [\"db01\"]\nbackend_maxconn = 32\n",
                1,
            );
            let lb = topo
                .start_lb(&cfg, &["--xdp-mode", "native"])
                .context("lb did not start")?;
            (Balancer::Lb(lb), SocketAddrV4::new(topo.vip, WRITE_PORT))
        }
        Row::Haproxy => {
            let cfg = manual_with_maxconn(&topo)?;
            let path = topo.log_dir.join("haproxy.cfg");
            std::fs::write(&path, &cfg)?;
            let ns = &topo.lb.ns;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/32", topo.vip),
                "dev",
                &topo.lb.ifaces[0],
            ])?;
            // The SYN-ACKs (cookies) go back towards the spoofed range, as lb's do.
            ns.ip(&[
                "route",
                "add",
                "198.18.128.0/17",
                "via",
                &topo.client.addr.to_string(),
            ])?;
            let p = failover::spawn_haproxy(&topo, &path, &cfg)?;
            (
                Balancer::Haproxy { _process: p },
                SocketAddrV4::new(topo.vip, WRITE_PORT),
            )
        }
    };
    // Up: one handshake answered.
    let deadline = Instant::now() + Duration::from_secs(15);
    let hs = bolt_handshake();
    loop {
        let ok = topo
            .client
            .ns
            .run_in(|| handshakes::one(SocketAddr::V4(target), &hs, LEGIT_TIMEOUT).is_ok())?;
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!("{}: nothing answered at {target} within 15 s", row.id());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Setup {
        balancer,
        target,
        _sims: sims,
        topo,
    })
}

fn mac_of(ns: &Ns, iface: &str) -> Result<[u8; 6]> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {text:?}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// Sends spoofed SYNs out of `iface` (call inside the client namespace) at `rate` per second
/// until `stop`; returns how many went out.
fn flood(
    iface: &str,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    target: SocketAddrV4,
    rate: u32,
    stop: &AtomicBool,
) -> Result<u64> {
    let ifindex = nix::net::if_::if_nametoindex(iface).context("flood interface")?;
    // SAFETY: plain socket(2) call; the descriptor is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let close = Closer(fd);
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: `sll` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            close.0,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(r == 0, "bind: {}", std::io::Error::last_os_error());
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let start = Instant::now();
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) {
        let due = (start.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while sent < due {
            let r = next();
            let src = Ipv4Addr::new(198, 18, 128 + (r as u8 & 0x7f), 1 + ((r >> 8) as u8 % 254));
            let sport = 1024 + ((r >> 16) as u16 % 64000);
            let seq = (r >> 32) as u32;
            buf.clear();
            etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
                .ipv4(src.octets(), target.ip().octets(), 64)
                .tcp(sport, target.port(), seq, 64240)
                .syn()
                .write(&mut buf, &[])
                .context("building a SYN")?;
            // SAFETY: `buf` is a valid frame of the length given; the socket is bound.
            let n = unsafe { libc::send(close.0, buf.as_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // The interface's queue is full (the receiving side is behind): as a flooding
                // tool does, wait for room; the rate reported is what was sent.
                if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                    break;
                }
                anyhow::bail!("send: {e}");
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(sent)
}

struct Closer(i32);

impl Drop for Closer {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// The established connection: handshake, HELLO, then RESET -> SUCCESS every 100 ms until
/// `stop`. Returns the round trips that succeeded, or the first failure.
fn established(target: SocketAddrV4, stop: &AtomicBool) -> (u64, Option<String>) {
    let run = || -> Result<u64> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(target), LEGIT_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(LEGIT_TIMEOUT))?;
        s.write_all(&bolt_handshake())?;
        let mut v = [0u8; 4];
        s.read_exact(&mut v)?;
        s.write_all(&loadgen::hello()?)?;
        ensure!(read_tag(&mut s)? == tag::SUCCESS, "HELLO refused");
        let reset = loadgen::message(tag::RESET, Vec::new())?;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(PING_EVERY);
            s.write_all(&reset).context("RESET")?;
            ensure!(
                read_tag(&mut s).context("RESET's answer")? == tag::SUCCESS,
                "RESET refused"
            );
            n += 1;
        }
        Ok(n)
    };
    match run() {
        Ok(n) => (n, None),
        Err(e) => (0, Some(format!("{e:#}"))),
    }
}

/// Reads one single-chunk Bolt message and returns its tag.
fn read_tag(s: &mut TcpStream) -> Result<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let len = usize::from(u16::from_be_bytes(len));
    ensure!(len >= 2, "chunk of {len} bytes");
    let mut body = vec![0u8; len + 2];
    s.read_exact(&mut body)?;
    Ok(body[1])
}

/// Runs the plan; one record per row and rate.
pub fn run(plan: &Plan) -> Vec<Record> {
    let mut out = Vec::new();
    let mut n = 0;
    for &rate in &plan.rates {
        for &row in &plan.rows {
            n += 1;
            let t = Instant::now();
            let rec = match run_one(plan, row, rate, n) {
                Ok(r) => r,
                Err(e) => Record {
                    row,
                    rate,
                    syns_sent: 0,
                    during: Phase::default(),
                    after: Phase::default(),
                    pings_ok: 0,
                    ping_error: None,
                    counters: Vec::new(),
                    slots_after: None,
                    machine_busy_cpus: 0.0,
                    error: Some(format!("{e:#}")),
                },
            };
            eprintln!(
                "  {} at {} SYN/s: during {}/{} ({:?}), after {}/{}, established {} ({:?}), {:?}, slots after {:?} ({:.1} s){}",
                row.id(),
                rate,
                rec.during.ok,
                rec.during.attempts,
                rec.during.errors,
                rec.after.ok,
                rec.after.attempts,
                rec.pings_ok,
                rec.ping_error,
                rec.counters,
                rec.slots_after,
                t.elapsed().as_secs_f64(),
                rec.error.as_deref().map(|e| format!(" ERROR {e}")).unwrap_or_default()
            );
            out.push(rec);
        }
    }
    out
}

fn run_one(plan: &Plan, row: Row, rate: u32, n: usize) -> Result<Record> {
    let s = setup(row, n)?;
    let before = if row.is_lb() {
        probe::lb_counters(&s.topo)?
    } else {
        Default::default()
    };
    let src_mac = mac_of(&s.topo.client.ns, &s.topo.client.iface)?;
    let dst_mac = mac_of(&s.topo.lb.ns, &s.topo.lb.ifaces[0])?;
    let iface = s.topo.client.iface.clone();
    let target = s.target;
    let flood_for = Duration::from_secs(plan.seconds);
    let cpu0 = probe::machine_cpu()?;
    let t0 = Instant::now();
    let (sent, outcomes, (pings_ok, ping_error)) = s.topo.client.ns.run_in(move || {
        let stop_flood = AtomicBool::new(false);
        let stop_ping = AtomicBool::new(false);
        std::thread::scope(|sc| {
            let pinger = sc.spawn(|| established(target, &stop_ping));
            std::thread::sleep(Duration::from_millis(300));
            let flooder = sc.spawn(|| flood(&iface, src_mac, dst_mac, target, rate, &stop_flood));
            let start = Instant::now();
            let hs = bolt_handshake();
            let mut probes = Vec::new();
            let mut k = 0u32;
            loop {
                let at = start + LEGIT_EVERY * k;
                if at >= start + flood_for + AFTER {
                    break;
                }
                if at >= start + flood_for {
                    stop_flood.store(true, Ordering::Relaxed);
                }
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let offset = at - start;
                probes.push(sc.spawn(move || {
                    let t = Instant::now();
                    let r = handshakes::one(SocketAddr::V4(target), &hs, LEGIT_TIMEOUT)
                        .map(|()| u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    (offset, r)
                }));
                k += 1;
            }
            stop_flood.store(true, Ordering::Relaxed);
            let outcomes: Vec<_> = probes.into_iter().filter_map(|p| p.join().ok()).collect();
            stop_ping.store(true, Ordering::Relaxed);
            let sent = flooder
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the flooder panicked")));
            let ping = pinger.join().unwrap_or((0, Some("panicked".into())));
            (sent, outcomes, ping)
        })
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu1 = probe::machine_cpu()?;
    let sent = sent?;
    let (during, after): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(|(o, _)| *o < flood_for);
    let (counters, slots_after) = if row.is_lb() {
        let after = probe::lb_counters(&s.topo)?;
        let mut moved = probe::lifecycle_moves(&before, &after);
        let flows = after.get("new_flows").copied().unwrap_or(0)
            - before.get("new_flows").copied().unwrap_or(0);
        moved.insert(0, ("new_flows".to_string(), flows));
        let status = s.topo.lb_status()?;
        (moved, status["maxconn"]["active"].as_u64())
    } else {
        (Vec::new(), None)
    };
    Ok(Record {
        row,
        rate,
        syns_sent: sent,
        during: Phase::of(&during),
        after: Phase::of(&after),
        pings_ok,
        ping_error,
        counters,
        slots_after,
        machine_busy_cpus: (cpu1.busy_s - cpu0.busy_s) / wall,
        error: None,
    })
}

/// The markdown section (heading included).
pub fn report(plan: &Plan, records: &[Record], command: &str, date: &str) -> String {
    let mut md = format!(
        "## lb-bench synflood: spoofed SYNs at the write VIP for {} s\n\n",
        plan.seconds
    );
    md += "| balancer | flood, SYN/s (sent) | legitimate new connections during the flood | connect→answer p50 / p99, µs | in the 2 s after | established connection (RESET every 100 ms) | lb counters moved | `maxconn` slots held after | machine busy CPUs |\n";
    md += "|---|---|---|---|---|---|---|---|---|\n";
    for r in records {
        if let Some(e) = &r.error {
            md += &format!(
                "| {} | {} | MISSING: {} | | | | | | |\n",
                r.row.label(),
                r.rate,
                e.lines().next().unwrap_or("")
            );
            continue;
        }
        let errs = |p: &Phase| {
            if p.errors.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = p.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
                format!(" ({})", v.join(", "))
            }
        };
        md += &format!(
            "| {} | {} ({}) | {}/{} = {:.2} %{} | {} / {} | {}/{} = {:.1} %{} | {} | {} | {} | {:.2} |\n",
            r.row.label(),
            r.rate,
            r.syns_sent,
            r.during.ok,
            r.during.attempts,
            r.during.pct(),
            errs(&r.during),
            r.during.p50_us.map_or("-".into(), |v| v.to_string()),
            r.during.p99_us.map_or("-".into(), |v| v.to_string()),
            r.after.ok,
            r.after.attempts,
            r.after.pct(),
            errs(&r.after),
            match &r.ping_error {
                None => format!("kept, {} round trips", r.pings_ok),
                Some(e) => format!("FAILED: {}", e.lines().next().unwrap_or("")),
            },
            if r.row.is_lb() {
                let v: Vec<String> = r.counters.iter().map(|(n, d)| format!("{n} +{d}")).collect();
                v.join(", ")
            } else {
                "-".into()
            },
            r.slots_after.map_or("-".into(), |v| v.to_string()),
            r.machine_busy_cpus,
        );
    }
    md += &format!(
        "\nSpoofed SYNs from random 198.18.128.0/17 sources (routed to the client namespace, which drops the SYN-ACKs: every flood handshake stays half open), paced from an AF_PACKET socket in the client namespace. Legitimate client in the same namespace: a new connection every 10 ms (Bolt handshake, 4-byte answer, close; 3.5 s timeout), during the flood and for 2 s after. Established connection: opened before the flood, Bolt RESET -> SUCCESS every 100 ms. lb: native XDP; `lb run --haproxy-config` serves `bind *:7680` on the client-facing address, the TOML row the VIP. HAProxy: the VIP as a /32 in the lb namespace, kernel defaults (tcp_syncookies=1). `maxconn` slots held: read after the flood, once the legitimate and the established connections closed (handshakes that never completed must hold none). {date}. Command: `{command}`.\n"
    );
    md
}
