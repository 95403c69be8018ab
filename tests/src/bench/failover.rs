//! `lb-bench failover`: how fast writes follow a master change, lb against HAProxy 2.6.
//!
//! One run: a fresh two-armed topology, simulators db01 (master), db02 and db03 (slaves), the
//! balancer under test in the lb namespace. The client namespace opens a new Bolt connection every
//! 10 ms (one `RETURN 1` write each) and keeps 4 pooled connections that write every 50 ms. After the
//! balancer has sent 20 consecutive writes to db01 (warm-up) and a steady second more (plus a phase
//! offset, below), the roles are
//! flipped out of band at T0 (db01 -> slave, db02 -> master, back to back on the control sockets);
//! the load continues for the window (6 s, the manual's timings), then everything is torn down.
//!
//! Contestants, all reached by the client at the same address (the VIP 198.18.0.10, port 7680):
//! - lb with the presets' default timings (inter 2s, rise 2, fall 3, fastinter 250ms), and with
//!   `inter 250ms, rise 1, fall 1`; `--xdp-mode native`.
//! - HAProxy 2.6 (`haproxy -f CFG -db` in the lb namespace) with the manual's `neo4j-ha-bolt.cfg`
//!   verbatim except the server addresses (mapped to the simulators'), and the same plus
//!   `default-server inter 250ms rise 1 fall 1`. It binds `*:7680` in the lb namespace, so the VIP is
//!   added to `l0` as a /32 for it; IPv4 forwarding stays off there (it proxies, no XDP, no routes
//!   beyond the harness's).
//!
//! The warm-up ends a fixed time after a health check (the one that settled the roles), and checks
//! are periodic, so a fixed steady state would flip the roles at the same check phase in every run
//! and report one point of the distribution as its median. Run `i` of `n` therefore waits an extra
//! `(i + 0.5) / n` of the contestant's check interval: the runs sample the phase evenly.
//!
//! Send times are taken on the client just before `connect` (new connections) or before the write
//! (pooled ones) and reported in seconds relative to T0.

use std::collections::BTreeMap;
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::clients::{new_write, Load, LoadSpec, Outcome, RawAttempt, Recorded};
use super::stats::{fmt_secs, median, spread, Spread};
use crate::harness::{LbProcess, Process, SimProcess, Topology};
use crate::sim::bolt_client::{BoltClient, Negotiation};
use crate::sim::control::SimControl;
use crate::sim::{Role, Stats};

/// The manual's Bolt configuration (`shared/seed/neo4j-ha-bolt.cfg`, copied verbatim).
pub const MANUAL_BOLT_CFG: &str = include_str!("neo4j-ha-bolt.cfg");
/// The example addresses of db01..db03 in the manual.
const MANUAL_ADDRS: [&str; 3] = ["10.0.1.10", "10.0.1.11", "10.0.1.12"];
/// The write port (the manual's `frontend neo4j-write`).
pub const WRITE_PORT: u16 = 7680;
const OLD: &str = "db01";
const NEW: &str = "db02";

/// What the report says about reading its rows.
pub const RUN_NOTE: &str = "The simulated db01 refuses writes with NotALeader from T0 on, so no write is acknowledged by the demoted master after T0 in any row; what differs is how long writes keep reaching it (last write on old master; the pooled connections' fate). lb's rows hold new writes in the no-master gap (`syn_hold`, exclusive roles only), so none fails; `--faithful` keeps HAProxy's round robin, which is not an exclusive role: its writes in the gap are refused and its pooled connections stay on db01, as with HAProxy. The imported configuration and the one with `on-marked-down shutdown-sessions` (in `defaults`) give the same write service (an imported exclusive role gets on_down = reset either way); only the read service differs (reset instead of drain)";

/// A balancer configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contestant {
    LbManual,
    LbFast,
    LbImported,
    LbImportedShutdown,
    LbImportedFaithful,
    HaproxyManual,
    HaproxyFast,
}

impl Contestant {
    pub const ALL: [Contestant; 7] = [
        Contestant::LbManual,
        Contestant::LbFast,
        Contestant::LbImported,
        Contestant::LbImportedShutdown,
        Contestant::LbImportedFaithful,
        Contestant::HaproxyManual,
        Contestant::HaproxyFast,
    ];

