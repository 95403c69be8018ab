//! Map keys, values, names and default sizes.

/// Most services (VIP:port pairs) one instance serves; also the outer backend-set array size.
pub const MAX_SERVICES: u32 = 64;
/// Stable backend ids are `0..MAX_BACKENDS` (per-backend counters are indexed by id).
pub const MAX_BACKENDS: u32 = 256;
/// Most members in one service's backend set.
pub const MAX_SET_SIZE: usize = 32;
/// Most local addresses that can serve as SNAT source addresses.
pub const MAX_SNAT_ADDRS: u32 = 64;
/// Most interfaces the program can redirect to.
pub const MAX_IFACES: u32 = 64;
/// Default size of the embryonic (SYN seen, not yet established) flow table, in entries:
/// one [`Handshake`] per connection, in the slot of its reply key ([`HandshakeSlot`]).
pub const DEFAULT_EMBRYONIC_ENTRIES: u32 = 65_536;
/// Sets of the handshake index (`CT_INDEX`, forward key -> reply key), [`INDEX_WAYS`] ways
/// each: four ways per entry of the default embryonic table.
pub const INDEX_SETS: u32 = 1 << 17;
/// Ways of a handshake index set.
pub const INDEX_WAYS: usize = 2;
/// Default size of the established flow table, in entries (two per connection).
pub const DEFAULT_ESTABLISHED_ENTRIES: u32 = 262_144;

pub const IPPROTO_TCP: u8 = 6;

/// Names of the maps, as declared in the XDP object and pinned under bpffs.
pub mod names {
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SETS: &str = "BACKEND_SETS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CT_EMBRYONIC: &str = "CT_EMBRYONIC";
    pub const CT_ESTABLISHED: &str = "CT_ESTABLISHED";
    pub const RR_CURSOR: &str = "RR_CURSOR";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const STATS_GLOBAL: &str = "STATS_GLOBAL";
    pub const STATS_SERVICE: &str = "STATS_SERVICE";
    pub const STATS_BACKEND: &str = "STATS_BACKEND";
    pub const SNAT_ADDRS: &str = "SNAT_ADDRS";
    /// Backend address -> its route's source address, for kernels without
    /// `BPF_FIB_LOOKUP_SRC` (before 6.7).
    pub const ROUTE_SRC: &str = "ROUTE_SRC";
    /// An earlier SNAT port range whose flows are still alive (`OLD_PORTS[0]`).
    pub const OLD_PORTS: &str = "OLD_PORTS";
    pub const RESET_EPOCH: &str = "RESET_EPOCH";
    /// Per service: until when (`bpf_ktime_get_coarse_ns`) a SYN finding no backend is held
    /// (dropped, for the client's retransmit) instead of refused; written by the agent while
    /// an exclusive role has no member and its candidates are checked.
    pub const SYN_HOLD: &str = "SYN_HOLD";
    pub const RST_BUCKET: &str = "RST_BUCKET";
    /// Connections the data path ended itself (ring buffer; not pinned: each program build
    /// writes its own, which its agent reads).
    pub const CONN_EVENTS: &str = "CONN_EVENTS";
    /// Flows the data path established, for a pair's standby (ring buffer, written only with
    /// `CONFIG_F_SYNC`; not pinned, like `CONN_EVENTS`).
    pub const FLOW_SYNC: &str = "FLOW_SYNC";
    /// Ifindex -> the MAC of that interface (written by the agent in a pair).
    pub const IFACE_MACS: &str = "IFACE_MACS";
    /// Backend id -> the SNAT ports its flows hold, which the port search trusts for the
    /// established table (not pinned: each program has its own, all set by an agent that
    /// adopts tables, then cleared port by port by its GC).
    pub const PORT_HINTS: &str = "PORT_HINTS";
    pub const SLOTS: &str = "SLOTS";
    pub const MAXCONN_ACTIVE: &str = "MAXCONN_ACTIVE";
    /// `lb capture`'s settings; written only by that command.
    pub const CAPTURE: &str = "CAPTURE";
    /// Perf event array the program emits captured frames to (`CaptureHeader` + frame bytes).
    pub const CAPTURE_EVENTS: &str = "CAPTURE_EVENTS";
    /// Agent-only: the layout hash of every pinned map (`lb_common::abi`), never read by the program.
    pub const META: &str = "META";
    /// Agent-only: the health of every (service, backend) pair, mirrored for `lb status`.
    pub const HEALTH: &str = "HEALTH";
    /// Agent-only: which service and backend name holds which id (stable across restarts).
    pub const IDS: &str = "IDS";
    /// Handshakes in progress: the client's tuple -> the key of the flow's `CT_EMBRYONIC`
    /// record (an array, set-associative; a hint the record confirms).
    pub const CT_INDEX: &str = "CT_INDEX";
    /// Pinned maps whose content the data path may lose (handshakes in progress, hints) or
    /// the agent rewrites at every start (settings): a build with another layout of one of
    /// them replaces it instead of refusing the pins.
    pub const REPLACEABLE: &[&str] = &[CONFIG, CT_EMBRYONIC, CT_INDEX];
    /// Every map the agent pins, in a stable order.
    pub const ALL: &[&str] = &[
        CONFIG,
        SERVICES,
        BACKEND_SETS,
        BACKENDS,
        CT_EMBRYONIC,
        CT_ESTABLISHED,
        RR_CURSOR,
        TX_PORTS,
        STATS_GLOBAL,
        STATS_SERVICE,
        STATS_BACKEND,
        SNAT_ADDRS,
        RESET_EPOCH,
        RST_BUCKET,
        SLOTS,
        MAXCONN_ACTIVE,
        CAPTURE,
        CAPTURE_EVENTS,
        ROUTE_SRC,
        OLD_PORTS,
        SYN_HOLD,
        CT_INDEX,
    ];
}

