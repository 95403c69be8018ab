//! Connection-end events for the agent's connection log (`CONN_EVENTS`, a ring buffer): the
//! data path reports the flows it deletes itself (reset on a demoted backend, a closed tuple
//! reused by a new SYN); the agent's GC logs the ones it expires. A full ring loses the event,
//! never the packet.
use lb_common::{ConnEvent, Flow, FlowKey};

use crate::maps::CONN_EVENTS;

/// Reports the end of the flow whose forward entry `fwd` (at `fwd_key`) and reply entry `rev`
/// are about to be deleted.
#[inline(always)]
pub fn ended(fwd_key: &FlowKey, fwd: &Flow, rev: &Flow, now: u64, reason: u32) {
    let Some(mut entry) = CONN_EVENTS.reserve(0) else {
        return;
    };
    entry.write(ConnEvent {
        created_ns: fwd.created_ns,
        ended_ns: now,
        bytes_in: fwd.bytes,
        bytes_out: rev.bytes,
        key: *fwd_key,
        snat_addr: fwd.nat_saddr,
        backend_addr: fwd.nat_daddr,
        snat_port: fwd.nat_sport,
        backend_port: fwd.nat_dport,
        service_id: fwd.service_id,
        backend_id: fwd.backend_id,
        reason,
    });
    entry.submit(0);
}
