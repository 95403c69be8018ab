//! `lb capture`: sampled copies of one service's frames, emitted to `CAPTURE_EVENTS` before
//! and after the rewrite (tcpdump never sees XDP_TX/REDIRECT frames). With capture off a
//! packet pays one array lookup.
use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::XdpContext,
};
use lb_common::{CaptureConfig, CaptureHeader, CAPTURE_MAX_SNAPLEN};

use crate::maps::{CAPTURE, CAPTURE_EVENTS};

/// The capture settings when this packet of `service` is to be captured (capture is on for
/// the service and the packet won the 1-in-`sample` draw), else all zero (`service == 0`). Its
/// `in` and `out` copies share the draw. (A plain value, not an `Option`: an `Option`'s
/// undefined payload lets LLVM spill a clobbered register, which the verifier refuses.)
#[inline(always)]
pub fn sampled(service: u32) -> CaptureConfig {
    let off = CaptureConfig::default();
    let Some(c) = CAPTURE.get(0) else {
        return off;
    };
    if c.service == 0 || c.service != service.wrapping_add(1) {
        return off;
    }
    // SAFETY: helper without arguments.
    if c.sample > 1 && unsafe { bpf_get_prandom_u32() } % c.sample != 0 {
        return off;
    }
    *c
}

/// Emits the frame as it is now (its first `snaplen` bytes) behind a [`CaptureHeader`]. A full
/// perf buffer loses the sample; the reader learns how many from the kernel.
#[inline(always)]
pub fn emit(ctx: &XdpContext, c: &CaptureConfig, service: u32, dir: u8, action: u8, reply: bool) {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let mut caplen = c.snaplen.min(CAPTURE_MAX_SNAPLEN);
    if caplen > len {
        caplen = len;
    }
    let hdr = CaptureHeader {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        service,
        len,
        caplen,
        dir,
        action,
        reply: reply as u8,
        _pad: 0,
    };
    // For XDP programs the helper appends the first `caplen` bytes of the frame (the upper
    // 32 bits of its flags) to `hdr`.
    CAPTURE_EVENTS.output(ctx, &hdr, caplen);
}
