//! RST synthesis: the segment under the program is turned into the RST a TCP stack would
//! answer it with (RFC 9293 3.10.7.1), options and payload stripped, and sent back out of
//! the ingress device.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use lb_common::Counter;
use network_types::eth::EthHdr;

use crate::{
    csum,
    maps::RST_BUCKET,
    parse::{
        words20, Frame, Ip, Tcp, ETH_LEN, IPPROTO_TCP, L4_OFF, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST,
        TCP_SYN,
    },
    stats,
};

const RST_FRAME_LEN: usize = L4_OFF + TCP_LEN;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Takes a token from this CPU's bucket (capacity and refill: `per_sec`) at `now`.
#[inline(always)]
fn take_token(per_sec: u32, now: u64) -> bool {
    let Some(b) = RST_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else runs on it while we do.
    let b = unsafe { &mut *b };
    let rate = per_sec as u64;
    let elapsed = crate::clock::age(now, b.last_ns).min(NS_PER_SEC);
    let refill = elapsed * rate / NS_PER_SEC;
    if refill > 0 {
        b.tokens = (b.tokens + refill).min(rate);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// The Ethernet, option-less IPv4 and TCP headers at their fixed offsets (14, 34). Fetched one
/// by one: a `#[repr(C)]` struct of the three would put the IPv4 header (alignment 4) at offset
/// 16, not 14.
#[inline(always)]
fn headers(f: &Frame) -> Option<(&'static mut EthHdr, &'static mut Ip, &'static mut Tcp)> {
    Some((
        f.get::<EthHdr>(0)?,
        f.get::<Ip>(ETH_LEN)?,
        f.get::<Tcp>(L4_OFF)?,
    ))
}

/// Answers the segment (handled at `now`) with a RST. The caller checked the IPv4 header has
/// no options. A RST is never answered (dropped instead).
#[inline(always)]
pub fn reply(ctx: &XdpContext, per_sec: u32, now: u64) -> u32 {
    if !take_token(per_sec, now) {
        stats::count(Counter::DropRstLimited);
        return xdp_action::XDP_DROP;
    }
    let f = Frame::new(ctx);
    let Some((eth, ip, tcp)) = headers(&f) else {
        return xdp_action::XDP_DROP;
    };
    let flags = tcp.flags;
    if flags & TCP_RST != 0 {
        return xdp_action::XDP_DROP;
    }
    let seg_seq = u32::from_be_bytes(tcp.seq);
    let seg_ack = u32::from_be_bytes(tcp.ack);
    let hdrs = 20u32 + ((tcp.doff >> 4) as u32) * 4;
    let payload = (u16::from_be(ip.tot_len) as u32).saturating_sub(hdrs);

    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        (seg_ack, 0u32, TCP_RST)
    } else {
        let mut len = payload;
        if flags & TCP_SYN != 0 {
            len += 1;
        }
        if flags & TCP_FIN != 0 {
            len += 1;
        }
        (0u32, seg_seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };

    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);

    core::mem::swap(&mut ip.saddr, &mut ip.daddr);
    ip.vihl = 0x45;
    ip.tos = 0;
    ip.tot_len = ((RST_FRAME_LEN - ETH_LEN) as u16).to_be();
    ip.id = 0;
    ip.frag_off = 0x4000u16.to_be();
    ip.ttl = 64;
    ip.proto = IPPROTO_TCP;
    ip.check = 0;

    core::mem::swap(&mut tcp.sport, &mut tcp.dport);
    tcp.seq = seq.to_be_bytes();
    tcp.ack = ack.to_be_bytes();
    tcp.doff = 5 << 4;
    tcp.flags = out_flags;
    tcp.window = 0;
    tcp.check = 0;
    tcp.urg = 0;

    let extra = f.len() as i32 - RST_FRAME_LEN as i32;
    if extra > 0 {
        // SAFETY: shrinking the frame by its bytes beyond the RST's headers.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx as *mut _, -extra) } != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    // The frame may have moved: look at it anew.
    let f = Frame::new(ctx);
    let Some((_, ip, tcp)) = headers(&f) else {
        return xdp_action::XDP_DROP;
    };
    let ip_check = csum::finish(csum::sum_words(words20(ip)));
    let pseudo = (ip.saddr >> 16) as u64
        + (ip.saddr & 0xffff) as u64
        + (ip.daddr >> 16) as u64
        + (ip.daddr & 0xffff) as u64
        + u16::from_ne_bytes([0, IPPROTO_TCP]) as u64
        + u16::from_ne_bytes([0, TCP_LEN as u8]) as u64;
    let tcp_check = csum::finish(pseudo + csum::sum_words(words20(tcp)));
    ip.check = ip_check;
    tcp.check = tcp_check;
    stats::count(Counter::RstSent);
    xdp_action::XDP_TX
}
