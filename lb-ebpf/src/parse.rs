//! Bounds-checked access to the frame. Every header read in the program goes through
//! [`Frame::ptr`], which the verifier sees checked against `data_end`.
use aya_ebpf::programs::XdpContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IPV4_LEN: usize = Ipv4Hdr::LEN;
pub const TCP_LEN: usize = 20;
/// Offset of the L4 header when the IPv4 header has no options (the only case we rewrite).
pub const L4_OFF: usize = ETH_LEN + IPV4_LEN;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The frame under the program: `[data, data_end)`.
#[derive(Clone, Copy)]
pub struct Frame {
    pub data: usize,
    pub end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.data
    }

    /// A pointer to a `T` at `off`, or `None` when the frame is too short.
    #[inline(always)]
    pub fn ptr<T>(&self, off: usize) -> Option<*mut T> {
        let start = self.data + off;
        if start + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(start as *mut T)
    }

    /// A mutable reference to a `T` at `off`, or `None` when the frame is too short.
    #[inline(always)]
    pub fn get<T>(&self, off: usize) -> Option<&'static mut T> {
        // SAFETY: `ptr` checked that `size_of::<T>()` bytes at `off` lie inside the frame,
        // which stays valid (and is not resized) for the rest of this program run unless a
        // caller adjusts it, after which callers build a new `Frame`. All header types are
        // plain byte structs with alignment 1 or read as such.
        self.ptr::<T>(off).map(|p| unsafe { &mut *p })
    }
}

/// A TCP header viewed as bytes, so that flag and offset reads need no bitfield code.
#[repr(C)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    /// Data offset in the high nibble.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg: u16,
}

impl Tcp {
    /// A SYN with none of ACK, RST or FIN: the only segment that may start a flow.
    #[inline(always)]
    pub fn is_plain_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
    }
}

/// An IPv4 header viewed as words in network byte order.
#[repr(C)]
pub struct Ip {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

impl Ip {
    #[inline(always)]
    pub fn ihl(&self) -> u8 {
        self.vihl & 0x0f
    }

    /// A fragment: more-fragments set or a non-zero offset.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & 0x3fff != 0
    }

    /// A fragment other than the first: it carries no L4 header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        u16::from_be(self.frag_off) & 0x1fff != 0
    }
}

/// An ICMP header (type, code, checksum, rest-of-header).
#[repr(C)]
pub struct Icmp {
    pub ty: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

/// The first eight bytes of a transport header: all an ICMP error must quote.
#[repr(C)]
pub struct Ports {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
}

/// The 16-bit words of a 20-byte header, for checksum sums.
#[inline(always)]
pub fn words20<T>(h: &T) -> &[u16; 10] {
    const { assert!(core::mem::size_of::<T>() == 20) };
    // SAFETY: `T` is exactly 20 bytes of plain data (checked above); u16 reads of packet memory
    // are fine for BPF (no alignment faults; the verifier allows them in XDP).
    unsafe { &*(h as *const T as *const [u16; 10]) }
}