    /// The id used on the command line and in the JSON.
    pub fn id(self) -> &'static str {
        match self {
            Contestant::LbManual => "lb-manual",
            Contestant::LbFast => "lb-fast",
            Contestant::LbImported => "lb-imported",
            Contestant::LbImportedShutdown => "lb-imported-shutdown",
            Contestant::LbImportedFaithful => "lb-imported-faithful",
            Contestant::HaproxyManual => "haproxy-manual",
            Contestant::HaproxyFast => "haproxy-fast",
        }
    }

    /// The name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Contestant::LbManual => "lb, manual timings (inter 2s rise 2 fall 3, fastinter 250ms)",
            Contestant::LbFast => "lb, inter 250ms rise 1 fall 1",
            Contestant::LbImported => "lb run --haproxy-config, the manual's config as is",
            Contestant::LbImportedShutdown => {
                "lb run --haproxy-config, the manual's + on-marked-down shutdown-sessions"
            }
            Contestant::LbImportedFaithful => {
                "lb run --haproxy-config --faithful (HAProxy's round robin and drain)"
            }
            Contestant::HaproxyManual => "HAProxy 2.6, manual config (inter 2s rise 2 fall 3)",
            Contestant::HaproxyFast => "HAProxy 2.6, inter 250ms rise 1 fall 1",
        }
    }

    /// Parses an [`id`](Contestant::id).
    pub fn parse(s: &str) -> Result<Contestant> {
        Contestant::ALL
            .into_iter()
            .find(|c| c.id() == s)
            .with_context(|| {
                let ids: Vec<&str> = Contestant::ALL.iter().map(|c| c.id()).collect();
                format!("unknown contestant {s:?} (one of {})", ids.join(", "))
            })
    }

    /// Whether this contestant uses the fast timings.
    pub fn fast(self) -> bool {
        matches!(self, Contestant::LbFast | Contestant::HaproxyFast)
    }

    /// The check interval (`inter`) of this contestant's timings.
    pub fn inter(self) -> Duration {
        Duration::from_millis(if self.fast() { 250 } else { 2000 })
    }

    /// Whether the balancer is lb (else HAProxy).
    pub fn is_lb(self) -> bool {
        !matches!(self, Contestant::HaproxyManual | Contestant::HaproxyFast)
    }

    /// Whether this is lb run from the manual's HAProxy configuration (`--haproxy-config`).
    pub fn imported(self) -> bool {
        matches!(
            self,
            Contestant::LbImported
                | Contestant::LbImportedShutdown
                | Contestant::LbImportedFaithful
        )
    }

    /// Where the client sends its writes: the VIP, or for an imported configuration (`bind
    /// *:7680`) the address lb serves it on, the first address of its first interface.
    pub fn target(self, topo: &Topology) -> SocketAddrV4 {
        let addr = if self.imported() {
            topo.lb.client_addr
        } else {
            topo.vip
        };
        SocketAddrV4::new(addr, WRITE_PORT)
    }
}

/// The scenario's timings and sizes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Scenario {
    /// Steady state between warm-up and T0 (before the phase offset).
    pub steady_ms: u64,
    /// How long the load continues after T0 (manual timings).
    pub window_ms: u64,
    /// The same for the fast timings.
    pub fast_window_ms: u64,
    /// A new write connection every ...
    pub new_every_ms: u64,
    /// Pooled connections opened before the flip.
    pub pooled: usize,
    /// Each pooled connection writes every ...
    pub pooled_every_ms: u64,
    /// How long to wait for attempts still in flight at the end of the window.
    pub grace_ms: u64,
    /// Consecutive writes answered by db01 that end the warm-up.
    pub warmup_streak: usize,
    /// Longest warm-up before the run counts as failed.
    pub warmup_timeout_ms: u64,
}

impl Scenario {
    /// The scenario of the issue: 1 s steady state, 6 s after the flip for every contestant.
    pub fn full() -> Scenario {
        Scenario {
            steady_ms: 1000,
            window_ms: 6000,
            fast_window_ms: 6000,
            new_every_ms: 10,
            pooled: 4,
            pooled_every_ms: 50,
            grace_ms: 2000,
            warmup_streak: 20,
            warmup_timeout_ms: 20_000,
        }
    }

    /// `--quick`: shorter steady state, and 3 s windows for the fast timings.
    pub fn quick() -> Scenario {
        Scenario {
            steady_ms: 500,
            fast_window_ms: 3000,
            ..Scenario::full()
        }
    }

    /// The window for `c`.
    pub fn window(&self, c: Contestant) -> Duration {
        Duration::from_millis(if c.fast() {
            self.fast_window_ms
        } else {
            self.window_ms
        })
    }
}

/// lb's configuration: the manual's two Bolt services (write -> master, read -> slaves) with the
/// role presets, at the presets' default timings or at inter 250ms rise 1 fall 1.
pub fn lb_config(topo: &Topology, fast: bool) -> String {
    let mut s = format!("instance = \"{}\"\n", topo.instance);
    for (name, preset) in [("master", "neo4j-ha-master"), ("slave", "neo4j-ha-slave")] {
        s += &format!("\n[[check]]\nname = \"{name}\"\npreset = \"{preset}\"\n");
        if fast {
            s += "inter = \"250ms\"\nrise = 1\nfall = 1\n";
        }
    }
    for b in &topo.backends {
        s += &format!(
            "\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            b.name, b.addr
        );
    }
    let all: Vec<String> = topo
        .backends
        .iter()
        .map(|b| format!("\"{}\"", b.name))
        .collect();
    for (name, port, check) in [("write", WRITE_PORT, "master"), ("read", 7681, "slave")] {
        s += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = 7687\nbackends = [{}]\ncheck = \"{check}\"\n",
            topo.vip,
            all.join(", ")
        );
    }
    s
}

/// The manual's HAProxy configuration with db01..db03 mapped to the topology's backends; `fast`
/// adds `default-server inter 250ms rise 1 fall 1` to its `defaults` section.
pub fn haproxy_config(topo: &Topology, fast: bool) -> Result<String> {
    ensure!(
        topo.backends.len() >= MANUAL_ADDRS.len(),
        "the manual's config needs {} backends",
        MANUAL_ADDRS.len()
    );
    let mut cfg = MANUAL_BOLT_CFG.to_string();
    for (manual, b) in MANUAL_ADDRS.iter().zip(&topo.backends) {
        let from = format!(" {manual}:7687 ");
        ensure!(
            cfg.matches(&from).count() == 2,
            "the manual's config no longer names {manual}:7687 twice"
        );
        cfg = cfg.replace(&from, &format!(" {}:7687 ", b.addr));
    }
    if fast {
        cfg = add_to_defaults(&cfg, "default-server inter 250ms rise 1 fall 1")?;
    }
    Ok(cfg)
}

