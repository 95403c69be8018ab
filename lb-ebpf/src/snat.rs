//! SNAT port claim: a free port on the balancer's backend-facing address for a new flow.
//!
//! A port is claimed by claiming the handshake table's slot of its reply key (backend -> SNAT
//! address:port) for the flow's record (`conntrack::claim`, a compare-and-swap); a port whose
//! reply key is in the established table is taken, and so is one whose slot holds another
//! live handshake (of this key or of another with the same slot); a slot whose handshake is
//! older than the connect timeout is free. The search starts from the backend's port bitmap
//! (`PORT_HINTS`, see `hints`) at this CPU's cursor, and takes free ports in order: a clear
//! bit means no established flow holds the port, so such a port needs only its slot tested,
//! a new flow finds a free port with one probe even when nine in ten are taken, and its slot
//! is the neighbour of the one before (`lb_common::handshake_slot_of`). Random ports follow
//! if the bitmap finds none (`SNAT_TRIES`). Under pressure (every try found its port
//! taken), it tries `REUSE_TRIES` more ports and may also take over the port of a flow that
//! has been closed for a while and whose backend did not close first: the backend has no
//! TIME_WAIT on that tuple, and without this, ports would wait for the GC (a flow the client
//! closed first normally ends at its last ACK, in the forward path, and frees its port then;
//! this covers the ones whose last ACK was lost and those a RST closed); or the port of a
//! half-open handshake older than `HALF_OPEN_NS` (the backend answered, the client never did:
//! a spoofed SYN), so that a SYN flood holds each port for a fraction of a second instead of
//! the connect timeout; or the port of a handshake its backend left unanswered for longer than
//! `UNANSWERED_NS` (1 s, the client's first SYN retransmit: a backend a flood overwhelmed, or
//! one that is gone).
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    Backend, Config, Counter, FlowKey, Handshake, PortHints, CONN_END_CLOSED, CONN_END_CLOSED_RST,
    FLOW_CLOSE_RST, IPPROTO_TCP, PORT_HINT_WORDS,
};

use crate::{
    conntrack::{self, Evicted, Takeover},
    events, hints,
    maps::PORT_CURSORS,
    maxconn, stats,
};

/// Random ports the second round of `claim` tries.
pub const SNAT_TRIES: u32 = 32;
/// Tries of the third round of `claim` (under pressure).
pub const REUSE_TRIES: u32 = 8;
/// How long a closed flow must have been quiet before a new flow may take over its port (its
/// last ACK and retransmitted FINs have passed).
pub const REUSE_QUIET_NS: u64 = 1_000_000_000;

