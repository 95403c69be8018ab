//! Connection limits (HAProxy's `maxconn`, per backend of a service and global), counted over
//! connections, not handshakes: as HAProxy counts only connections its kernel accepted, a
//! handshake that never completes (a spoofed SYN) must not hold a slot.
//!
//! A SYN is admitted while the counts are below the limits ([`admits`], a read). The slot is
//! taken when the client's ACK completes the handshake ([`acquire`]): it adds one to the pair's
//! and the global count with the fetch form of the BPF atomic add (the bpfel target has no
//! compare-and-swap; the object is built with `--cpu v3` for `BPF_ATOMIC | BPF_FETCH`), undoes
//! the add when the old value was already at the limit, and records the slot in `SLOTS` under
//! the forward key. If the limit filled between the SYN and its ACK, the ACK is dropped and the
//! flow stays a handshake: the backend has not seen the ACK, so it holds no connection, and
//! the client's next segment (or its ACK of the backend's SYN-ACK retransmit) tries again.
//! A slot is released by whoever deletes that `SLOTS` entry: the data path when the flow closes
//! with FINs both ways, is reset or gives its port to a new flow, or the agent's GC (through
//! `lb_release`) when the flow expired (a RST-closed one after about 2 s) or vanished. A
//! delete succeeds once, so a slot is released once.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{epoch_index, FlowKey, Slot, MAXCONN_GLOBAL};

use crate::maps::{MAXCONN_ACTIVE, SLOTS};

/// Adds `delta` (two's complement for a decrement) to `MAXCONN_ACTIVE[index]`, returning the
/// old value.
#[inline(always)]
fn fetch_add(index: u32, delta: u64) -> Option<u64> {
    let p = MAXCONN_ACTIVE.get_ptr_mut(index)?;
    // SAFETY: `p` points at an array element valid for the program's lifetime; every writer
    // of this element uses an atomic add.
    Some(unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, delta) })
}

/// Takes one unit of `MAXCONN_ACTIVE[index]` unless `limit` (0: none) is reached.
#[inline(always)]
fn take(index: u32, limit: u32) -> bool {
    let Some(old) = fetch_add(index, 1) else {
        return false;
    };
    if limit != 0 && old >= limit as u64 {
        fetch_add(index, u64::MAX);
        return false;
    }
    true
}

#[inline(always)]
fn give(index: u32) {
    fetch_add(index, u64::MAX);
}

/// Whether a new handshake to (`service`, `backend`) may start: both counts are below their
/// limits (0: none). A read: handshakes take no slot (see the module's text).
#[inline(always)]
pub fn admits(service: u32, backend: u32, limit: u32, global_limit: u32) -> bool {
    let below = |index: u32, limit: u32| {
        limit == 0
            || crate::maps::MAXCONN_ACTIVE
                .get(index)
                .is_some_and(|&n| n < limit as u64)
    };
    below(epoch_index(service, backend), limit) && below(MAXCONN_GLOBAL, global_limit)
}

/// Why a slot was not taken.
pub enum Refused {
    /// A limit is reached.
    Limit,
    /// `SLOTS` is full.
    TableFull,
}

/// Takes a slot for the flow `key` of (`service`, `backend`), whose handshake completes now,
/// under the pair's limit and the global one.
#[inline(always)]
pub fn acquire(
    key: &FlowKey,
    service: u32,
    backend: u32,
    limit: u32,
    global_limit: u32,
    now: u64,
) -> Result<(), Refused> {
    // A slot left on this tuple by an earlier flow that expired (the GC releases those too,
    // but this flow needs the key now).
    release(key);
    let index = epoch_index(service, backend);
    if !take(index, limit) {
        return Err(Refused::Limit);
    }
    if !take(MAXCONN_GLOBAL, global_limit) {
        give(index);
        return Err(Refused::Limit);
    }
    let slot = Slot {
        created_ns: now,
        index,
        _pad: 0,
    };
    if SLOTS.insert(key, &slot, BPF_NOEXIST as u64).is_err() {
        give(index);
        give(MAXCONN_GLOBAL);
        return Err(Refused::TableFull);
    }
    Ok(())
}