/// `cfg` (the manual's HAProxy configuration) with `line` added to its `defaults` section.
pub fn add_to_defaults(cfg: &str, line: &str) -> Result<String> {
    let anchor = "defaults\n    mode        tcp\n";
    ensure!(
        cfg.contains(anchor),
        "the manual's config has no `defaults` section to extend"
    );
    Ok(cfg.replacen(anchor, &format!("{anchor}    {line}\n"), 1))
}

/// The `haproxy` binary: `$LB_HAPROXY`, else Debian's `/usr/sbin/haproxy`, else `haproxy` on PATH.
pub fn haproxy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_HAPROXY") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/sbin/haproxy");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("haproxy")
    }
}

/// `haproxy -v`'s first line, for the report.
pub fn haproxy_version() -> Option<String> {
    let out = std::process::Command::new(haproxy_bin())
        .arg("-v")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

enum Balancer {
    Lb(LbProcess),
    Haproxy(Process),
}

impl Balancer {
    fn process(&self) -> &Process {
        match self {
            Balancer::Lb(lb) => &lb.process,
            Balancer::Haproxy(p) => p,
        }
    }

    /// Fails with the balancer's output if it has exited.
    fn ensure_alive(&self, when: &str) -> Result<()> {
        let p = self.process();
        if let Some(status) = p.try_wait()? {
            bail!("{} exited ({status}) {when}\n{}", p.name(), p.logs());
        }
        Ok(())
    }
}

fn start_balancer(topo: &Topology, c: Contestant) -> Result<(Balancer, String)> {
    if c.imported() {
        let mut cfg = haproxy_config(topo, false)?;
        if c == Contestant::LbImportedShutdown {
            cfg = add_to_defaults(&cfg, "default-server on-marked-down shutdown-sessions")?;
        }
        let path = topo.log_dir.join("haproxy.cfg");
        std::fs::write(&path, &cfg).with_context(|| format!("writing {}", path.display()))?;
        let path = path.display().to_string();
        let mut args = vec!["--haproxy-config", &path, "--xdp-mode", "native"];
        if c == Contestant::LbImportedFaithful {
            args.push("--faithful");
        }
        let lb = topo
            .start_lb_args(&args)
            .context("lb run --haproxy-config did not start")?;
        return Ok((Balancer::Lb(lb), cfg));
    }
    if c.is_lb() {
        let cfg = lb_config(topo, c.fast());
        let lb = topo
            .start_lb(&cfg, &["--xdp-mode", "native"])
            .context("lb did not start")?;
        return Ok((Balancer::Lb(lb), cfg));
    }
    let cfg = haproxy_config(topo, c.fast())?;
    let path = topo.log_dir.join("haproxy.cfg");
    std::fs::write(&path, &cfg).with_context(|| format!("writing {}", path.display()))?;
    let lb_ns = &topo.lb.ns;
    // HAProxy binds *:7680 in the lb namespace: give it the VIP so the client is the same for all.
    lb_ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", topo.vip),
        "dev",
        &topo.lb.ifaces[0],
    ])?;
    lb_ns.exec(&["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"])?;
    let p = spawn_haproxy(topo, &path, &cfg)?;
    let addr = SocketAddrV4::new(topo.vip, WRITE_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.try_wait()? {
            bail!("haproxy exited ({status}) at start\n{}", p.logs());
        }
        let up = topo.client.ns.run_in(|| {
            TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok((Balancer::Haproxy(p), cfg));
        }
        if Instant::now() > deadline {
            bail!("haproxy did not listen on {addr} within 10 s\n{}", p.logs());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends writes until `streak` in a row were answered by db01; returns (attempts, time taken).
fn warm_up(topo: &Topology, addr: SocketAddrV4, s: &Scenario) -> Result<(usize, Duration)> {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(s.warmup_timeout_ms);
    let (attempts, seen) = topo.client.ns.run_in(|| {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let (mut attempts, mut streak) = (0, 0);
        while streak < s.warmup_streak && Instant::now() < deadline {
            let o = new_write(addr);
            attempts += 1;
            streak = if o.reached() == Some(OLD) && !matches!(o, Outcome::NotALeader { .. }) {
                streak + 1
            } else {
                0
            };
            *seen.entry(o.label()).or_default() += 1;
            thread::sleep(Duration::from_millis(s.new_every_ms));
        }
        (
            attempts,
            if streak >= s.warmup_streak {
                None
            } else {
                Some(seen)
            },
        )
    })?;
    if let Some(seen) = seen {
        bail!(
            "warm-up: no {} consecutive writes on {OLD} within {} ms ({attempts} attempts: {seen:?})",
            s.warmup_streak,
            s.warmup_timeout_ms
        );
    }
    Ok((attempts, start.elapsed()))
}

/// One new-connection write, relative to T0.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// Send time, seconds after T0 (negative before).
    pub t: f64,
    /// Milliseconds until the outcome.
    pub took_ms: f64,
    pub outcome: Outcome,
}

/// One write of a pooled connection, relative to T0.
#[derive(Debug, Clone, Serialize)]
pub struct PooledWrite {
    pub conn: usize,
    /// Whether it went over a connection opened after the previous one failed.
    pub reconnect: bool,
    pub t: f64,
    pub took_ms: f64,
    pub outcome: Outcome,
    /// Why the client dropped the connection after this write (e.g. reset right after a
    /// NotALeader), if it did.
    pub lost: Option<Outcome>,
}

impl PooledWrite {
    /// The failure this write revealed: its own outcome, or the loss of its connection.
    fn failure(&self) -> Option<&Outcome> {
        if self.outcome.is_failure() {
            Some(&self.outcome)
        } else {
            self.lost.as_ref()
        }
    }
}

fn rel(t: Instant, t0: Instant) -> f64 {
    if t >= t0 {
        (t - t0).as_secs_f64()
    } else {
        -(t0 - t).as_secs_f64()
    }
}

fn attempt(a: &RawAttempt, t0: Instant) -> Attempt {
    Attempt {
        t: rel(a.sent, t0),
        took_ms: a.took.as_secs_f64() * 1000.0,
        outcome: a.outcome.clone(),
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// First new write answered by the new master, seconds after T0.
    pub first_new_master_s: Option<f64>,
    /// Last new write that reached the old master (answered, or refused as NotALeader), seconds
    /// after T0; 0 when none was sent after T0.
    pub last_old_master_s: Option<f64>,
    /// One of the window's last [`END_ATTEMPTS`] new writes still reached the old master: it was
    /// still in the rotation when the window closed, and the figure above is a lower bound.
    pub old_master_until_end: bool,
    /// Time during which new writes reached both: last old after first new, else 0.
    pub overlap_s: Option<f64>,
    /// When there was no overlap: first new - last old.
    pub gap_s: Option<f64>,
    /// New connections sent after T0.
    pub new_after_t0: usize,
    /// Of those, failed without a server answering (refused, reset, closed, timeout, other).
    pub failed_after_t0: usize,
    /// Of those, writes the old master refused as NotALeader.
    pub not_a_leader_after_t0: usize,
    /// Outcome counts after T0, by label.
    pub after_t0: BTreeMap<String, usize>,
    /// Outcome counts before T0, by label.
    pub before_t0: BTreeMap<String, usize>,
    /// New connections still in flight when the run ended.
    pub pending: u64,
}

/// How many of a window's last new writes decide whether the old master was still reached at its end
/// (5 at 10 ms spacing: 50 ms; under a 50/50 split, all five miss the old master with p = 1/32).
pub const END_ATTEMPTS: usize = 5;

/// Computes the figures from the new-connection attempts of one run, sorted by send time.
pub fn figures(attempts: &[Attempt], pending: u64) -> Figures {
    let mut f = Figures {
        pending,
        ..Figures::default()
    };
    let mut last_old: Option<f64> = None;
    for a in attempts {
        let label = a.outcome.label();
        if a.t < 0.0 {
            *f.before_t0.entry(label).or_default() += 1;
            if a.outcome.reached() == Some(OLD) {
                last_old = Some(0.0);
            }
            continue;
        }
        *f.after_t0.entry(label).or_default() += 1;
        f.new_after_t0 += 1;
        if a.outcome.is_failure() {
            f.failed_after_t0 += 1;
        }
        match (&a.outcome, a.outcome.reached()) {
            (Outcome::Answered { .. }, Some(NEW)) => {
                f.first_new_master_s = Some(f.first_new_master_s.map_or(a.t, |x| x.min(a.t)));
            }
            (o, Some(OLD)) => {
                if matches!(o, Outcome::NotALeader { .. }) {
                    f.not_a_leader_after_t0 += 1;
                }
                last_old = Some(last_old.map_or(a.t, |x| x.max(a.t)));
            }
            _ => {}
        }
    }
    f.last_old_master_s = last_old;
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.t >= 0.0).collect();
    f.old_master_until_end = after.len() >= END_ATTEMPTS
        && after[after.len() - END_ATTEMPTS..]
            .iter()
            .any(|a| a.outcome.reached() == Some(OLD));
    if let (Some(first), Some(last)) = (f.first_new_master_s, last_old) {
        f.overlap_s = Some((last - first).max(0.0));
        if last < first {
            f.gap_s = Some(first - last);
        }
    }
    f
}

/// What became of one pooled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Its connection failed (reset/closed) and a reconnection wrote on the new master.
    MovedAfterReset,
    /// Wrote on the new master without losing its connection (not expected: TCP is pinned).
    MovedWithoutReset,
    /// Still reaching the old master at the end of the window.
    StayedOnOld,
    /// Lost its connection and never wrote on the new master within the window.
    ResetNotBack,
    /// None of the above (e.g. no writes at all).
    Other,
}

/// One pooled connection over the run.
#[derive(Debug, Clone, Serialize)]
pub struct PooledSummary {
    pub conn: usize,
    pub fate: Fate,
    /// Server of its first write.
    pub initial: Option<String>,
    /// First failed write after T0: (seconds after T0, label).
    pub first_failure_s: Option<f64>,
    pub first_failure: Option<String>,
    /// First write answered by the new master.
    pub new_master_s: Option<f64>,
    /// Last write that reached the old master after T0.
    pub last_old_master_s: Option<f64>,
    /// Writes after T0 that the old master refused as NotALeader.
    pub not_a_leader_after_t0: usize,
    /// Writes after T0 the old master accepted (it was still master).
    pub old_master_writes_after_t0: usize,
    /// Label of its last write.
    pub last: Option<String>,
}

/// Summarises the writes of pooled connection `conn`.
pub fn pooled_summary(conn: usize, writes: &[PooledWrite]) -> PooledSummary {
    let mut mine: Vec<&PooledWrite> = writes.iter().filter(|w| w.conn == conn).collect();
    mine.sort_by(|a, b| a.t.total_cmp(&b.t));
    let after: Vec<&&PooledWrite> = mine.iter().filter(|w| w.t >= 0.0).collect();
    let first_failure = after
        .iter()
        .find_map(|w| w.failure().map(|f| (w.t, f.label())));
    let new_master_s = after
        .iter()
        .find(|w| matches!(&w.outcome, Outcome::Answered { server } if server == NEW))
        .map(|w| w.t);
    let last_old = after
        .iter()
        .rev()
        .find(|w| w.outcome.reached() == Some(OLD))
        .map(|w| w.t);
    let last = mine.last();
    let fate = match (new_master_s, &first_failure, last) {
        (Some(_), Some(_), _) => Fate::MovedAfterReset,
        (Some(_), None, _) => Fate::MovedWithoutReset,
        (None, _, Some(l)) if l.t >= 0.0 && l.outcome.reached() == Some(OLD) => Fate::StayedOnOld,
        (None, Some(_), _) => Fate::ResetNotBack,
        _ => Fate::Other,
    };
    PooledSummary {
        conn,
        fate,
        initial: mine
            .first()
            .and_then(|w| w.outcome.reached().map(str::to_string)),
        first_failure_s: first_failure.as_ref().map(|(t, _)| *t),
        first_failure: first_failure.map(|(_, l)| l),
        new_master_s,
        last_old_master_s: last_old,
        not_a_leader_after_t0: after
            .iter()
            .filter(|w| {
                matches!(&w.outcome, Outcome::NotALeader { server } if server.as_deref() == Some(OLD))
            })
            .count(),
        old_master_writes_after_t0: after
            .iter()
            .filter(|w| matches!(&w.outcome, Outcome::Answered { server } if server == OLD))
            .count(),
        last: last.map(|w| w.outcome.label()),
    }
}

/// Everything one run recorded.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub contestant: Contestant,
    /// 0-based run number.
    pub run: usize,
    /// T0 as Unix time, milliseconds.
    pub t0_unix_ms: u128,
    /// Milliseconds the two role changes took (from T0).
    pub flip_ms: f64,
    pub warmup_attempts: usize,
    pub warmup_s: f64,
    /// Steady state actually waited between warm-up and T0 (with the phase offset).
    pub steady_s: f64,
    pub window_s: f64,
    /// Where the client sent its writes.
    pub client_target: String,
    /// `net.ipv4.conf.{all,l0,l1}.forwarding` in the lb namespace during the run.
    pub lb_ns_forwarding: String,
    pub figures: Figures,
    pub pooled: Vec<PooledSummary>,
    /// Pooled connections whose thread had not finished when the run ended.
    pub pooled_pending: usize,
    pub sims: Vec<Stats>,
    pub balancer_config: String,
    /// The balancer's last log lines (lb logs every state change; the manual's HAProxy config has
    /// no log target, so only its start-up notices).
    pub balancer_log_tail: Vec<String>,
    pub attempts: Vec<Attempt>,
    pub pooled_writes: Vec<PooledWrite>,
}

