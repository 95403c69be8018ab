//! Every map of the data path. The agent owns (is the only writer of) `CONFIG`, `SERVICES`,
//! `BACKEND_SETS`, `BACKENDS` and `TX_PORTS`; the program owns the connection tables and the
//! counters. Sizes here are defaults: the agent may override `max_entries` at load time.
use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, PerCpuArray, PerfEventArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    epoch_index, handshake_slots, BackendKey, BackendSet, BackendStats, CaptureConfig, Config,
    ConnEvent, Flow, FlowKey, FlowSync, Handshake, HandshakeSlot, IndexSet, PortHints, PortRange,
    RstBucket, Service, ServiceKey, ServiceStats, Slot, COUNTER_MAX, DEFAULT_EMBRYONIC_ENTRIES,
    DEFAULT_ESTABLISHED_ENTRIES, FLOW_SYNC_BYTES, INDEX_SETS, MAXCONN_ENTRIES, MAX_BACKENDS,
    MAX_IFACES, MAX_SERVICES, MAX_SNAT_ADDRS,
};

/// Runtime settings, index 0.
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// VIP:port -> service.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { MAX_SERVICES as usize }> = HashMap::new();

/// Service id -> the service's current backend set (an inner array with one `BackendSet`).
#[btf_map]
pub static BACKEND_SETS: ArrayOfMaps<Array<BackendSet, 1>, { MAX_SERVICES as usize }> =
    ArrayOfMaps::new();

/// Backend data address:port -> stable backend id. Replies are only translated from these.
#[btf_map]
pub static BACKENDS: HashMap<BackendKey, u32, { MAX_BACKENDS as usize }> = HashMap::new();

/// Flows whose handshake has not completed, one record each in the slot of its reply key
/// (see [`lb_common::HandshakeSlot`]); records expire after the connect timeout. Mmapable: the
/// agent reads the slots in place.
#[btf_map]
pub static CT_EMBRYONIC: Array<
    HandshakeSlot,
    { handshake_slots(DEFAULT_EMBRYONIC_ENTRIES) as usize },
    { lb_common::BPF_F_MMAPABLE as usize },
> = Array::new();

/// The handshake index: `CT_INDEX[hash(client tuple)]`, a set of ways each naming a client
/// tuple and its record's key in `CT_EMBRYONIC` (see [`lb_common::IndexWay`]).
#[btf_map]
pub static CT_INDEX: Array<IndexSet, { INDEX_SETS as usize }> = Array::new();

/// Established flows: preallocated, never evicted; when full, new flows are refused.
#[btf_map]
pub static CT_ESTABLISHED: HashMap<FlowKey, Flow, { DEFAULT_ESTABLISHED_ENTRIES as usize }> =
    HashMap::new();

/// `BPF_F_NO_PREALLOC`: entries are allocated when inserted.
const NO_PREALLOC: usize = 1;

