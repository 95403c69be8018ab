//! XDP's own failure signals, which no counter of the program itself can see: the kernel's
//! `xdp:xdp_redirect_err` and `xdp:xdp_exception` tracepoints (they fire after the program
//! returned, for any XDP program on the host) counted into the global counters.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use lb_common::Counter;

use crate::stats;

/// A redirect the kernel refused after the program asked for it.
#[tracepoint]
pub fn lb_redirect_err(_ctx: TracePointContext) -> u32 {
    stats::count(Counter::XdpRedirectErr);
    0
}

/// XDP_ABORTED, or an action the driver cannot perform.
#[tracepoint]
pub fn lb_exception(_ctx: TracePointContext) -> u32 {
    stats::count(Counter::XdpException);
    0
}
