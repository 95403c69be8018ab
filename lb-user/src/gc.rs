//! The connection-table GC: once a second a thread of the agent ([`Worker`], not the event loop
//! the checks run on) walks both tables and deletes
//! - established flows closing (FIN both ways, or a RST; see `lb_common::is_closing`) whose
//!   last segment is older than the close timeout,
//! - established flows idle for longer than the idle timeout,
//! - established entries whose partner is gone (a delete interrupted half-way), once they are
//!   older than the close timeout;
//!
//! It deletes no handshake: a record older than the connect timeout (a handshake that never
//! completed) is invisible to the data path, and the next claim in its set takes its way; the
//! GC counts it once (`embryonic_expired`) and clears its SNAT port's bit in the port bitmap.
//!
//! Each pass then brings the port bitmap (`PORT_HINTS`) in line with the tables: the bits of
//! the ports its flows and handshakes hold are set, and every other set bit is released
//! through [`HintMap::release`], which looks the port up in the established table after
//! clearing it (a flow may have been established since the pass read the table). It can look
//! a port up only for backends whose address and SNAT addresses it has seen in a flow or a
//! handshake record; another backend's bits stay set (its new flows then search at random).
//!
//! and then releases the connection slots (`maxconn`) of flows that are gone: deleted above or
//! vanished (a slot is taken when a handshake completes, so only established flows hold one). The agent cannot decrement a count
//! atomically from userspace, so it releases through `lb_release`, a program it runs with
//! `BPF_PROG_TEST_RUN` that deletes the slot and, only if that delete succeeded, decrements.
//!
//! The idle timeout is per service (`idle_timeout` of a `[[service]]`, else the global one).
//!
//! Every flow it deletes gets a line in the connection log (`crate::connlog`).
//!
//! The data path deletes a flow itself only when the client closed first and its last ACK
//! passed (and on resets and tuple reuse); on a FIN or RST it deletes nothing: a half-closed
//! connection keeps working, retransmitted FINs still translate, and a spoofed RST can be
//! taken back by the next genuine segment. Flow timestamps are `bpf_ktime_get_coarse_ns`, i.e.
//! CLOCK_MONOTONIC_COARSE; `last_seen_ns` is written at most once a second per entry, so idle expiry is accurate to a
//! second.
//!
//! A pass first reads a table completely, then deletes: deleting the key an iteration stands on
//! would restart `BPF_MAP_GET_NEXT_KEY` from the first key. Each doomed flow is read again just
//! before its delete and kept if it changed meanwhile (a new flow on the same tuple, or a
//! segment that made it active again). A pass deletes at most [`MAX_DELETIONS`] entries; the
//! rest waits for the next second.
use std::{os::fd::AsFd, time::Duration};

use foldhash::{HashMap as FastMap, HashSet as FastSet};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{
    backend_closed_first, is_closing, names, Flow, FlowKey, PortHints, Slot, DIR_FORWARD,
    IPPROTO_TCP, MAX_BACKENDS, MAX_SERVICES,
};
use tracing::{debug, warn};

use crate::{
    config::Config,
    connlog::{ConnLog, Ended},
    handshakes::Handshakes,
    port_hints::{HintBits, HintMap},
};

/// Most entries one pass deletes (two a flow): a million flows that expire together (idle
/// since a burst) go in one pass (four syscalls a flow, a few seconds), not in a queue of
/// one-second passes ten times as long.
pub const MAX_DELETIONS: usize = 2_000_000;

/// How often the agent runs a pass.
pub const PERIOD: Duration = Duration::from_secs(1);

/// How long a flow closed by the client first (or by a RST) stays after its last segment, when
/// the close timeout is longer: the backend holds no TIME_WAIT for it, so its SNAT port can be
/// used again soon (under connection churn to one backend the ports would otherwise run out).
/// Enough for retransmitted FINs and last ACKs; a later one finds no flow and gets a RST.
pub const QUICK_CLOSE_NS: u64 = 2_000_000_000;

/// How old a slot must be before the GC may find its flow gone: the data path records the slot
/// just before it moves the flow to the established table.
const SLOT_GRACE_NS: u64 = 1_000_000_000;

/// The timeouts a pass applies, in nanoseconds. Zero disables the idle or close expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub connect_ns: u64,
    pub idle_ns: u64,
    pub close_ns: u64,
    /// Idle timeout per service id; 0: `idle_ns`.
    pub idle_by_service: [u64; MAX_SERVICES as usize],
}

impl Timeouts {
    /// Global timeouts only.
    pub fn new(connect_ns: u64, idle_ns: u64, close_ns: u64) -> Self {
        Self {
            connect_ns,
            idle_ns,
            close_ns,
            idle_by_service: [0; MAX_SERVICES as usize],
        }
    }

    pub fn from_config(cfg: &Config) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut t = Self::new(
            ns(cfg.connect_timeout),
            ns(cfg.idle_timeout),
            ns(cfg.close_timeout),
        );
        for s in &cfg.services {
            if let (Some(d), Some(slot)) =
                (s.idle_timeout, t.idle_by_service.get_mut(s.id as usize))
            {
                *slot = ns(d);
            }
        }
        t
    }

    /// The idle timeout of flows of `service`.
    pub fn idle_of(&self, service: u32) -> u64 {
        match self.idle_by_service.get(service as usize) {
            Some(&t) if t != 0 => t,
            _ => self.idle_ns,
        }
    }

    /// Why the flow of the forward entry `a` and the reply entry `b` should go at `now`, if it
    /// should: closed and quiet for the close timeout (at most `QUICK_CLOSE_NS` unless the
    /// backend closed first and holds the TIME_WAIT), or idle for its service's idle timeout.
    fn expiry(&self, now: u64, a: &Flow, b: &Flow) -> Option<Expiry> {
        let quiet = now.saturating_sub(a.last_seen_ns.max(b.last_seen_ns));
        let idle = self.idle_of(a.service_id);
        let close = if backend_closed_first(a, b) {
            self.close_ns
        } else {
            self.close_ns.min(QUICK_CLOSE_NS)
        };
        if self.close_ns != 0 && is_closing(a, b) && quiet > close {
            Some(Expiry::Closed)
        } else if idle != 0 && quiet > idle {
            Some(Expiry::Idle)
        } else {
            None
        }
    }
}