/// Runtime settings of the data path (`CONFIG[0]`), written by the agent before attach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Config {
    /// Embryonic flows older than this are treated as absent.
    pub embryonic_timeout_ns: u64,
    /// Idle timeout of established flows (used by the table GC).
    pub idle_timeout_ns: u64,
    /// How long a closing flow (FIN both ways, or a RST) stays after its last segment (used
    /// by the table GC).
    pub close_timeout_ns: u64,
    /// First SNAT port (host byte order; compared after conversion).
    pub snat_port_min: u16,
    /// Last SNAT port, inclusive (host byte order).
    pub snat_port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Generated RSTs allowed per second per CPU (token bucket; excess dropped and counted).
    pub rst_per_sec: u32,
    /// Most connections all services together may hold (HAProxy's global `maxconn`); 0: no
    /// limit.
    pub maxconn: u32,
    /// Slots of the handshake table (`CT_EMBRYONIC`'s entries; a power of two, see
    /// [`handshake_slots`]).
    pub handshake_slots: u32,
    pub _pad: u32,
}

/// Per-packet debug log lines through aya-log.
pub const CONFIG_F_DEBUG: u32 = 1;
/// The program is attached in generic (SKB) mode: frames may be GSO super-packets.
pub const CONFIG_F_GENERIC: u32 = 2;
/// The kernel has no `BPF_FIB_LOOKUP_SRC` (Linux before 6.7): a new flow's source address is
/// the one the agent resolved for its backend (`ROUTE_SRC`), not the FIB lookup's.
pub const CONFIG_F_ROUTE_SRC: u32 = 4;
/// Flows of an earlier SNAT port range (`OLD_PORTS`, after a restart with a changed
/// `snat_ports`) are still alive: replies to those ports are translated for them; without a
/// flow such a reply passes to the kernel (the port is not lb's any more).
pub const CONFIG_F_OLD_PORTS: u32 = 8;
/// The instance is one of a pair: every flow the data path establishes is also written to
/// `FLOW_SYNC` (a [`FlowSync`]), which the agent streams to the standby; and a frame addressed
/// to another MAC than its interface's (`IFACE_MACS`) is passed, not forwarded: on a segment
/// the two nodes share, a switch floods frames meant for the other node.
pub const CONFIG_F_SYNC: u32 = 16;

/// Bytes of the `FLOW_SYNC` ring in a pair (outside one the agent makes it one page): about
/// 5,900 records, more than 300 ms at the machine's connection rate between two drains 10 ms
/// apart.
pub const FLOW_SYNC_BYTES: u32 = 256 * 4096;

/// 64-bit words of a backend's SNAT-port hint bitmap (`PORT_HINTS`): bit `i` of word `w` stands
/// for port `snat_port_min + 64 w + i`; enough for every port above 1023.
pub const PORT_HINT_WORDS: u32 = 1024;

/// `PORT_HINTS[backend id]`: which SNAT ports the backend's flows hold. A port with an
/// established flow always has its bit set (lb-ebpf `hints.rs` says who keeps that rule), so a
/// clear bit spares a new flow's port search the established table; a set bit whose port is
/// free (an expired handshake, a flow a RST closed) costs the search a skipped port until the
/// GC's next pass clears it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PortHints {
    pub words: [u64; PORT_HINT_WORDS as usize],
}

impl Default for PortHints {
    fn default() -> Self {
        Self {
            words: [0; PORT_HINT_WORDS as usize],
        }
    }
}

/// `OLD_PORTS[0]`: an inclusive port range, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    #[inline(always)]
    pub const fn contains(&self, port: u16) -> bool {
        port >= self.min && port <= self.max && self.max != 0
    }
}

