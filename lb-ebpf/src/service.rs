//! VIP:port -> service, and the choice of a backend from the service's current set.
use lb_common::{
    flow_hash, Backend, FlowKey, Service, ServiceKey, BALANCE_FIRST, BALANCE_MAGLEV, BALANCE_MASK,
    IPPROTO_TCP, MAGLEV_SIZE, MAX_SERVICES, MAX_SET_SIZE,
};

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

/// A backend chosen from the installed set by the service's balance mode, with the set's
/// generation. `None` when the set is empty (or not installed yet).
#[inline(always)]
pub fn pick(svc: &Service, key: &FlowKey) -> Option<(Backend, u64)> {
    let service_id = svc.id;
    if service_id >= MAX_SERVICES {
        return None;
    }
    let set = backend_set(service_id)?;
    let count = set.count;
    if count == 0 || count as usize > MAX_SET_SIZE {
        return None;
    }
    let i = match svc.flags & BALANCE_MASK {
        BALANCE_FIRST => 0,
        BALANCE_MAGLEV => {
            let slot = (flow_hash(key) % MAGLEV_SIZE as u32) as usize;
            // The compiler knows the bound, the verifier does not (see below).
            // SAFETY: reading a local through a valid reference.
            let slot = unsafe { core::ptr::read_volatile(&slot) };
            if slot >= MAGLEV_SIZE {
                return None;
            }
            *set.maglev.get(slot)? as usize
        }
        _ => {
            let cursor = RR_CURSOR.get_ptr_mut(service_id)?;
            // SAFETY: array slot valid for the program run. The increment is not atomic: two
            // CPUs racing may pick the same backend once, which round robin tolerates.
            let n = unsafe {
                let n = *cursor;
                *cursor = n.wrapping_add(1);
                n
            };
            (n % count) as usize
        }
    };
    // The compiler knows `i < count <= MAX_SET_SIZE`, the verifier does not: a volatile
    // round trip keeps an explicit bound check in the program.
    // SAFETY: reading a local through a valid reference.
    let i = unsafe { core::ptr::read_volatile(&i) };
    if i >= count as usize || i >= MAX_SET_SIZE {
        return None;
    }
    let b = set.members.get(i)?;
    Some((*b, set.generation))
}
