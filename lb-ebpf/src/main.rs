//! lb's XDP program. The entry points only dispatch; each concern lives in its own module:
//! `parse` (header access), `clock` (the time packets are handled at), `service` (VIP lookup,
//! backend choice), `conntrack` (flow tables), `snat` (port claim), `hints`
//! (the SNAT port bitmap and its rule), `maxconn` (connection
//! limits), `nat` + `csum` (rewrite), `forward` (next hop, transmit), `path` (the forward and
//! reply TCP paths), `icmp` (error translation), `rst` (RST synthesis), `pair` (frames flooded
//! to this node for the other one of a pair), `stats`, `capture` (`lb capture`'s frame copies),
//! `events` (connection ends for the agent's log), `trace` (XDP failure tracepoints).
//!
//! Anything not addressed to a VIP:port, and not a reply from a backend to an SNAT-range port
//! (or an ICMP error about one), is passed to the kernel byte for byte.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// aya's map methods take `impl Borrow<K>`: passing a key or a `Flow` (80 bytes) by value would
// copy it onto the 512-byte BPF stack, so the data path passes references on purpose.
#![cfg_attr(target_arch = "bpf", allow(clippy::needless_borrows_for_generic_args))]

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod clock;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod hints;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod maxconn;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod pair;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod path;
#[cfg(target_arch = "bpf")]
mod rst;
#[cfg(target_arch = "bpf")]
mod service;
#[cfg(target_arch = "bpf")]
mod snat;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod trace;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use lb_common::{Counter, CONFIG_F_OLD_PORTS};
    use network_types::eth::EthHdr;

    use crate::{
        clock, csum, icmp,
        maps::{backend_id, config, in_old_ports, is_snat_addr},
        pair::for_the_other_host,
        parse::{
            words20, Frame, Ip, Ports, Tcp, ETH_LEN, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP, L4_OFF,
        },
        path, service, stats,
    };

    /// The load balancer: every frame received on an attached interface. Written out rather
    /// than with `#[xdp]`, whose entry calls an inner function: a second frame, and Linux 6.1
    /// counts every frame of a call chain (each rounded up to 32 bytes) against one 512-byte
    /// stack. Here `process` and all it calls are inlined into the entry: one frame.
    #[no_mangle]
    #[link_section = "xdp"]
    pub fn lb_xdp(ctx: *mut aya_ebpf::bindings::xdp_md) -> u32 {
        process(&XdpContext::new(ctx))
    }

    /// Passes every frame. Attached to veth peers that must receive XDP_TX/REDIRECT frames,
    /// and the floor against which benchmarks measure `lb_xdp`.
    #[xdp]
    pub fn lb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[inline(always)]
    fn process(ctx: &XdpContext) -> u32 {
        let f = Frame::new(ctx);
        let (Some(eth), Some(ethertype)) = (f.get::<EthHdr>(0), f.get::<u16>(12)) else {
            return xdp_action::XDP_PASS;
        };
        if u16::from_be(*ethertype) != ETH_P_IPV4 {
            return xdp_action::XDP_PASS;
        }
        let Some(ip) = f.get::<Ip>(ETH_LEN) else {
            return xdp_action::XDP_PASS;
        };
        if ip.vihl >> 4 != 4 {
            return xdp_action::XDP_PASS;
        }
        match ip.proto {
            IPPROTO_TCP => tcp(ctx, f, eth, ip),
            IPPROTO_ICMP => {
                let cfg = config();
                let now = clock::now();
                icmp::handle(ctx, f, eth, ip, cfg, now)
            }
            _ => xdp_action::XDP_PASS,
        }
    }

    #[inline(always)]
    fn tcp(ctx: &XdpContext, f: Frame, eth: &mut EthHdr, ip: &mut Ip) -> u32 {
        // A later fragment carries no ports: it cannot be told apart, and without its first
        // fragment (which we drop if it is ours) the kernel cannot reassemble it.
        if ip.is_later_fragment() {
            return xdp_action::XDP_PASS;
        }
        let ihl = ip.ihl() as usize;
        if ihl < 5 {
            return xdp_action::XDP_PASS;
        }
        let Some(ports) = f.get::<Ports>(ETH_LEN + ihl * 4) else {
            return xdp_action::XDP_PASS;
        };
        let cfg = config();
        if let Some(svc) = service::lookup(ip.daddr, ports.dport) {
            if for_the_other_host(ctx, eth, cfg) {
                return xdp_action::XDP_PASS;
            }
            let Some(tcp) = checked_tcp(f, ip, svc.id) else {
                return xdp_action::XDP_DROP;
            };
            let now = clock::now();
            let key = path::key_of(ip, tcp);
            return path::forward(
                &mut path::Packet::new(ctx, f, eth, ip, tcp, &key, cfg, now),
                svc,
            );
        }
        let dport = u16::from_be(ports.dport);
        let in_range =
            cfg.snat_port_max != 0 && dport >= cfg.snat_port_min && dport <= cfg.snat_port_max;
        let old_range = !in_range && cfg.flags & CONFIG_F_OLD_PORTS != 0 && in_old_ports(dport);
        let backend = if (in_range || old_range) && is_snat_addr(ip.daddr) {
            backend_id(ip.saddr, ports.sport)
        } else {
            None
        };
        if let Some(backend) = backend {
            if for_the_other_host(ctx, eth, cfg) {
                return xdp_action::XDP_PASS;
            }
            let Some(tcp) = checked_tcp(f, ip, u32::MAX) else {
                return xdp_action::XDP_DROP;
            };
            let now = clock::now();
            let key = path::key_of(ip, tcp);
            return path::reply(
                &mut path::Packet::new(ctx, f, eth, ip, tcp, &key, cfg, now),
                backend,
                old_range,
            );
        }
        xdp_action::XDP_PASS
    }

    /// The TCP header of a packet that is ours, or `None` (counted) when the packet has IP
    /// options, is a fragment, has a wrong IP header checksum or is truncated: such packets are
    /// dropped, never forwarded, answered or turned into flows (the kernel's forwarding path,
    /// which XDP bypasses, discards bad checksums too: RFC 1812 5.2.2).
    #[inline(always)]
    fn checked_tcp(f: Frame, ip: &Ip, service: u32) -> Option<&'static mut Tcp> {
        let reason = if ip.ihl() != 5 {
            Counter::DropIpOptions
        } else if ip.is_fragment() {
            Counter::DropFragment
        } else if !csum::ipv4_header_ok(words20(ip)) {
            Counter::DropMalformed
        } else if let Some(tcp) = f.get::<Tcp>(L4_OFF) {
            return Some(tcp);
        } else {
            Counter::DropMalformed
        };
        stats::service_drop(service, reason);
        None
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
