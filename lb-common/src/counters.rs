//! Global per-CPU counters (`STATS_GLOBAL[Counter as u32]`): what the data path did with the
//! packets that concerned it, and why it dropped the ones it dropped.
//!
//! One table, declared once: each row is a variant, its exported name and its doc; the enum,
//! [`COUNTER_NAMES`] and [`COUNTER_DOCS`] are generated from it for both sides. Append only:
//! the numbering is part of the map ABI (a retired row is renamed and reused, never removed).

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $variant:ident => $name:literal,)+) => {
        /// Index of a global counter.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])+ $variant,)+
            /// Number of counters (array size), not a counter.
            Max,
        }

        /// Exported names of the counters, indexed like [`Counter`].
        pub const COUNTER_NAMES: [&str; COUNTER_MAX as usize] = [$($name,)+];

        /// What each counter counts (its doc), indexed like [`Counter`].
        pub const COUNTER_DOCS: [&str; COUNTER_MAX as usize] = [$(concat!($($doc, " "),+),)+];
    };
}

counters! {
    /// Client -> backend packets rewritten and forwarded.
    FwdPackets => "fwd_packets",
    /// Backend -> client packets rewritten and forwarded.
    ReplyPackets => "reply_packets",
    /// New flows created (SYN to a VIP:port, backend chosen, SNAT port claimed).
    NewFlows => "new_flows",
    /// Flows moved from the embryonic to the established table.
    Established => "established",
    /// ICMP errors translated for a flow and forwarded.
    IcmpTranslated => "icmp_translated",
    /// TTL <= 1 on a packet for a VIP: passed to the kernel unmodified.
    PassTtl => "pass_ttl",
    /// A RST that would have been answered (no flow, a reset flow): dropped, never answered.
    DropNoFlow => "drop_no_flow",
    /// SYN held (dropped, for the client's retransmit) because its service had no backend
    /// while an exclusive role was being handed over (`SYN_HOLD`): no refusal in a failover.
    SynHeld => "syn_held",
    /// SYN refused with a RST because no SNAT port was free for the chosen backend.
    RstSnatExhausted => "rst_snat_exhausted",
    /// Under SNAT port pressure, a handshake that its backend left unanswered for longer than
    /// the client's first SYN retransmit (`UNANSWERED_NS`, 1 s: a backend whose SYN queue a
    /// flood filled, or one that is gone) gave its port to a new flow; the client's retransmit
    /// starts a fresh handshake. (This row was `drop_embryonic_full`, retired when the port
    /// claim became the handshake's only insert.)
    UnansweredReclaimed => "unanswered_reclaimed",
    /// Flow could not move to the established table (full): the flow is refused.
    DropEstablishedFull => "drop_established_full",
    /// Fragment (first fragment, MF or offset) to a VIP/SNAT port.
    DropFragment => "drop_fragment",
    /// IPv4 options on a packet to a VIP/SNAT port.
    DropIpOptions => "drop_ip_options",
    /// `bpf_fib_lookup` did not return success for a new flow (see `FibResult*`).
    DropFib => "drop_fib",
    /// The egress interface is not one the program can redirect to.
    DropNoEgress => "drop_no_egress",
    /// ICMP error for a VIP/SNAT tuple that matches no flow.
    DropIcmpNoFlow => "drop_icmp_no_flow",
    /// Truncated or malformed headers on a packet for a VIP/SNAT port.
    DropMalformed => "drop_malformed",
    /// RST of an established flow whose sequence number is outside the receiver's window
    /// (RFC 5961): a blind or stale RST, dropped; the flow is untouched.
    DropRstOutOfWindow => "drop_rst_out_of_window",
    /// Frames larger than 1514 bytes seen in generic mode (GSO super-packets).
    GenericLarge => "generic_large_frames",
    /// RSTs generated (all reasons).
    RstSent => "rst_sent",
    /// The route's source address for a backend is not an address of an attached interface.
    DropNoSnatAddr => "drop_no_snat_addr",
    /// `bpf_fib_lookup` result codes 0..=9 for new flows, one counter each: 0 (success; also
    /// counted when a CPU reuses the next hop it found for the backend within 100 ms).
    FibResult0 => "fib_success",
    /// `bpf_fib_lookup` result 1 (blackhole).
    FibResult1 => "fib_blackhole",
    /// `bpf_fib_lookup` result 2 (unreachable).
    FibResult2 => "fib_unreachable",
    /// `bpf_fib_lookup` result 3 (prohibit).
    FibResult3 => "fib_prohibit",
    /// `bpf_fib_lookup` result 4 (not fwded).
    FibResult4 => "fib_not_fwded",
    /// `bpf_fib_lookup` result 5 (fwd disabled).
    FibResult5 => "fib_fwd_disabled",
    /// `bpf_fib_lookup` result 6 (unsupp lwt).
    FibResult6 => "fib_unsupp_lwt",
    /// `bpf_fib_lookup` result 7 (no neigh).
    FibResult7 => "fib_no_neigh",
    /// `bpf_fib_lookup` result 8 (frag needed).
    FibResult8 => "fib_frag_needed",
    /// `bpf_fib_lookup` result 9 (no src addr).
    FibResult9 => "fib_no_src_addr",
    /// Segment with no flow (to a VIP:port, or from a backend to an SNAT port) answered with RST.
    RstNoFlow => "rst_no_flow",
    /// SYN to a service whose backend set is empty (e.g. no master) answered with RST.
    RstNoBackend => "rst_no_backend",
    /// Segment of a flow whose backend was demoted with `on_down = "reset"`: flow deleted, RST.
    RstFlowReset => "rst_flow_reset",
    /// A RST that the per-CPU rate limit suppressed (the segment was dropped instead).
    DropRstLimited => "drop_rst_limited",
    /// SYN on the tuple of a closing flow (FIN both ways or RST): the old flow was deleted and
    /// a new one started (TIME_WAIT reuse by the client).
    ClosedTupleReused => "closed_tuple_reused",
    /// `xdp:xdp_redirect_err` tracepoint hits (any XDP program on this host): a redirect the
    /// kernel refused after the program returned (e.g. frame larger than the egress MTU).
    XdpRedirectErr => "xdp_redirect_err",
    /// `xdp:xdp_exception` tracepoint hits (XDP_ABORTED, or an action the driver cannot do).
    XdpException => "xdp_exception",
    /// SYN over a `maxconn` limit (per backend or global), dropped (the client's SYN
    /// retransmit stands in for HAProxy's queue); or a handshake's completing ACK when the
    /// limit filled since its SYN (dropped: the client's next segment tries again).
    DropMaxconn => "drop_maxconn",
    /// SYN over a `maxconn` limit answered with a RST (`on_maxconn = "reset"`).
    RstMaxconn => "rst_maxconn",
    /// A handshake's completing ACK dropped because the connection-slot table (`SLOTS`)
    /// refused the insert.
    DropSlotsFull => "drop_slots_full",
    /// Under SNAT port pressure, a handshake that the backend answered but the client never
    /// completed within `HALF_OPEN_NS` (a spoofed SYN, typically) gave its port to a new flow.
    HalfOpenReclaimed => "half_open_reclaimed",
    /// Under SNAT port pressure, a closed flow (no TIME_WAIT at its backend) quiet long enough
    /// was deleted and gave its port to a new flow.
    ClosedPortTakenOver => "closed_port_taken_over",
    /// A flow the client closed first, ended by the data path as the client's ACK of the
    /// backend's FIN passed (both FINs acknowledged: the backend's socket is gone, the client
    /// holds the TIME_WAIT): both entries deleted, its slot and SNAT port free at once.
    EndedAtLastAck => "ended_at_last_ack",
    /// A client ACK on a handshake in progress that does not acknowledge the backend's
    /// SYN-ACK (typically the last ACK of an earlier connection on the same tuple, overtaken
    /// by the SYN that reused it): dropped, never forwarded on the new flow's mapping, where
    /// the backend would answer it with a RST that ends the new connection.
    DropHandshakeStale => "drop_handshake_stale",
    /// A backend segment on a handshake in progress that does not answer its SYN (not a
    /// SYN-ACK acknowledging the client's initial sequence number): the backend still holds an
    /// earlier connection on the same SNAT port (a spoofed SYN's half-open handshake whose port
    /// was taken over, or a closed flow's retransmitted FIN). Answered with a RST, which ends
    /// that stale connection at the backend, so that the client's SYN retransmit finds a clean
    /// tuple; never forwarded to the new client.
    RstHandshakeStale => "rst_handshake_stale",
    /// In a pair: a frame to a VIP or an SNAT port addressed to another host's MAC (a switch
    /// flooding a frame meant for the other node): passed to the kernel, which drops it; the
    /// node it was meant for forwards it.
    PassOtherHost => "pass_other_host",
}

/// Number of entries in `STATS_GLOBAL`.
pub const COUNTER_MAX: u32 = Counter::Max as u32;
