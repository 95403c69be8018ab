//! Per-CPU counters. Each helper is one map lookup and plain adds (per-CPU: no atomics).
use lb_common::{BackendStats, Counter, ServiceStats, MAX_BACKENDS, MAX_SERVICES};

use crate::maps::{STATS_BACKEND, STATS_GLOBAL, STATS_SERVICE};

#[inline(always)]
pub fn count(c: Counter) {
    add(c as u32, 1);
}

#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(p) = STATS_GLOBAL.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; nothing else runs on it while we do.
        unsafe { *p += n };
    }
}

/// Counts a `bpf_fib_lookup` result code (0..=9; larger codes fold into the last).
#[inline(always)]
pub fn count_fib(rc: i64) {
    let rc = if (0..=9).contains(&rc) { rc as u32 } else { 9 };
    add(Counter::FibResult0 as u32 + rc, 1);
}

#[inline(always)]
pub fn service(id: u32) -> Option<&'static mut ServiceStats> {
    if id >= MAX_SERVICES {
        return None;
    }
    // SAFETY: per-CPU slot of this CPU, valid for the program run.
    STATS_SERVICE.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn backend(id: u32) -> Option<&'static mut BackendStats> {
    if id >= MAX_BACKENDS {
        return None;
    }
    // SAFETY: per-CPU slot of this CPU, valid for the program run.
    STATS_BACKEND.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// A packet to `service` was dropped or refused for `reason`.
#[inline(always)]
pub fn service_drop(service: u32, reason: Counter) {
    count(reason);
    if let Some(s) = self::service(service) {
        s.drops += 1;
    }
}