/// Claims a port for the handshake record `hs` from `backend` to `snat_addr`, trying ports in
/// `cfg`'s SNAT range (each try writes its port into `hs.fwd`, whose reverse is the record's
/// key). Returns the port (network order) or `None`. Handshakes older than the connect timeout
/// at `now` give their slots up; under pressure, so does a stale half-open one, and the port of
/// a quiet closed flow with no TIME_WAIT at the backend is taken over.
///
/// Three rounds, each only if the one before found nothing:
/// 1. Up to four words of the backend's port bitmap (`PORT_HINTS`), from this CPU's cursor
///    on (`PORT_CURSORS`: the port after the last one it found for the backend, or the word
///    after one that had none free). In each, the first port the word says is free, from the
///    cursor's bit on, has its slot tested (a clear bit: no established flow), so the cost
///    does not grow with occupancy (at 90 % a word of 64 ports has no free port once in a
///    thousand). Whatever the test finds, the port's bit is set: taken by this flow, or by the
///    handshake the test met. A CPU thus takes a backend's free ports in order, and their
///    handshake slots are neighbours (`handshake_slot_of`): the slot a new flow claims is on a
///    cache line the CPU, or its prefetcher, has just read, where a port drawn at random
///    meant a slot anywhere in the table, and a cache miss. A freed port is taken again only
///    once the cursor has gone round the range (or a random try below meets it): a port's
///    reuse comes as late as the range allows.
/// 2. `SNAT_TRIES` random ports (the hints are stale in the ports they set: ended flows the GC
///    has not rewritten yet).
/// 3. Under pressure, `REUSE_TRIES` takeovers (see below).
///
/// The rounds only test ports; the claim follows the first that found one.
#[inline(always)]
pub fn claim(
    backend: &Backend,
    snat_addr: u32,
    hs: &mut Handshake,
    cfg: &Config,
    now: u64,
) -> Option<u16> {
    let (min, max) = (cfg.snat_port_min, cfg.snat_port_max);
    let backend_id = backend.id;
    if max < min {
        return None;
    }
    let range = (max - min) as u32 + 1;
    // One key, its port changed each try.
    let mut key = FlowKey {
        saddr: backend.addr,
        daddr: snat_addr,
        sport: backend.port,
        dport: 0,
        proto: IPPROTO_TCP,
        _pad: 0,
        _pad16: 0,
    };
    // Written out rather than a loop: Linux 6.1's verifier refuses the loop LLVM makes of it
    // (entered in the middle, closed by a fallthrough).
    let mut found = false;
    if let (Some(hints), Some(cursor)) =
        (hints::of(backend_id), PORT_CURSORS.get_ptr_mut(backend_id))
    {
        // Words that hold a port of the range (`range` fits in `PORT_HINT_WORDS` words above
        // port 1023, which the agent's config check ensures).
        let words = range.div_ceil(64).min(PORT_HINT_WORDS);
        // SAFETY: this CPU's map value, valid for the program run; nothing else runs on this
        // CPU meanwhile.
        let cursor = unsafe { &mut *cursor };
        let mut hint_try = || hint_try(hints, cursor, words, range, min, &mut key, cfg, now);
        found = hint_try() || hint_try() || hint_try() || hint_try();
    }
    let mut i = 0;
    while !found && i < SNAT_TRIES {
        // A fresh random port each try: taken ports cluster, and a walk from one random start
        // would keep hitting the same cluster.
        key.dport = random_port(min, range).to_be();
        if available(&key, cfg, now, Takeover::Expired) {
            hints::hold(backend_id, key.dport, min, max);
            found = true;
        }
        i += 1;
    }
    // The searches only read; the claim follows them, so the verifier walks it (and the rest
    // of the path) once, not once per try. A claim another CPU wins meanwhile (a race on one
    // slot) leaves the search to the round below.
    hs.fwd.nat_sport = key.dport;
    if found && conntrack::claim(&key, hs, cfg, now, Takeover::Expired).is_some() {
        return Some(key.dport);
    }

    // Under pressure: `REUSE_TRIES` more ports, looking for one whose handshake is half open
    // and stale or unanswered for over a second, or one held by a flow that closed more than
    // `REUSE_QUIET_NS` ago with no TIME_WAIT at the backend; that flow is deleted (its slot
    // released, its end reported to the connection log) and its port claimed.
    let (mut half_open, mut closed) = (false, false);
    let mut i = 0;
    while !half_open && !closed && i < REUSE_TRIES {
        key.dport = random_port(min, range).to_be();
        half_open = available(&key, cfg, now, Takeover::HalfOpen);
        closed = !half_open && conntrack::closed_quiet(&key, now, REUSE_QUIET_NS).is_some();
        i += 1;
    }
    hs.fwd.nat_sport = key.dport;
    if half_open {
        match conntrack::claim(&key, hs, cfg, now, Takeover::HalfOpen)? {
            Evicted::HalfOpen => stats::count(Counter::HalfOpenReclaimed),
            Evicted::Unanswered => stats::count(Counter::UnansweredReclaimed),
            Evicted::None => {}
        }
        return Some(key.dport);
    }
    if !closed {
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
    if !conntrack::established_has(&key)
        && conntrack::claim(&key, hs, cfg, now, Takeover::Expired).is_some()
    {
        Some(key.dport)
    } else {
        None
    }
}

/// One try of the bitmap round: the word of this CPU's `cursor` in the backend's `hints`,
/// and in it the first port it calls free from the cursor's bit on, wrapping round the word.
/// Its bit is clear, so no established flow holds it (`hints`' rule): only its slot is tested
/// (into `key`). Whatever the test finds, the port's bit is set: taken by this flow, or by the
/// handshake the test met. The cursor moves on to the port after it; past a word with no port
/// free, to the next word.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn hint_try(
    hints: *mut PortHints,
    cursor: &mut u32,
    words: u32,
    range: u32,
    min: u16,
    key: &mut FlowKey,
    cfg: &Config,
    now: u64,
) -> bool {
    // The cursor holds the offset to go on from, plus one; 0 (a CPU that has found no port
    // for the backend yet) reads as `u32::MAX % range`, a start like any other.
    let at = cursor.wrapping_sub(1) % range;
    let (w, from) = (at / 64, at % 64);
    let word = hints::word_at(hints, w);
    // Another CPU may set a bit after this read: a port it claims meanwhile is still in its
    // slot, which the test below meets.
    let mut free = !hints::load(word);
    // `w * 64 < range` (w < words), so this does not underflow.
    let valid = range - w * 64;
    if valid < 64 {
        free &= (1u64 << valid) - 1;
    }
    if free == 0 {
        *cursor = (w + 1) % words * 64 + 1;
        return false;
    }
    let bit = (lowest_bit(free.rotate_right(from)) + from) & 63;
    *cursor = w * 64 + bit + 2;
    key.dport = ((min as u32 + w * 64 + bit) as u16).to_be();
    // The next port this word calls free is the one this CPU's next search tries. Past the
    // neighbouring port (whose slot the hardware's prefetcher has already brought: ports
    // taken in order read the table in order), its slot is read now, while the rest of this
    // flow's work runs: free ports ten apart at 90 % occupancy put each new flow's slot on
    // lines of its own.
    let rest = free & !((2u64 << bit).wrapping_sub(1));
    if rest != 0 {
        let ahead = lowest_bit(rest) - bit;
        if ahead > 1 {
            conntrack::prefetch_slot(key, ahead, cfg.handshake_slots);
        }
    }
    // A promotion sets its port's bit before it frees the port's slot: if one freed the slot
    // since the word was read, the bit says so now, and the port is checked in full.
    let found = conntrack::claimable(key, cfg, now, Takeover::Expired)
        && (hints::load(word) & (1u64 << bit) == 0 || !conntrack::established_has(key));
    hints::set(word, 1u64 << bit);
    found
}

/// Whether the port of record key `key` is free for a new handshake: in no established flow,
/// and claimable in the handshake table (free, or held by a handshake `takeover` allows).
#[inline(always)]
fn available(key: &FlowKey, cfg: &Config, now: u64, takeover: Takeover) -> bool {
    !conntrack::established_has(key) && conntrack::claimable(key, cfg, now, takeover)
}

/// The index of the lowest set bit of `x` (not 0), without a branch or a table: the bits
/// below it, counted (SWAR).
#[inline(always)]
fn lowest_bit(x: u64) -> u32 {
    let mut v = (x & x.wrapping_neg()).wrapping_sub(1);
    v -= (v >> 1) & 0x5555_5555_5555_5555;
    v = (v & 0x3333_3333_3333_3333) + ((v >> 2) & 0x3333_3333_3333_3333);
    v = (v + (v >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (v.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// A random port in `[min, min + range)` (host order).
#[inline(always)]
fn random_port(min: u16, range: u32) -> u16 {
    // SAFETY: helper without arguments.
    (min as u32 + unsafe { bpf_get_prandom_u32() } % range) as u16
}
