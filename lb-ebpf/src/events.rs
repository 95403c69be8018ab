//! Connection-end events for the agent's connection log (`CONN_EVENTS`, a ring buffer): the
//! data path reports the flows it deletes itself (reset on a demoted backend, a closed tuple
//! reused by a new SYN); the agent's GC logs the ones it expires. A full ring loses the event,
//! never the packet. Records wake no one: the agent's GC thread drains the ring every 50 ms.
use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, maps::ring_buf::RingBufEntry};
use lb_common::{ConnEvent, Flow, FlowKey};

use crate::maps::CONN_EVENTS;

/// Reports the end of the flow whose forward entry `fwd` (at `fwd_key`) and reply entry `rev`
/// are about to be deleted.
#[inline(always)]
pub fn ended(fwd_key: &FlowKey, fwd: &Flow, rev: &Flow, now: u64, reason: u32) {
    prepare(fwd_key, fwd, rev, now, reason).submit();
}

/// A record written into the ring, not yet visible to the agent.
pub struct Pending(Option<RingBufEntry<ConnEvent>>);

impl Pending {
    /// Makes the record visible without waking the agent (`BPF_RB_NO_WAKEUP`): it drains the
    /// ring on a timer, and a wakeup per ended connection would cost more than the connection.
    #[inline(always)]
    pub fn submit(self) {
        if let Some(e) = self.0 {
            e.submit(BPF_RB_NO_WAKEUP as u64);
        }
    }

    #[inline(always)]
    pub fn discard(self) {
        if let Some(e) = self.0 {
            e.discard(0);
        }
    }
}

/// Writes the record of a flow's end into the ring (in place: no stack copy) without sending it.
#[inline(always)]
pub fn prepare(fwd_key: &FlowKey, fwd: &Flow, rev: &Flow, now: u64, reason: u32) -> Pending {
    let Some(mut entry) = CONN_EVENTS.reserve(0) else {
        return Pending(None);
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
        generation: fwd.generation,
        _pad: 0,
    });
    Pending(Some(entry))
}