/// Connection slots held against `maxconn` limits, by forward flow key. Only flows of a
/// limited backend (or under a global limit) have one. Not preallocated: an instance without
/// limits pays no memory for it.
#[btf_map]
pub static SLOTS: HashMap<
    FlowKey,
    Slot,
    { (DEFAULT_EMBRYONIC_ENTRIES / 2 + DEFAULT_ESTABLISHED_ENTRIES / 2) as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Connections held per (service, backend) pair, and in total at `MAXCONN_GLOBAL`; changed
/// only with atomic adds (by the data path and by `lb_release`).
#[btf_map]
pub static MAXCONN_ACTIVE: Array<u64, { MAXCONN_ENTRIES as usize }> = Array::new();

/// Connections the data path ended itself, for the agent's connection log (256 KiB: about
/// 3,000 events between two reads).
#[btf_map]
pub static CONN_EVENTS: RingBuf<ConnEvent, { 64 * 4096 }> = RingBuf::new();

/// Flows the data path established, for a pair's standby (only with `CONFIG_F_SYNC`; the
/// agent sizes it: one page when the instance is not paired).
#[btf_map]
pub static FLOW_SYNC: RingBuf<FlowSync, { FLOW_SYNC_BYTES as usize }> = RingBuf::new();

/// Ifindex -> the interface's MAC (only read with `CONFIG_F_SYNC`).
#[btf_map]
pub static IFACE_MACS: HashMap<u32, [u8; 6], { MAX_IFACES as usize }> = HashMap::new();

/// Whether a frame received on `ifindex` is addressed to `dst`, that interface's own MAC.
#[inline(always)]
pub fn addressed_here(ifindex: u32, dst: &[u8; 6]) -> bool {
    IFACE_MACS.get_ptr(ifindex).is_some_and(|mac| {
        // SAFETY: a map value pointer from a successful lookup is valid for reading.
        unsafe { *mac == *dst }
    })
}

/// Backend id -> the SNAT ports its flows hold (`hints`, `lb_common::PortHints`). Not pinned:
/// an agent that adopts tables sets every bit before its program serves them. Mmapable: the
/// agent's GC and a pair's receiver change its words in place, with atomic operations.
#[btf_map]
pub static PORT_HINTS: Array<
    PortHints,
    { MAX_BACKENDS as usize },
    { lb_common::BPF_F_MMAPABLE as usize },
> = Array::new();

/// Round-robin cursor per service.
#[btf_map]
pub static RR_CURSOR: Array<u32, { MAX_SERVICES as usize }> = Array::new();

/// Interfaces the program may redirect to (ifindex -> ifindex).
#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_IFACES as usize }> = DevMapHash::new();

/// Local addresses of the attached interfaces (network order -> 1): the only destinations a
/// backend's reply can be translated for.
#[btf_map]
pub static SNAT_ADDRS: HashMap<u32, u32, { MAX_SNAT_ADDRS as usize }> = HashMap::new();

/// Scratch space for `bpf_fib_lookup`'s parameters (one per CPU, not pinned): off the stack,
/// which Linux 6.1 counts across the program's frames.
#[btf_map]
pub static FIB_PARAMS: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup, 1> = PerCpuArray::new();

/// Backend id -> the next hop this CPU found for it last (one per CPU, not pinned: a new
/// program starts with none), reused for `forward::HOP_REUSE_NS`.
#[btf_map]
pub static NEXT_HOPS: PerCpuArray<crate::forward::CachedHop, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Backend id -> where this CPU's port search for the backend goes on (`snat::claim`): the
/// offset in the SNAT range of the port after the last one it found (or of the word after one
/// with no port free), plus one; 0, a CPU that has found none yet, reads as `u32::MAX` modulo
/// the range. One per CPU, not pinned: a new program's CPUs start there again.
#[btf_map]
pub static PORT_CURSORS: PerCpuArray<u32, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// Scratch space for a new flow's handshake record (one per CPU, not pinned), built here and
/// inserted from here: 160 bytes the stack cannot spare.
#[btf_map]
pub static NEW_HANDSHAKE: PerCpuArray<Handshake, 1> = PerCpuArray::new();

/// Backend address -> the source address of the agent's route to it (network order). Read
/// only with `CONFIG_F_ROUTE_SRC`, where the kernel's FIB lookup cannot say the source
/// (`BPF_FIB_LOOKUP_SRC` is Linux 6.7+).
#[btf_map]
pub static ROUTE_SRC: HashMap<u32, u32, { MAX_BACKENDS as usize }> = HashMap::new();

/// An earlier SNAT port range whose flows are still alive (read only with
/// `CONFIG_F_OLD_PORTS`).
#[btf_map]
pub static OLD_PORTS: Array<PortRange, 1> = Array::new();

/// Whether `port` (host order) is in the earlier SNAT range whose flows are still alive.
#[inline(always)]
pub fn in_old_ports(port: u16) -> bool {
    OLD_PORTS.get(0).is_some_and(|r| r.contains(port))
}

/// Reset epoch per (service, backend), bumped by the agent when it demotes a backend with
/// `on_down = "reset"`; flows created under an older epoch are reset on their next segment.
#[btf_map]
pub static RESET_EPOCH: Array<u32, { (MAX_SERVICES * MAX_BACKENDS) as usize }> = Array::new();

/// Per service: until when (`clock::now`) a SYN that finds no backend is held (dropped:
/// the client retransmits it) instead of refused. The agent sets it when an exclusive role
/// loses its holder and its candidates are checked at `fastinter`, and clears it when one is
/// installed; the deadline bounds the hold even if the agent is gone.
#[btf_map]
pub static SYN_HOLD: Array<u64, { MAX_SERVICES as usize }> = Array::new();

/// Whether a SYN to `service` that finds no backend is held at `now`.
#[inline(always)]
pub fn syn_held(service: u32, now: u64) -> bool {
    SYN_HOLD.get(service).is_some_and(|&until| now < until)
}

/// Token bucket of generated RSTs, per CPU.
#[btf_map]
pub static RST_BUCKET: PerCpuArray<RstBucket, 1> = PerCpuArray::new();

/// Global counters, indexed by `lb_common::Counter`.
#[btf_map]
pub static STATS_GLOBAL: PerCpuArray<u64, { COUNTER_MAX as usize }> = PerCpuArray::new();

/// Per-service counters, indexed by service id.
#[btf_map]
pub static STATS_SERVICE: PerCpuArray<ServiceStats, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Per-backend counters, indexed by stable backend id.
#[btf_map]
pub static STATS_BACKEND: PerCpuArray<BackendStats, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// `lb capture`'s settings, index 0 (all zero: off). Written only by that command.
#[btf_map]
pub static CAPTURE: Array<CaptureConfig, 1> = Array::new();

/// Captured frames for `lb capture` (one perf buffer per CPU, opened by the command).
#[btf_map]
pub static CAPTURE_EVENTS: PerfEventArray = PerfEventArray::new();

/// Settings before the agent wrote any (all zero).
static NO_CONFIG: Config = Config {
    embryonic_timeout_ns: 0,
    idle_timeout_ns: 0,
    close_timeout_ns: 0,
    snat_port_min: 0,
    snat_port_max: 0,
    flags: 0,
    rst_per_sec: 0,
    maxconn: 0,
    handshake_slots: 0,
    _pad: 0,
};

/// The runtime settings, read in place (a copy would take 48 bytes of the 512-byte stack):
/// only the agent writes them, between packets as far as a packet can tell.
#[inline(always)]
pub fn config() -> &'static Config {
    CONFIG.get(0).unwrap_or(&NO_CONFIG)
}

