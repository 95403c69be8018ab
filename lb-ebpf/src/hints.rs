//! The SNAT port hints (`PORT_HINTS`): per backend, a bitmap of the SNAT ports its flows hold.
//!
//! One rule makes the bitmap more than a hint: **a port with an established flow has its bit
//! set.** A clear bit therefore means that no established flow holds the port, and a port
//! search that finds one only has to test the port's handshake slot, not the established
//! table (one hash lookup less per new flow). The rule is kept by
//! - the handshake's promotion, which sets the bit after inserting the established entries
//!   and before freeing the handshake's slot (so at every instant either the bit is set or
//!   the slot still holds the flow's handshake, which a claim of the port also meets);
//! - whoever deletes a flow, which clears the bit only after the delete succeeded (the forward
//!   path at a flow's last ACK, [`release`]; the agent's GC, which clears the bits of ports it
//!   found free and then looks each one up again, setting it back if a flow was established
//!   meanwhile);
//! - the agent, which sets every bit before a new program serves tables it adopted, and sets
//!   the bits of the flows a pair's peer installs before it installs them.
//!
//! A set bit whose port is free (a handshake that expired or was taken over, a flow a RST
//! closed) only costs the search a skipped port until the GC's next pass clears it.
use core::intrinsics::{atomic_and, atomic_or, AtomicOrdering};

use lb_common::{PortHints, PORT_HINT_WORDS};

use crate::maps::PORT_HINTS;

/// Backend `backend_id`'s bitmap.
#[inline(always)]
pub fn of(backend_id: u32) -> Option<*mut PortHints> {
    PORT_HINTS.get_ptr_mut(backend_id)
}

/// Word `w` of a backend's hints (`w` < `PORT_HINT_WORDS`, which the mask also ensures).
#[inline(always)]
pub fn word_at(hints: *mut PortHints, w: u32) -> *mut u64 {
    // The compiler can prove `w` in bounds and would drop the mask; the verifier cannot, and
    // needs it. Read back from the stack, `w` is opaque to the compiler, so the mask stays.
    // SAFETY: reads a local.
    let w = unsafe { core::ptr::read_volatile(&w) } & (PORT_HINT_WORDS - 1);
    // SAFETY: `hints` points at a `PortHints` map value, valid for the program run; `w` is
    // masked into its array.
    unsafe { (*hints).words.as_mut_ptr().add(w as usize) }
}

/// Reads a word (other CPUs and the agent change it only with atomic operations).
#[inline(always)]
pub fn load(word: *mut u64) -> u64 {
    // SAFETY: an aligned u64 of a map value, valid for the program run.
    unsafe { core::ptr::read_volatile(word) }
}

/// Sets `bits` of `word`.
#[inline(always)]
pub fn set(word: *mut u64, bits: u64) {
    // SAFETY: an aligned u64 of a map value; the BPF atomic instruction.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word, bits) };
}

/// The hint word of `port` (network order) for backend `backend_id` and the port's bit in it;
/// `None` for a port outside `[min, max]`.
#[inline(always)]
fn bit_of(backend_id: u32, port: u16, min: u16, max: u16) -> Option<(*mut u64, u64)> {
    let port = u16::from_be(port);
    if port < min || port > max {
        return None;
    }
    let hints = of(backend_id)?;
    let off = (port - min) as u32;
    Some((word_at(hints, off / 64), 1u64 << (off % 64)))
}

/// Whether the bit of `port` (network order) of backend `backend_id` is set (true for a port
/// outside `[min, max]`, which has none: it may be held).
#[inline(always)]
pub fn held(backend_id: u32, port: u16, min: u16, max: u16) -> bool {
    bit_of(backend_id, port, min, max).is_none_or(|(word, bit)| load(word) & bit != 0)
}

/// Sets the bit of `port` (network order) of backend `backend_id`: a port claimed, or a flow
/// established on it.
#[inline(always)]
pub fn hold(backend_id: u32, port: u16, min: u16, max: u16) {
    if let Some((word, bit)) = bit_of(backend_id, port, min, max) {
        set(word, bit);
    }
}

/// Clears the bit of a port whose flow the caller has just deleted (and no one else: see the
/// module's rule), so that the next search finds it at once.
#[inline(always)]
pub fn release(backend_id: u32, port: u16, min: u16, max: u16) {
    if let Some((word, bit)) = bit_of(backend_id, port, min, max) {
        // SAFETY: an aligned u64 of the map value, changed with the BPF atomic instruction.
        unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(word, !bit) };
    }
}