/// The extra steady-state time of run `run` of `runs`: `(run + 0.5) / runs` of `c`'s check interval.
pub fn phase_offset(c: Contestant, run: usize, runs: usize) -> Duration {
    c.inter().mul_f64((run as f64 + 0.5) / runs.max(1) as f64)
}

/// Runs the scenario once for `c` on a fresh topology (removed again before this returns); `run`
/// of `runs` picks the phase offset.
pub fn run_once(c: Contestant, s: &Scenario, run: usize, runs: usize) -> Result<RunRecord> {
    let topo = Topology::two_armed("bench_failover")?;
    let sims = topo.start_sims(&["master", "slave", "slave"])?;
    let (balancer, balancer_config) = start_balancer(&topo, c)?;
    let steady = Duration::from_millis(s.steady_ms) + phase_offset(c, run, runs);
    let result = measure(&topo, &sims, &balancer, c, s, run, steady);
    let log: Vec<String> = balancer
        .process()
        .stderr()
        .lines()
        .chain(balancer.process().stdout().lines())
        .map(strip_ansi)
        .collect();
    let tail = log[log.len().saturating_sub(60)..].to_vec();
    let mut record = match result {
        Ok(r) => r,
        Err(e) => return Err(e.context(format!("{}\n{}", c.id(), balancer.process().logs()))),
    };
    record.balancer_config = balancer_config;
    record.balancer_log_tail = tail;
    Ok(record)
}

