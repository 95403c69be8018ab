//! ICMP errors (destination unreachable, time exceeded) about a balanced flow: the quoted
//! header and the outer destination are translated like the flow's packets, so that path
//! MTU discovery works through the balancer. Everything else ICMP passes to the kernel.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Config, Counter, FlowKey, IPPROTO_TCP};
use network_types::eth::EthHdr;

use crate::{
    conntrack::{self, Side},
    csum, forward,
    maps::{is_backend, is_snat_addr},
    nat, pair,
    parse::{words20, Frame, Icmp, Ip, Ports, ETH_LEN, L4_OFF},
    service, stats,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const INNER_IP_OFF: usize = L4_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + 20;
/// Offset of the quoted TCP checksum, present only when the error quotes enough bytes.
const INNER_TCP_CHECK_OFF: usize = INNER_L4_OFF + 16;

#[inline(always)]
pub fn handle(
    ctx: &XdpContext,
    f: Frame,
    eth: &mut EthHdr,
    ip: &mut Ip,
    cfg: &Config,
    now: u64,
) -> u32 {
    if ip.ihl() != 5 || ip.is_fragment() {
        return xdp_action::XDP_PASS;
    }
    let Some(icmp) = f.get::<Icmp>(L4_OFF) else {
        return xdp_action::XDP_PASS;
    };
    if icmp.ty != ICMP_DEST_UNREACH && icmp.ty != ICMP_TIME_EXCEEDED {
        return xdp_action::XDP_PASS;
    }
    let (Some(inner), Some(ports)) = (f.get::<Ip>(INNER_IP_OFF), f.get::<Ports>(INNER_L4_OFF))
    else {
        return xdp_action::XDP_PASS;
    };
    if inner.proto != IPPROTO_TCP || inner.ihl() != 5 {
        return xdp_action::XDP_PASS;
    }
    // Ours: the quoted packet came from a VIP:port (a reply to a client) or went from an
    // SNAT port to a backend (a forwarded packet).
    // The side our packets' key comes from: the client's for a reply, the backend's for a
    // forwarded packet.
    let side = if service::lookup(inner.saddr, ports.sport).is_some() {
        Side::Client
    } else {
        let sport = u16::from_be(ports.sport);
        let from_snat =
            cfg.snat_port_max != 0 && sport >= cfg.snat_port_min && sport <= cfg.snat_port_max;
        if !from_snat || !is_snat_addr(inner.saddr) || !is_backend(inner.daddr, ports.dport) {
            return xdp_action::XDP_PASS;
        }
        Side::Backend
    };
    if pair::for_the_other_host(ctx, eth, cfg) {
        return xdp_action::XDP_PASS;
    }
    // Ours, but corrupt: the kernel would discard it (RFC 1812 5.2.2), so must we; the
    // translation would carry the wrong checksum along.
    if !csum::ipv4_header_ok(words20(ip)) {
        stats::count(Counter::DropMalformed);
        return xdp_action::XDP_DROP;
    }
    // The quoted packet travelled the other way: its reverse is the key of our packets.
    let key = FlowKey {
        saddr: inner.daddr,
        daddr: inner.saddr,
        sport: ports.dport,
        dport: ports.sport,
        proto: IPPROTO_TCP,
        _pad: 0,
        _pad16: 0,
    };
    let Some(found) = conntrack::lookup(&key, side, now, cfg) else {
        stats::count(Counter::DropIcmpNoFlow);
        return xdp_action::XDP_DROP;
    };
    if forward::ttl_ends_here(ip) {
        return xdp_action::XDP_PASS;
    }
    let flow = *found.flow;
    // The quoted packet becomes the reverse of what our rewritten packets look like.
    let (s, d, sp, dp) = (
        flow.nat_daddr,
        flow.nat_saddr,
        flow.nat_dport,
        flow.nat_sport,
    );

    let mut icmp_check = icmp.check;
    let mut inner_check = inner.check;
    inner_check = csum::replace4(inner_check, inner.saddr, s);
    inner_check = csum::replace4(inner_check, inner.daddr, d);
    icmp_check = csum::replace4(icmp_check, inner.saddr, s);
    icmp_check = csum::replace4(icmp_check, inner.daddr, d);
    icmp_check = csum::replace2(icmp_check, inner.check, inner_check);
    icmp_check = csum::replace2(icmp_check, ports.sport, sp);
    icmp_check = csum::replace2(icmp_check, ports.dport, dp);
    // Quoted only if the outer packet's total length covers it: bytes past it are Ethernet
    // padding or a trailer, which the ICMP checksum does not cover (updating the checksum for
    // them would corrupt it).
    let quotes_tcp_check = u16::from_be(ip.tot_len) as usize >= INNER_TCP_CHECK_OFF + 2 - ETH_LEN;
    if let Some(tc) = f
        .get::<u16>(INNER_TCP_CHECK_OFF)
        .filter(|_| quotes_tcp_check)
    {
        let mut t = *tc;
        t = csum::replace4(t, inner.saddr, s);
        t = csum::replace4(t, inner.daddr, d);
        t = csum::replace2(t, ports.sport, sp);
        t = csum::replace2(t, ports.dport, dp);
        icmp_check = csum::replace2(icmp_check, *tc, t);
        *tc = t;
    }
    inner.saddr = s;
    inner.daddr = d;
    inner.check = inner_check;
    ports.sport = sp;
    ports.dport = dp;
    icmp.check = icmp_check;

    let mut ip_check = csum::replace4(ip.check, ip.daddr, flow.nat_daddr);
    ip_check = nat::decrement_ttl(ip, ip_check);
    ip.daddr = flow.nat_daddr;
    ip.check = ip_check;
    nat::set_macs(eth, &flow);
    stats::count(Counter::IcmpTranslated);
    forward::transmit(ctx, flow.ifindex)
}
