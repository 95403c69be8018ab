//! SNAT port claim: a free port on the balancer's backend-facing address for a new flow.
//!
//! A port is claimed by inserting the flow's reply entry (backend -> SNAT address:port) into
//! the embryonic table with BPF_NOEXIST; a port whose reply key is in the established table is
//! taken too, and so is a port whose embryonic entry has expired. Each try draws a random
//! port; the search gives up after `SNAT_TRIES` tries.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{Flow, FlowKey, IPPROTO_TCP};

use crate::conntrack;

pub const SNAT_TRIES: u32 = 32;

/// Claims a port for the reply entry `reply` from `backend:bport` to `snat_addr`, trying
/// ports in `[min, max]` (host order). Returns the port (network order) or `None`.
/// Embryonic entries older than `embryonic_timeout` at `now` are taken over.
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
    let mut i = 0;
    while i < SNAT_TRIES {
        // A fresh random port each try: taken ports cluster, and a walk from one random start
        // would keep hitting the same cluster.
        // SAFETY: helper without arguments.
        let port = (min as u32 + unsafe { bpf_get_prandom_u32() } % range) as u16;
        let key = FlowKey {
            saddr: backend,
            daddr: snat_addr,
            sport: bport,
            dport: port.to_be(),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        if !conntrack::established_has(&key)
            && (conntrack::claim_embryonic(&key, reply)
                || conntrack::reclaim_expired(&key, reply, now, embryonic_timeout))
        {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}
