//! lb's XDP program: the entry points only. Each concern lives in its own module.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    /// The load balancer: every frame received on an attached interface.
    #[xdp]
    pub fn lb_xdp(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Passes every frame. Attached to veth peers that must receive XDP_TX/REDIRECT frames,
    /// and the floor against which benchmarks measure `lb_xdp`.
    #[xdp]
    pub fn lb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

/// The XDP program only exists for the BPF target; on the host this crate is an empty binary
/// so that `cargo build --workspace` and `cargo clippy --workspace` work.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