fn measure(
    topo: &Topology,
    sims: &[SimProcess],
    balancer: &Balancer,
    c: Contestant,
    s: &Scenario,
    run: usize,
    steady: Duration,
) -> Result<RunRecord> {
    let addr = c.target(topo);
    let (warmup_attempts, warmup) = warm_up(topo, addr, s)?;
    balancer.ensure_alive("during warm-up")?;
    let forwarding = topo
        .lb
        .ns
        .exec_unchecked(&[
            "sysctl",
            "net.ipv4.conf.all.forwarding",
            "net.ipv4.conf.l0.forwarding",
            "net.ipv4.conf.l1.forwarding",
        ])
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();

    let window = s.window(c);
    let pooled = topo.client.ns.run_in(|| {
        (0..s.pooled)
            .map(|_| BoltClient::connect(addr.into(), Negotiation::Classic, None))
            .collect::<Result<Vec<_>>>()
    })??;
    let spec = LoadSpec {
        addr,
        new_every: Duration::from_millis(s.new_every_ms),
        pooled_every: Duration::from_millis(s.pooled_every_ms),
        deadline: Instant::now() + steady + window + Duration::from_secs(5),
    };
    let load = topo
        .client
        .ns
        .run_in(move || Load::start(spec, pooled))?
        .context("starting the client load")?;

    thread::sleep(steady);
    let (old, new) = (
        SimControl::new(&sims[0].control),
        SimControl::new(&sims[1].control),
    );
    let t0 = Instant::now();
    let t0_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    old.set_role(Role::Slave).context("demoting db01")?;
    new.set_role(Role::Master).context("promoting db02")?;
    let flip = t0.elapsed();
    let end = t0 + window;
    thread::sleep(end.saturating_duration_since(Instant::now()));
    let rec: Recorded = load.finish(Duration::from_millis(s.grace_ms));
    balancer.ensure_alive("during the run")?;

    let attempts: Vec<Attempt> = rec.new.iter().map(|a| attempt(a, t0)).collect();
    let mut attempts = attempts;
    attempts.sort_by(|a, b| a.t.total_cmp(&b.t));
    let pooled_writes: Vec<PooledWrite> = rec
        .pooled
        .iter()
        .map(|p| {
            let a = attempt(&p.attempt, t0);
            PooledWrite {
                conn: p.conn,
                reconnect: p.reconnect,
                lost: p.lost.clone(),
                t: a.t,
                took_ms: a.took_ms,
                outcome: a.outcome,
            }
        })
        .collect();
    ensure!(
        attempts.iter().any(|a| a.t >= 0.0),
        "no new write was recorded after T0"
    );
    let figures = figures(&attempts, rec.new_pending);
    let pooled = (0..s.pooled)
        .map(|i| pooled_summary(i, &pooled_writes))
        .collect();
    let sims = sims
        .iter()
        .filter_map(|p| SimControl::new(&p.control).stats().ok())
        .collect();
    Ok(RunRecord {
        contestant: c,
        run,
        t0_unix_ms,
        flip_ms: flip.as_secs_f64() * 1000.0,
        warmup_attempts,
        warmup_s: warmup.as_secs_f64(),
        steady_s: steady.as_secs_f64(),
        window_s: window.as_secs_f64(),
        client_target: addr.to_string(),
        lb_ns_forwarding: forwarding,
        figures,
        pooled,
        pooled_pending: rec.pooled_pending,
        sims,
        balancer_config: String::new(),
        balancer_log_tail: Vec::new(),
        attempts,
        pooled_writes,
    })
}