/// What one pass saw and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries read from each table (a handshake record is one entry).
    pub embryonic_entries: usize,
    pub established_entries: usize,
    /// Handshake records found past the connect timeout (each counted by one pass; the data
    /// path reuses their ways).
    pub embryonic_expired: usize,
    /// Established flows (two entries each) deleted after the close timeout.
    pub closed: usize,
    /// Established flows (two entries each) deleted after the idle timeout.
    pub idle: usize,
    /// Established entries without their partner, deleted.
    pub orphans: usize,
    /// Doomed flows found changed when read again, and kept.
    pub revived: usize,
    /// Connection slots held (`SLOTS` entries read) and released by this pass.
    pub slots: usize,
    pub slots_released: usize,
    /// The pass stopped at [`MAX_DELETIONS`] (or at a read error); the rest waits.
    pub truncated: bool,
}

impl SweepStats {
    /// Entries deleted in this pass.
    pub fn deleted_entries(&self) -> usize {
        self.embryonic_expired + 2 * (self.closed + self.idle) + self.orphans
    }
}

/// How full a table is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Fill {
    pub entries: usize,
    pub capacity: usize,
}

/// Live connections of one (service, backend) pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairFlows {
    pub service: u32,
    pub backend: u32,
    /// Established flows that are not closing (FIN both ways or a RST).
    pub established: u64,
    /// Handshakes in progress (embryonic flows within the connect timeout).
    pub embryonic: u64,
}

/// What the tables held at the last pass (or census): entries per table against its capacity,
/// connection slots, and live connections per (service, backend) pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableFill {
    pub embryonic: Fill,
    pub established: Fill,
    /// Connection slots held against `maxconn` limits.
    pub slots: usize,
    /// Pairs with at least one live connection, ordered by (service, backend).
    pub pairs: Vec<PairFlows>,
}

impl TableFill {
    /// The pair's connections (established + in handshake).
    pub fn flows_of(&self, service: u32, backend: u32) -> u64 {
        self.pairs
            .iter()
            .find(|p| p.service == service && p.backend == backend)
            .map(|p| p.established + p.embryonic)
            .unwrap_or(0)
    }
}

/// Counts live connections per pair while a pass walks the tables, and remembers the forward
/// keys of the flows the pass keeps (so that the slot sweep needs no lookup for them).
#[derive(Default)]
struct Tally {
    pairs: std::collections::BTreeMap<(u32, u32), PairFlows>,
    live: FastSet<FlowKey>,
    /// The SNAT ports of the flows the pass keeps, per backend (when the GC keeps port hints).
    held: Option<HintBits>,
    /// A reply key of each backend id the pass met (the last one), for [`Known`].
    seen: Vec<Option<FlowKey>>,
}

impl Tally {
    /// A kept flow's reply key `key` (backend -> SNAT address:port) holds its SNAT port
    /// towards `backend`.
    fn hold(&mut self, backend: u32, key: &FlowKey) {
        self.learn(backend, key);
        if let Some(h) = &mut self.held {
            h.hold(backend, u16::from_be(key.dport));
        }
    }

    /// Remembers that backend id `backend` is reached with reply key `key` (kept or not).
    fn learn(&mut self, backend: u32, key: &FlowKey) {
        let i = backend as usize;
        if i < MAX_BACKENDS as usize {
            if self.seen.len() <= i {
                self.seen.resize(i + 1, None);
            }
            self.seen[i] = Some(*key);
        }
    }

    fn pair(&mut self, f: &Flow) -> &mut PairFlows {
        self.pairs
            .entry((f.service_id, f.backend_id))
            .or_insert(PairFlows {
                service: f.service_id,
                backend: f.backend_id,
                ..Default::default()
            })
    }
}

/// The addresses a backend id's flows were seen with: its own (address, port), and the SNAT
/// addresses towards it (a few of each: a backend's address or route may change).
#[derive(Default)]
struct Known {
    backends: Vec<(u32, u16)>,
    snat: Vec<u32>,
}

impl Known {
    /// At most this many of each are kept (the oldest goes).
    const MAX: usize = 4;

    /// Adds the addresses of reply key `key`.
    fn learn(&mut self, key: &FlowKey) {
        fn add<T: PartialEq>(v: &mut Vec<T>, x: T) {
            if !v.contains(&x) {
                if v.len() == Known::MAX {
                    v.remove(0);
                }
                v.push(x);
            }
        }
        add(&mut self.backends, (key.saddr, key.sport));
        add(&mut self.snat, key.daddr);
    }

    /// Whether an established flow holds SNAT `port` (host order) towards this backend now.
    fn established(&self, table: &Table, port: u16) -> bool {
        self.backends.iter().any(|&(saddr, sport)| {
            self.snat.iter().any(|&daddr| {
                let key = FlowKey {
                    saddr,
                    daddr,
                    sport,
                    dport: port.to_be(),
                    proto: IPPROTO_TCP,
                    _pad: 0,
                    _pad16: 0,
                };
                // A failed lookup other than "no such key" counts as held: the bit stays.
                !matches!(table.get(&key, 0), Err(MapError::KeyNotFound))
            })
        })
    }
}

/// Why an established flow goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Closed,
    Idle,
}