/// `SERVICES` key: a virtual IP address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ServiceKey {
    /// VIP, network byte order.
    pub addr: u32,
    /// VIP port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Service {
    /// Index into `BACKEND_SETS`, `RR_CURSOR` and `STATS_SERVICE`.
    pub id: u32,
    /// `BALANCE_*` in the low bits.
    pub flags: u32,
    /// Most connections this service holds to each of its backends (HAProxy's `server ...
    /// maxconn`, `backend_maxconn`); 0: no limit.
    pub backend_maxconn: u32,
    pub _pad: u32,
}

/// Round robin over the set (default).
pub const BALANCE_ROUNDROBIN: u32 = 0;
/// Always the set's first member (the agent orders sets by configuration order).
pub const BALANCE_FIRST: u32 = 1;
/// Maglev consistent hashing over the connection's addresses and ports.
pub const BALANCE_MAGLEV: u32 = 2;
pub const BALANCE_MASK: u32 = 0x3;
/// `Service::flags`: a SYN over a `maxconn` limit is answered with a RST instead of dropped.
pub const SERVICE_F_MAXCONN_RESET: u32 = 4;

/// Size of a backend set's Maglev lookup table (a prime; 128x the largest set).
pub const MAGLEV_SIZE: usize = 4093;

/// One member of a backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Backend {
    /// Backend address, network byte order.
    pub addr: u32,
    /// Backend (data) port, network byte order.
    pub port: u16,
    pub _pad: u16,
    /// Stable backend id (index into `STATS_BACKEND`).
    pub id: u32,
}

/// The value of the single entry of an inner backend-set map. The agent writes a complete
/// set into a spare inner map and then swaps the `BACKEND_SETS` slot; a live inner map is
/// never written, so a reader sees one generation whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendSet {
    /// Monotonic per instance; recorded in every flow the set chose.
    pub generation: u64,
    /// Valid entries in `members`.
    pub count: u32,
    pub _pad: u32,
    pub members: [Backend; MAX_SET_SIZE],
    /// Maglev lookup table: hash % MAGLEV_SIZE -> index into `members`.
    pub maglev: [u8; MAGLEV_SIZE],
    pub _pad2: [u8; 3],
}

impl Default for BackendSet {
    fn default() -> Self {
        Self {
            generation: 0,
            count: 0,
            _pad: 0,
            members: [Backend::default(); MAX_SET_SIZE],
            maglev: [0; MAGLEV_SIZE],
            _pad2: [0; 3],
        }
    }
}

/// `BACKENDS` key: a configured backend's data address and port. Only replies from one of
/// these take the reverse NAT path; everything else from the same host passes untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct BackendKey {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Connection-table key: the 4-tuple as seen on the wire, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Padding as two fields, not a `[u8; 3]`: zeroing three unaligned bytes compiles to a call
    /// of `memset` in BPF, a subprogram frame that Linux 6.1's stack limit counts.
    pub _pad: u8,
    pub _pad16: u16,
}

impl FlowKey {
    /// The key of a TCP packet from `src` to `dst` (the agent's and the tests' way to name a
    /// tuple).
    #[cfg(feature = "user")]
    pub fn between(src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4) -> Self {
        Self {
            saddr: crate::addr_be(src.ip().octets()),
            daddr: crate::addr_be(dst.ip().octets()),
            sport: crate::port_be(src.port()),
            dport: crate::port_be(dst.port()),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad16: 0,
        }
    }

    /// The key of a packet travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: 0,
            _pad16: 0,
        }
    }
}

/// Flow states.
pub const FLOW_SYN_SENT: u8 = 1;
pub const FLOW_SYN_RECV: u8 = 2;
pub const FLOW_ESTABLISHED: u8 = 3;

/// `Flow::close`: this direction sent a FIN.
pub const FLOW_CLOSE_FIN: u8 = 1;
/// `Flow::close`: this direction sent a RST (cleared again by a later non-RST segment from the
/// same direction, which proves the RST spoofed: a genuine RST's sender is gone).
pub const FLOW_CLOSE_RST: u8 = 2;

/// Whether the flow of the entries `a` and `b` is closing: FINs sent in both directions, or a
/// RST in either. A closing flow is deleted by the GC after the close timeout, and a SYN on
/// its tuple starts a new flow.
#[inline(always)]
pub const fn is_closing(a: &Flow, b: &Flow) -> bool {
    (a.close & b.close & FLOW_CLOSE_FIN) != 0 || ((a.close | b.close) & FLOW_CLOSE_RST) != 0
}

/// Whether the backend closed the flow of the forward entry `fwd` and the reply entry `rev`
/// first, with FINs (not a RST): the backend then holds the TIME_WAIT on the tuple, so the flow
/// and its SNAT port stay for the whole close timeout; any other closed flow may go sooner. The
/// one rule the data path's port takeover and the agent's GC both follow.
#[inline(always)]
pub const fn backend_closed_first(fwd: &Flow, rev: &Flow) -> bool {
    rev.first_fin != 0 && (fwd.close | rev.close) & FLOW_CLOSE_RST == 0
}

