//! Fuzzing the XDP program through `BPF_PROG_TEST_RUN` (issue 7): 100,000 seeded frames (override
//! with `LB_FUZZ_FRAMES`; the seed with `LB_FUZZ_SEED`, decimal or `0x` hex) run through one
//! loaded program against a table pre-populated with real flows.
//!
//! # Inputs
//!
//! First six flows are opened with valid SYN / SYN-ACK / ACK exchanges (three per service), six
//! more are left embryonic (three after the SYN, three after the SYN-ACK), for the fuzzed
//! segments to move on. Then each frame is one of:
//!
//! - 50 %: a valid frame of one of the classes *VIP SYN* (new or existing client tuple),
//!   *established forward segment* (client -> VIP of a known flow) and *reply segment* (backend ->
//!   SNAT port of a known flow; data and ACKs on the six complete flows, any flags on the
//!   others), mutated 1-3 times: bit flips, byte overwrites, truncation at a
//!   random length, extension with random bytes, IP header length, flags/fragment offset, TTL,
//!   protocol, total length, TCP flags, TCP data offset; then, as a sender would, the IP checksum
//!   is mostly recomputed and the TCP checksum sometimes; finally one checksum may be made wrong.
//! - 40 %: random frames of 0..=200 bytes: pure noise, noise behind an Ethernet + IPv4 header, or
//!   noise behind a TCP/IPv4 header aimed at a VIP:port or from a backend to an SNAT-range port.
//!   Frames shorter than 14 bytes cannot be test-run (the kernel refuses them): they are counted
//!   as skipped.
//! - 10 %: ICMP errors (fragmentation needed, host unreachable, time exceeded, sometimes another
//!   type) quoting a real flow's tuple or a random one, in either direction, sometimes mutated.
//!
//! Most frames arrive on the interface they belong to (VIP-bound on `cl0`, backend-side on
//! `bk0`); one in ten arrives on the other one.
//!
//! # The model
//!
//! [`classify`] puts each input in a [`Class`] from its bytes alone, before it runs; the classes
//! say what the program may do:
//!
//! - not ours (not IPv4, other protocols, TCP later fragments, IHL < 5, no room for the ports,
//!   ICMP that is not an error quoting a balancer tuple, TCP not for a VIP:port nor from a
//!   backend to an SNAT address:SNAT-range port): XDP_PASS, byte for byte, no counter;
//! - ours but unfit (IP options, first fragment, wrong IP header checksum, TCP header cut
//!   short): XDP_DROP, one counter each (`drop_ip_options`, `drop_fragment`, `drop_malformed`
//!   for the last two; an ICMP error about a balancer tuple with a wrong IP header checksum
//!   too);
//! - ours (VIP-bound, reply-bound, ICMP error quoting a balancer tuple): XDP_REDIRECT or XDP_TX
//!   of a translated frame, XDP_TX of a RST (TCP only), XDP_DROP, or XDP_PASS (unchanged) only
//!   when the TTL is <= 1. Never XDP_ABORTED.
//!
//! Every translated output must be the input with only the NAT fields changed (MACs, addresses,
//! ports, TTL - 1, checksums), with a valid IP header checksum and, when the input's were valid,
//! valid TCP (or ICMP and quoted IP) checksums; a RST must be exactly the RFC 9293 answer to its
//! input (a RST is never answered).
//!
//! # Counter accounting
//!
//! The program counts in `STATS_GLOBAL` (a) exactly one *outcome* for every frame it considers
//! its own, and (b) secondary *events* on top of some outcomes. Frames it passes as not its own
//! are not counted at all. The outcomes ([`OUTCOMES`]) are:
//!
//! - `fwd_packets`, `reply_packets`, `icmp_translated` (counted in `send` / `icmp::handle`
//!   before the transmit), `pass_ttl`;
//! - the drops `drop_ip_options`, `drop_fragment`, `drop_malformed`, `drop_fib`,
//!   `drop_no_snat_addr`, `drop_established_full`, `drop_icmp_no_flow`;
//! - the refusals (`path::refuse`): `drop_no_flow` (the refused segment is itself a RST:
//!   dropped), `drop_rst_limited` (rate limit: dropped), or, when the RST was sent, its reason
//!   `rst_no_flow`, `rst_no_backend`, `rst_snat_exhausted`, `rst_flow_reset`.
//!
//! The events ([`EVENTS`]) are `new_flows`, `established`, `closed_tuple_reused` (followed by
//! the new flow's outcome), `rst_sent` (next to the refusal reason), `fib_*` (every FIB lookup,
//! next to `fwd_packets` or `drop_fib`), `generic_large_frames`, and `drop_no_egress` (a failed
//! redirect after `fwd_packets`/`reply_packets`/`icmp_translated` was counted: must stay 0 here,
//! both interfaces are registered). `drop_no_backend` and `drop_redirect` are never counted.
//!
//! So: sum of outcome deltas == frames the model calls ours; the forward/reply/ICMP counters ==
//! the translated outputs of each class; `pass_ttl` == ours frames passed; `rst_sent` == the
//! refusal reasons == RSTs seen; the drop outcomes == ours frames dropped; and the unfit classes
//! match their counters exactly.
//!
//! Every tenth of the run and after it, every forward entry of each connection table must have
//! its reply entry in the same table, pointing back (entries created by the fuzz included).
//!
//! Reproducing: the same seed gives the same sequence of mutations and random bytes; the SNAT
//! ports of the known flows (chosen at random by the program) and hence the bytes of reply
//! segments differ from run to run. A failure prints each distinct complaint with its count and
//! the first frame (input and output in hex) that raised it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::Result;
use lb_common::{Counter, Flow, FlowKey, COUNTER_MAX, COUNTER_NAMES, DIR_FORWARD, DIR_REPLY};
use lb_tests::fixture::frames::{hex, TcpFrame, XorShift, ACK, FIN, PSH, RST, SYN};
use lb_tests::fixture::*;