type Table<V = Flow> = HashMap<MapData, FlowKey, V>;
type Slots = HashMap<MapData, FlowKey, Slot>;

/// The GC: handles on both connection tables, the slot table and the timeouts.
pub struct Gc {
    embryonic: Handshakes,
    established: Table,
    slots: Option<(Slots, usize)>,
    fill: TableFill,
    /// Forward keys of the flows the last pass found alive and kept.
    live: FastSet<FlowKey>,
    /// Most keys one walk of the established table visits. A key deleted under the walk (by
    /// the data path) makes the kernel restart it from the first key; this keeps such a pass
    /// finite.
    established_visits: usize,
    /// The established table's fd, for batch reads.
    established_fd: std::os::fd::OwnedFd,
    /// Expired handshake records the last pass counted (key, creation time), so that the next
    /// one does not count them again.
    expired: FastSet<(FlowKey, u64)>,
    timeouts: Timeouts,
    log: ConnLog,
    /// How long the last pass spent deleting established flows (the work it found to do; the
    /// rest of a pass is reading).
    deleting: Duration,
    /// The program's port bitmap (see [`Gc::set_port_hints`]).
    hints: Option<std::sync::Arc<HintMap>>,
    /// How each backend id's ports are looked up: the addresses seen in its flows.
    known: FastMap<u32, Known>,
    /// In a pair: what the peer is told (flows ended, flows refreshed at each pass).
    pair: Option<crate::pair::feed::Feed>,
}

/// Why the GC ended a flow, as the connection log says it.
fn reason(fwd: &Flow, rev: &Flow, why: Expiry) -> &'static str {
    match why {
        Expiry::Idle => "idle timeout",
        Expiry::Closed if (fwd.close | rev.close) & lb_common::FLOW_CLOSE_RST != 0 => "reset",
        Expiry::Closed => "closed (FIN both ways)",
    }
}

/// A table as a typed map, and the visit bound of a walk over it.
fn table<V: aya::Pod>(map: Map, name: &str) -> Result<(Table<V>, usize, std::os::fd::OwnedFd)> {
    let max_entries = match &map {
        Map::HashMap(m) | Map::LruHashMap(m) => m
            .info()
            .map(|i| i.max_entries() as usize)
            .with_context(|| format!("map {name}: info"))?,
        _ => anyhow::bail!("map {name} is not a hash map"),
    };
    let fd = map_fd(&map, name)?;
    let t = Table::<V>::try_from(map)
        .with_context(|| format!("map {name} has an unexpected type or layout"))?;
    Ok((t, max_entries.saturating_mul(2).saturating_add(1024), fd))
}

