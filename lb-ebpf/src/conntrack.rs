//! The connection tables: embryonic (handshakes in progress, an array of slots) and
//! established (preallocated, never evicted). A handshake is one record ([`Handshake`], both
//! directions) in the slot of its reply key ([`lb_common::HandshakeSlot`]), which the client's
//! side finds through the handshake index (`CT_INDEX`); an established flow has a forward and
//! a reply entry, and a lookup only counts when the partner entry exists and points back.
use core::{
    intrinsics::{atomic_cxchg, AtomicOrdering},
    ptr::{addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    backend_closed_first, handshake_age, handshake_ctrl, handshake_slot_of, handshake_tag,
    index_set_of, is_closing, Config, Counter, Flow, FlowKey, Handshake, HandshakeSlot, IndexWay,
    DIR_REPLY, FLOW_CLOSE_FIN, FLOW_CLOSE_RST, FLOW_ESTABLISHED, FLOW_SYN_RECV, FLOW_SYN_SENT,
    HANDSHAKE_STAMP_SHIFT, HANDSHAKE_WRITING, IPPROTO_TCP,
};

use crate::{
    clock, events, hints,
    maps::{CT_EMBRYONIC, CT_ESTABLISHED, CT_INDEX},
    parse::{Tcp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// A flow entry found with its partner.
pub struct Found {
    pub flow: &'static mut Flow,
    pub partner: &'static mut Flow,
    pub established: bool,
    /// The slot of a handshake's record ([`RecordRef::NONE`] for an established flow).
    pub record: RecordRef,
}

/// The slot of a handshake record: its control word, and the value that word had when the
/// record was taken (a release only frees the slot if it still has it).
#[derive(Clone, Copy)]
pub struct RecordRef {
    ctrl: *mut u64,
    seen: u64,
}

impl RecordRef {
    /// No slot (an established flow's).
    const NONE: RecordRef = RecordRef {
        ctrl: core::ptr::null_mut(),
        seen: 0,
    };
}

/// The side a segment's key comes from: a client's (client -> VIP, the forward key) or a
/// backend's (backend -> SNAT address, the reply key). The handshake table needs it: its
/// records sit under the reply key, and the client's side finds them through the index.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

#[inline(always)]
fn get_est(key: &FlowKey) -> Option<&'static mut Flow> {
    // SAFETY: hash-map values stay valid for the program run (RCU); concurrent writers only
    // touch `state`/`last_seen_ns`, single aligned stores.
    CT_ESTABLISHED.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

/// The control word and the record of the slot of reply key `key`.
#[inline(always)]
fn slot_of(key: &FlowKey, slots: u32) -> Option<(*mut u64, &'static mut Handshake)> {
    let slot = CT_EMBRYONIC.get_ptr_mut(handshake_slot_of(key, slots))?;
    // SAFETY: an array map value, valid for the program run; each direction's path writes
    // only its own half of a record, and a claim rewrites a record only behind an odd control
    // word.
    Some(unsafe { (addr_of_mut!((*slot).ctrl), &mut *addr_of_mut!((*slot).hs)) })
}

/// Reads a slot's control word (another CPU may change it at any time).
#[inline(always)]
fn ctrl_of(ctrl: *mut u64) -> u64 {
    // SAFETY: an aligned u64 of a map value, changed only by single stores and atomics.
    unsafe { read_volatile(ctrl) }
}

/// Replaces a slot's control word `seen` by `new`; false if another CPU changed it first.
#[inline(always)]
fn swap_ctrl(ctrl: *mut u64, seen: u64, new: u64) -> bool {
    // SAFETY: as in `ctrl_of`; the BPF atomic compare-and-exchange instruction.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(ctrl, seen, new)
            .1
    }
}

/// The handshake record under reply key `key`, and its slot: the slot's control word is even
/// and carries the key's tag, the record's forward half points back to the key, and the word
/// did not change during that check.
#[inline(always)]
fn get_handshake(key: &FlowKey, slots: u32) -> Option<(&'static mut Handshake, RecordRef)> {
    let (ctrl, hs) = slot_of(key, slots)?;
    let seen = ctrl_of(ctrl);
    if HandshakeSlot::holds(seen)
        && (seen >> 32) as u32 == handshake_tag(key)
        && hs.fwd.points_back_to(key)
        && ctrl_of(ctrl) == seen
    {
        return Some((hs, RecordRef { ctrl, seen }));
    }
    None
}

/// Looks `key` (from `side`) up: established first, then a handshake in progress (unless
/// expired at `now`).
#[inline(always)]
pub fn lookup(key: &FlowKey, side: Side, now: u64, cfg: &Config) -> Option<Found> {
    established(key).or_else(|| handshake(key, side, now, cfg))
}

/// [`lookup_settled`] for a backend's segment (`key`: the reply tuple). With
/// `maybe_established` false (its port's bit was clear: no established flow held the port),
/// the handshake table is read first, and the established table only if it has no record (a
/// flow established since the bit was read: its promotion set the bit, then freed the slot).
#[inline(always)]
pub fn lookup_reply(
    key: &FlowKey,
    now: u64,
    cfg: &Config,
    maybe_established: bool,
) -> Option<Found> {
    if maybe_established {
        return lookup_settled(key, Side::Backend, now, cfg);
    }
    handshake(key, Side::Backend, now, cfg).or_else(|| established(key))
}

/// The handshake in progress under `key` (from `side`), unless expired at `now`.
#[inline(always)]
fn handshake(key: &FlowKey, side: Side, now: u64, cfg: &Config) -> Option<Found> {
    let (hs, record) = match side {
        Side::Backend => get_handshake(key, cfg.handshake_slots)?,
        Side::Client => indexed(key, cfg.handshake_slots)?,
    };
    if clock::age(now, hs.rev.created_ns) > cfg.embryonic_timeout_ns {
        return None;
    }
    let Handshake { fwd, rev } = hs;
    Some(match side {
        Side::Client => Found {
            flow: fwd,
            partner: rev,
            established: false,
            record,
        },
        Side::Backend => Found {
            flow: rev,
            partner: fwd,
            established: false,
            record,
        },
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
pub fn lookup_settled(key: &FlowKey, side: Side, now: u64, cfg: &Config) -> Option<Found> {
    lookup(key, side, now, cfg).or_else(|| established(key))
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
        record: RecordRef::NONE,
    })
}

/// The handshake index set of the client tuple `key`.
#[inline(always)]
fn index_set(key: &FlowKey) -> Option<*mut [IndexWay; lb_common::INDEX_WAYS]> {
    let set = CT_INDEX.get_ptr_mut(index_set_of(key))?;
    // SAFETY: an array map value, valid for the program run.
    Some(unsafe { core::ptr::addr_of_mut!((*set).ways) })
}

/// The handshake of client tuple `key`, through the index: a way that names the tuple gives
/// the record's key, and the record counts only if its reply half points back to the tuple
/// (a way is a hint: it outlives its handshake, and another CPU may be rewriting it).
#[inline(always)]
fn indexed(key: &FlowKey, slots: u32) -> Option<(&'static mut Handshake, RecordRef)> {
    let ways = index_set(key)?;
    // SAFETY: `ways` points into an array map value, valid for the program run; a torn read
    // is caught by the record check.
    let (w0, w1) = unsafe { (&(*ways)[0], &(*ways)[1]) };
    confirmed(w0, key, slots).or_else(|| confirmed(w1, key, slots))
}

/// The handshake the index way `w` names for client tuple `key`, if its record points back.
#[inline(always)]
fn confirmed(
    w: &IndexWay,
    key: &FlowKey,
    slots: u32,
) -> Option<(&'static mut Handshake, RecordRef)> {
    if !w.names(key) {
        return None;
    }
    get_handshake(&w.record(), slots).filter(|(hs, _)| hs.rev.points_back_to(key))
}

/// Records in the index that client tuple `key`'s handshake is the record at `record`: in the
/// way that already names the tuple (an ended handshake's), else in the set's older way.
#[inline(always)]
pub fn index(key: &FlowKey, record: &FlowKey, now: u64) {
    let Some(ways) = index_set(key) else {
        return;
    };
    let stamp = (now >> 20) as u32;
    // SAFETY: as in `indexed`; two CPUs writing one way at once leave at worst a way that
    // names neither handshake correctly, which the record check rejects (a lost handshake,
    // like a handshake whose slot another claim took).
    let (w0, w1) = unsafe { (&mut (*ways)[0], &mut (*ways)[1]) };
    let way = if w1.names(key) {
        w1
    } else if w0.names(key) {
        w0
    } else if stamp.wrapping_sub(w1.stamp) > stamp.wrapping_sub(w0.stamp) {
        w1
    } else {
        w0
    };
    *way = IndexWay::new(key, record, stamp);
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
    if backend_closed_first(fwd, rev) || clock::age(now, last) <= quiet_ns {
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

/// Claims reply key `key` for the handshake `hs`, which is copied into the key's slot: what
/// claims an SNAT port. The slot must be free or hold a handshake (of this key or another)
/// that `takeover` may evict; else the port counts as taken and the search tries another.
/// Returns whether the key was claimed, and with it which live handshake, if any, was evicted.
///
/// The slot is claimed with a compare-and-swap of its control word to the key's tag with the
/// writing bit set; readers skip the slot until the record is written and the bit cleared.
#[inline(always)]
pub fn claim(
    key: &FlowKey,
    hs: &Handshake,
    cfg: &Config,
    now: u64,
    takeover: Takeover,
) -> Option<Evicted> {
    let (ctrl, record) = slot_of(key, cfg.handshake_slots)?;
    let (seen, evicted) = decide(ctrl, record, cfg, now, takeover)?;
    let claimed = handshake_ctrl(handshake_tag(key), now);
    if !swap_ctrl(ctrl, seen, claimed | HANDSHAKE_WRITING) {
        return None;
    }
    // SAFETY: `hs` (this CPU's scratch record) and `record` (a map value) do not overlap; the
    // slot is this CPU's until the writing bit is cleared.
    unsafe { core::ptr::copy_nonoverlapping(hs, record, 1) };
    // SAFETY: as in `ctrl_of`; the record is written before its word says so (the JIT keeps
    // program order, and x86 does not reorder stores).
    unsafe { write_volatile(ctrl, claimed) };
    Some(evicted)
}

/// Whether [`claim`] would claim `key` now (only reads: a port search tests ports with this,
/// so that the verifier walks the claim once, not once per try). With
/// [`Takeover::Expired`] it reads the slot's control word alone.
#[inline(always)]
pub fn claimable(key: &FlowKey, cfg: &Config, now: u64, takeover: Takeover) -> bool {
    slot_of(key, cfg.handshake_slots)
        .and_then(|(ctrl, record)| decide(ctrl, record, cfg, now, takeover))
        .is_some()
}

/// Reads every cache line of the slot `ahead` slots after the slot of reply key `key`: the
/// slot of the port a search will try next (`snat`), so that the next new flow's claim finds
/// the lines in the cache instead of waiting for them (BPF has no prefetch instruction; loads
/// whose values nothing waits for are the next best thing).
#[inline(always)]
pub fn prefetch_slot(key: &FlowKey, ahead: u32, slots: u32) {
    let i = handshake_slot_of(key, slots).wrapping_add(ahead) & slots.wrapping_sub(1);
    if let Some(slot) = CT_EMBRYONIC.get_ptr(i) {
        let words = slot as *const u64;
        // Words 56 bytes apart, the first and the last: one in every line the slot spans.
        const LAST: usize = core::mem::size_of::<HandshakeSlot>() / 8 - 1;
        for w in [0, 7, 14, LAST] {
            // SAFETY: an array map value (`size_of::<HandshakeSlot>()` bytes, 8-aligned, plain
            // data), valid for the program run; `w` is within it.
            unsafe { read_volatile(words.add(w)) };
        }
    }
}

/// [`claim`]'s decision on a slot (`ctrl`, `record`): the control word to swap, and which live
/// handshake is evicted; `None` if the port counts as taken.
#[inline(always)]
fn decide(
    ctrl: *mut u64,
    record: &Handshake,
    cfg: &Config,
    now: u64,
    takeover: Takeover,
) -> Option<(u64, Evicted)> {
    let seen = ctrl_of(ctrl);
    if seen & HANDSHAKE_WRITING != 0 {
        // Another CPU is writing this slot.
        return None;
    }
    // Free, or claimed longer ago than the connect timeout (one stamp unit more, so that a
    // record the lookups still take is never reclaimed).
    if seen >> 32 == 0
        || handshake_age(seen, now) > cfg.embryonic_timeout_ns + (1 << HANDSHAKE_STAMP_SHIFT)
    {
        return Some((seen, Evicted::None));
    }
    if takeover != Takeover::HalfOpen {
        return None;
    }
    let age = clock::age(now, record.rev.created_ns);
    match record.rev.state {
        FLOW_SYN_RECV if age > HALF_OPEN_NS => Some((seen, Evicted::HalfOpen)),
        FLOW_SYN_SENT if age > UNANSWERED_NS => Some((seen, Evicted::Unanswered)),
        _ => None,
    }
}

/// The live handshake a [`claim`] evicted, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// None: the slot was free or its handshake past the connect timeout.
    None,
    /// A half-open one (`HALF_OPEN_NS`).
    HalfOpen,
    /// One its backend left unanswered (`UNANSWERED_NS`).
    Unanswered,
}

/// Which live handshake [`claim`] may evict (a free slot, or one whose handshake is older than
/// the connect timeout, it always takes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// No live one: only expired handshakes give their slots up.
    Expired,
    /// One half open (the backend answered, the client never did: a spoofed SYN looks like
    /// this) for more than `HALF_OPEN_NS`, or one its backend left unanswered for more than
    /// `UNANSWERED_NS`.
    HalfOpen,
}

/// How old a half-open handshake must be before, under port pressure, a new flow may take over
/// its port. A real client's ACK follows the backend's SYN-ACK within a round trip; a flood of
/// spoofed SYNs at 20,000/s keeps about 5,000 ports younger than this.
pub const HALF_OPEN_NS: u64 = 250_000_000;

/// How long a handshake its backend never answered (no SYN-ACK) holds its port under port
/// pressure: the client's first SYN retransmit (RFC 6298's initial RTO, 1 s) is due by then,
/// and it starts a fresh handshake on a free port. A backend that stops answering (gone, or
/// its SYN queue full under a flood) would otherwise let flood handshakes hold every port for
/// the connect timeout. A backend slower than that still answers the retransmit.
pub const UNANSWERED_NS: u64 = 1_000_000_000;

/// Frees the slot of a handshake's record, unless another claim took it meanwhile.
#[inline(always)]
fn release(record: RecordRef, now: u64) {
    if !record.ctrl.is_null() {
        let seen = record.seen;
        let _ = swap_ctrl(record.ctrl, seen, handshake_ctrl(0, now));
    }
}

/// The backend answered the SYN: the client's next ACK establishes the flow. Both halves
/// say so: the forward one for that ACK, the reply one for [`Takeover::HalfOpen`].
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
/// there first, then its SNAT port's bit is set in the port bitmap (`hints`' rule), then the
/// handshake record's slot is freed, so a concurrent reader always finds the flow in one of
/// them (its index way stays behind, a hint that no longer confirms), and a port search
/// always finds the port taken by the bit or by the slot.
/// Returns false (and leaves the handshake alone) when the established table is full. With `sync` (a pair), the flow is also reported to the agent
/// for the standby.
#[inline(always)]
pub fn promote(fwd_key: &FlowKey, found: &Found, cfg: &Config, now: u64, sync: bool) -> bool {
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
    hints::hold(
        fwd.backend_id,
        fwd.nat_sport,
        cfg.snat_port_min,
        cfg.snat_port_max,
    );
    release(found.record, now);
    stats::count(Counter::Established);
    if sync {
        events::established(fwd_key, &fwd, &rev);
    }
    true
}

/// Deletes a flow found at `key`: both established entries, or its handshake record.
#[inline(always)]
pub fn delete(key: &FlowKey, found: &Found, now: u64) {
    if found.established {
        let _ = CT_ESTABLISHED.remove(key);
        let _ = CT_ESTABLISHED.remove(&found.flow.partner_key(IPPROTO_TCP));
    } else {
        release(found.record, now);
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
    if clock::age(now, flow.last_seen_ns) > TOUCH_NS {
        flow.last_seen_ns = now;
    }
}