const DEFAULT_SEED: u64 = 0x1b_f022_5eed;
const DEFAULT_FRAMES: usize = 100_000;

/// Counters that move exactly once for every frame the program considers its own.
const OUTCOMES: &[Counter] = &[
    Counter::FwdPackets,
    Counter::ReplyPackets,
    Counter::IcmpTranslated,
    Counter::PassTtl,
    Counter::DropIpOptions,
    Counter::DropFragment,
    Counter::DropMalformed,
    Counter::DropFib,
    Counter::DropNoSnatAddr,
    Counter::DropEstablishedFull,
    Counter::DropIcmpNoFlow,
    Counter::DropNoFlow,
    Counter::DropRstLimited,
    Counter::RstNoFlow,
    Counter::RstNoBackend,
    Counter::RstSnatExhausted,
    Counter::RstFlowReset,
    Counter::DropMaxconn,
    Counter::RstMaxconn,
    Counter::DropSlotsFull,
    Counter::SynHeld,
    Counter::DropRstOutOfWindow,
    Counter::DropHandshakeStale,
    Counter::RstHandshakeStale,
    Counter::PassOtherHost,
];

/// The outcomes whose action is XDP_DROP.
const DROP_OUTCOMES: &[Counter] = &[
    Counter::DropIpOptions,
    Counter::DropFragment,
    Counter::DropMalformed,
    Counter::DropFib,
    Counter::DropNoSnatAddr,
    Counter::DropEstablishedFull,
    Counter::DropIcmpNoFlow,
    Counter::DropNoFlow,
    Counter::DropRstLimited,
    Counter::DropMaxconn,
    Counter::DropSlotsFull,
    Counter::SynHeld,
    Counter::DropRstOutOfWindow,
    Counter::DropHandshakeStale,
];

/// The refusal reasons counted only when the RST was sent.
const RST_REASONS: &[Counter] = &[
    Counter::RstNoFlow,
    Counter::RstNoBackend,
    Counter::RstSnatExhausted,
    Counter::RstFlowReset,
    Counter::RstMaxconn,
    Counter::RstHandshakeStale,
];

/// Counters counted on top of an outcome (or never), not per frame.
const EVENTS: &[Counter] = &[
    Counter::NewFlows,
    Counter::Established,
    Counter::ClosedTupleReused,
    Counter::XdpRedirectErr,
    Counter::XdpException,
    Counter::RstSent,
    Counter::FibResult0,
    Counter::FibResult1,
    Counter::FibResult2,
    Counter::FibResult3,
    Counter::FibResult4,
    Counter::FibResult5,
    Counter::FibResult6,
    Counter::FibResult7,
    Counter::FibResult8,
    Counter::FibResult9,
    Counter::GenericLarge,
    Counter::DropNoEgress,
    Counter::HalfOpenReclaimed,
    Counter::UnansweredReclaimed,
    Counter::ClosedPortTakenOver,
    Counter::EndedAtLastAck,
];

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// What an input is, decided from its bytes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Not Ethernet + IPv4 (other ethertype, version, IPv4 header cut short).
    NotIpv4,
    /// IPv4, neither TCP nor ICMP.
    OtherProto,
    /// A TCP fragment other than the first (no ports to tell whose it is).
    LaterFragment,
    /// TCP with an IHL below 5.
    BadIhl,
    /// TCP too short for the ports after the IP header.
    NoPorts,
    /// ICMP that is not a destination-unreachable / time-exceeded error quoting an option-less
    /// TCP header (or whose own header has options or is a fragment).
    NotIcmpError,
    /// TCP or an ICMP error, but not about a VIP:port nor a backend -> SNAT-range tuple.
    Unmatched,
    /// Ours, with IP options.
    IpOptions,
    /// Ours, a first fragment (more-fragments set).
    Fragment,
    /// Ours, a wrong IP header checksum.
    BadChecksum,
    /// Ours, the TCP header cut short.
    Truncated,
    /// Ours: TCP to a VIP:port.
    Forward,
    /// Ours: TCP from a backend to an SNAT address and SNAT-range port.
    Reply,
    /// Ours: an ICMP error quoting a VIP:port or SNAT tuple.
    IcmpError,
}

