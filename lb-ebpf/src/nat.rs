//! Where a packet is rewritten: addresses, ports, MACs, TTL and the checksums that cover them.
use lb_common::Flow;

use crate::{
    csum,
    parse::{Ip, Tcp},
};
use network_types::eth::EthHdr;

/// Rewrites an IPv4/TCP packet as `flow` says and decrements the TTL (the caller checked
/// TTL > 1). IP and TCP checksums are updated incrementally.
#[inline(always)]
pub fn rewrite(eth: &mut EthHdr, ip: &mut Ip, tcp: &mut Tcp, flow: &Flow) {
    let mut ip_check = ip.check;
    let mut tcp_check = tcp.check;

    ip_check = csum::replace4(ip_check, ip.saddr, flow.nat_saddr);
    ip_check = csum::replace4(ip_check, ip.daddr, flow.nat_daddr);
    ip_check = decrement_ttl(ip, ip_check);

    // The TCP checksum covers the addresses through the pseudo header.
    tcp_check = csum::replace4(tcp_check, ip.saddr, flow.nat_saddr);
    tcp_check = csum::replace4(tcp_check, ip.daddr, flow.nat_daddr);
    tcp_check = csum::replace2(tcp_check, tcp.sport, flow.nat_sport);
    tcp_check = csum::replace2(tcp_check, tcp.dport, flow.nat_dport);

    ip.saddr = flow.nat_saddr;
    ip.daddr = flow.nat_daddr;
    ip.check = ip_check;
    tcp.sport = flow.nat_sport;
    tcp.dport = flow.nat_dport;
    tcp.check = tcp_check;
    set_macs(eth, flow);
}

/// Sets the L2 header for the next hop recorded in `flow`.
#[inline(always)]
pub fn set_macs(eth: &mut EthHdr, flow: &Flow) {
    eth.src_addr = flow.smac;
    eth.dst_addr = flow.dmac;
}

/// Decrements the TTL and returns the IP checksum updated for it.
#[inline(always)]
pub fn decrement_ttl(ip: &mut Ip, ip_check: u16) -> u16 {
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    csum::replace2(ip_check, old, new)
}
