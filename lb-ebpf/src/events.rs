//! Connection-end events for the agent's connection log (`CONN_EVENTS`, a ring buffer): the
//! data path reports the flows it deletes itself (reset on a demoted backend, a closed tuple
//! reused by a new SYN); the agent's GC logs the ones it expires. A full ring loses the event,
//! never the packet. Records wake no one: the agent's GC thread drains the ring every 50 ms.
//!
//! In a pair, also the flows it establishes (`FLOW_SYNC`), which the agent streams to the
//! standby.
use aya_ebpf::bindings::BPF_RB_NO_WAKEUP;
use lb_common::{ConnEvent, Flow, FlowKey};

use crate::maps::{CONN_EVENTS, FLOW_SYNC};

/// Reports the end of the flow whose forward entry `fwd` (at `fwd_key`) and reply entry `rev`
/// are about to be deleted: the record is reserved, written in place (no stack copy) and
/// submitted in one straight line, without waking the agent (`BPF_RB_NO_WAKEUP`: it drains the
/// ring on a timer, and a wakeup per ended connection would cost more than the connection).
/// A reservation carried across other branches is one Linux 6.1's verifier cannot always see
/// released.
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
        generation: fwd.generation,
        _pad: 0,
    });
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}

/// Reports a flow just established (forward key `fwd_key`, entries `fwd` and `rev` as
/// inserted) for the pair's standby: reserved, written in place and submitted in one straight
/// line, without a wakeup (the agent drains the ring on a timer). A full ring loses the
/// record (the standby resets that flow after a takeover), never the packet.
#[inline(always)]
pub fn established(fwd_key: &FlowKey, fwd: &Flow, rev: &Flow) {
    let Some(mut entry) = FLOW_SYNC.reserve(0) else {
        return;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` points at the reserved record, valid and ours until the submit; each field
    // is written once through a raw pointer, with no copy of the whole record on the stack.
    unsafe {
        core::ptr::addr_of_mut!((*p).fwd_key).write(*fwd_key);
        core::ptr::addr_of_mut!((*p).fwd).write(*fwd);
        core::ptr::addr_of_mut!((*p).rev).write(*rev);
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
}