/// Direction of a flow entry.
pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;

/// Connection-table value: how to rewrite and where to send a packet matching the key.
/// Every flow has two entries, forward (client -> VIP) and reply (backend -> SNAT), whose
/// rewritten tuples are each other's keys reversed ("partners").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Generation of the backend set that chose the backend (its low 32 bits).
    pub generation: u32,
    /// Where the sequence space this entry's direction has sent ends (host order): the
    /// highest `seq + payload` (+1 for a SYN or FIN) seen. A genuine RST from this side
    /// carries a sequence number at most this (see `ack`).
    pub seq_end: u32,
    /// Rewritten tuple (network byte order).
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    /// Egress interface of the rewritten packet.
    pub ifindex: u32,
    pub backend_id: u32,
    pub service_id: u32,
    pub nat_sport: u16,
    pub nat_dport: u16,
    /// L2 header of the rewritten packet.
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub state: u8,
    pub dir: u8,
    /// `FLOW_CLOSE_*` bits about the segments sent in this entry's direction; only the path of
    /// that direction writes them. A flow is closing per [`is_closing`] over both entries.
    pub close: u8,
    /// 1 when this direction's FIN came before the other direction's (its sender closed
    /// first: a backend that closed first holds TIME_WAIT on the tuple, so the GC keeps the
    /// flow, and with it the SNAT port, for the whole close timeout). Written with `close`.
    pub first_fin: u8,
    /// `RESET_EPOCH[service][backend]` when the flow was created; a different value now means
    /// the backend was demoted with `on_down = "reset"`: the flow is reset on its next segment.
    pub epoch: u32,
    /// The acknowledgment number this entry's direction sent last (host order): where its
    /// sender expects the other side's next byte. RFC 5961: a RST from the other side is
    /// accepted only with a sequence number from `ack - 1` to that side's `seq_end`.
    pub ack: u32,
    /// TCP payload bytes forwarded in this entry's direction (retransmissions included): the
    /// forward entry counts the client's, the reply entry the backend's. Only that direction's
    /// path adds to it (two CPUs on one direction at once may lose an add: a log figure).
    pub bytes: u64,
}

impl Flow {
    /// The key of the partner entry (the rewritten tuple, reversed).
    #[inline(always)]
    pub const fn partner_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            saddr: self.nat_daddr,
            daddr: self.nat_saddr,
            sport: self.nat_dport,
            dport: self.nat_sport,
            proto,
            _pad: 0,
            _pad16: 0,
        }
    }

    /// Whether this entry's rewrite, reversed, is `key` (the partner points back).
    #[inline(always)]
    pub const fn points_back_to(&self, key: &FlowKey) -> bool {
        self.nat_saddr == key.daddr
            && self.nat_daddr == key.saddr
            && self.nat_sport == key.dport
            && self.nat_dport == key.sport
    }
}

/// A hash of the connection's addresses and ports (the protocol is always TCP here), mixed
/// so that neighbouring ports spread: the Maglev slot of a new flow, and a client tuple's set
/// in the handshake index ([`index_set_of`]).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = (key.saddr as u64) << 32 | key.daddr as u64;
    h ^= ((key.sport as u64) << 16 | key.dport as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// The handshake index set (`CT_INDEX` slot) of client tuple `key`.
#[inline(always)]
pub const fn index_set_of(key: &FlowKey) -> u32 {
    flow_hash(key) & (INDEX_SETS - 1)
}

/// A handshake in progress (`CT_EMBRYONIC`, under the reply key `fwd.partner_key()`): both
/// directions' entries in one record, so that a new flow is one insert and one port claim,
/// and a segment of the handshake finds both halves with one lookup. The client's direction
/// finds the record through the handshake index (`CT_INDEX`); the backend's by its own tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Handshake {
    /// The forward entry (client -> VIP, rewritten to SNAT address -> backend).
    pub fwd: Flow,
    /// The reply entry (backend -> SNAT address, rewritten to VIP -> client).
    pub rev: Flow,
}

impl Handshake {
    /// The record's own key in `CT_EMBRYONIC` (the reply tuple).
    #[inline(always)]
    pub const fn key(&self) -> FlowKey {
        self.fwd.partner_key(IPPROTO_TCP)
    }

    /// The client's tuple (the forward key).
    #[inline(always)]
    pub const fn fwd_key(&self) -> FlowKey {
        self.rev.partner_key(IPPROTO_TCP)
    }
}

/// Slots of a handshake table for `entries` records: a power of two, at least one.
pub const fn handshake_slots(entries: u32) -> u32 {
    if entries <= 1 {
        1
    } else {
        entries.next_power_of_two()
    }
}

