//! The data path's clock: `bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE (the time of the
//! last timekeeping tick: at most one tick, 4 ms at HZ=250, behind CLOCK_MONOTONIC). Every
//! timeout the program keeps is 2 ms or more (handshake stamps), most of them seconds, and the
//! coarse clock costs no TSC read: about 40 ns less per packet in `lb-bench cost`. The agent
//! stamps what it writes with the same clock (`lb_user::gc::monotonic_now`), so its stamps are
//! never ahead of the program's; ages are still taken with [`age`], which reads a stamp ahead
//! of `now` (another clock's, say a test's) as age 0, never as a wrapped, huge age.

/// Now, in nanoseconds of CLOCK_MONOTONIC_COARSE.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments (Linux 5.11+, every program type).
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
}

/// How long before `now` the stamp `then` was taken; 0 for a stamp ahead of `now`.
#[inline(always)]
pub fn age(now: u64, then: u64) -> u64 {
    now.saturating_sub(then)
}