/// `line` without ANSI colour sequences (`ESC [ ... letter`), as lb's log has them.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The medians of one contestant over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub contestant: Contestant,
    pub label: String,
    pub runs_ok: usize,
    pub runs_failed: usize,
    pub first_new_master_s: Option<Spread>,
    pub last_old_master_s: Option<Spread>,
    /// Runs in which the old master still got new writes at the end of the window.
    pub old_master_until_end_runs: usize,
    pub overlap_s: Option<Spread>,
    pub failed_after_t0: Option<Spread>,
    /// Failure labels after T0 over all runs.
    pub failures: BTreeMap<String, usize>,
    pub not_a_leader_after_t0: Option<Spread>,
    /// Pooled connections per fate, over all runs.
    pub pooled_fates: BTreeMap<String, usize>,
    /// The table's pooled-connection cell.
    pub pooled_fate: String,
}

/// Summarises the successful runs of `c`.
pub fn summarize(c: Contestant, runs: &[RunRecord], failed: usize) -> Summary {
    let f = |get: &dyn Fn(&Figures) -> Option<f64>| {
        spread(&runs.iter().map(|r| get(&r.figures)).collect::<Vec<_>>())
    };
    let mut failures = BTreeMap::new();
    for r in runs {
        for (label, n) in &r.figures.after_t0 {
            if !matches!(label.as_str(), "db01" | "db02" | "db03")
                && !label.starts_with("NotALeader")
            {
                *failures.entry(label.clone()).or_default() += n;
            }
        }
    }
    let pooled: Vec<&PooledSummary> = runs.iter().flat_map(|r| &r.pooled).collect();
    let mut pooled_fates = BTreeMap::new();
    for p in &pooled {
        *pooled_fates
            .entry(format!("{:?}", p.fate))
            .or_insert(0usize) += 1;
    }
    Summary {
        contestant: c,
        label: c.label().to_string(),
        runs_ok: runs.len(),
        runs_failed: failed,
        first_new_master_s: f(&|x| x.first_new_master_s),
        last_old_master_s: f(&|x| x.last_old_master_s),
        old_master_until_end_runs: runs
            .iter()
            .filter(|r| r.figures.old_master_until_end)
            .count(),
        overlap_s: f(&|x| x.overlap_s),
        failed_after_t0: f(&|x| Some(x.failed_after_t0 as f64)),
        failures,
        not_a_leader_after_t0: f(&|x| Some(x.not_a_leader_after_t0 as f64)),
        pooled_fates,
        pooled_fate: pooled_fate(&pooled, runs.first().map_or(0.0, |r| r.window_s)),
    }
}