/// The slot (`CT_EMBRYONIC` index) of the handshake record under reply key `key`, in a table
/// of `slots` slots (a power of two): a hash of everything but the SNAT port, plus that port.
/// A backend's consecutive SNAT ports (through one SNAT address) have neighbouring slots, so
/// a CPU that takes ports in order (`snat`'s cursor) walks the table in order too, and the
/// slot it claims is on a cache line it, or the hardware's prefetcher, has just read. Keys of
/// other (backend, SNAT address) pairs start elsewhere in the table; two keys sharing a slot
/// only matter while both have a handshake in progress (the second one's port is then taken).
/// [`HANDSHAKE_SLOT_MAP`] names this function in `CT_EMBRYONIC`'s layout hash.
#[inline(always)]
pub const fn handshake_slot_of(key: &FlowKey, slots: u32) -> u32 {
    let pair = FlowKey { dport: 0, ..*key };
    flow_hash(&pair).wrapping_add(u16::from_be(key.dport) as u32) & slots.wrapping_sub(1)
}

/// The version of [`handshake_slot_of`], part of `CT_EMBRYONIC`'s layout hash: a build that
/// places records elsewhere replaces an older build's pinned table (its handshakes in progress
/// start over) instead of looking them up in the wrong slots. 1: a hash of the whole key;
/// 2: linear in the SNAT port.
pub const HANDSHAKE_SLOT_MAP: u64 = 2;

/// The tag of reply key `key` in its slot's control word: never 0 (a free slot's tag).
#[inline(always)]
pub const fn handshake_tag(key: &FlowKey) -> u32 {
    flow_hash(key).rotate_right(16) | 1
}

/// The unit of a handshake slot's stamp: 2^21 ns, about 2 ms.
pub const HANDSHAKE_STAMP_SHIFT: u32 = 21;

/// The control word of a slot holding, since `now` (ns), the record of the key with tag `tag`
/// (0: free since `now`). Bit 0 is clear: the record is complete ([`HANDSHAKE_WRITING`]).
#[inline(always)]
pub const fn handshake_ctrl(tag: u32, now: u64) -> u64 {
    (tag as u64) << 32 | (((now >> HANDSHAKE_STAMP_SHIFT) as u32) << 1) as u64
}

/// Bit 0 of a slot's control word: its record is being written.
pub const HANDSHAKE_WRITING: u64 = 1;

/// How long before `now` (ns) the control word `ctrl` was written, to its stamp's unit
/// (ages wrap after 2^31 units, about 52 days). A stamp up to [`HANDSHAKE_AHEAD_UNITS`] ahead
/// of `now` (written with another clock than the reader's) reads as age 0, not as a wrapped,
/// huge age that would free the slot.
#[inline(always)]
pub const fn handshake_age(ctrl: u64, now: u64) -> u64 {
    let units =
        ((now >> HANDSHAKE_STAMP_SHIFT) as u32).wrapping_sub((ctrl as u32) >> 1) & 0x7fff_ffff;
    if units > 0x7fff_ffff - HANDSHAKE_AHEAD_UNITS {
        return 0;
    }
    (units as u64) << HANDSHAKE_STAMP_SHIFT
}

/// `BPF_F_MMAPABLE`: the map flag of `CT_EMBRYONIC` and `PORT_HINTS`, which the agent maps.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// How far (stamp units, about 1 s) a slot's stamp may be ahead of a reader's clock and still
/// read as age 0 ([`handshake_age`]).
pub const HANDSHAKE_AHEAD_UNITS: u32 = 512;

/// One slot of the handshake table (`CT_EMBRYONIC[handshake_slot_of(reply key)]`): a record
/// and its control word: the tag of the record's key (high half; 0: the slot is free) and
/// when the slot was claimed or freed (low half, [`handshake_ctrl`]; bit 0 set while the
/// record is written). Each reply key has one slot, so a SYN claims its SNAT port with a
/// compare-and-swap of that word; a slot held by another key's live handshake makes the port
/// search try another port (the port is part of the key), and one claimed longer ago than the
/// connect timeout is free again, which the word alone tells. A reader takes a record only
/// when its word is complete, tagged with its key, the record's forward half points back to
/// the key, and the word is unchanged after that check.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct HandshakeSlot {
    pub ctrl: u64,
    pub hs: Handshake,
}

impl HandshakeSlot {
    /// Whether control word `ctrl` says its slot holds a record (tagged, not being written).
    #[inline(always)]
    pub const fn holds(ctrl: u64) -> bool {
        ctrl >> 32 != 0 && ctrl & HANDSHAKE_WRITING == 0
    }

    /// The record the slot holds, if any.
    pub fn record(&self) -> Option<&Handshake> {
        Self::holds(self.ctrl).then_some(&self.hs)
    }

    /// Whether the slot holds the record under reply key `key` (as a reader takes it).
    pub fn holds_key(&self, key: &FlowKey) -> bool {
        Self::holds(self.ctrl)
            && (self.ctrl >> 32) as u32 == handshake_tag(key)
            && self.hs.fwd.points_back_to(key)
    }
}