/// Releases the slot of the flow whose forward key is `key`, if it holds one and nobody
/// released it yet. Returns whether this call released it.
#[inline(always)]
pub fn release(key: &FlowKey) -> bool {
    // SAFETY: hash-map value valid for the program run; copied out at once.
    let Some(index) = (unsafe { SLOTS.get(key) }).map(|s| s.index) else {
        return false;
    };
    if SLOTS.remove(key).is_err() {
        return false;
    }
    give(index);
    give(MAXCONN_GLOBAL);
    true
}

/// The agent's way to take slots for flows its pair's peer established (a standby installing
/// the synced flows): never attached, only run through `BPF_PROG_TEST_RUN` with a frame of up
/// to `SLOT_CLAIMS` `SlotClaim`s. The counts go up whatever the limits (the flows exist); a
/// flow that holds a slot already keeps it. Each claim comes back with its outcome in
/// `slot._pad` (`CLAIM_*`). Returns `XDP_PASS`.
#[aya_ebpf::macros::xdp]
pub fn lb_acquire(ctx: aya_ebpf::programs::XdpContext) -> u32 {
    use aya_ebpf::bindings::xdp_action;
    use lb_common::{SlotClaim, SLOT_CLAIMS};
    let f = crate::parse::Frame::new(&ctx);
    for i in 0..SLOT_CLAIMS {
        let Some(bytes) =
            f.get::<[u8; core::mem::size_of::<SlotClaim>()]>(i * core::mem::size_of::<SlotClaim>())
        else {
            break;
        };
        let claim = bytes.as_mut_ptr() as *mut SlotClaim;
        // SAFETY: `bytes` is `size_of::<SlotClaim>()` bytes of the frame, readable and
        // writable; SlotClaim is plain data valid for any bit pattern; unaligned accesses
        // because packet data has no alignment guarantee.
        let mut c: SlotClaim = unsafe { core::ptr::read_unaligned(claim) };
        c.slot._pad = claim_one(&c);
        // SAFETY: as above.
        unsafe { core::ptr::write_unaligned(claim, c) };
    }
    xdp_action::XDP_PASS
}

/// One claim of [`lb_acquire`]: counted before the entry is in, as [`acquire`] does (whoever
/// deletes the entry gives back what is already there).
#[inline(always)]
fn claim_one(c: &lb_common::SlotClaim) -> u32 {
    use lb_common::{CLAIM_FULL, CLAIM_HELD, CLAIM_TAKEN};
    let mut slot = c.slot;
    slot._pad = 0;
    fetch_add(slot.index, 1);
    fetch_add(MAXCONN_GLOBAL, 1);
    if SLOTS.insert(&c.key, &slot, BPF_NOEXIST as u64).is_ok() {
        return CLAIM_TAKEN;
    }
    give(slot.index);
    give(MAXCONN_GLOBAL);
    // SAFETY: hash-map value valid for the program run; only tested for presence.
    if unsafe { SLOTS.get(&c.key) }.is_some() {
        CLAIM_HELD
    } else {
        CLAIM_FULL
    }
}

/// The agent's way to release slots atomically (userspace has no atomic add on map values):
/// never attached, only run through `BPF_PROG_TEST_RUN` with a frame of up to `SLOT_CLAIMS`
/// forward `FlowKey`s of flows the GC deleted or found gone, or that a standby's peer ended.
/// Returns `XDP_PASS` when it released a slot (for one key: that key's), `XDP_DROP` when there
/// was none (or someone else released it first).
#[aya_ebpf::macros::xdp]
pub fn lb_release(ctx: aya_ebpf::programs::XdpContext) -> u32 {
    use aya_ebpf::bindings::xdp_action;
    let f = crate::parse::Frame::new(&ctx);
    let mut released = false;
    for i in 0..lb_common::SLOT_CLAIMS {
        let Some(key) =
            f.get::<[u8; core::mem::size_of::<FlowKey>()]>(i * core::mem::size_of::<FlowKey>())
        else {
            break;
        };
        // SAFETY: `key` is `size_of::<FlowKey>()` readable bytes; FlowKey is plain data valid
        // for any bit pattern; read unaligned because packet data has no alignment guarantee.
        let key: FlowKey = unsafe { core::ptr::read_unaligned(key.as_ptr() as *const FlowKey) };
        released |= release(&key);
    }
    if released {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}
