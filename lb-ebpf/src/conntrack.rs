//! The connection tables: embryonic (LRU, handshake in progress) and established
//! (preallocated, never evicted). Every flow has a forward and a reply entry; a lookup only
//! counts when the partner entry exists in the same table and points back.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    backend_closed_first, is_closing, Counter, Flow, FlowKey, DIR_REPLY, FLOW_CLOSE_FIN,
    FLOW_CLOSE_RST, FLOW_ESTABLISHED, FLOW_SYN_RECV, IPPROTO_TCP,
};

use crate::{
    events,
    maps::{CT_EMBRYONIC, CT_ESTABLISHED},
    parse::{Tcp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// A flow entry found with its partner.
pub struct Found {
    pub flow: &'static mut Flow,
    pub partner: &'static mut Flow,
    pub established: bool,
}

#[inline(always)]
fn get_est(key: &FlowKey) -> Option<&'static mut Flow> {
    // SAFETY: hash-map values stay valid for the program run (RCU); concurrent writers only
    // touch `state`/`last_seen_ns`, single aligned stores.
    CT_ESTABLISHED.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn get_emb(key: &FlowKey) -> Option<&'static mut Flow> {
    // SAFETY: as in `get_est`.
    CT_EMBRYONIC.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

/// Looks `key` up: established first, then embryonic (unless expired at `now`).
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64, embryonic_timeout: u64) -> Option<Found> {
    if let Some(found) = established(key) {
        return Some(found);
    }
    let flow = get_emb(key)?;
    if now.wrapping_sub(flow.created_ns) > embryonic_timeout {
        return None;
    }
    let partner = get_emb(&flow.partner_key(IPPROTO_TCP))?;
    if !partner.points_back_to(key) {
        return None;
    }
    Some(Found {
        flow,
        partner,
        established: false,
    })
}

/// [`lookup`] for a segment that is not a plain SYN, which must never miss a flow that
/// exists. A handshake completing on another CPU moves its flow from the embryonic table to
/// the established one: it inserts there first, then deletes here ([`promote`]). A lookup that
/// read the established table before that insert and the embryonic one after that delete
/// finds neither; the established table has the flow by then, so it is read once more. (Seen
/// in generic mode, where a client's handshake ACK and its first data leave on two CPUs: the
/// data segment found no flow and was answered with a RST.)
#[inline(always)]
pub fn lookup_settled(key: &FlowKey, now: u64, embryonic_timeout: u64) -> Option<Found> {
    lookup(key, now, embryonic_timeout).or_else(|| established(key))
}

/// The established flow at `key`, with its partner pointing back.
#[inline(always)]
fn established(key: &FlowKey) -> Option<Found> {
    let flow = get_est(key)?;
    let partner = get_est(&flow.partner_key(IPPROTO_TCP))?;
    if !partner.points_back_to(key) {
        return None;
    }
    Some(Found {
        flow,
        partner,
        established: true,
    })
}

/// Whether `key` is in the established table (a port claim checks it before its insert into
/// the embryonic table, which only sees that table).
#[inline(always)]
pub fn established_has(key: &FlowKey) -> bool {
    CT_ESTABLISHED.get_ptr(key).is_some()
}

/// A closed flow whose SNAT port a new flow may take over (see [`closed_quiet`]).
pub struct Closed {
    pub fwd_key: FlowKey,
    pub fwd: &'static Flow,
    pub rev: &'static Flow,
}

/// If the established entry at `key` is the reply entry of a flow that has been closing for
/// more than `quiet_ns` and whose backend did not close first (so the backend holds no
/// TIME_WAIT on this tuple), the flow. (A flow the client closed first whose last ACK passed
/// is not here any more: the forward path ended it, see [`client_closed_and_acked`].) Nothing
/// is deleted here (see [`delete_closed`]).
#[inline(always)]
pub fn closed_quiet(key: &FlowKey, now: u64, quiet_ns: u64) -> Option<Closed> {
    let rev = get_est(key)?;
    if rev.dir != DIR_REPLY {
        return None;
    }
    let fwd_key = rev.partner_key(IPPROTO_TCP);
    let fwd = get_est(&fwd_key)?;
    if !fwd.points_back_to(key) || !is_closing(fwd, rev) {
        return None;
    }
    let last = if fwd.last_seen_ns > rev.last_seen_ns {
        fwd.last_seen_ns
    } else {
        rev.last_seen_ns
    };
    if backend_closed_first(fwd, rev) || now.wrapping_sub(last) <= quiet_ns {
        return None;
    }
    Some(Closed { fwd_key, fwd, rev })
}

/// Whether the client closed the flow first (`fwd`: its forward entry, `rev`: the reply one)
/// and both FINs are acknowledged: the backend received the client's FIN and its own FIN was
/// acknowledged, so its socket is gone once that ACK arrives, and the client holds the only
/// TIME_WAIT. Nothing on the tuple is still due but a retransmit of the backend's FIN should
/// that last ACK be lost (it then meets no flow and gets a RST, which ends the same socket).
#[inline(always)]
pub fn client_closed_and_acked(fwd: &Flow, rev: &Flow) -> bool {
    fwd.first_fin != 0
        && rev.first_fin == 0
        && (fwd.close | rev.close) & FLOW_CLOSE_RST == 0
        && fwd.close & rev.close & FLOW_CLOSE_FIN != 0
        && fwd.ack == rev.seq_end
        && rev.ack == fwd.seq_end
}

/// Deletes both established entries of a flow (`key` and its partner's); false if another CPU
/// deleted it first.
#[inline(always)]
pub fn delete_established(key: &FlowKey, partner_key: &FlowKey) -> bool {
    if CT_ESTABLISHED.remove(key).is_err() {
        return false;
    }
    let _ = CT_ESTABLISHED.remove(partner_key);
    true
}

/// Deletes a closed flow found by [`closed_quiet`] at reply key `key`; false if another CPU
/// deleted it first.
#[inline(always)]
pub fn delete_closed(c: &Closed, key: &FlowKey) -> bool {
    delete_established(&c.fwd_key, key)
}

/// Inserts a new reply entry only if its key is free: this is what claims an SNAT port.
#[inline(always)]
pub fn claim_embryonic(key: &FlowKey, flow: &Flow) -> bool {
    CT_EMBRYONIC.insert(key, flow, BPF_NOEXIST as u64).is_ok()
}

/// Takes over the embryonic reply entry at `key` (writes `flow` there, claiming its SNAT port)
/// if `over` says the handshake holding it is over.
#[inline(always)]
fn take_over_if(key: &FlowKey, flow: &Flow, over: impl Fn(&Flow) -> bool) -> bool {
    // SAFETY: value valid for the program run; only read.
    match CT_EMBRYONIC.get_ptr(key).map(|old| unsafe { &*old }) {
        Some(old) if over(old) => CT_EMBRYONIC.insert(key, flow, BPF_ANY as u64).is_ok(),
        _ => false,
    }
}

/// Takes over the embryonic entry at `key` if it has expired (its flow never completed), so
/// that dead handshakes do not hold SNAT ports until the LRU evicts them.
#[inline(always)]
pub fn reclaim_expired(key: &FlowKey, flow: &Flow, now: u64, embryonic_timeout: u64) -> bool {
    take_over_if(key, flow, |old| {
        now.wrapping_sub(old.created_ns) > embryonic_timeout
    })
}

/// Takes over the embryonic reply entry at `key` if its handshake is half open and stale: the
/// flow began more than `stale_ns` ago, the backend answered (`FLOW_SYN_RECV`) and the
/// client never completed it. A spoofed SYN looks like this; a real client's ACK follows the
/// backend's SYN-ACK within a round trip.
#[inline(always)]
pub fn reclaim_half_open(key: &FlowKey, flow: &Flow, now: u64, stale_ns: u64) -> bool {
    take_over_if(key, flow, |old| {
        old.state == FLOW_SYN_RECV && now.wrapping_sub(old.created_ns) > stale_ns
    })
}

/// Inserts (or replaces an expired) forward entry.
#[inline(always)]
pub fn insert_embryonic(key: &FlowKey, flow: &Flow) -> bool {
    CT_EMBRYONIC.insert(key, flow, BPF_ANY as u64).is_ok()
}

#[inline(always)]
pub fn remove_embryonic(key: &FlowKey) {
    let _ = CT_EMBRYONIC.remove(key);
}

/// The backend answered the SYN: the client's next ACK establishes the flow. Both entries
/// say so: the forward one for that ACK, the reply one (which holds the SNAT port) for
/// [`reclaim_half_open`].
#[inline(always)]
pub fn mark_syn_recv(forward: &mut Flow, reply: &mut Flow) {
    if forward.state < FLOW_SYN_RECV {
        forward.state = FLOW_SYN_RECV;
    }
    if reply.state < FLOW_SYN_RECV {
        reply.state = FLOW_SYN_RECV;
    }
}

/// Moves a flow from the embryonic to the established table: both entries are inserted
/// there first, then removed from the embryonic table, so a concurrent reader always finds
/// the flow in one of them. Returns false (and leaves the embryonic flow alone) when the
/// established table is full. With `sync` (a pair), the flow is also reported to the agent
/// for the standby.
#[inline(always)]
pub fn promote(fwd_key: &FlowKey, found: &Found, now: u64, sync: bool) -> bool {
    let mut fwd = *found.flow;
    let mut rev = *found.partner;
    fwd.state = FLOW_ESTABLISHED;
    rev.state = FLOW_ESTABLISHED;
    fwd.last_seen_ns = now;
    rev.last_seen_ns = now;
    let rev_key = fwd.partner_key(IPPROTO_TCP);
    if CT_ESTABLISHED
        .insert(&rev_key, &rev, BPF_ANY as u64)
        .is_err()
    {
        return false;
    }
    if CT_ESTABLISHED
        .insert(fwd_key, &fwd, BPF_ANY as u64)
        .is_err()
    {
        let _ = CT_ESTABLISHED.remove(&rev_key);
        return false;
    }
    remove_embryonic(fwd_key);
    remove_embryonic(&rev_key);
    stats::count(Counter::Established);
    if sync {
        events::established(fwd_key, &fwd, &rev);
    }
    true
}

/// Deletes both entries of a flow found at `key` (its backend was demoted with reset).
#[inline(always)]
pub fn delete(key: &FlowKey, found: &Found) {
    let partner = found.flow.partner_key(IPPROTO_TCP);
    if found.established {
        let _ = CT_ESTABLISHED.remove(key);
        let _ = CT_ESTABLISHED.remove(&partner);
    } else {
        remove_embryonic(key);
        remove_embryonic(&partner);
    }
}

/// Records what a segment with `flags` says about the connection's end in `flow`, the entry of
/// the direction it travels (each direction writes only its own entry, so the two paths never
/// race on one byte). Nothing is deleted here: a half-closed connection keeps working, the
/// last ACK and retransmitted FINs still translate; the forward path ends a flow the client
/// closed first at its last ACK ([`client_closed_and_acked`]), and the GC deletes any other
/// once it has been closing for the close timeout. A RST marks the entry; any later non-RST segment from
/// the same side clears the mark again (a genuine RST's sender never sends on the tuple again,
/// so that RST was spoofed). A changed mark refreshes `last_seen_ns`: the close timeout counts
/// from the segment that closed the flow.
#[inline(always)]
pub fn track(flow: &mut Flow, partner_close: u8, tcp: &Tcp, now: u64) {
    let flags = tcp.flags;
    let old = flow.close;
    let new = if flags & TCP_RST != 0 {
        old | FLOW_CLOSE_RST
    } else if flags & TCP_FIN != 0 {
        if old & FLOW_CLOSE_FIN == 0 && partner_close & FLOW_CLOSE_FIN == 0 {
            // This side closes first (both at once: both entries say so, which the GC
            // treats as the backend having closed first).
            flow.first_fin = 1;
        }
        (old & !FLOW_CLOSE_RST) | FLOW_CLOSE_FIN
    } else {
        old & !FLOW_CLOSE_RST
    };
    if new != old {
        flow.close = new;
        flow.last_seen_ns = now;
    }
}

/// How far past the receiver's last acknowledgment a segment may end and still move
/// `seq_end`: 16 MiB, more than a default Linux receive window (6 MiB). A blind segment with a
/// guessed sequence number moves it with a chance of 1 in 256, and never further than this.
const SEQ_AHEAD_MAX: u32 = 1 << 24;

/// Records where the sequence space `flow`'s direction sent ends and the acknowledgment it
/// sent last (see [`rst_acceptable`]); `partner_ack`: the receiver's last acknowledgment. A
/// SYN of a handshake sets the start (its sequence number is the sender's choice); later
/// segments only move the end forward, and not beyond [`SEQ_AHEAD_MAX`] past `partner_ack`.
#[inline(always)]
pub fn track_seq(flow: &mut Flow, partner_ack: u32, tcp: &Tcp, payload: u32, established: bool) {
    let flags = tcp.flags;
    if flags & TCP_RST != 0 {
        return;
    }
    let seq = u32::from_be_bytes(tcp.seq);
    let end = seq
        .wrapping_add(payload)
        .wrapping_add(((flags & TCP_SYN != 0) as u32) + ((flags & TCP_FIN != 0) as u32));
    let handshake = flags & TCP_SYN != 0 && !established;
    let forward = (end.wrapping_sub(flow.seq_end) as i32) > 0
        && end.wrapping_sub(partner_ack) <= SEQ_AHEAD_MAX;
    if handshake || forward {
        flow.seq_end = end;
    }
    if flags & TCP_ACK != 0 {
        flow.ack = u32::from_be_bytes(tcp.ack);
    }
}

/// RFC 5961's check, as a middlebox can make it: a RST on an established flow is accepted
/// only if its sequence number lies between what the receiver acknowledged last (`partner.ack`,
/// less one: a RST may follow the sender's own FIN) and the end of what its sender sent
/// (`flow.seq_end`). On an idle connection that is one or two numbers: a blind RST with a
/// guessed sequence number is dropped and never reaches the endpoint or the table. Any other
/// segment is acceptable here.
#[inline(always)]
pub fn rst_acceptable(flow: &Flow, partner: &Flow, tcp: &Tcp) -> bool {
    if tcp.flags & TCP_RST == 0 {
        return true;
    }
    let low = partner.ack.wrapping_sub(1);
    u32::from_be_bytes(tcp.seq).wrapping_sub(low) <= flow.seq_end.wrapping_sub(low)
}

/// Whether a client segment may pass on a handshake in progress (`flow`: its forward entry,
/// `partner`: the reply entry). A segment with ACK (and no SYN or RST) must acknowledge the
/// backend's SYN-ACK: before the backend answered there is nothing to acknowledge, after it
/// the ACK is its initial sequence number plus one. Anything else is a segment of an earlier
/// connection on the same tuple (its last ACK, delayed behind the SYN that reused the tuple
/// on another CPU): on the new mapping the backend would answer it with a RST that ends the
/// new connection. SYN retransmits and RSTs pass.
#[inline(always)]
pub fn handshake_ack_acceptable(flow: &Flow, partner: &Flow, tcp: &Tcp) -> bool {
    if tcp.flags & (TCP_ACK | TCP_SYN | TCP_RST) != TCP_ACK {
        return true;
    }
    flow.state == FLOW_SYN_RECV && u32::from_be_bytes(tcp.ack) == partner.seq_end
}

/// Most data a client can send before its handshake completes at the backend (the window of
/// a SYN-ACK is not scaled: 65,535 bytes), and its FIN.
const HANDSHAKE_DATA_MAX: u32 = 65_536;

/// Whether a backend segment may pass on a handshake in progress (`partner`: the flow's
/// forward entry): a RST, or a SYN-ACK that acknowledges the client's SYN. The client's end of
/// the sequence space (`partner.seq_end`) is its SYN's, or, when its ACK waits for a slot and
/// it sent data meanwhile, at most `HANDSHAKE_DATA_MAX` beyond it: the backend's SYN-ACK
/// retransmit then still acknowledges the SYN. Any other segment comes from an earlier
/// connection the backend still holds on the same SNAT port: its answer to our SYN (a
/// duplicate ACK from a half-open handshake whose port was taken over), that handshake's
/// SYN-ACK retransmitted (acknowledging another SYN, a random distance away), or a closed
/// flow's retransmitted FIN.
#[inline(always)]
pub fn handshake_reply_acceptable(partner: &Flow, tcp: &Tcp) -> bool {
    if tcp.flags & TCP_RST != 0 {
        return true;
    }
    tcp.flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK)
        && partner.seq_end.wrapping_sub(u32::from_be_bytes(tcp.ack)) <= HANDSHAKE_DATA_MAX
}

/// How often an entry's `last_seen_ns` is refreshed at most.
const TOUCH_NS: u64 = if cfg!(feature = "upgrade-test") {
    999_000_000
} else {
    1_000_000_000
};

/// Refreshes `last_seen_ns`, at most once a second per entry (a shared cache line).
#[inline(always)]
pub fn touch(flow: &mut Flow, now: u64) {
    if now.wrapping_sub(flow.last_seen_ns) > TOUCH_NS {
        flow.last_seen_ns = now;
    }
}