/// One way of a handshake index set: a client's tuple and where its handshake record is.
/// Written by the SYN that creates the record, without a lock: a reader that finds its tuple
/// here confirms it against the record (whose reply half must point back to the tuple), so
/// a torn or stale way only costs a miss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct IndexWay {
    /// The client's tuple (network order): its address, the VIP, its port, the VIP's port.
    pub client: u32,
    pub vip: u32,
    pub client_port: u16,
    pub vip_port: u16,
    /// The record's key (the reply tuple, network order): backend, SNAT address, ports.
    pub backend: u32,
    pub snat: u32,
    pub backend_port: u16,
    pub snat_port: u16,
    /// When the way was written, in units of 2^20 ns (about a millisecond), wrapping: the
    /// older way of a set is the one a new handshake replaces.
    pub stamp: u32,
    pub _pad: u32,
}

impl IndexWay {
    /// A way naming client tuple `key` and its handshake record's key `record`, at `stamp`.
    #[inline(always)]
    pub const fn new(key: &FlowKey, record: &FlowKey, stamp: u32) -> Self {
        Self {
            client: key.saddr,
            vip: key.daddr,
            client_port: key.sport,
            vip_port: key.dport,
            backend: record.saddr,
            snat: record.daddr,
            backend_port: record.sport,
            snat_port: record.dport,
            stamp,
            _pad: 0,
        }
    }

    /// Whether the way names client tuple `key`.
    #[inline(always)]
    pub const fn names(&self, key: &FlowKey) -> bool {
        self.client == key.saddr
            && self.vip == key.daddr
            && self.client_port == key.sport
            && self.vip_port == key.dport
    }

    /// The key of the handshake record the way names.
    #[inline(always)]
    pub const fn record(&self) -> FlowKey {
        FlowKey {
            saddr: self.backend,
            daddr: self.snat,
            sport: self.backend_port,
            dport: self.snat_port,
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad16: 0,
        }
    }
}

/// A handshake index set (`CT_INDEX[i]`, one cache line).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct IndexSet {
    pub ways: [IndexWay; INDEX_WAYS],
}

/// A held connection slot (`SLOTS`, keyed by the flow's forward key): counted in
/// `MAXCONN_ACTIVE[index]` and in `MAXCONN_ACTIVE[MAXCONN_GLOBAL]`. Whoever deletes the slot
/// (the data path when the flow closes or is reset, the agent's GC through `lb_release` when
/// the flow expired or vanished) decrements both counters, so each slot is released exactly
/// once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Slot {
    pub created_ns: u64,
    /// `epoch_index(service, backend)`.
    pub index: u32,
    pub _pad: u32,
}

/// Claims in one `lb_acquire` run at most (its frame is up to this many [`SlotClaim`]s).
pub const SLOT_CLAIMS: usize = 16;

/// `SlotClaim::slot._pad` as `lb_acquire` hands the claim back: the slot was taken, the flow
/// held one already, or there was no room in `SLOTS`.
pub const CLAIM_TAKEN: u32 = 1;
pub const CLAIM_HELD: u32 = 2;
pub const CLAIM_FULL: u32 = 3;

/// What the agent hands `lb_acquire` (its `BPF_PROG_TEST_RUN` frame holds up to
/// [`SLOT_CLAIMS`] of them): a slot for a flow its pair's peer established, taken whatever the
/// limits (the flow exists: the counts must say so). The program writes the outcome into
/// `slot._pad` (`CLAIM_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotClaim {
    /// The flow's forward key.
    pub key: FlowKey,
    pub slot: Slot,
}

/// `ConnEvent::reason`: the flow's backend was demoted with `on_down = "reset"`.
pub const CONN_END_RESET: u32 = 1;
/// `ConnEvent::reason`: a SYN reused the tuple of the closed flow before the GC deleted it.
pub const CONN_END_REUSED: u32 = 2;
/// `ConnEvent::reason`: a flow closed with FINs both ways whose SNAT port a new flow took over.
pub const CONN_END_CLOSED: u32 = 3;
/// `ConnEvent::reason`: a flow closed by a RST whose SNAT port a new flow took over.
pub const CONN_END_CLOSED_RST: u32 = 4;

/// A connection the data path deleted itself (`CONN_EVENTS`), for the agent's connection log:
/// the GC, which logs the flows it expires, never sees these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ConnEvent {
    pub created_ns: u64,
    pub ended_ns: u64,
    /// Payload bytes from the client and from the backend.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The forward key: client -> VIP.
    pub key: FlowKey,
    /// SNAT address and port, backend address and port (network order).
    pub snat_addr: u32,
    pub backend_addr: u32,
    pub snat_port: u16,
    pub backend_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// `CONN_END_*`.
    pub reason: u32,
    /// The backend-set generation that chose the flow's backend (low 32 bits).
    pub generation: u32,
    pub _pad: u32,
}

