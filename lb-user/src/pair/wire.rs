//! One synced flow as it travels between the two agents of a pair: what the standby needs to
//! forward the flow's next segment exactly as the active would, and nothing that only makes
//! sense on the active (its ifindexes, its own MACs, its clock, its ids). Fixed size, network
//! byte order, no allocation: at the machine's connection rate the encoding must cost far less
//! than a microsecond.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, Result};

/// The state one direction of a flow carries (`Flow`'s per-direction fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Direction {
    /// Where the sequence space this direction sent ends (host order).
    pub seq_end: u32,
    /// The acknowledgment this direction sent last (host order).
    pub ack: u32,
    /// `FLOW_CLOSE_*` bits.
    pub close: u8,
    /// 1 when this direction closed first.
    pub first_fin: u8,
    /// Payload bytes forwarded in this direction.
    pub bytes: u64,
}

/// A flow of the active node, independent of its table layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncedFlow {
    /// The client's address and port, and the VIP:port it connected to.
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    /// The SNAT address and port the backend sees, and the backend.
    pub snat: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// MAC the flow's replies go to (the client's or its router's), and the backend's (or its
    /// router's): on the segments both nodes share, the same for either.
    pub client_mac: [u8; 6],
    pub backend_mac: [u8; 6],
    /// Positions, in the instance's interface list (`--iface`, client-facing first), of the
    /// interfaces the flow leaves by towards the client and towards the backend: the pair's
    /// nodes list their interfaces in the same order, each under its own names.
    pub client_iface: u8,
    pub backend_iface: u8,
    /// How long ago the flow began, and how long ago it last carried a segment.
    pub age_ns: u64,
    pub idle_ns: u64,
    /// When it last carried a segment, on the sender's wall clock (ns since the Unix epoch):
    /// for a new flow, when its handshake completed. The receiver's sync lag is its own wall
    /// clock less this (exact on one machine, as good as NTP across two).
    pub last_seen_unix_ns: u64,
    /// The backend-set generation that chose the backend (for the connection log).
    pub generation: u32,
    /// Client -> backend, and backend -> client.
    pub forward: Direction,
    pub reply: Direction,
}

/// Bytes of an encoded [`SyncedFlow`].
pub const FLOW_LEN: usize = 4 * 6 + 6 * 2 + 2 + 8 * 3 + 4 + 2 * DIRECTION_LEN;
const DIRECTION_LEN: usize = 4 + 4 + 1 + 1 + 8;

/// Appends bytes in network order.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn addr(&mut self, a: SocketAddrV4) {
        self.0.extend_from_slice(&a.ip().octets());
        self.u16(a.port());
    }
    fn dir(&mut self, d: &Direction) {
        self.u32(d.seq_end);
        self.u32(d.ack);
        self.u8(d.close);
        self.u8(d.first_fin);
        self.u64(d.bytes);
    }
}

/// Reads bytes in network order from a slice of the right length (checked by the caller).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at gave N bytes")
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
    fn addr(&mut self) -> SocketAddrV4 {
        let ip = Ipv4Addr::from(self.take::<4>());
        SocketAddrV4::new(ip, self.u16())
    }
    fn dir(&mut self) -> Direction {
        Direction {
            seq_end: self.u32(),
            ack: self.u32(),
            close: self.u8(),
            first_fin: self.u8(),
            bytes: self.u64(),
        }
    }
}

impl SyncedFlow {
    /// Appends the flow's [`FLOW_LEN`] bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        w.addr(self.client);
        w.addr(self.vip);
        w.addr(self.snat);
        w.addr(self.backend);
        w.0.extend_from_slice(&self.client_mac);
        w.0.extend_from_slice(&self.backend_mac);
        w.u8(self.client_iface);
        w.u8(self.backend_iface);
        w.u64(self.age_ns);
        w.u64(self.idle_ns);
        w.u64(self.last_seen_unix_ns);
        w.u32(self.generation);
        w.dir(&self.forward);
        w.dir(&self.reply);
    }

    /// The flow encoded in `bytes` (exactly [`FLOW_LEN`] of them).
    pub fn decode(bytes: &[u8]) -> Result<SyncedFlow> {
        if bytes.len() != FLOW_LEN {
            bail!(
                "a synced flow is {FLOW_LEN} bytes, got {}: the peer runs another lb version",
                bytes.len()
            );
        }
        let mut r = Reader(bytes);
        Ok(SyncedFlow {
            client: r.addr(),
            vip: r.addr(),
            snat: r.addr(),
            backend: r.addr(),
            client_mac: r.take(),
            backend_mac: r.take(),
            client_iface: r.u8(),
            backend_iface: r.u8(),
            age_ns: r.u64(),
            idle_ns: r.u64(),
            last_seen_unix_ns: r.u64(),
            generation: r.u32(),
            forward: r.dir(),
            reply: r.dir(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> SyncedFlow {
        SyncedFlow {
            client: "198.18.0.2:40001".parse().unwrap(),
            vip: "198.18.0.10:7680".parse().unwrap(),
            snat: "10.0.1.1:12345".parse().unwrap(),
            backend: "10.0.1.10:7687".parse().unwrap(),
            client_mac: [2, 0, 0, 0, 0, 2],
            backend_mac: [2, 0, 0, 0, 1, 0x10],
            client_iface: 0,
            backend_iface: 1,
            age_ns: 1_500_000_000,
            idle_ns: 20_000_000,
            last_seen_unix_ns: 1_796_000_000_000_000_000,
            generation: 7,
            forward: Direction {
                seq_end: 0xfedc_ba98,
                ack: 17,
                close: 0,
                first_fin: 0,
                bytes: 20,
            },
            reply: Direction {
                seq_end: 18,
                ack: 0xfedc_ba98,
                close: 1,
                first_fin: 1,
                bytes: 1 << 40,
            },
        }
    }

    #[test]
    fn a_flow_decodes_to_what_was_encoded() {
        let f = sample();
        let mut buf = Vec::new();
        f.encode(&mut buf);
        assert_eq!(buf.len(), FLOW_LEN);
        assert_eq!(SyncedFlow::decode(&buf).unwrap(), f);
        // Network order on the wire: the client's address comes first, as written.
        assert_eq!(&buf[..6], &[198, 18, 0, 2, 0x9c, 0x41]);
    }

    #[test]
    fn a_record_of_another_length_is_refused_with_the_reason() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        let e = SyncedFlow::decode(&buf[..FLOW_LEN - 1]).unwrap_err();
        assert!(e.to_string().contains("another lb version"), "{e}");
    }
}