impl Class {
    fn ours(self) -> bool {
        self >= Class::IpOptions
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn ip4(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

fn is_service(addr: Ipv4Addr, port: u16) -> bool {
    addr == VIP && (port == WRITE_PORT || port == READ_PORT)
}

/// The addresses the fixture registers as SNAT (local) addresses.
fn is_snat_addr(addr: Ipv4Addr) -> bool {
    addr == CL0_ADDR || addr == SNAT_ADDR
}

fn is_backend(addr: Ipv4Addr, port: u16) -> bool {
    port == BACKEND_PORT && [DB01, DB02, DB03].contains(&addr)
}

fn in_snat_range(port: u16) -> bool {
    (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port)
}

/// The model: the class of `b`.
fn classify(b: &[u8]) -> Class {
    if b.len() < 34 || be16(b, 12) != 0x0800 || b[14] >> 4 != 4 {
        return Class::NotIpv4;
    }
    let ihl = usize::from(b[14] & 0x0f);
    let frag = be16(b, 20);
    let (saddr, daddr) = (ip4(b, 26), ip4(b, 30));
    match b[23] {
        6 => {
            if frag & 0x1fff != 0 {
                return Class::LaterFragment;
            }
            if ihl < 5 {
                return Class::BadIhl;
            }
            let p = 14 + ihl * 4;
            if b.len() < p + 8 {
                return Class::NoPorts;
            }
            let (sport, dport) = (be16(b, p), be16(b, p + 2));
            let class = if is_service(daddr, dport) {
                Class::Forward
            } else if in_snat_range(dport) && is_snat_addr(daddr) && is_backend(saddr, sport) {
                Class::Reply
            } else {
                return Class::Unmatched;
            };
            if ihl != 5 {
                Class::IpOptions
            } else if frag & 0x3fff != 0 {
                Class::Fragment
            } else if ip_csum_ok_at(b, 14) != Some(true) {
                Class::BadChecksum
            } else if b.len() < 54 {
                Class::Truncated
            } else {
                class
            }
        }
        1 => {
            if ihl != 5 || frag & 0x3fff != 0 || b.len() < 70 || (b[34] != 3 && b[34] != 11) {
                return Class::NotIcmpError;
            }
            if b[42 + 9] != 6 || b[42] & 0x0f != 5 {
                return Class::NotIcmpError;
            }
            let (isrc, idst) = (ip4(b, 54), ip4(b, 58));
            let (sport, dport) = (be16(b, 62), be16(b, 64));
            if is_service(isrc, sport)
                || (in_snat_range(sport) && is_snat_addr(isrc) && is_backend(idst, dport))
            {
                if ip_csum_ok_at(b, 14) == Some(true) {
                    Class::IcmpError
                } else {
                    Class::BadChecksum
                }
            } else {
                Class::Unmatched
            }
        }
        _ => Class::OtherProto,
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------

fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The IPv4 header checksum over the header at `off` is right (`None`: no whole header).
fn ip_csum_ok_at(b: &[u8], off: usize) -> Option<bool> {
    let ihl = usize::from(*b.get(off)? & 0x0f) * 4;
    if ihl < 20 || b.len() < off + ihl {
        return None;
    }
    Some(fold(sum16(&b[off..off + ihl])) == 0xffff)
}

/// The L4 bytes of an option-less IPv4 packet as its total length says, if the frame holds them.
fn l4_span(b: &[u8]) -> Option<(usize, usize)> {
    if b.len() < 34 || b[14] != 0x45 {
        return None;
    }
    let tot = usize::from(be16(b, 16));
    (tot >= 20 && 14 + tot <= b.len()).then_some((34, 14 + tot))
}

/// The TCP checksum of an option-less IPv4/TCP packet is right (`None`: cannot be computed).
fn tcp_csum_ok(b: &[u8]) -> Option<bool> {
    let (s, e) = l4_span(b)?;
    if b[23] != 6 || e - s < 20 {
        return None;
    }
    let pseudo = sum16(&b[26..34]) + 6 + (e - s) as u64;
    Some(fold(pseudo + sum16(&b[s..e])) == 0xffff)
}

/// The ICMP checksum of an option-less IPv4/ICMP packet is right.
fn icmp_csum_ok(b: &[u8]) -> Option<bool> {
    let (s, e) = l4_span(b)?;
    if b[23] != 1 || e - s < 8 {
        return None;
    }
    Some(fold(sum16(&b[s..e])) == 0xffff)
}

fn fix_ip_csum(b: &mut [u8]) {
    if b.len() < 34 {
        return;
    }
    let ihl = (usize::from(b[14] & 0x0f) * 4).clamp(20, b.len() - 14);
    b[24] = 0;
    b[25] = 0;
    let c = !fold(sum16(&b[14..14 + ihl]));
    b[24..26].copy_from_slice(&c.to_be_bytes());
}

fn fix_tcp_csum(b: &mut [u8]) {
    let Some((s, e)) = l4_span(b) else { return };
    if b[23] != 6 || e - s < 20 {
        return;
    }
    b[s + 16] = 0;
    b[s + 17] = 0;
    let pseudo = sum16(&b[26..34]) + 6 + (e - s) as u64;
    let c = !fold(pseudo + sum16(&b[s..e]));
    b[s + 16..s + 18].copy_from_slice(&c.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Flows and inputs
// ---------------------------------------------------------------------------------------------

/// A flow opened before the fuzz.
#[derive(Clone, Debug)]
struct Known {
    conn: Conn,
    /// Opened completely: its base segments carry no FIN, RST or SYN.
    stable: bool,
}

impl std::ops::Deref for Known {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

fn mac_of(addr: Ipv4Addr) -> [u8; 6] {
    match addr {
        DB01 => DB01_MAC,
        DB02 => DB02_MAC,
        _ => DB03_MAC,
    }
}

/// Opens a flow: the SYN, then (`steps` >= 2) the backend's SYN-ACK, then (`steps` >= 3) the
/// client's ACK; each must go through, byte for byte.
fn open(fx: &Fixture, client_port: u16, service_port: u16, steps: u8) -> Result<Known> {
    let conn = match steps {
        0 | 1 => Conn::syn(fx, client_port, service_port)?,
        2 => Conn::handshake(fx, client_port, service_port)?,
        _ => Conn::establish(fx, client_port, service_port)?,
    };
    Ok(Known {
        conn,
        stable: steps >= 3,
    })
}

/// Where an input was generated from (for the report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    MutatedSyn,
    MutatedForward,
    MutatedReply,
    Random,
    Icmp,
}

/// The ingress interface of an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Backends,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backends,
            Side::Backends => Side::Client,
        }
    }
}

struct Input {
    source: Source,
    side: Side,
    frame: Vec<u8>,
}

struct Gen<'a> {
    rng: XorShift,
    flows: &'a [Known],
}

/// TCP flags of the base segments: mostly data and ACKs, so that known flows live a while
/// (a FIN or RST each way, then a SYN on the tuple, replaces a flow).
const FLAG_SETS: [u8; 16] = [
    ACK,
    ACK,
    ACK,
    ACK,
    ACK,
    ACK,
    PSH | ACK,
    PSH | ACK,
    PSH | ACK,
    PSH | ACK,
    FIN | ACK,
    RST | ACK,
    RST,
    SYN,
    SYN | ACK,
    0,
];

impl Gen<'_> {
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.rng.range(0, v.len() - 1)]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.rng.range(0, 99) < percent
    }