/// A flow the data path just established (`FLOW_SYNC`): its forward key and both entries as
/// they went into the established table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowSync {
    pub fwd_key: FlowKey,
    pub fwd: Flow,
    pub rev: Flow,
}

/// Entries of `MAXCONN_ACTIVE`: one per (service, backend) pair, then the global count.
pub const MAXCONN_ENTRIES: u32 = MAX_SERVICES * MAX_BACKENDS + 1;
/// Index of the global count in `MAXCONN_ACTIVE`.
pub const MAXCONN_GLOBAL: u32 = MAX_SERVICES * MAX_BACKENDS;

/// Per-CPU token bucket of generated RSTs (`RST_BUCKET[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RstBucket {
    pub tokens: u64,
    pub last_ns: u64,
}

/// Agent-only mirror of one (service, backend) pair's health (`HEALTH[epoch_index(s, b)]`),
/// so that `lb status` shows the last state even when no agent runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct HealthRecord {
    /// Wall-clock time (ms since the Unix epoch) of the last transition.
    pub since_unix_ms: u64,
    /// Latency of the last check, microseconds.
    pub latency_us: u32,
    /// `HEALTH_F_*` bits.
    pub flags: u32,
    /// Operator override: 0 ready, 1 drain, 2 disable.
    pub admin: u32,
    pub positives: u16,
    pub failures: u16,
    /// The last check result, UTF-8, NUL-padded.
    pub last: [u8; 64],
}

impl Default for HealthRecord {
    fn default() -> Self {
        Self {
            since_unix_ms: 0,
            latency_us: 0,
            flags: 0,
            admin: 0,
            positives: 0,
            failures: 0,
            last: [0; 64],
        }
    }
}

pub const HEALTH_F_UP: u32 = 1;
pub const HEALTH_F_IN_SET: u32 = 2;
pub const HEALTH_F_CHECKED: u32 = 4;
pub const HEALTH_F_CONFIGURED: u32 = 8;

/// Index of a (service, backend) pair in `RESET_EPOCH`.
#[inline(always)]
pub const fn epoch_index(service: u32, backend: u32) -> u32 {
    service * MAX_BACKENDS + backend
}

/// Per-CPU counters of one service (`STATS_SERVICE[service id]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(bytemuck::Pod, bytemuck::Zeroable, serde::Serialize)
)]
pub struct ServiceStats {
    /// Client -> backend packets and bytes forwarded.
    pub packets: u64,
    pub bytes: u64,
    /// Backend -> client packets and bytes forwarded.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    /// Packets to this VIP:port that were dropped or refused, any reason.
    pub drops: u64,
}

/// Per-CPU counters of one backend (`STATS_BACKEND[backend id]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(bytemuck::Pod, bytemuck::Zeroable, serde::Serialize)
)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    /// SYNs refused because a `maxconn` limit of this backend (or the global one) was reached.
    pub maxconn_refused: u64,
}

impl ServiceStats {
    /// Adds `o` (another CPU's counters) to these.
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.new_flows += o.new_flows;
        self.drops += o.drops;
    }
}

impl BackendStats {
    /// Adds `o` (another CPU's counters) to these.
    pub fn add(&mut self, o: &Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.reply_packets += o.reply_packets;
        self.reply_bytes += o.reply_bytes;
        self.new_flows += o.new_flows;
        self.maxconn_refused += o.maxconn_refused;
    }
}

/// `CAPTURE[0]`: which service's frames `lb capture` samples. All zero (the state of a fresh
/// instance, and what the command writes back when it exits) means capture is off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CaptureConfig {
    /// Service id + 1; 0: off.
    pub service: u32,
    /// One packet in `sample` is captured (0 and 1: every packet).
    pub sample: u32,
    /// Most bytes of each frame copied (capped at [`CAPTURE_MAX_SNAPLEN`]).
    pub snaplen: u32,
    pub _pad: u32,
}

/// Largest `snaplen`: a perf sample (its headers included) must fit in 64 KiB.
pub const CAPTURE_MAX_SNAPLEN: u32 = 65_000;

/// The frame as it arrived (before the rewrite).
pub const CAPTURE_DIR_IN: u8 = 0;
/// The frame as it leaves (after the rewrite): what the backend or the client receives.
pub const CAPTURE_DIR_OUT: u8 = 1;
/// `CaptureHeader::action` of an `in` frame (its action is not decided yet).
pub const CAPTURE_NO_ACTION: u8 = 0xff;

/// What the program emits to `CAPTURE_EVENTS` in front of the first `caplen` bytes of a frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CaptureHeader {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the frame was captured.
    pub ts_ns: u64,
    pub service: u32,
    /// The frame's length.
    pub len: u32,
    /// Bytes of the frame that follow the header.
    pub caplen: u32,
    /// `CAPTURE_DIR_IN` or `CAPTURE_DIR_OUT`.
    pub dir: u8,
    /// The XDP action of an `out` frame, else `CAPTURE_NO_ACTION`.
    pub action: u8,
    /// 1 on the reply path (backend -> client), 0 on the forward path.
    pub reply: u8,
    pub _pad: u8,
}