/// A second handle on the map `name` of `ebpf`, which stays in the object.
pub fn share(ebpf: &Ebpf, name: &str) -> Result<Map> {
    let map = ebpf
        .map(name)
        .with_context(|| format!("the object has no map {name}"))?;
    let fd = map_fd(map, name)?;
    let data = MapData::from_fd(fd).with_context(|| format!("reopen map {name}"))?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// A second fd on the hash map or array `map` (named `name` in errors), for calls aya has no
/// method for or for a handle of another owner.
pub fn map_fd(map: &Map, name: &str) -> Result<std::os::fd::OwnedFd> {
    let data = match map {
        Map::HashMap(m) | Map::LruHashMap(m) | Map::Array(m) => m,
        _ => anyhow::bail!("map {name} is neither a hash map nor an array"),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicate the fd of map {name}"))
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the data path's clock (`bpf_ktime_get_coarse_ns`),
/// so that a stamp the agent writes is never ahead of the program's `now`.
pub fn monotonic_now() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("clock_gettime(CLOCK_MONOTONIC_COARSE)");
    }
    Ok((ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64)
}

impl Gc {
    /// The one constructor: both tables (with their visit bounds and fds) and the slot table.
    fn with_tables(
        embryonic: Handshakes,
        established: (Table, usize, std::os::fd::OwnedFd),
        slots: Option<(Slots, usize)>,
        timeouts: Timeouts,
    ) -> Self {
        Self {
            embryonic,
            expired: FastSet::default(),
            established: established.0,
            established_visits: established.1,
            established_fd: established.2,
            slots,
            fill: TableFill::default(),
            live: Default::default(),
            timeouts,
            log: ConnLog::default(),
            deleting: Duration::ZERO,
            hints: None,
            known: FastMap::default(),
            pair: None,
        }
    }

    /// Tells `feed` (the pair's) of every flow that ends and, at each pass, of the flows that
    /// carried a segment since the pass before.
    pub fn feed_pair(&mut self, feed: crate::pair::feed::Feed) {
        self.pair = Some(feed);
    }

    /// The pair's feed, if any (the worker hands it the data path's `FLOW_SYNC` records).
    pub fn pair_feed(&mut self) -> Option<&mut crate::pair::feed::Feed> {
        self.pair.as_mut()
    }

    /// Keeps the data path's port bitmap (`PORT_HINTS`, for SNAT range `range`) in line with
    /// each pass's tables (see the module's text). With `adopted` (tables an earlier program
    /// filled, whose flows' bits this map lacks), every bit is set first, before the caller
    /// lets the program serve. Returns the mapping, which a pair's receiver shares.
    pub fn set_port_hints(
        &mut self,
        map: Map,
        range: (u16, u16),
        adopted: bool,
    ) -> Result<std::sync::Arc<HintMap>> {
        let fd = map_fd(&map, names::PORT_HINTS)?;
        let hints = std::sync::Arc::new(HintMap::new(&fd, range)?);
        if adopted {
            hints.hold_all();
        }
        self.hints = Some(hints.clone());
        Ok(hints)
    }

    /// Sets the bits of the ports in `held` and releases the other set bits of each backend
    /// whose addresses are known (see [`HintMap::release`]).
    fn write_hints(&mut self, held: Option<HintBits>, seen: Vec<Option<FlowKey>>) {
        let (Some(map), Some(held)) = (self.hints.clone(), held) else {
            return;
        };
        for (id, key) in seen.iter().enumerate() {
            if let Some(key) = key {
                self.known.entry(id as u32).or_default().learn(key);
            }
        }
        let bitmaps = held.into_bitmaps();
        let none = PortHints::default();
        let mut released = 0;
        for id in 0..MAX_BACKENDS {
            let bits = bitmaps.get(&id).map(|b| &**b);
            if bits.is_none() && !map.holds_any(id) {
                continue;
            }
            match self.known.get(&id) {
                Some(known) => {
                    released += map.release(id, bits.unwrap_or(&none), |port| {
                        known.established(&self.established, port)
                    });
                }
                None => {
                    if let Some(bits) = bits {
                        map.hold_ports(id, bits);
                    }
                }
            }
        }
        if released > 0 {
            debug!(released, "port bitmap: bits of free ports cleared");
        }
    }

    /// Takes both connection tables out of the loaded object (after `Control::new`, which
    /// takes only the maps it writes).
    pub fn new(ebpf: &mut Ebpf, timeouts: Timeouts) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the object has no map {name}"))
        };
        let embryonic = Handshakes::new(take(names::CT_EMBRYONIC)?)?;
        let established = table(take(names::CT_ESTABLISHED)?, names::CT_ESTABLISHED)?;
        let slots = slot_table(
            ebpf.take_map(names::SLOTS)
                .with_context(|| format!("the object has no map {}", names::SLOTS))?,
        )?;
        Ok(Self::with_tables(
            embryonic,
            established,
            Some(slots),
            timeouts,
        ))
    }

    /// Opens second handles on both tables and leaves them in the object (for tests that
    /// still read the tables through it).
    pub fn shared(ebpf: &Ebpf, timeouts: Timeouts) -> Result<Self> {
        let embryonic = Handshakes::of(ebpf)?;
        let established = table(share(ebpf, names::CT_ESTABLISHED)?, names::CT_ESTABLISHED)?;
        let slots = slot_table(share(ebpf, names::SLOTS)?)?;
        Ok(Self::with_tables(
            embryonic,
            established,
            Some(slots),
            timeouts,
        ))
    }

    /// Opens both tables of a running instance from their pins in `dir`.
    pub fn from_pins(dir: &std::path::Path, timeouts: Timeouts) -> Result<Self> {
        let open = |name: &str| crate::dataplane::open_pinned(dir, name);
        let slots = crate::dataplane::open_pinned(dir, names::SLOTS)
            .ok()
            .and_then(|m| slot_table(m).ok());
        Ok(Self::with_tables(
            Handshakes::new(open(names::CT_EMBRYONIC)?)?,
            table(open(names::CT_ESTABLISHED)?, names::CT_ESTABLISHED)?,
            slots,
            timeouts,
        ))
    }

    /// Where the connection log goes (default: the agent's log).
    pub fn set_log(&mut self, log: ConnLog) {
        self.log = log;
    }

    /// Logs a connection the data path ended (a `CONN_EVENTS` record).
    pub fn log_event(&mut self, e: &lb_common::ConnEvent) {
        self.log.record(&Ended::from_event(e));
        if let Some(p) = &mut self.pair {
            p.ended(&e.key, e.ended_ns.saturating_sub(e.created_ns));
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// One pass at the current time, slots released through `release` (the object's
    /// `lb_release`); logs what it deleted at debug level.
    pub fn run_once(&mut self, release: Option<&Xdp>) -> Result<SweepStats> {
        let now = monotonic_now()?;
        let mut st = self.sweep(now);
        self.sweep_slots(now, release, &mut st);
        if st.deleted_entries() > 0 || st.revived > 0 || st.truncated {
            debug!(
                embryonic = st.embryonic_entries,
                established = st.established_entries,
                embryonic_expired = st.embryonic_expired,
                closed = st.closed,
                idle = st.idle,
                orphans = st.orphans,
                revived = st.revived,
                slots_released = st.slots_released,
                truncated = st.truncated,
                "connection-table GC pass"
            );
        }
        Ok(st)
    }

    /// One pass as if the monotonic clock read `now` (ns).
    pub fn sweep(&mut self, now: u64) -> SweepStats {
        let mut st = SweepStats::default();
        let mut tally = Tally {
            held: self.hints.as_ref().map(|h| HintBits::new(h.range())),
            ..Default::default()
        };
        self.sweep_established(now, MAX_DELETIONS, &mut st, &mut tally);
        self.sweep_embryonic(now, &mut st, &mut tally);
        self.write_hints(tally.held.take(), std::mem::take(&mut tally.seen));
        self.fill = TableFill {
            embryonic: Fill {
                entries: st.embryonic_entries,
                capacity: self.embryonic.capacity(),
            },
            established: Fill {
                entries: st.established_entries,
                capacity: capacity(self.established_visits),
            },
            slots: self.fill.slots,
            pairs: tally.pairs.into_values().collect(),
        };
        self.live = tally.live;
        st
    }

    /// What the tables held at the last pass.
    pub fn fill(&self) -> &TableFill {
        &self.fill
    }

    /// Flows whose SNAT port is in `range` (their reply entries' destination port), counted
    /// over both tables by their keys alone.
    pub fn flows_on_ports(&self, range: (u16, u16)) -> usize {
        let on = |k: &FlowKey| (range.0..=range.1).contains(&u16::from_be(k.dport));
        let mut embryonic = 0;
        if let Err(e) = self
            .embryonic
            .for_each(|k, _| embryonic += usize::from(on(&k)))
        {
            warn!("reading {}: {e:#}", names::CT_EMBRYONIC);
        }
        let established = self
            .established
            .keys()
            .filter_map(|k| k.ok())
            .filter(on)
            .count();
        embryonic + established
    }

    /// Reads both tables and the slot table without deleting anything (for `lb status`).
    pub fn census(&mut self, now: u64) -> TableFill {
        let mut tally = Tally::default();
        // Batch reads (as a pass does): a million entries in milliseconds.
        let mut snapshot: FastMap<FlowKey, Flow> = FastMap::default();
        if let Err(e) = read_table(
            (&self.established, &self.established_fd),
            self.established_visits,
            |k, f| {
                snapshot.insert(k, f);
            },
        ) {
            warn!("reading {}: {e:#}", names::CT_ESTABLISHED);
        }
        for f in snapshot.values().filter(|f| f.dir == DIR_FORWARD) {
            let open = snapshot
                .get(&f.partner_key(IPPROTO_TCP))
                .is_some_and(|p| !is_closing(f, p));
            if open {
                tally.pair(f).established += 1;
            }
        }
        let established = snapshot.len();
        let mut embryonic = 0;
        let connect_ns = self.timeouts.connect_ns;
        if let Err(e) = self.embryonic.for_each(|_, hs| {
            embryonic += 1;
            if now.saturating_sub(hs.fwd.created_ns) <= connect_ns {
                tally.pair(&hs.fwd).embryonic += 1;
            }
        }) {
            warn!("reading {}: {e:#}", names::CT_EMBRYONIC);
        }
        let slots = self
            .slots
            .as_ref()
            .map(|(m, v)| m.keys().take(*v).flatten().count())
            .unwrap_or(0);
        TableFill {
            embryonic: Fill {
                entries: embryonic,
                capacity: self.embryonic.capacity(),
            },
            established: Fill {
                entries: established,
                capacity: capacity(self.established_visits),
            },
            slots,
            pairs: tally.pairs.into_values().collect(),
        }
    }

    /// Releases the slots of flows that are gone (run after [`Gc::sweep`], which deletes
    /// expired flows): slots older than a second whose forward key is not an established
    /// flow's. (A handshake holds no slot: its ACK takes one as it moves the flow to the
    /// established table, or gives it back at once if it cannot.)
    pub fn sweep_slots(&mut self, now: u64, release: Option<&Xdp>, st: &mut SweepStats) {
        let Some((slots, visits)) = &self.slots else {
            return;
        };
        let held_before = st.slots;
        let mut gone = Vec::new();
        for item in slots.iter().take(*visits) {
            match item {
                Ok((k, slot)) => {
                    st.slots += 1;
                    if now.saturating_sub(slot.created_ns) > SLOT_GRACE_NS {
                        gone.push(k);
                    }
                }
                Err(e) => {
                    warn!("reading {}: {e}", names::SLOTS);
                    st.truncated = true;
                    break;
                }
            }
        }
        // Flows this pass found alive need no lookup; the others are looked up again (they may
        // have been created or revived since).
        gone.retain(|k| !self.live.contains(k) && self.established.get(k, 0).is_err());
        self.fill.slots = st.slots - held_before;
        if gone.is_empty() {
            return;
        }
        let Some(prog) = release else {
            warn!("the object has no lb_release program: connection slots are not released");
            return;
        };
        for key in gone {
            match release_slot(prog, &key) {
                Ok(true) => {
                    st.slots_released += 1;
                    self.fill.slots = self.fill.slots.saturating_sub(1);
                }
                Ok(false) => {}
                Err(e) => {
                    warn!("releasing a connection slot: {e:#}");
                    break;
                }
            }
        }
    }

    /// Deletes expired established flows and orphans, at most `budget` entries.
    fn sweep_established(
        &mut self,
        now: u64,
        budget: usize,
        st: &mut SweepStats,
        tally: &mut Tally,
    ) {
        // Sized from the last pass: growing a map of millions of entries would hold the old and
        // the new one at once.
        let expected = self.fill.established.entries;
        let mut snapshot: FastMap<FlowKey, Flow> =
            FastMap::with_capacity_and_hasher(expected + expected / 8, Default::default());
        let read = read_table(
            (&self.established, &self.established_fd),
            self.established_visits,
            |k, f| {
                snapshot.insert(k, f);
            },
        );
        if let Err(e) = read {
            warn!("reading {}: {e:#}", names::CT_ESTABLISHED);
            st.truncated = true;
        }
        st.established_entries = snapshot.len();

        let mut flows: Vec<(FlowKey, FlowKey, Expiry)> = Vec::new();
        let mut orphans: Vec<FlowKey> = Vec::new();
        let mut refresh: Vec<(FlowKey, Flow, Flow)> = Vec::new();
        let mut planned = 0usize;
        for (key, flow) in &snapshot {
            if planned + 2 > budget {
                st.truncated = true;
                break;
            }
            let pkey = flow.partner_key(IPPROTO_TCP);
            match snapshot.get(&pkey) {
                Some(partner) if partner.points_back_to(key) => {
                    // Each flow once, from its forward entry.
                    if flow.dir != DIR_FORWARD {
                        continue;
                    }
                    if !is_closing(flow, partner) {
                        tally.pair(flow).established += 1;
                    }
                    if let Some(why) = self.timeouts.expiry(now, flow, partner) {
                        tally.learn(partner.backend_id, &pkey);
                        flows.push((*key, pkey, why));
                        planned += 2;
                    } else {
                        tally.live.insert(*key);
                        tally.hold(partner.backend_id, &pkey);
                        if self.pair.is_some() {
                            refresh.push((*key, *flow, *partner));
                        }
                    }
                }
                _ => {
                    let grace = self.timeouts.close_ns.max(PERIOD.as_nanos() as u64);
                    if now.saturating_sub(flow.last_seen_ns.max(flow.created_ns)) > grace {
                        orphans.push(*key);
                        planned += 1;
                    }
                }
            }
        }

        if let Some(p) = &mut self.pair {
            p.pass(now, refresh.into_iter());
        }
        let deleting = std::time::Instant::now();
        for (fkey, rkey, why) in flows {
            // Read again: a segment may have revived the flow, or a new one taken the tuple.
            let (Ok(f), Ok(r)) = (
                self.established.get(&fkey, 0),
                self.established.get(&rkey, 0),
            ) else {
                st.revived += 1;
                continue;
            };
            let before = snapshot.get(&fkey).map(|s| s.created_ns);
            if before != Some(f.created_ns)
                || !r.points_back_to(&fkey)
                || self.timeouts.expiry(now, &f, &r) != Some(why)
            {
                st.revived += 1;
                continue;
            }
            remove(&mut self.established, &fkey);
            remove(&mut self.established, &rkey);
            self.log
                .record(&Ended::from_flows(&fkey, &f, &r, reason(&f, &r, why)));
            if let Some(p) = &mut self.pair {
                p.ended(&fkey, now.saturating_sub(f.created_ns));
            }
            match why {
                Expiry::Closed => st.closed += 1,
                Expiry::Idle => st.idle += 1,
            }
        }
        for key in orphans {
            let Ok(f) = self.established.get(&key, 0) else {
                continue;
            };
            let partner_back = self
                .established
                .get(&f.partner_key(IPPROTO_TCP), 0)
                .is_ok_and(|p| p.points_back_to(&key));
            if partner_back || snapshot.get(&key).map(|s| s.created_ns) != Some(f.created_ns) {
                st.revived += 1;
                continue;
            }
            remove(&mut self.established, &key);
            st.orphans += 1;
        }
        self.log.flush();
        self.deleting = deleting.elapsed();
    }

    /// Counts the handshakes in progress (and, once each, those past the connect timeout).
    fn sweep_embryonic(&mut self, now: u64, st: &mut SweepStats, tally: &mut Tally) {
        let timeout = self.timeouts.connect_ns;
        let mut expired = FastSet::default();
        let read = self.embryonic.for_each(|k, hs| {
            st.embryonic_entries += 1;
            let created = hs.rev.created_ns;
            if now.saturating_sub(created) <= timeout {
                tally.pair(&hs.fwd).embryonic += 1;
                tally.live.insert(hs.fwd_key());
                tally.hold(hs.rev.backend_id, &k);
            } else {
                tally.learn(hs.rev.backend_id, &k);
                expired.insert((k, created));
            }
        });
        if let Err(e) = read {
            warn!("reading {}: {e:#}", names::CT_EMBRYONIC);
            st.truncated = true;
        }
        st.embryonic_expired = expired.difference(&self.expired).count();
        self.expired = expired;
    }
}

/// A table's capacity from its walk's visit bound (see [`table`]).
fn capacity(visits: usize) -> usize {
    visits.saturating_sub(1024) / 2
}

/// The slot table as a typed map, and the visit bound of a walk over it.
fn slot_table(map: Map) -> Result<(Slots, usize)> {
    let max_entries = match &map {
        Map::HashMap(m) => m
            .info()
            .map(|i| i.max_entries() as usize)
            .context("map SLOTS: info")?,
        _ => anyhow::bail!("map {} is not a hash map", names::SLOTS),
    };
    let t = Slots::try_from(map)
        .with_context(|| format!("map {} has an unexpected type or layout", names::SLOTS))?;
    Ok((t, max_entries.saturating_mul(2).saturating_add(1024)))
}

/// Reads every entry of `table` into `each`: in batches of [`BATCH`] (`BPF_MAP_LOOKUP_BATCH`,
/// one syscall per batch instead of two per entry: a pass over a million entries costs
/// milliseconds, not seconds), or entry by entry where the kernel has no batch lookup for the
/// map. At most `visits` entries.
fn read_table<V: aya::Pod + bytemuck::Pod + Default>(
    (table, fd): (&Table<V>, &std::os::fd::OwnedFd),
    visits: usize,
    mut each: impl FnMut(FlowKey, V),
) -> Result<()> {
    let mut keys = vec![FlowKey::default(); BATCH];
    let mut values = vec![V::default(); BATCH];
    // The hash table's batch token: the bucket to continue from.
    let (mut token, mut read) = (None, 0usize);
    while read < visits {
        let (n, next, err) = crate::batch::lookup(fd.as_fd(), token, &mut keys, &mut values);
        for i in 0..n {
            each(keys[i], values[i]);
        }
        read += n;
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            None => {}
            // The end of the table (the last batch's entries were delivered above).
            Some(libc::ENOENT) => return Ok(()),
            // No batch lookup here (an old kernel, or a first call refused): entry by entry.
            Some(libc::EINVAL | ENOTSUPP) if token.is_none() => {
                for item in table.iter().take(visits) {
                    let (k, f) = item?;
                    each(k, f);
                }
                return Ok(());
            }
            Some(_) => {
                return Err(err.unwrap_or_else(std::io::Error::last_os_error))
                    .context("BPF_MAP_LOOKUP_BATCH")
            }
        }
        token = Some(next);
    }
    Ok(())
}

/// The kernel's ENOTSUPP (not in libc): an operation the map type does not have.
const ENOTSUPP: i32 = 524;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call; also more than any hash bucket holds (the kernel
/// refuses a batch smaller than the bucket it stops at).
const BATCH: usize = 4096;

/// The object's `lb_release` program, which [`Gc::run_once`] releases slots through.
pub fn release_program(ebpf: &Ebpf) -> Option<&Xdp> {
    ebpf.program("lb_release").and_then(|p| p.try_into().ok())
}

/// The GC on a thread of its own. A pass is syscalls on every entry (a million entries take
/// seconds); on the agent's event loop it would hold up the health checks and the failover
/// decisions behind it. The worker owns the [`Gc`] and so the connection log, which it also
/// feeds from the data path's `CONN_EVENTS` ring (drained every [`EVENTS_EVERY`]: the data path
/// submits without waking anyone, since a wakeup per ended connection would cost more than the
/// connection under churn). The loop reads what a pass found from [`Worker::published`].
pub struct Worker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shared: std::sync::Arc<std::sync::Mutex<Published>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the GC's thread drains the `CONN_EVENTS` ring.
pub const EVENTS_EVERY: Duration = Duration::from_millis(50);
/// How often it drains both rings in a pair (`FLOW_SYNC` too): a flow reaches the peer at
/// most this much after it was established, plus the stream's own delay. Longer means fewer
/// writes to the peer and fewer flows sent at all (one that opens and closes between two
/// drains never is): at 10 ms the sync cost each agent 0.9-1.4 µs per connection under churn,
/// at 25 ms 0.6-0.8 (`lb-bench pair`), with sessions on the standby 12 ms after their
/// handshake at the median, 25 ms at p99.
pub const SYNC_EVERY: Duration = Duration::from_millis(25);

/// What the worker's last pass found that the loop acts on (the table fill goes to the live
/// view through `on_pass`).
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// The port range to count flows on (an earlier `snat_ports`), set by the loop.
    pub watch: Option<(u16, u16)>,
    /// Flows on `watch`'s ports at the last pass, with the range they were counted on.
    pub on_watched: Option<((u16, u16), usize)>,
}

/// The pause after a pass that took `took`: [`PERIOD`], or [`REST_PER_PASS`] times the pass
/// when that is longer, so the GC's thread uses at most a fifth of a CPU however large the
/// tables grow (a million flows: a pass of about half a second, one every 2.5 s; expiry is
/// that much later, never skipped).
pub fn rest_after(took: Duration) -> Duration {
    PERIOD.max(took * REST_PER_PASS)
}

/// See [`rest_after`].
pub const REST_PER_PASS: u32 = 4;

impl Worker {
    /// Starts passes every [`PERIOD`] (longer for long passes, see [`rest_after`]) on a thread named `lb-gc`; `release` is an own handle on
    /// `lb_release` (see [`crate::dataplane::own_program`]); `on_pass` gets each pass's fill.
    pub fn spawn(
        mut gc: Gc,
        release: Option<Xdp>,
        mut events: aya::maps::RingBuf<MapData>,
        mut flow_sync: Option<aya::maps::RingBuf<MapData>>,
        on_pass: impl Fn(&TableFill) + Send + 'static,
    ) -> Result<Self> {
        // In a pair the rings are drained more often: the peer's lag is this period.
        let every = if flow_sync.is_some() {
            SYNC_EVERY
        } else {
            EVENTS_EVERY
        };
        use std::sync::{atomic::Ordering, Arc, Mutex};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Published::default()));
        let thread = std::thread::Builder::new().name("lb-gc".into()).spawn({
            let (stop, shared) = (stop.clone(), shared.clone());
            move || {
                let mut next = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    // The flows established first, then the ends: a flow found and ended in
                    // the same drain is taken back before anything is sent.
                    if let (Some(ring), Ok(now)) = (flow_sync.as_mut(), monotonic_now()) {
                        if let Some(feed) = gc.pair_feed() {
                            feed.tick(now);
                        }
                        while let Some(item) = ring.next() {
                            let size = std::mem::size_of::<lb_common::FlowSync>();
                            if item.len() >= size {
                                let f: lb_common::FlowSync =
                                    bytemuck::pod_read_unaligned(&item[..size]);
                                if let Some(feed) = gc.pair_feed() {
                                    feed.established(&f);
                                }
                            }
                        }
                    }
                    while let Some(item) = events.next() {
                        if item.len() >= std::mem::size_of::<lb_common::ConnEvent>() {
                            let e: lb_common::ConnEvent = bytemuck::pod_read_unaligned(
                                &item[..std::mem::size_of::<lb_common::ConnEvent>()],
                            );
                            gc.log_event(&e);
                        }
                    }
                    if let Some(feed) = gc.pair_feed() {
                        feed.flush();
                    }
                    let wait = next.saturating_duration_since(std::time::Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait.min(every));
                        continue;
                    }
                    let started = std::time::Instant::now();
                    // Deleting is the work the pass found, not overhead: only the reading
                    // counts towards the rest (else a pass deleting a million expired flows
                    // would put off the next one by its own length four times over).
                    if let Err(e) = gc.run_once(release.as_ref()) {
                        warn!("connection-table GC: {e:#}");
                    }
                    if let Some(feed) = gc.pair_feed() {
                        feed.flush();
                    }
                    let took = started.elapsed().saturating_sub(gc.deleting);
                    on_pass(gc.fill());
                    let watch = shared.lock().ok().and_then(|p| p.watch);
                    let on_watched = watch.map(|r| (r, gc.flows_on_ports(r)));
                    if let Ok(mut p) = shared.lock() {
                        p.on_watched = on_watched;
                    }
                    next = std::time::Instant::now() + rest_after(took);
                }
            }
        });
        let thread = thread.context("start the GC thread")?;
        Ok(Self {
            stop,
            shared,
            thread: Some(thread),
        })
    }

    /// Counts flows on `range` at every pass from now on (`None`: stop).
    pub fn watch_ports(&self, range: Option<(u16, u16)>) {
        if let Ok(mut p) = self.shared.lock() {
            if p.watch != range {
                p.watch = range;
                p.on_watched = None;
            }
        }
    }

    /// What the last pass found.
    pub fn published(&self) -> Published {
        self.shared.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Releases the slot of the flow whose forward key is `key` by running `lb_release` on it:
/// true when this call released it (the program deleted the slot and decremented the counts).
pub fn release_slot(prog: &Xdp, key: &FlowKey) -> Result<bool> {
    run_release(prog, std::slice::from_ref(key))
}

/// One run of `lb_release` on up to `lb_common::SLOT_CLAIMS` keys: whether it released one.
fn run_release(prog: &Xdp, keys: &[FlowKey]) -> Result<bool> {
    let mut out = vec![0u8; std::mem::size_of_val(keys) + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(bytemuck::cast_slice(keys)),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN of lb_release")?;
    // XDP_PASS (2): released; XDP_DROP (1): no slot, or released by someone else first.
    Ok(r.return_value == 2)
}

/// Takes slots for flows a pair's peer established, by running `lb_acquire` on `claims`
/// (`lb_common::SLOT_CLAIMS` per run), whatever the limits (the flows exist). Each claim comes
/// back with its outcome in `slot._pad` (`CLAIM_TAKEN`, `CLAIM_HELD`, `CLAIM_FULL`).
pub fn acquire_slots(prog: &Xdp, claims: &mut [lb_common::SlotClaim]) -> Result<()> {
    for chunk in claims.chunks_mut(lb_common::SLOT_CLAIMS) {
        let mut out = vec![0u8; std::mem::size_of_val(chunk) + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(bytemuck::cast_slice(chunk)),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN of lb_acquire")?;
        let back = &out[..(r.data_size_out as usize).min(std::mem::size_of_val(chunk))];
        for (c, b) in chunk
            .iter_mut()
            .zip(back.chunks_exact(std::mem::size_of::<lb_common::SlotClaim>()))
        {
            *c = bytemuck::pod_read_unaligned(b);
        }
    }
    Ok(())
}

/// Releases the slots of the flows whose forward keys are `keys` by running `lb_release` on
/// them (`lb_common::SLOT_CLAIMS` per run); a key without a slot is passed over.
pub fn release_slots(prog: &Xdp, keys: &[FlowKey]) -> Result<()> {
    for chunk in keys.chunks(lb_common::SLOT_CLAIMS) {
        run_release(prog, chunk)?;
    }
    Ok(())
}

/// Deletes `key`; an entry already gone (the data path deleted it) is fine.
fn remove<V: aya::Pod>(table: &mut Table<V>, key: &FlowKey) {
    match table.remove(key) {
        Ok(()) => {}
        Err(MapError::KeyNotFound) => {}
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => warn!("connection-table GC: delete failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{rest_after, Expiry, Timeouts, PERIOD, QUICK_CLOSE_NS};
    use lb_common::{Flow, FLOW_CLOSE_FIN, FLOW_CLOSE_RST};
    use std::time::Duration;

    const S: u64 = 1_000_000_000;

    /// A flow's forward and reply entries, both last seen at `seen`, with these close bits.
    fn flow(seen: u64, close: (u8, u8), backend_first: bool) -> (Flow, Flow) {
        let f = |close: u8, first_fin: u8| Flow {
            last_seen_ns: seen,
            close,
            first_fin,
            ..Default::default()
        };
        (f(close.0, 0), f(close.1, u8::from(backend_first)))
    }

    #[test]
    fn a_closed_flow_goes_after_two_seconds_unless_the_backend_closed_first() {
        let t = Timeouts::new(30 * S, 7200 * S, 10 * S);
        let fins = (FLOW_CLOSE_FIN, FLOW_CLOSE_FIN);
        let (a, b) = flow(100 * S, fins, false);
        assert_eq!(t.expiry(100 * S + QUICK_CLOSE_NS, &a, &b), None);
        assert_eq!(
            t.expiry(100 * S + QUICK_CLOSE_NS + 1, &a, &b),
            Some(Expiry::Closed)
        );
        // The backend holds the TIME_WAIT: the flow keeps its port for the close timeout.
        let (a, b) = flow(100 * S, fins, true);
        assert_eq!(t.expiry(109 * S, &a, &b), None);
        assert_eq!(t.expiry(110 * S + 1, &a, &b), Some(Expiry::Closed));
        // A RST ends it quickly whoever sent a FIN first.
        let (a, b) = flow(100 * S, (FLOW_CLOSE_RST, FLOW_CLOSE_FIN), true);
        assert_eq!(t.expiry(103 * S, &a, &b), Some(Expiry::Closed));
    }

    #[test]
    fn an_open_flow_goes_after_its_services_idle_timeout_and_half_closed_is_open() {
        let mut t = Timeouts::new(30 * S, 60 * S, 10 * S);
        t.idle_by_service[1] = 5 * S;
        let (mut a, b) = flow(0, (FLOW_CLOSE_FIN, 0), false);
        assert_eq!(t.expiry(59 * S, &a, &b), None, "half closed is not closed");
        assert_eq!(t.expiry(61 * S, &a, &b), Some(Expiry::Idle));
        a.service_id = 1;
        assert_eq!(t.expiry(6 * S, &a, &b), Some(Expiry::Idle));
    }

    #[test]
    fn zero_timeouts_expire_nothing() {
        let t = Timeouts::new(30 * S, 0, 0);
        let (a, b) = flow(0, (FLOW_CLOSE_FIN, FLOW_CLOSE_FIN), false);
        assert_eq!(t.expiry(u64::MAX, &a, &b), None);
    }

    #[test]
    fn a_long_pass_is_followed_by_four_times_its_length_of_rest_a_short_one_by_a_second() {
        assert_eq!(rest_after(Duration::from_millis(20)), PERIOD);
        assert_eq!(
            rest_after(Duration::from_millis(600)),
            Duration::from_millis(2400)
        );
    }
}
