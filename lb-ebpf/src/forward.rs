//! Next-hop lookup (`bpf_fib_lookup`) and transmission (XDP_TX or XDP_REDIRECT via devmap).
use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
    programs::XdpContext,
};
use lb_common::Counter;

use crate::{
    maps::{FIB_PARAMS, NEXT_HOPS, ROUTE_SRC, TX_PORTS},
    parse::Ip,
    stats,
};

const AF_INET: u8 = 2;
/// Fill `ipv4_src` with the route's preferred source address (kernel 6.7+).
const BPF_FIB_LOOKUP_SRC: u32 = 1 << 4;

/// Whether the packet's TTL ends here: such a packet is left to the kernel, which answers it
/// (ICMP time exceeded) as a router does; counted.
#[inline(always)]
pub fn ttl_ends_here(ip: &Ip) -> bool {
    let ends = ip.ttl <= 1;
    if ends {
        stats::count(Counter::PassTtl);
    }
    ends
}

/// Where and how a new flow's packets leave.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct NextHop {
    pub ifindex: u32,
    pub src: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Where the source address of a new flow comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SrcFrom {
    /// The FIB lookup fills it (`BPF_FIB_LOOKUP_SRC`, Linux 6.7+).
    Fib,
    /// The agent's route lookup for the backend, in `ROUTE_SRC` (older kernels); 0 if the
    /// backend has none (dropped as "no SNAT address").
    RouteSrc,
}

/// How long a CPU reuses the next hop it found for a backend: new flows to that backend
/// within this time skip the FIB lookup (route, neighbour and source address: about a quarter
/// of a new flow's cost). A changed route or neighbour reaches new flows within it; a flow
/// keeps its SYN's hop for its life anyway. A failed lookup is never reused.
pub const HOP_REUSE_NS: u64 = 100_000_000;

/// A next hop one CPU found for a backend (`NEXT_HOPS[backend id]`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct CachedHop {
    /// When it was found; 0: never.
    pub found_ns: u64,
    /// The backend's address and the ingress interface it was found for.
    pub dst: u32,
    pub ingress: u32,
    pub hop: NextHop,
}

/// The next hop towards backend `id` at `dst` for a new flow that arrived on `ifindex` at
/// `now`: the one this CPU found for it within [`HOP_REUSE_NS`], else [`lookup`]'s.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn next_hop(
    ctx: &XdpContext,
    ifindex: u32,
    id: u32,
    dst: u32,
    dport: u16,
    tot_len: u16,
    src_from: SrcFrom,
    now: u64,
) -> Result<NextHop, i64> {
    let cached = NEXT_HOPS.get_ptr_mut(id);
    if let Some(c) = cached {
        // SAFETY: this CPU's map value, valid for the program run.
        let c = unsafe { &*c };
        if c.found_ns != 0
            && c.dst == dst
            && c.ingress == ifindex
            && crate::clock::age(now, c.found_ns) < HOP_REUSE_NS
        {
            stats::count_fib(0);
            return Ok(c.hop);
        }
    }
    let hop = lookup(ctx, ifindex, dst, dport, tot_len, src_from)?;
    if let Some(c) = cached {
        // SAFETY: as above; nothing else runs on this CPU meanwhile.
        unsafe {
            *c = CachedHop {
                found_ns: now,
                dst,
                ingress: ifindex,
                hop,
            }
        };
    }
    Ok(hop)
}

/// Looks up the route to `dst` (network order) for a packet that arrived on `ifindex`.
/// `tot_len` 0 skips the MTU check (generic mode: GSO super-packets). On any result other
/// than success returns the result code.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    ifindex: u32,
    dst: u32,
    dport: u16,
    tot_len: u16,
    src_from: SrcFrom,
) -> Result<NextHop, i64> {
    // The parameters live in a per-CPU scratch map, not on the stack: Linux 6.1 counts every
    // frame of a call chain against one 512-byte stack, and `lb_xdp` needs most of it.
    let Some(p) = FIB_PARAMS.get_ptr_mut(0) else {
        return Err(-1);
    };
    let words = p as *mut u64;
    for i in 0..core::mem::size_of::<bpf_fib_lookup>() / 8 {
        // SAFETY: `p` is this CPU's map value, `size_of::<bpf_fib_lookup>()` (64) writable bytes,
        // 8-aligned; volatile so that the stores do not become a `memset` call (another frame).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: `p` is valid for reads and writes for the whole program run (a map value of
    // this CPU; nothing else runs on this CPU meanwhile) and now all zero, a valid value.
    let p = unsafe { &mut *p };
    p.family = AF_INET;
    p.l4_protocol = crate::parse::IPPROTO_TCP;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed; ctx is the
    // program's context pointer.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            match src_from {
                SrcFrom::Fib => BPF_FIB_LOOKUP_SRC,
                SrcFrom::RouteSrc => 0,
            },
        )
    };
    stats::count_fib(rc);
    if rc != 0 {
        return Err(rc);
    }
    let src = match src_from {
        // SAFETY: on success with BPF_FIB_LOOKUP_SRC the kernel filled the IPv4 source union
        // member.
        SrcFrom::Fib => unsafe { p.__bindgen_anon_3.ipv4_src },
        SrcFrom::RouteSrc => ROUTE_SRC.get_ptr(dst).map_or(0, |s| {
            // SAFETY: a map value pointer from a successful lookup is valid for reading.
            unsafe { *s }
        }),
    };
    Ok(NextHop {
        ifindex: p.ifindex,
        src,
        smac: p.smac,
        dmac: p.dmac,
    })
}

/// Sends the (rewritten) frame out of `ifindex`: back out of the ingress device with
/// XDP_TX, otherwise through the devmap. An interface the agent did not register is a drop.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex as usize == ctx.ingress_ifindex() {
        return xdp_action::XDP_TX;
    }
    match TX_PORTS.redirect(ifindex, xdp_action::XDP_DROP as u64) {
        Ok(action) => action,
        Err(_) => {
            stats::count(Counter::DropNoEgress);
            xdp_action::XDP_DROP
        }
    }
}

/// The agent's feature probe, never attached: run once through `BPF_PROG_TEST_RUN`, it asks
/// the kernel for a route with `BPF_FIB_LOOKUP_SRC`. `XDP_PASS`: the flag is known; `XDP_DROP`:
/// the kernel refused it as invalid (Linux before 6.7), so the agent sets `CONFIG_F_ROUTE_SRC`.
#[aya_ebpf::macros::xdp]
pub fn lb_probe_fib_src(ctx: XdpContext) -> u32 {
    const EINVAL: i64 = 22;
    // SAFETY: bpf_fib_lookup is a plain-old-data struct; all-zero is a valid value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = crate::parse::IPPROTO_TCP;
    // The loopback device (ifindex 1 in every network namespace) and 127.0.0.1: any answer
    // but -EINVAL means the flag was accepted.
    p.ifindex = 1;
    p.__bindgen_anon_4.ipv4_dst = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed; ctx is the
    // program's context pointer.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    if rc == -EINVAL {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}