#[cfg(feature = "user")]
mod pod {
    /// `aya::Pod` for map types that derive `bytemuck::Pod`.
    macro_rules! aya_pod {
        ($($t:ty),* $(,)?) => {
            $(
                // SAFETY: the type derives bytemuck::Pod, which checks at compile time that it
                // is #[repr(C)], Copy, free of padding and valid for any bit pattern: what
                // aya::Pod requires.
                unsafe impl aya::Pod for $t {}
            )*
        };
    }

    aya_pod!(
        super::Config,
        super::ServiceKey,
        super::Service,
        super::Backend,
        super::BackendSet,
        super::BackendKey,
        super::FlowKey,
        super::Flow,
        super::ServiceStats,
        super::BackendStats,
        super::RstBucket,
        super::HealthRecord,
        super::Slot,
        super::ConnEvent,
        super::FlowSync,
        super::CaptureConfig,
        super::PortRange,
        super::PortHints,
        super::Handshake,
        super::HandshakeSlot,
        super::IndexSet,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn map_values_have_the_sizes_the_kernel_sees() {
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<Flow>(), 80);
        assert_eq!(size_of::<Slot>(), 16);
        assert_eq!(size_of::<PortHints>(), 8192);
        assert_eq!(size_of::<ConnEvent>(), 80);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 12);
        assert_eq!(size_of::<BackendSet>(), 16 + 12 * MAX_SET_SIZE + 4096);
        assert_eq!(size_of::<Config>(), 48);
        assert_eq!(size_of::<HandshakeSlot>(), 168);
        assert_eq!(size_of::<CaptureConfig>(), 16);
        assert_eq!(size_of::<CaptureHeader>(), 24);
    }

    #[test]
    fn consecutive_snat_ports_of_a_backend_have_neighbouring_handshake_slots() {
        let reply = |backend: u32, port: u16| FlowKey {
            saddr: backend,
            daddr: 0x0a00_0001,
            sport: 7687u16.to_be(),
            dport: port.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad16: 0,
        };
        let slots = handshake_slots(65_536);
        let first = handshake_slot_of(&reply(0x0a00_0002, 40_000), slots);
        for i in 1..100u32 {
            assert_eq!(
                handshake_slot_of(&reply(0x0a00_0002, 40_000 + i as u16), slots),
                (first + i) & (slots - 1),
                "port 40000 + {i}"
            );
        }
        // Other backends start elsewhere, and every slot stays in the table.
        let starts: std::collections::HashSet<u32> = (3..40u32)
            .map(|b| handshake_slot_of(&reply(0x0a00_0000 | b, 40_000), slots))
            .collect();
        assert!(starts.len() > 30, "{starts:?}");
        assert!(starts.iter().all(|&s| s < slots));
        // The tag still tells the ports of one slot's neighbourhood apart.
        assert_ne!(
            handshake_tag(&reply(0x0a00_0002, 40_000)),
            handshake_tag(&reply(0x0a00_0002, 40_001))
        );
    }

    #[test]
    fn a_flow_is_closing_after_fins_both_ways_or_a_rst_either_way() {
        let with = |close| Flow {
            close,
            ..Default::default()
        };
        let (none, fin, rst) = (with(0), with(FLOW_CLOSE_FIN), with(FLOW_CLOSE_RST));
        assert!(!is_closing(&none, &none));
        assert!(
            !is_closing(&fin, &none) && !is_closing(&none, &fin),
            "half-closed"
        );
        assert!(is_closing(&fin, &fin));
        assert!(is_closing(&rst, &none) && is_closing(&none, &rst));
    }

    #[test]
    fn partner_key_of_a_forward_entry_is_the_reply_key() {
        let fwd_key = FlowKey {
            saddr: 1,
            daddr: 2,
            sport: 10,
            dport: 20,
            proto: 6,
            _pad: 0,
            _pad16: 0,
        };
        let fwd = Flow {
            nat_saddr: 3,
            nat_daddr: 4,
            nat_sport: 30,
            nat_dport: 40,
            ..Default::default()
        };
        let rev_key = fwd.partner_key(6);
        assert_eq!(
            (rev_key.saddr, rev_key.daddr, rev_key.sport, rev_key.dport),
            (4, 3, 40, 30)
        );
        let rev = Flow {
            nat_saddr: 2,
            nat_daddr: 1,
            nat_sport: 20,
            nat_dport: 10,
            ..Default::default()
        };
        assert!(rev.points_back_to(&fwd_key));
        assert_eq!(rev.partner_key(6), fwd_key);
        assert!(fwd.points_back_to(&rev_key));
    }
}