/// The backend set currently installed for `service_id`, copied out of the inner map.
#[inline(always)]
pub fn backend_set(service_id: u32) -> Option<&'static BackendSet> {
    BACKEND_SETS.get_value(service_id, &0)
}

/// The id of backend `addr:port`, if it is a configured one.
#[inline(always)]
pub fn backend_id(addr: u32, port: u16) -> Option<u32> {
    let key = BackendKey {
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: a hash-map value pointer from a successful lookup is valid for reading (RCU);
    // the agent writes a backend's id once, when it adds the backend.
    BACKENDS.get_ptr(key).map(|id| unsafe { *id })
}

/// Whether `addr:port` is a configured backend.
#[inline(always)]
pub fn is_backend(addr: u32, port: u16) -> bool {
    backend_id(addr, port).is_some()
}

/// Whether `addr` is an SNAT (local) address of this balancer.
#[inline(always)]
pub fn is_snat_addr(addr: u32) -> bool {
    SNAT_ADDRS.get_ptr(addr).is_some()
}

/// The current reset epoch of (service, backend).
#[inline(always)]
pub fn reset_epoch(service: u32, backend: u32) -> u32 {
    if service >= MAX_SERVICES || backend >= MAX_BACKENDS {
        return 0;
    }
    RESET_EPOCH
        .get(epoch_index(service, backend))
        .copied()
        .unwrap_or(0)
}