fn pooled_fate(pooled: &[&PooledSummary], window: f64) -> String {
    let total = pooled.len();
    let mut parts = Vec::new();
    let of = |fate: Fate| -> Vec<&PooledSummary> {
        pooled.iter().copied().filter(|p| p.fate == fate).collect()
    };
    let med = |v: &[&PooledSummary], get: &dyn Fn(&PooledSummary) -> Option<f64>| {
        median(&v.iter().filter_map(|p| get(p)).collect::<Vec<_>>())
    };
    let how = |v: &[&PooledSummary]| {
        let mut labels: BTreeMap<String, usize> = BTreeMap::new();
        for p in v {
            if let Some(l) = &p.first_failure {
                *labels.entry(l.clone()).or_default() += 1;
            }
        }
        labels
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(l, _)| l)
            .unwrap_or_else(|| "failed".into())
    };
    let nal = |v: &[&PooledSummary]| {
        median(
            &v.iter()
                .map(|p| p.not_a_leader_after_t0 as f64)
                .collect::<Vec<_>>(),
        )
        .unwrap_or(0.0)
    };
    let moved = of(Fate::MovedAfterReset);
    if !moved.is_empty() {
        parts.push(format!(
            "{}/{total} {} at {:.2} s, reconnected to {NEW} at {:.2} s ({:.0} NotALeader before)",
            moved.len(),
            how(&moved),
            med(&moved, &|p| p.first_failure_s).unwrap_or(f64::NAN),
            med(&moved, &|p| p.new_master_s).unwrap_or(f64::NAN),
            nal(&moved),
        ));
    }
    let stayed = of(Fate::StayedOnOld);
    if !stayed.is_empty() {
        parts.push(format!(
            "{}/{total} still on {OLD} after {window:.0} s ({:.0} NotALeader each)",
            stayed.len(),
            nal(&stayed),
        ));
    }
    let lost = of(Fate::ResetNotBack);
    if !lost.is_empty() {
        parts.push(format!(
            "{}/{total} {} at {:.2} s, not on {NEW} within {window:.0} s",
            lost.len(),
            how(&lost),
            med(&lost, &|p| p.first_failure_s).unwrap_or(f64::NAN),
        ));
    }
    for fate in [Fate::MovedWithoutReset, Fate::Other] {
        let v = of(fate);
        if !v.is_empty() {
            parts.push(format!("{}/{total} {fate:?}", v.len()));
        }
    }
    if parts.is_empty() {
        "no pooled data".into()
    } else {
        parts.join("; ")
    }
}

/// The report's markdown table.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| contestant | first write on new master | last write on old master | overlap | refused/failed new connections | pooled connections' fate |\n\
         |---|---|---|---|---|---|\n",
    );
    for s in summaries {
        if s.runs_ok == 0 {
            out += &format!(
                "| {} | no data ({} runs failed) | | | | |\n",
                s.label, s.runs_failed
            );
            continue;
        }
        let mut last_old = fmt_secs(s.last_old_master_s, "none");
        if s.old_master_until_end_runs > 0 {
            last_old += &format!(
                ", still at end of window in {}/{} runs",
                s.old_master_until_end_runs, s.runs_ok
            );
        }
        let failed = match s.failed_after_t0 {
            Some(f) if s.runs_ok > 1 => format!("{:.0} ({:.0}-{:.0})", f.median, f.min, f.max),
            Some(f) => format!("{:.0}", f.median),
            None => "-".into(),
        };
        let kinds: Vec<String> = s.failures.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let failed = if kinds.is_empty() {
            failed
        } else {
            format!("{failed} [all runs: {}]", kinds.join(", "))
        };
        let runs = if s.runs_failed > 0 {
            format!(
                " ({} of {} runs failed)",
                s.runs_failed,
                s.runs_ok + s.runs_failed
            )
        } else {
            String::new()
        };
        out += &format!(
            "| {}{runs} | {} | {} | {} | {failed} | {} |\n",
            s.label,
            fmt_secs(s.first_new_master_s, "none in window"),
            last_old,
            fmt_secs(s.overlap_s, "n/a"),
            s.pooled_fate
        );
    }
    out
}

