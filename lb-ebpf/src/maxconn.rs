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

/// The agent's way to release a slot atomically (userspace has no atomic add on map values):
/// never attached, only run through `BPF_PROG_TEST_RUN` with a frame that is the forward
/// `FlowKey` of a flow the GC deleted or found gone. Returns `XDP_PASS` when it released a
/// slot, `XDP_DROP` when there was none (or someone else released it first).
#[aya_ebpf::macros::xdp]
pub fn lb_release(ctx: aya_ebpf::programs::XdpContext) -> u32 {
    use aya_ebpf::bindings::xdp_action;
    let f = crate::parse::Frame::new(&ctx);
    let Some(key) = f.get::<[u8; core::mem::size_of::<FlowKey>()]>(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: `key` is `size_of::<FlowKey>()` readable bytes; FlowKey is plain data valid for
    // any bit pattern; read unaligned because packet data has no alignment guarantee.
    let key: FlowKey = unsafe { core::ptr::read_unaligned(key.as_ptr() as *const FlowKey) };
    if release(&key) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}
