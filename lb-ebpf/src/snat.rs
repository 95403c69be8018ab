//! SNAT port claim: a free port on the balancer's backend-facing address for a new flow.
//!
//! A port is claimed by inserting the flow's reply entry (backend -> SNAT address:port) into
//! the embryonic table with BPF_NOEXIST; a port whose reply key is in the established table is
//! taken too, and so is a port whose embryonic entry has expired. Each try draws a random
//! port; the search gives up after `SNAT_TRIES` tries. Under pressure (every try found its port
//! taken), it tries `REUSE_TRIES` more ports and may also take over the port of a flow that
//! has been closed for a while and whose backend did not close first: the backend has no
//! TIME_WAIT on that tuple, and without this, ports would wait for the GC (a flow the client
//! closed first normally ends at its last ACK, in the forward path, and frees its port then;
//! this covers the ones whose last ACK was lost and those a RST closed); or the port of a
//! half-open handshake older than `HALF_OPEN_NS` (the backend answered, the client never did: a spoofed SYN), so that a SYN
//! flood holds each port for a fraction of a second instead of the connect timeout.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    Counter, Flow, FlowKey, CONN_END_CLOSED, CONN_END_CLOSED_RST, FLOW_CLOSE_RST, IPPROTO_TCP,
};

use crate::{conntrack, events, maxconn, stats};

pub const SNAT_TRIES: u32 = 32;
/// Tries of the second round of `claim` (under pressure).
pub const REUSE_TRIES: u32 = 8;
/// How long a closed flow must have been quiet before a new flow may take over its port (its
/// last ACK and retransmitted FINs have passed).
pub const REUSE_QUIET_NS: u64 = 1_000_000_000;
/// How old a half-open handshake must be before, under port pressure, a new flow may take over
/// its port. A real client's ACK follows the backend's SYN-ACK within a round trip; a flood of
/// spoofed SYNs at 20,000/s keeps about 5,000 ports younger than this.
pub const HALF_OPEN_NS: u64 = 250_000_000;

/// Claims a port for the reply entry `reply` from `backend:bport` to `snat_addr`, trying
/// ports in `[min, max]` (host order). Returns the port (network order) or `None`.
/// Embryonic entries older than `embryonic_timeout` at `now` are taken over; under pressure,
/// so is the port of a quiet closed flow with no TIME_WAIT at the backend.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn claim(
    backend: u32,
    bport: u16,
    snat_addr: u32,
    min: u16,
    max: u16,
    reply: &Flow,
    now: u64,
    embryonic_timeout: u64,
) -> Option<u16> {
    if max < min {
        return None;
    }
    let range = (max - min) as u32 + 1;
    // One key, its port changed each try.
    let mut key = FlowKey {
        saddr: backend,
        daddr: snat_addr,
        sport: bport,
        dport: 0,
        proto: IPPROTO_TCP,
        _pad: 0,
        _pad16: 0,
    };
    let mut i = 0;
    while i < SNAT_TRIES {
        // A fresh random port each try: taken ports cluster, and a walk from one random start
        // would keep hitting the same cluster.
        key.dport = random_port(min, range).to_be();
        if !conntrack::established_has(&key)
            && (conntrack::claim_embryonic(&key, reply)
                || conntrack::reclaim_expired(&key, reply, now, embryonic_timeout))
        {
            return Some(key.dport);
        }
        i += 1;
    }

    // Under pressure: `REUSE_TRIES` more ports, looking for a free one or one held by a flow
    // that closed more than `REUSE_QUIET_NS` ago with no TIME_WAIT at the backend; that flow is
    // deleted (its slot released, its end reported to the connection log) and its port
    // claimed. The search only reads; the one takeover follows it, so the verifier walks the
    // takeover (and the rest of the path) once, not once per try.
    let mut found = false;
    let mut i = 0;
    while i < REUSE_TRIES {
        key.dport = random_port(min, range).to_be();
        if !conntrack::established_has(&key) {
            if conntrack::claim_embryonic(&key, reply) {
                return Some(key.dport);
            }
            if conntrack::reclaim_half_open(&key, reply, now, HALF_OPEN_NS) {
                stats::count(Counter::HalfOpenReclaimed);
                return Some(key.dport);
            }
        }
        if conntrack::closed_quiet(&key, now, REUSE_QUIET_NS).is_some() {
            found = true;
            break;
        }
        i += 1;
    }
    if !found {
        return None;
    }
    let c = conntrack::closed_quiet(&key, now, REUSE_QUIET_NS)?;
    let reason = if (c.fwd.close | c.rev.close) & FLOW_CLOSE_RST != 0 {
        CONN_END_CLOSED_RST
    } else {
        CONN_END_CLOSED
    };
    // The log record is sent from the entries before they are deleted (one straight reserve,
    // write and submit, which every verifier sees released; two CPUs taking over the same
    // port at once would log it twice, nothing worse).
    events::ended(&c.fwd_key, c.fwd, c.rev, now, reason);
    if conntrack::delete_closed(&c, &key) {
        stats::count(Counter::ClosedPortTakenOver);
        maxconn::release(&c.fwd_key);
    }
    if !conntrack::established_has(&key) && conntrack::claim_embryonic(&key, reply) {
        Some(key.dport)
    } else {
        None
    }
}

/// A random port in `[min, min + range)` (host order).
#[inline(always)]
fn random_port(min: u16, range: u32) -> u16 {
    // SAFETY: helper without arguments.
    (min as u32 + unsafe { bpf_get_prandom_u32() } % range) as u16
}