    fn flow(&mut self) -> Known {
        self.flows[self.rng.range(0, self.flows.len() - 1)].clone()
    }

    /// A known flow and the flags of a base segment on it: the flows opened completely get
    /// only data and ACKs (mutations may still close them), the others any [`FLAG_SETS`].
    fn flow_and_flags(&mut self) -> (Known, u8) {
        let k = self.flow();
        let flags = if k.stable {
            self.pick(&[ACK, PSH | ACK])
        } else {
            self.pick(&FLAG_SETS)
        };
        (k, flags)
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = if self.chance(50) {
            0
        } else {
            self.rng.range(1, 64)
        };
        self.rng.bytes(n)
    }

    fn next(&mut self) -> Result<Input> {
        let r = self.rng.range(0, 99);
        let mut input = if r < 50 {
            self.mutated()?
        } else if r < 90 {
            Input {
                source: Source::Random,
                side: Side::Client,
                frame: self.random_frame(),
            }
        } else {
            self.icmp()?
        };
        if self.chance(10) {
            input.side = input.side.other();
        }
        Ok(input)
    }

    fn mutated(&mut self) -> Result<Input> {
        let (source, side, mut f) = match self.rng.range(0, 2) {
            0 => {
                let port = if self.chance(5) {
                    self.flow().client_port
                } else {
                    self.rng.range(1024, 65535) as u16
                };
                let client = if self.chance(80) {
                    CLIENT
                } else {
                    Ipv4Addr::from(self.rng.next_u64() as u32)
                };
                let svc = self.pick(&[WRITE_PORT, READ_PORT]);
                let syn = TcpFrame::syn(CLIENT_MAC, CL0_MAC, sa(client, port), sa(VIP, svc))
                    .with_seq_ack(self.rng.next_u64() as u32, 0);
                (Source::MutatedSyn, Side::Client, syn.bytes()?)
            }
            1 => {
                let ((k, flags), p) = (self.flow_and_flags(), self.payload());
                let seg = k.client(flags, &p);
                (Source::MutatedForward, Side::Client, seg.bytes()?)
            }
            _ => {
                let ((k, flags), p) = (self.flow_and_flags(), self.payload());
                let seg = k.backend(flags, &p);
                (Source::MutatedReply, Side::Backends, seg.bytes()?)
            }
        };
        for _ in 0..self.rng.range(1, 3) {
            self.mutate(&mut f);
        }
        // As a sender would: the IP checksum mostly fits the (mutated) header, the TCP one
        // sometimes; then now and then one of them is wrong.
        if self.chance(75) {
            fix_ip_csum(&mut f);
        }
        if self.chance(50) {
            fix_tcp_csum(&mut f);
        }
        if self.chance(10) {
            let off = self.pick(&[24usize, 50]);
            if off + 1 < f.len() {
                f[off] ^= self.rng.range(1, 255) as u8;
            }
        }
        Ok(Input {
            source,
            side,
            frame: f,
        })
    }

