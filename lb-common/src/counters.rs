//! Global per-CPU counters (`STATS_GLOBAL[Counter as u32]`): what the data path did with the
//! packets that concerned it, and why it dropped the ones it dropped.

/// Index of a global counter. Append only: the numbering is part of the map ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Client -> backend packets rewritten and forwarded.
    FwdPackets = 0,
    /// Backend -> client packets rewritten and forwarded.
    ReplyPackets,
    /// New flows created (SYN to a VIP:port, backend chosen, SNAT port claimed).
    NewFlows,
    /// Flows moved from the embryonic to the established table.
    Established,
    /// ICMP errors translated for a flow and forwarded.
    IcmpTranslated,
    /// TTL <= 1 on a packet for a VIP: passed to the kernel unmodified.
    PassTtl,
    /// Non-SYN segment to a VIP:port (or from a backend to an SNAT port) with no flow.
    DropNoFlow,
    /// SYN to a VIP:port whose backend set is empty.
    DropNoBackend,
    /// SYN refused with a RST because no SNAT port was free for the chosen backend.
    RstSnatExhausted,
    /// SYN dropped because the embryonic table refused the insert.
    DropEmbryonicFull,
    /// Flow could not move to the established table (full): the flow is refused.
    DropEstablishedFull,
    /// Fragment (first fragment, MF or offset) to a VIP/SNAT port.
    DropFragment,
    /// IPv4 options on a packet to a VIP/SNAT port.
    DropIpOptions,
    /// `bpf_fib_lookup` did not return success for a new flow (see `FibResult*`).
    DropFib,
    /// The egress interface is not one the program can redirect to.
    DropNoEgress,
    /// ICMP error for a VIP/SNAT tuple that matches no flow.
    DropIcmpNoFlow,
    /// Truncated or malformed headers on a packet for a VIP/SNAT port.
    DropMalformed,
    /// The redirect itself failed.
    DropRedirect,
    /// Frames larger than 1514 bytes seen in generic mode (GSO super-packets).
    GenericLarge,
    /// RSTs generated (all reasons).
    RstSent,
    /// The route's source address for a backend is not an address of an attached interface.
    DropNoSnatAddr,
    /// `bpf_fib_lookup` result codes 0..=9 for new flows, one counter each.
    FibResult0,
    FibResult1,
    FibResult2,
    FibResult3,
    FibResult4,
    FibResult5,
    FibResult6,
    FibResult7,
    FibResult8,
    FibResult9,
    /// Segment with no flow (to a VIP:port, or from a backend to an SNAT port) answered with RST.
    RstNoFlow,
    /// SYN to a service whose backend set is empty (e.g. no master) answered with RST.
    RstNoBackend,
    /// Segment of a flow whose backend was demoted with `on_down = "reset"`: flow deleted, RST.
    RstFlowReset,
    /// A RST that the per-CPU rate limit suppressed (the segment was dropped instead).
    DropRstLimited,
    /// SYN on the tuple of a closing flow (FIN both ways or RST): the old flow was deleted and
    /// a new one started (TIME_WAIT reuse by the client).
    ClosedTupleReused,
    /// `xdp:xdp_redirect_err` tracepoint hits (any XDP program on this host): a redirect the
    /// kernel refused after the program returned (e.g. frame larger than the egress MTU).
    XdpRedirectErr,
    /// `xdp:xdp_exception` tracepoint hits (XDP_ABORTED, or an action the driver cannot do).
    XdpException,
    /// SYN over a `maxconn` limit (per backend or global), dropped (the client's SYN
    /// retransmit stands in for HAProxy's queue).
    DropMaxconn,
    /// SYN over a `maxconn` limit answered with a RST (`on_maxconn = "reset"`).
    RstMaxconn,
    /// SYN dropped because the connection-slot table (`SLOTS`) refused the insert.
    DropSlotsFull,
    /// Number of counters (array size), not a counter.
    Max,
}

/// Number of entries in `STATS_GLOBAL`.
pub const COUNTER_MAX: u32 = Counter::Max as u32;

/// Human names of the counters, indexed like [`Counter`].
pub const COUNTER_NAMES: [&str; COUNTER_MAX as usize] = [
    "fwd_packets",
    "reply_packets",
    "new_flows",
    "established",
    "icmp_translated",
    "pass_ttl",
    "drop_no_flow",
    "drop_no_backend",
    "rst_snat_exhausted",
    "drop_embryonic_full",
    "drop_established_full",
    "drop_fragment",
    "drop_ip_options",
    "drop_fib",
    "drop_no_egress",
    "drop_icmp_no_flow",
    "drop_malformed",
    "drop_redirect",
    "generic_large_frames",
    "rst_sent",
    "drop_no_snat_addr",
    "fib_success",
    "fib_blackhole",
    "fib_unreachable",
    "fib_prohibit",
    "fib_not_fwded",
    "fib_fwd_disabled",
    "fib_unsupp_lwt",
    "fib_no_neigh",
    "fib_frag_needed",
    "fib_no_src_addr",
    "rst_no_flow",
    "rst_no_backend",
    "rst_flow_reset",
    "drop_rst_limited",
    "closed_tuple_reused",
    "xdp_redirect_err",
    "xdp_exception",
    "drop_maxconn",
    "rst_maxconn",
    "drop_slots_full",
];
