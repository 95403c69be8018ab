//! VIP:port -> service, and the choice of a backend from the service's current set.
use lb_common::{Backend, Service, ServiceKey, IPPROTO_TCP, MAX_SERVICES, MAX_SET_SIZE};

use crate::maps::{backend_set, RR_CURSOR, SERVICES};

/// The service listening on `addr:port` (network order), if any.
#[inline(always)]
pub fn lookup(addr: u32, port: u16) -> Option<Service> {
    let key = ServiceKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    };
    // SAFETY: hash-map value valid for the program run; copied out at once.
    unsafe { SERVICES.get(key).copied() }
}

/// A backend chosen round robin from the installed set, with the set's generation.
/// `None` when the set is empty (or not installed yet).
#[inline(always)]
pub fn pick(service_id: u32) -> Option<(Backend, u64)> {
    if service_id >= MAX_SERVICES {
        return None;
    }
    let set = backend_set(service_id)?;
    let count = set.count;
    if count == 0 || count as usize > MAX_SET_SIZE {
        return None;
    }
    let cursor = RR_CURSOR.get_ptr_mut(service_id)?;
    // SAFETY: array slot valid for the program run. The increment is not atomic: two CPUs
    // racing may pick the same backend once, which round robin tolerates.
    let n = unsafe {
        let n = *cursor;
        *cursor = n.wrapping_add(1);
        n
    };
    let i = (n % count) as usize;
    // The compiler knows `i < count <= MAX_SET_SIZE`, the verifier does not: a volatile
    // round trip keeps an explicit bound check in the program.
    // SAFETY: reading a local through a valid reference.
    let i = unsafe { core::ptr::read_volatile(&i) };
    if i >= MAX_SET_SIZE {
        return None;
    }
    let b = set.members.get(i)?;
    Some((*b, set.generation))
}
