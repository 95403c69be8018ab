//! Types shared by the XDP program (`lb-ebpf`) and the agent (`lb-user`).
//!
//! Every map key and value is `#[repr(C)]`, has no implicit padding, and stores packet fields
//! in **network byte order** (addresses as the `u32` read straight from the header, ports as
//! the `u16` read straight from the header). Userspace converts with [`addr_be`] / [`port_be`].
//!
//! With the `user` feature the types are `bytemuck::Pod` and `aya::Pod`.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod abi;
pub mod counters;
pub mod maps;

pub use counters::*;
pub use maps::*;

/// IPv4 address in network byte order, as stored in every map.
#[inline(always)]
pub const fn addr_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// TCP/UDP port in network byte order, as stored in every map.
#[inline(always)]
pub const fn port_be(port: u16) -> u16 {
    port.to_be()
}