    fn mutate(&mut self, f: &mut Vec<u8>) {
        let len = f.len();
        match self.rng.range(0, 10) {
            0 if len > 0 => {
                let i = self.rng.range(0, len - 1);
                f[i] ^= 1 << self.rng.range(0, 7);
            }
            1 if len > 0 => {
                let i = self.rng.range(0, len - 1);
                f[i] = self.rng.next_u64() as u8;
            }
            2 => f.truncate(self.rng.range(0, len)),
            3 => {
                let n = self.rng.range(1, 64);
                f.extend(self.rng.bytes(n));
            }
            4 if len > 14 => f[14] = (f[14] & 0xf0) | self.rng.range(0, 15) as u8,
            5 if len > 21 => {
                let v: u16 = match self.rng.range(0, 4) {
                    0 => 0x2000,
                    1 => 0x0000,
                    2 => self.rng.range(1, 0x1fff) as u16,
                    3 => 0x2000 | self.rng.range(1, 0x1fff) as u16,
                    _ => self.rng.next_u64() as u16,
                };
                f[20..22].copy_from_slice(&v.to_be_bytes());
            }
            6 if len > 22 => {
                let r = self.rng.next_u64() as u8;
                f[22] = self.pick(&[0, 1, 2, 255, r]);
            }
            7 if len > 23 => {
                let r = self.rng.next_u64() as u8;
                f[23] = self.pick(&[1, 17, 0, r]);
            }
            8 if len > 47 => {
                let r = self.rng.next_u64() as u8;
                f[47] = self.pick(&[SYN, SYN | ACK, ACK, RST, FIN, SYN | FIN, SYN | RST, 0, r]);
            }
            9 if len > 46 => f[46] = (f[46] & 0x0f) | ((self.rng.range(0, 15) as u8) << 4),
            10 if len > 17 => {
                let v: u16 = match self.rng.range(0, 3) {
                    0 => 0,
                    1 => (len - 14 + self.rng.range(1, 40)) as u16,
                    2 => (len - 14).saturating_sub(self.rng.range(1, 40)) as u16,
                    _ => self.rng.next_u64() as u16,
                };
                f[16..18].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }

    /// Random bytes, sometimes behind a plausible header (written only as far as it fits).
    fn random_frame(&mut self) -> Vec<u8> {
        let len = self.rng.range(0, 200);
        let mut f = self.rng.bytes(len);
        let put = |f: &mut Vec<u8>, off: usize, bytes: &[u8]| {
            for (i, b) in bytes.iter().enumerate() {
                if let Some(x) = f.get_mut(off + i) {
                    *x = *b;
                }
            }
        };
        match self.rng.range(0, 2) {
            0 => {}
            1 => {
                put(&mut f, 12, &[0x08, 0x00, 0x45]);
                let r = self.rng.next_u64() as u8;
                let proto = self.pick(&[6, 1, 17, r]);
                put(&mut f, 23, &[proto]);
            }
            _ => {
                put(&mut f, 12, &[0x08, 0x00]);
                let vihl = self.pick(&[0x45, 0x45, 0x45, 0x46, 0x4f, 0x44]);
                let frag: u16 = self.pick(&[0x4000, 0x4000, 0x0000, 0x2000, 0x0001]);
                put(&mut f, 14, &[vihl]);
                put(&mut f, 20, &frag.to_be_bytes());
                put(&mut f, 23, &[6]);
                let (src, dst, sport, dport) = if self.chance(50) {
                    let svc = self.pick(&[WRITE_PORT, READ_PORT]);
                    (CLIENT, VIP, self.rng.next_u64() as u16, svc)
                } else {
                    let k = self.flow();
                    let port = if self.chance(50) {
                        k.port
                    } else {
                        self.rng.range(SNAT_PORTS.0.into(), SNAT_PORTS.1.into()) as u16
                    };
                    (k.backend, SNAT_ADDR, BACKEND_PORT, port)
                };
                put(&mut f, 26, &src.octets());
                put(&mut f, 30, &dst.octets());
                let p = 14 + usize::from(vihl & 0x0f) * 4;
                put(&mut f, p, &sport.to_be_bytes());
                put(&mut f, p + 2, &dport.to_be_bytes());
                if self.chance(75) {
                    fix_ip_csum(&mut f);
                }
            }
        }
        f
    }

    /// An ICMP error about a forwarded packet (from the backend side) or a reply (from the
    /// client side), quoting a known flow's tuple or a random one.
    fn icmp(&mut self) -> Result<Input> {
        let k = self.flow();
        let about_forwarded = self.chance(50);
        let known = self.chance(50);
        let (src, dst) = if about_forwarded {
            let port = if known {
                k.port
            } else {
                self.rng.range(SNAT_PORTS.0.into(), SNAT_PORTS.1.into()) as u16
            };
            let backend = if known {
                k.backend
            } else {
                self.pick(&[DB01, DB02, DB03])
            };
            (sa(SNAT_ADDR, port), sa(backend, BACKEND_PORT))
        } else {
            let port = if known {
                k.client_port
            } else {
                self.rng.range(1024, 65535) as u16
            };
            let svc = if known {
                k.service_port
            } else {
                self.pick(&[WRITE_PORT, READ_PORT])
            };
            (sa(VIP, svc), sa(CLIENT, port))
        };
        let (src, dst) = if self.chance(15) {
            let r = |g: &mut Self| {
                sa(
                    Ipv4Addr::from(g.rng.next_u64() as u32),
                    g.rng.next_u64() as u16,
                )
            };
            (r(self), r(self))
        } else {
            (src, dst)
        };
        let quoted = TcpFrame::new([0; 6], [0; 6], src, dst)
            .with_flags(self.pick(&FLAG_SETS))
            .with_seq_ack(self.rng.next_u64() as u32, self.rng.next_u64() as u32)
            .with_payload(&{
                let n = self.rng.range(0, 16);
                self.rng.bytes(n)
            });
        let ip = quoted.ip_bytes()?;
        let quote_len = self.rng.range(28, ip.len());
        let (ty, code, rest) = self.pick(&[
            (3u8, 4u8, [0u8, 0, 0x05, 0x78]),
            (3, 1, [0; 4]),
            (11, 0, [0; 4]),
            (12, 0, [0; 4]),
        ]);
        let ttl = self.pick(&[64, 64, 64, 1, 2]);
        let (side, eth_src, eth_dst, from, to) = if about_forwarded {
            (Side::Backends, ROUTER_MAC, BK0_MAC, ROUTER, SNAT_ADDR)
        } else {
            let router = Ipv4Addr::new(198, 18, 0, 254);
            (Side::Client, [2, 0, 0, 0, 0, 0xfe], CL0_MAC, router, VIP)
        };
        let mut f = lb_tests::fixture::frames::icmp_error(
            eth_src,
            eth_dst,
            from,
            to,
            ttl,
            ty,
            code,
            rest,
            &ip[..quote_len],
        )?;
        if self.chance(15) {
            self.mutate(&mut f);
            if self.chance(50) {
                fix_ip_csum(&mut f);
            }
        }
        Ok(Input {
            source: Source::Icmp,
            side,
            frame: f,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Checking one output
// ---------------------------------------------------------------------------------------------

/// What happened to one input, as far as the accounting is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    /// Passed, not ours.
    PassOther,
    /// Passed, ours (TTL <= 1).
    PassTtl,
    Drop,
    /// A RST answered with XDP_TX.
    Rst,
    /// A translated frame (XDP_REDIRECT or XDP_TX).
    Translated,
}

/// The frame with bytes `ranges` removed, for comparing what must not change.
fn without(b: &[u8], ranges: &[(usize, usize)]) -> Vec<u8> {
    b.iter()
        .enumerate()
        .filter(|(i, _)| !ranges.iter().any(|(s, e)| (s..e).contains(&i)))
        .map(|(_, x)| *x)
        .collect()
}

/// Checks the program's answer to `input` against what the model allows for `class`.
fn check(input: &[u8], class: Class, side: Side, out: &Outcome) -> Result<Verdict, String> {
    match out.action {
        Action::Pass => {
            if out.frame != input {
                return Err("XDP_PASS changed the frame".into());
            }
            if !class.ours() {
                return Ok(Verdict::PassOther);
            }
            let may_pass = matches!(class, Class::Forward | Class::Reply | Class::IcmpError);
            if may_pass && input[22] <= 1 {
                Ok(Verdict::PassTtl)
            } else {
                Err(format!(
                    "XDP_PASS of a {class:?} frame with TTL {}",
                    input[22]
                ))
            }
        }
        Action::Drop if class.ours() => Ok(Verdict::Drop),
        Action::Tx | Action::Redirect => match class {
            Class::Forward | Class::Reply => {
                if out.frame.len() >= 34
                    && out.frame[26..30] == input[30..34]
                    && out.frame[30..34] == input[26..30]
                {
                    check_rst(input, out)?;
                    Ok(Verdict::Rst)
                } else {
                    check_translated_tcp(input, class, side, out)?;
                    Ok(Verdict::Translated)
                }
            }
            Class::IcmpError => {
                check_translated_icmp(input, out)?;
                Ok(Verdict::Translated)
            }
            _ => Err(format!("{:?} of a {class:?} frame", out.action)),
        },
        a => Err(format!("{a:?} of a {class:?} frame")),
    }
}

/// A RST must be exactly the RFC 9293 answer to the input (as `packet.rs` builds it), sent back
/// with XDP_TX, and never the answer to a RST.
fn check_rst(input: &[u8], out: &Outcome) -> Result<(), String> {
    if out.action != Action::Tx {
        return Err("a RST must leave with XDP_TX".into());
    }
    let flags = input[47];
    if flags & RST != 0 {
        return Err("a RST was answered with a RST".into());
    }
    let (seq, ack) = (be32(input, 38), be32(input, 42));
    let hdrs = 20 + u32::from(input[46] >> 4) * 4;
    let payload = u32::from(be16(input, 16)).saturating_sub(hdrs);
    let (seq, ack, out_flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        let len = payload + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        (0, seq.wrapping_add(len), RST | ACK)
    };
    let mac = |off: usize| -> [u8; 6] {
        let mut m = [0; 6];
        m.copy_from_slice(&input[off..off + 6]);
        m
    };
    let mut want = TcpFrame::new(
        mac(0),
        mac(6),
        sa(ip4(input, 30), be16(input, 36)),
        sa(ip4(input, 26), be16(input, 34)),
    )
    .with_flags(out_flags)
    .with_seq_ack(seq, ack);
    want.id = 0;
    want.window = 0;
    let want = want
        .bytes()
        .map_err(|e| format!("building the RST: {e:#}"))?;
    if out.frame != want {
        return Err(format!("wrong RST, want {}", hex(&want)));
    }
    Ok(())
}

/// Checksums of a translated frame: the IP header's always valid, the others valid when the
/// input's were.
fn check_csums(input: &[u8], out: &[u8]) -> Result<(), String> {
    if ip_csum_ok_at(out, 14) != Some(true) {
        return Err(format!(
            "invalid IP header checksum in the output (input's valid: {:?})",
            ip_csum_ok_at(input, 14)
        ));
    }
    if tcp_csum_ok(input) == Some(true) && tcp_csum_ok(out) != Some(true) {
        return Err("the input's TCP checksum was valid, the output's is not".into());
    }
    if icmp_csum_ok(input) == Some(true) && icmp_csum_ok(out) != Some(true) {
        return Err("the input's ICMP checksum was valid, the output's is not".into());
    }
    Ok(())
}

fn check_translated_tcp(
    input: &[u8],
    class: Class,
    side: Side,
    out: &Outcome,
) -> Result<(), String> {
    let o = &out.frame;
    if o.len() != input.len() {
        return Err("a translated frame changed length".into());
    }
    if input[22] < 2 || o[22] != input[22] - 1 {
        return Err(format!("TTL {} -> {}", input[22], o[22]));
    }
    // eth, TTL, IP check, addresses, ports, TCP check.
    let nat = [(0, 12), (22, 23), (24, 34), (34, 38), (50, 52)];
    if without(o, &nat) != without(input, &nat) {
        return Err("a translated frame changed more than the NAT fields".into());
    }
    check_csums(input, o)?;
    let (saddr, daddr, sport, dport) = (ip4(o, 26), ip4(o, 30), be16(o, 34), be16(o, 36));
    match class {
        Class::Forward => {
            let backends: &[Ipv4Addr] = if be16(input, 36) == WRITE_PORT {
                &[DB01]
            } else {
                &[DB02, DB03]
            };
            if saddr != SNAT_ADDR
                || !in_snat_range(sport)
                || !backends.contains(&daddr)
                || dport != BACKEND_PORT
            {
                return Err(format!(
                    "forwarded as {saddr}:{sport} -> {daddr}:{dport}, not SNAT -> a backend of the service"
                ));
            }
            if o[0..6] != mac_of(daddr) || o[6..12] != BK0_MAC {
                return Err("forwarded with wrong MACs".into());
            }
            // The forward mapping always leaves through bk0.
            let want = if side == Side::Backends {
                Action::Tx
            } else {
                Action::Redirect
            };
            if out.action != want {
                return Err(format!("forwarded with {:?}, want {want:?}", out.action));
            }
        }
        _ => {
            if saddr != VIP || (sport != WRITE_PORT && sport != READ_PORT) {
                return Err(format!(
                    "reply translated from {saddr}:{sport}, not a VIP:port"
                ));
            }
        }
    }
    Ok(())
}

fn check_translated_icmp(input: &[u8], out: &Outcome) -> Result<(), String> {
    let o = &out.frame;
    if o.len() != input.len() {
        return Err("a translated ICMP error changed length".into());
    }
    if input[22] < 2 || o[22] != input[22] - 1 {
        return Err(format!("TTL {} -> {}", input[22], o[22]));
    }
    // eth, TTL, IP check, outer daddr, ICMP check, quoted IP check + addresses, quoted ports,
    // quoted TCP check.
    let nat = [
        (0, 12),
        (22, 23),
        (24, 26),
        (30, 34),
        (36, 38),
        (52, 54),
        (54, 62),
        (62, 66),
        (78, 80),
    ];
    if without(o, &nat) != without(input, &nat) {
        return Err("a translated ICMP error changed more than the NAT fields".into());
    }
    check_csums(input, o)?;
    if ip_csum_ok_at(input, 42) == Some(true) && ip_csum_ok_at(o, 42) != Some(true) {
        return Err("the quoted IP checksum was valid, the translated one is not".into());
    }
    // The error goes to whoever sent the quoted packet.
    if o[30..34] != o[54..58] {
        return Err("the translated error is not addressed to the quoted packet's source".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v}: {e}")))
}

struct Failure {
    index: usize,
    source: Source,
    class: Class,
    side: Side,
    why: String,
    input: Vec<u8>,
    output: Outcome,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "frame #{} ({:?}, class {:?}, from {:?}): {}",
            self.index, self.source, self.class, self.side, self.why
        )?;
        writeln!(f, "  input:  {}", hex(&self.input))?;
        writeln!(
            f,
            "  output: {:?} {}",
            self.output.action,
            hex(&self.output.frame)
        )
    }
}

/// Every forward entry of `table` has its reply entry in the same table, pointing back.
fn unpaired(name: &str, table: &[(FlowKey, Flow)]) -> Vec<String> {
    let map: std::collections::HashMap<FlowKey, Flow> = table.iter().copied().collect();
    let mut bad = Vec::new();
    for (k, f) in table.iter().filter(|(_, f)| f.dir == DIR_FORWARD) {
        let pk = f.partner_key(lb_common::IPPROTO_TCP);
        match map.get(&pk) {
            Some(p) if p.points_back_to(k) && p.dir == DIR_REPLY => {}
            Some(p) => bad.push(format!(
                "{name}: {:?} -> {:?}: partner {:?} points to {:?}",
                key_tuple(k),
                nat_tuple(f),
                key_tuple(&pk),
                nat_tuple(p)
            )),
            None => bad.push(format!(
                "{name}: {:?} -> {:?}: no partner {:?}",
                key_tuple(k),
                nat_tuple(f),
                key_tuple(&pk)
            )),
        }
    }
    bad
}

/// Checks the pairing of both tables after `index` frames, adding complaints to `bad`; returns
/// `(index, forward entries in CT_EMBRYONIC, forward entries in CT_ESTABLISHED)`.
fn pairing(fx: &Fixture, index: usize, bad: &mut Vec<String>) -> Result<(usize, usize, usize)> {
    let (embryonic, established) = (fx.embryonic()?, fx.established()?);
    for b in unpaired("embryonic", &embryonic)
        .into_iter()
        .chain(unpaired("established", &established))
    {
        bad.push(format!("after frame {index}: {b}"));
    }
    let forward = |t: &[(FlowKey, Flow)]| t.iter().filter(|(_, f)| f.dir == DIR_FORWARD).count();
    Ok((index, forward(&embryonic), forward(&established)))
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn fuzzed_frames_get_only_the_actions_the_model_allows() -> Result<()> {
    // Every counter is either a per-frame outcome or an event (a new counter must be placed).
    for i in 0..COUNTER_MAX {
        let is = |set: &[Counter]| set.iter().any(|c| *c as u32 == i);
        assert!(
            is(OUTCOMES) ^ is(EVENTS),
            "counter {} must be exactly one of OUTCOMES and EVENTS",
            COUNTER_NAMES[i as usize]
        );
    }
    let seed = env_number("LB_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let frames = env_number("LB_FUZZ_FRAMES").map_or(DEFAULT_FRAMES, |n| n as usize);
    eprintln!("fuzz: seed {seed:#x}, {frames} frames (LB_FUZZ_SEED, LB_FUZZ_FRAMES)");
    // RSTs unlimited enough to see them (the limit is per second), and a handshake table with a
    // slot for every frame: ports refused for a full table are not what this test looks for.
    let embryonic = frames.next_power_of_two().max(65_536);
    let config = format!("rst_per_sec = 10000000\n{CONFIG}\n[tables]\nembryonic = {embryonic}\n");

    Fixture::run_with_config("fuzz", &config, |fx| {
        pin_to_one_cpu()?;
        let mut flows = Vec::new();
        for (i, svc) in [
            WRITE_PORT, READ_PORT, WRITE_PORT, READ_PORT, WRITE_PORT, READ_PORT,
        ]
        .into_iter()
        .enumerate()
        {
            flows.push(open(fx, 41000 + i as u16, svc, 3)?);
        }
        // Handshakes in progress, which fuzzed SYN-ACKs and ACKs move on (promotions into the
        // established table during the fuzz).
        for (i, (svc, steps)) in [
            (WRITE_PORT, 1),
            (READ_PORT, 1),
            (WRITE_PORT, 1),
            (WRITE_PORT, 2),
            (READ_PORT, 2),
            (READ_PORT, 2),
        ]
        .into_iter()
        .enumerate()
        {
            flows.push(open(fx, 42000 + i as u16, svc, steps)?);
        }

        let mut gen = Gen {
            rng: XorShift::new(seed),
            flows: &flows,
        };
        let before = fx.counters()?;
        let mut tally: BTreeMap<(Class, Verdict), u64> = BTreeMap::new();
        let mut sources: BTreeMap<Source, u64> = BTreeMap::new();
        let mut translated: BTreeMap<Class, u64> = BTreeMap::new();
        let (mut skipped, mut ours, mut ran) = (0u64, 0u64, 0u64);
        // Each distinct complaint with its count and first frame.
        let mut failures: BTreeMap<String, (u64, Failure)> = BTreeMap::new();
        let started = Instant::now();
        // The pairing of the tables, checked every tenth of the run and at the end: flows come
        // and go (FINs, RSTs and SYNs on closed tuples), the end alone would see few of them.
        let check_every = (frames / 10).max(1);
        let mut checks = Vec::new();
        let mut bad_pairs: Vec<String> = Vec::new();
        for index in 0..frames {
            if index > 0 && index % check_every == 0 {
                checks.push(pairing(fx, index, &mut bad_pairs)?);
            }
            let input = gen.next()?;
            *sources.entry(input.source).or_default() += 1;
            if input.frame.len() < 14 {
                skipped += 1;
                continue;
            }
            let class = classify(&input.frame);
            let ifindex = match input.side {
                Side::Client => fx.cl0.ifindex,
                Side::Backends => fx.bk0.ifindex,
            };
            let out = fx.test_run(&input.frame, ifindex)?;
            ran += 1;
            ours += u64::from(class.ours());
            match check(&input.frame, class, input.side, &out) {
                Ok(v) => {
                    *tally.entry((class, v)).or_default() += 1;
                    if v == Verdict::Translated {
                        *translated.entry(class).or_default() += 1;
                    }
                }
                Err(why) => {
                    let first = Failure {
                        index,
                        source: input.source,
                        class,
                        side: input.side,
                        why: why.clone(),
                        input: input.frame,
                        output: out,
                    };
                    failures.entry(why).or_insert((0, first)).0 += 1;
                }
            }
        }
        let elapsed = started.elapsed();
        let after = fx.counters()?;
        let d = |c: Counter| after.get(c).wrapping_sub(before.get(c));
        let sum = |set: &[Counter]| set.iter().map(|c| d(*c)).sum::<u64>();
        let verdicts = |v: Verdict| -> u64 {
            tally
                .iter()
                .filter(|((c, x), _)| *x == v && c.ours())
                .map(|(_, n)| n)
                .sum()
        };
        let classed = |c: Class| -> u64 {
            tally
                .iter()
                .filter(|((x, _), _)| *x == c)
                .map(|(_, n)| n)
                .sum()
        };

        eprintln!(
            "fuzz: {ran} frames run in {elapsed:.2?} ({skipped} shorter than 14 bytes skipped), \
             {ours} ours; sources {sources:?}"
        );
        for ((c, v), n) in &tally {
            eprintln!("  {c:?} / {v:?}: {n}");
        }
        eprintln!("  counters: {:?}", after.changes_since(&before));

        assert!(
            failures.is_empty(),
            "seed {seed:#x}: {} frames broke the model; each complaint with its first frame:\n{}",
            failures.values().map(|(n, _)| n).sum::<u64>(),
            failures
                .values()
                .map(|(n, f)| format!("{n} x {f}"))
                .collect::<String>()
        );

        // The accounting (see the module documentation).
        let ctx = format!(
            "seed {seed:#x}; counters {:?}",
            after.changes_since(&before)
        );
        assert_eq!(sum(OUTCOMES), ours, "outcomes == frames ours; {ctx}");
        assert_eq!(
            d(Counter::FwdPackets),
            translated.get(&Class::Forward).copied().unwrap_or(0),
            "fwd_packets == forwarded frames; {ctx}"
        );
        assert_eq!(
            d(Counter::ReplyPackets),
            translated.get(&Class::Reply).copied().unwrap_or(0),
            "reply_packets == translated replies; {ctx}"
        );
        assert_eq!(
            d(Counter::IcmpTranslated),
            translated.get(&Class::IcmpError).copied().unwrap_or(0),
            "icmp_translated == translated ICMP errors; {ctx}"
        );
        assert_eq!(
            d(Counter::PassTtl),
            verdicts(Verdict::PassTtl),
            "pass_ttl; {ctx}"
        );
        assert_eq!(
            d(Counter::RstSent),
            verdicts(Verdict::Rst),
            "rst_sent; {ctx}"
        );
        assert_eq!(
            sum(RST_REASONS),
            verdicts(Verdict::Rst),
            "RST reasons; {ctx}"
        );
        assert_eq!(sum(DROP_OUTCOMES), verdicts(Verdict::Drop), "drops; {ctx}");
        assert_eq!(
            d(Counter::DropIpOptions),
            classed(Class::IpOptions),
            "drop_ip_options; {ctx}"
        );
        assert_eq!(
            d(Counter::DropFragment),
            classed(Class::Fragment),
            "drop_fragment; {ctx}"
        );
        assert_eq!(
            d(Counter::DropMalformed),
            classed(Class::Truncated) + classed(Class::BadChecksum),
            "drop_malformed; {ctx}"
        );
        assert_eq!(d(Counter::DropNoEgress), 0, "drop_no_egress; {ctx}");
        // The fixture is not one of a pair: every frame is judged as addressed here.
        assert_eq!(d(Counter::PassOtherHost), 0, "pass_other_host; {ctx}");

        // Every forward entry has its reverse, at the end as during the run.
        checks.push(pairing(fx, frames, &mut bad_pairs)?);
        eprintln!("fuzz: forward entries at the pairing checks (frame, embryonic, established): {checks:?}");
        assert!(
            bad_pairs.is_empty(),
            "seed {seed:#x}: {} forward entries without their reverse (the first 20):\n{}",
            bad_pairs.len(),
            bad_pairs
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(())
    })
}