/// Validates the configuration `cfg` (written at `path`) with `haproxy -c` and starts HAProxy
/// in the foreground in the lb namespace.
pub fn spawn_haproxy(
    topo: &Topology,
    path: &std::path::Path,
    cfg: &str,
) -> Result<crate::harness::Process> {
    let lb_ns = &topo.lb.ns;
    let bin = haproxy_bin();
    let check = lb_ns.exec_unchecked(&[
        bin.as_os_str(),
        "-c".as_ref(),
        "-f".as_ref(),
        path.as_os_str(),
    ])?;
    if !check.status.success() {
        bail!(
            "haproxy -c rejected the config ({}):\n{}{}\n--- config ---\n{cfg}",
            check.status,
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let mut cmd = lb_ns.command(&bin);
    cmd.arg("-f").arg(path).arg("-db");
    topo.spawn_command("haproxy", cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(t: f64, outcome: Outcome) -> Attempt {
        Attempt {
            t,
            took_ms: 1.0,
            outcome,
        }
    }
    fn on(server: &str) -> Outcome {
        Outcome::Answered {
            server: server.into(),
        }
    }
    fn nal(server: &str) -> Outcome {
        Outcome::NotALeader {
            server: Some(server.into()),
        }
    }

    #[test]
    fn a_clean_switch_has_a_gap_and_no_overlap() {
        let f = figures(
            &[
                a(-0.5, on("db01")),
                a(0.1, on("db01")),
                a(0.2, nal("db01")),
                a(0.3, Outcome::Refused),
                a(0.4, on("db02")),
                a(0.5, on("db02")),
                a(0.6, on("db02")),
                a(0.7, on("db02")),
                a(0.8, on("db02")),
            ],
            0,
        );
        assert_eq!(f.first_new_master_s, Some(0.4));
        assert_eq!(f.last_old_master_s, Some(0.2));
        assert_eq!(f.overlap_s, Some(0.0));
        assert!((f.gap_s.unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(
            (f.new_after_t0, f.failed_after_t0, f.not_a_leader_after_t0),
            (8, 1, 1)
        );
        assert!(!f.old_master_until_end);
    }

    #[test]
    fn a_split_has_overlap_and_a_censored_end() {
        let mut split: Vec<Attempt> = (0..10)
            .map(|i| {
                a(
                    5.0 + 0.1 * f64::from(i),
                    on(if i % 2 == 0 { "db02" } else { "db01" }),
                )
            })
            .collect();
        split.insert(0, a(2.0, on("db02")));
        let f = figures(&split, 2);
        assert!((f.overlap_s.unwrap() - 3.9).abs() < 1e-9);
        assert!(f.old_master_until_end);
        assert_eq!(f.pending, 2);
        // Nothing after T0 on the old master: its last write counts as T0.
        let f = figures(&[a(-0.01, on("db01")), a(0.3, on("db02"))], 0);
        assert_eq!(f.last_old_master_s, Some(0.0));
        // The old master left just before the end: not censored.
        let mut late: Vec<Attempt> = vec![a(5.8, on("db01"))];
        late.extend((0..5).map(|i| a(5.81 + 0.01 * f64::from(i), on("db02"))));
        assert!(!figures(&late, 0).old_master_until_end);
    }

    #[test]
    fn pooled_fates() {
        let w = |conn, t, outcome| PooledWrite {
            conn,
            reconnect: false,
            lost: None,
            t,
            took_ms: 1.0,
            outcome,
        };
        let writes = vec![
            w(0, -0.1, on("db01")),
            w(0, 0.2, nal("db01")),
            w(0, 0.3, Outcome::Reset),
            w(0, 0.35, Outcome::Refused),
            w(0, 0.4, on("db02")),
            w(1, -0.1, on("db01")),
            w(1, 5.9, nal("db01")),
            w(2, -0.1, on("db01")),
            w(2, 0.3, Outcome::Reset),
        ];
        let p0 = pooled_summary(0, &writes);
        assert_eq!(p0.fate, Fate::MovedAfterReset);
        assert_eq!(
            (p0.first_failure_s, p0.new_master_s),
            (Some(0.3), Some(0.4))
        );
        assert_eq!(p0.first_failure.as_deref(), Some("reset"));
        assert_eq!(p0.not_a_leader_after_t0, 1);
        assert_eq!(p0.initial.as_deref(), Some("db01"));
        assert_eq!(pooled_summary(1, &writes).fate, Fate::StayedOnOld);
        assert_eq!(pooled_summary(2, &writes).fate, Fate::ResetNotBack);
        assert_eq!(pooled_summary(3, &writes).fate, Fate::Other);
        // Refused as NotALeader, then reset during the follow-up read: a reset all the same.
        let mut lost = w(4, 0.125, nal("db01"));
        lost.lost = Some(Outcome::Reset);
        let later = vec![w(4, -0.1, on("db01")), lost, w(4, 0.175, on("db02"))];
        let p4 = pooled_summary(4, &later);
        assert_eq!(p4.fate, Fate::MovedAfterReset);
        assert_eq!(
            (p4.first_failure_s, p4.first_failure.as_deref()),
            (Some(0.125), Some("reset"))
        );
    }

    #[test]
    fn runs_sample_the_check_phase_evenly() {
        let ms = |run, runs| phase_offset(Contestant::LbManual, run, runs).as_millis();
        assert_eq!((ms(0, 1), ms(0, 4), ms(3, 4)), (1000, 250, 1750));
        assert_eq!(phase_offset(Contestant::HaproxyFast, 1, 5).as_millis(), 75);
    }

    #[test]
    fn colours_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m up"),
            "2026  INFO up"
        );
    }

    #[test]
    fn the_manual_config_is_mapped_and_extended() {
        // Addresses the harness gives db01..db03 are the manual's; map onto others to see the swap.
        let mut cfg = MANUAL_BOLT_CFG.to_string();
        for (m, to) in MANUAL_ADDRS
            .iter()
            .zip(["10.9.0.1", "10.9.0.2", "10.9.0.3"])
        {
            cfg = cfg.replace(&format!(" {m}:7687 "), &format!(" {to}:7687 "));
        }
        assert_eq!(cfg.matches(" 10.9.0.2:7687 check port 7474").count(), 2);
        assert!(MANUAL_BOLT_CFG.contains("bind *:7680"));
        assert!(MANUAL_BOLT_CFG.contains("defaults\n    mode        tcp\n"));
    }
}
