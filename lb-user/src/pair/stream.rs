//! The stream between the two agents of a pair: one TCP connection each way, each carrying the
//! flows of the node that opens it. A node's sender connects to the peer's `listen` address,
//! sends a snapshot of its established flows, then every message its [`Feed`](super::feed)
//! queues, and a ping each second it has nothing else; it reconnects (and sends a new snapshot)
//! whenever the connection breaks. A node's receiver accepts its peer's connection and applies
//! what arrives to its own tables. Neither side needs to know which node is active: a standby
//! establishes no flows and sends nothing but its snapshot (of flows it received, which the
//! peer already has and so leaves alone), and after a takeover the roles of the two streams
//! swap by themselves. Two threads (blocking sockets), apart from the agent's event loop.
//!
//! Each connection begins with a mutual proof of the pair's shared secret (`[pair]
//! secret_file`): the sender's hello carries a nonce, the receiver answers with its own nonce
//! and an HMAC-SHA256 over both, the sender proves itself the same way; a side that finds a
//! wrong proof drops the connection before any flow moves. (Without a secret both sides use an
//! empty key: anyone who reaches the port can then install flows.) The messages after it are
//! not signed one by one: keep the stream on the pair's own link.
//!
//! Frames: a type byte, a big-endian u16 length, the payload.
use std::{
    collections::HashSet,
    io::{BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::FlowKey;
use serde::Serialize;
use tracing::{error, info, warn};

use super::{
    feed::{Batch, Outgoing},
    wire::FLOW_LEN,
    SyncedFlow,
};

/// The first bytes of every connection: the protocol and its version.
pub const MAGIC: &[u8; 8] = b"lb-pair1";

const T_HELLO: u8 = 1;
const T_NEW: u8 = 2;
const T_UPDATE: u8 = 3;
const T_END: u8 = 4;
const T_SNAPSHOT_DONE: u8 = 5;
const T_PING: u8 = 6;
const T_CHALLENGE: u8 = 7;
const T_PROOF: u8 = 8;
const T_SNAPSHOT_BEGIN: u8 = 9;

/// Bytes of a nonce and of a proof (HMAC-SHA256).
pub const NONCE: usize = 16;
pub const PROOF: usize = 32;

/// The pair's shared secret (never printed).
#[derive(Clone, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    fn mac(&self, parts: &[&[u8]]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        for p in parts {
            mac.update(p);
        }
        mac
    }

    /// HMAC-SHA256 of `parts` under the secret.
    fn proof(&self, parts: &[&[u8]]) -> [u8; PROOF] {
        use hmac::Mac;
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Whether `proof` is this secret's over `parts` (compared in constant time).
    fn verify(&self, parts: &[&[u8]], proof: &[u8; PROOF]) -> bool {
        use hmac::Mac;
        self.mac(parts).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// A fresh random nonce.
fn nonce() -> Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .context("reading /dev/urandom")?;
    Ok(n)
}

/// What the receiver's proof covers, and the sender's.
const BY_RECEIVER: &[u8] = b"lb-pair1 receiver";
const BY_SENDER: &[u8] = b"lb-pair1 sender";

/// A sender with nothing to send pings this often; a receiver that hears nothing for
/// [`SILENCE`] drops the connection.
pub const PING_EVERY: Duration = Duration::from_secs(1);
pub const SILENCE: Duration = Duration::from_secs(4);

/// One message on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// The sender's first message: the protocol, and its nonce.
    Hello([u8; NONCE]),
    /// The receiver's answer: its nonce, and its proof of the secret over both nonces.
    Challenge([u8; NONCE], [u8; PROOF]),
    /// The sender's proof of the secret over both nonces.
    Proof([u8; PROOF]),
    /// A snapshot follows; `active`: the sender holds the VIPs, so its flows are the truth (a
    /// standby receiving it makes its tables the snapshot: see [`receive_loop`]).
    SnapshotBegin {
        active: bool,
    },
    New(SyncedFlow),
    Update(SyncedFlow),
    /// The flow with this forward key (client -> VIP) ended.
    End {
        client: SocketAddrV4,
        vip: SocketAddrV4,
    },
    /// The snapshot that began the connection is complete: this many flows.
    SnapshotDone(u64),
    Ping,
}

/// A forward key as (client, VIP).
pub fn tuple_of(k: &FlowKey) -> (SocketAddrV4, SocketAddrV4) {
    (
        super::addr_of(k.saddr, k.sport),
        super::addr_of(k.daddr, k.dport),
    )
}

impl From<Outgoing> for Msg {
    fn from(o: Outgoing) -> Msg {
        match o {
            Outgoing::New(f) => Msg::New(f),
            Outgoing::Update(f) => Msg::Update(f),
            Outgoing::End(k) => {
                let (client, vip) = tuple_of(&k);
                Msg::End { client, vip }
            }
        }
    }
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddrV4) {
    out.extend_from_slice(&a.ip().octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

impl Msg {
    /// Appends the message's frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let t = match self {
            Msg::Hello(n) => {
                out.extend_from_slice(MAGIC);
                out.extend_from_slice(n);
                T_HELLO
            }
            Msg::Challenge(n, p) => {
                out.extend_from_slice(n);
                out.extend_from_slice(p);
                T_CHALLENGE
            }
            Msg::Proof(p) => {
                out.extend_from_slice(p);
                T_PROOF
            }
            Msg::SnapshotBegin { active } => {
                out.push(*active as u8);
                T_SNAPSHOT_BEGIN
            }
            Msg::New(f) => {
                f.encode(out);
                T_NEW
            }
            Msg::Update(f) => {
                f.encode(out);
                T_UPDATE
            }
            Msg::End { client, vip } => {
                put_addr(out, *client);
                put_addr(out, *vip);
                T_END
            }
            Msg::SnapshotDone(n) => {
                out.extend_from_slice(&n.to_be_bytes());
                T_SNAPSHOT_DONE
            }
            Msg::Ping => T_PING,
        };
        let len = (out.len() - start - 3) as u16;
        out[start] = t;
        out[start + 1..start + 3].copy_from_slice(&len.to_be_bytes());
    }

    /// Reads one message.
    pub fn read(r: &mut impl Read) -> Result<Msg> {
        let mut head = [0u8; 3];
        r.read_exact(&mut head)?;
        let len = u16::from_be_bytes([head[1], head[2]]) as usize;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let want = |n: usize| -> Result<()> {
            if len != n {
                bail!("message type {} of {len} bytes (expected {n})", head[0]);
            }
            Ok(())
        };
        Ok(match head[0] {
            T_HELLO => {
                if len != MAGIC.len() + NONCE || &body[..MAGIC.len()] != MAGIC {
                    bail!(
                        "the peer does not speak this pair protocol: another lb version, or not lb"
                    );
                }
                Msg::Hello(body[MAGIC.len()..].try_into()?)
            }
            T_CHALLENGE => {
                want(NONCE + PROOF)?;
                Msg::Challenge(body[..NONCE].try_into()?, body[NONCE..].try_into()?)
            }
            T_PROOF => {
                want(PROOF)?;
                Msg::Proof(body[..].try_into()?)
            }
            T_SNAPSHOT_BEGIN => {
                want(1)?;
                Msg::SnapshotBegin {
                    active: body[0] != 0,
                }
            }
            T_NEW => Msg::New(SyncedFlow::decode(&body)?),
            T_UPDATE => Msg::Update(SyncedFlow::decode(&body)?),
            T_END => {
                want(12)?;
                Msg::End {
                    client: get_addr(&body[..6]),
                    vip: get_addr(&body[6..]),
                }
            }
            T_SNAPSHOT_DONE => {
                want(8)?;
                Msg::SnapshotDone(u64::from_be_bytes(body[..8].try_into()?))
            }
            T_PING => {
                want(0)?;
                Msg::Ping
            }
            other => bail!("unknown message type {other}: the peer runs another lb version"),
        })
    }
}

const _: () = assert!(FLOW_LEN < u16::MAX as usize);

/// What the pair's two streams are doing, for `lb status`, the dashboard and `lb health`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PairStatus {
    pub peer: String,
    pub listen: String,
    /// This node's flows to the peer.
    pub sending: bool,
    pub flows_sent: u64,
    pub snapshots_sent: u64,
    /// The peer's flows to this node: connected, and its snapshot received on this connection.
    pub receiving: bool,
    pub synced: bool,
    pub flows_received: u64,
    pub ends_received: u64,
    /// Flows not installed: already present (a `New` this node has), or refused (an unknown
    /// service or backend, a full table).
    pub flows_present: u64,
    pub install_errors: u64,
    /// Flows deleted because the active peer's snapshot did not have them.
    pub purged: u64,
    /// How long new flows took from their handshake on the peer to this node's tables
    /// (wall clocks; the live stream only, not snapshots), in µs: median, 99th percentile,
    /// worst, and how many were measured.
    pub lag_p50_us: Option<u64>,
    pub lag_p99_us: Option<u64>,
    pub lag_max_us: u64,
    pub lag_count: u64,
    #[serde(skip)]
    pub lag: Lag,
    /// Flows the peer established while this node held the VIPs too (both serve: split
    /// brain), and when the last came (seconds since the Unix epoch).
    pub split_brain_flows: u64,
    pub split_brain_at: Option<u64>,
    pub last_snapshot_flows: u64,
    /// Seconds since the Unix epoch.
    pub last_snapshot_at: Option<u64>,
    pub last_error: Option<String>,
    /// "active" while this node holds a VIP address (keepalived put it there), else
    /// "standby".
    pub role: String,
    /// The VRRP state keepalived last notified (`lb pair notify`), and since when (seconds
    /// since the Unix epoch).
    pub vrrp_state: Option<String>,
    pub vrrp_since: Option<u64>,
    /// Whether this node may take the VIPs over now, and why (see [`eligibility`]).
    pub eligible: bool,
    pub why: String,
    /// When the status was written (ms since the Unix epoch), for readers to tell a stale
    /// file from a live one.
    pub written_at_ms: u64,
}

/// How long after its start a node with no stream either way (its peer down or unreachable)
/// waits before it says it may serve alone.
pub const ALONE_AFTER: Duration = Duration::from_secs(5);

/// Whether a node with streams `s`, up for `up`, may take the VIPs over: only with the peer's
/// flows (its snapshot received on the live stream), or alone when the peer is unreachable
/// both ways (then nobody has flows to give it). A peer reachable but not streaming to this
/// node, or in the middle of its snapshot, makes it wait: a takeover then would reset the
/// flows it lacks.
pub fn eligibility(s: &PairStatus, up: Duration) -> (bool, String) {
    if s.synced {
        return (
            true,
            format!(
                "synced: the peer's snapshot ({} flows) is in, its flows follow",
                s.last_snapshot_flows
            ),
        );
    }
    if s.receiving {
        return (false, "unsynced: receiving the peer's snapshot".into());
    }
    if s.sending {
        return (
            false,
            "unsynced: the peer is reachable but streams nothing to this node (check its [pair] peer)"
                .into(),
        );
    }
    if up < ALONE_AFTER {
        return (
            false,
            format!("starting: waiting up to {ALONE_AFTER:?} for the peer"),
        );
    }
    (true, "alone: the peer is unreachable both ways".into())
}

/// A histogram of sync lags: eight buckets per power of two of microseconds (within 12.5 %).
#[derive(Debug, Clone, Default)]
pub struct Lag {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

impl Lag {
    fn index(us: u64) -> usize {
        if us < 8 {
            return us as usize;
        }
        let octave = 63 - us.leading_zeros() as usize;
        (octave - 2) * 8 + ((us >> (octave - 3)) & 7) as usize
    }

    /// The largest value of bucket `i`, µs.
    fn upper(i: usize) -> u64 {
        if i < 8 {
            return i as u64;
        }
        let (octave, sub) = (i / 8 + 2, (i % 8) as u64);
        ((8 + sub + 1) << (octave - 3)) - 1
    }

    pub fn record(&mut self, us: u64) {
        let i = Self::index(us);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, 0);
        }
        self.buckets[i] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The `q` quantile (0..=1), µs: the top of its bucket, at most the largest value seen.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Self::upper(i).min(self.max_us));
            }
        }
        Some(self.max_us)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }
}

/// Shared status of both streams.
pub type Status = Arc<Mutex<PairStatus>>;

fn with(status: &Status, f: impl FnOnce(&mut PairStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

fn with_value<T: Default>(status: &Status, f: impl FnOnce(&mut PairStatus) -> T) -> T {
    status.lock().map(|mut s| f(&mut s)).unwrap_or_default()
}

/// This node's flows, for the snapshot a new connection begins with.
pub trait Source: Send {
    fn snapshot(&mut self) -> Result<Vec<SyncedFlow>>;
    /// Whether this node holds the VIPs now (its flows are the truth).
    fn active(&self) -> bool;
}

/// Where the peer's flows go.
pub trait Sink: Send {
    /// Installs `f`; with `replace` over what the tables hold, else only where they hold
    /// nothing. Ok(false): not installed, the tables hold the flow already.
    fn install(&mut self, f: &SyncedFlow, replace: bool) -> Result<bool>;
    /// Deletes the flow from `client` to `vip`, if the tables hold it.
    fn end(&mut self, client: SocketAddrV4, vip: SocketAddrV4) -> Result<()>;
    /// Applies `ops` in order: the outcome of each, in the same order (an install's as
    /// [`Sink::install`] gives it, an end's `Ok(true)`). One op at a time unless the tables
    /// know better.
    fn apply(&mut self, ops: &[Op]) -> Vec<Result<bool>> {
        one_by_one(self, ops)
    }
    /// Whether this node holds the VIPs now.
    fn active(&self) -> bool;
    /// Deletes every established flow but those of `keep` (forward tuples); how many went.
    fn purge_except(&mut self, keep: &HashSet<(SocketAddrV4, SocketAddrV4)>) -> Result<u64>;
}

/// One change the peer sent for this node's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Install the flow: over what the tables hold with `replace`, else only where they
    /// hold nothing.
    Install { flow: SyncedFlow, replace: bool },
    /// Delete the flow from `client` to `vip`.
    End {
        client: SocketAddrV4,
        vip: SocketAddrV4,
    },
}

/// [`Sink::apply`] one op at a time, through [`Sink::install`] and [`Sink::end`].
pub fn one_by_one<S: Sink + ?Sized>(sink: &mut S, ops: &[Op]) -> Vec<Result<bool>> {
    ops.iter()
        .map(|op| match *op {
            Op::Install { flow, replace } => sink.install(&flow, replace),
            Op::End { client, vip } => sink.end(client, vip).map(|()| true),
        })
        .collect()
}

/// Ops applied at once at most: what one read of the stream brought, up to this.
const APPLY_AT_MOST: usize = 1024;

/// Sleeps `d` unless `stop` is set first (checked every 100 ms).
fn nap(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
}

/// The sender: this node's flows to `peer`, until `stop`.
pub fn send_loop(
    peer: SocketAddrV4,
    secret: Secret,
    mut source: impl Source,
    rx: Receiver<Batch>,
    status: Status,
    stop: Arc<AtomicBool>,
) {
    let mut logged_down = false;
    while !stop.load(Ordering::Relaxed) {
        let stream = match TcpStream::connect_timeout(&SocketAddr::V4(peer), Duration::from_secs(1))
        {
            Ok(s) => s,
            Err(e) => {
                if !logged_down {
                    warn!(%peer, "pair: cannot reach the peer's agent ({e}); retrying every second");
                    logged_down = true;
                }
                with(&status, |s| {
                    s.sending = false;
                    s.last_error = Some(format!("connect to {peer}: {e}"));
                });
                // What was queued meanwhile is in the next snapshot.
                while rx.try_recv().is_ok() {}
                nap(&stop, Duration::from_secs(1));
                continue;
            }
        };
        logged_down = false;
        match send_on(stream, &secret, &mut source, &rx, &status, &stop) {
            Ok(()) => return,
            Err(e) => {
                warn!(%peer, "pair: the stream to the peer broke: {e:#}");
                with(&status, |s| {
                    s.sending = false;
                    s.last_error = Some(format!("stream to {peer}: {e:#}"));
                });
                nap(&stop, Duration::from_millis(200));
            }
        }
    }
}

/// One connection's life: hello, snapshot, then the queue. Ok when the agent stops.
fn send_on(
    mut stream: TcpStream,
    secret: &Secret,
    source: &mut impl Source,
    rx: &Receiver<Batch>,
    status: &Status,
    stop: &AtomicBool,
) -> Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(SILENCE))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mine = nonce()?;
    Msg::Hello(mine).encode(&mut buf);
    stream.write_all(&buf)?;
    buf.clear();
    stream.set_read_timeout(Some(SILENCE))?;
    let theirs = match Msg::read(&mut stream)? {
        Msg::Challenge(theirs, proof) => {
            if !secret.verify(&[BY_RECEIVER, &mine, &theirs], &proof) {
                bail!("the peer does not know this pair's secret (secret_file differs, or one side has none)");
            }
            theirs
        }
        other => bail!("expected the peer's challenge, got {other:?}"),
    };
    Msg::Proof(secret.proof(&[BY_SENDER, &theirs, &mine])).encode(&mut buf);
    Msg::SnapshotBegin {
        active: source.active(),
    }
    .encode(&mut buf);
    let flows = source.snapshot().context("reading this node's flows")?;
    for f in &flows {
        Msg::New(*f).encode(&mut buf);
        if buf.len() > 60 * 1024 {
            stream.write_all(&buf)?;
            buf.clear();
        }
    }
    Msg::SnapshotDone(flows.len() as u64).encode(&mut buf);
    stream.write_all(&buf)?;
    buf.clear();
    info!(
        flows = flows.len(),
        "pair: connected to the peer, snapshot sent"
    );
    with(status, |s| {
        s.sending = true;
        s.snapshots_sent += 1;
        s.flows_sent += flows.len() as u64;
    });
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_timeout(PING_EVERY) {
            Ok(first) => {
                let mut n = 0u64;
                let mut batch = Some(first);
                // Whatever else is queued goes in the same write.
                while let Some(b) = batch {
                    for o in b {
                        if matches!(o, Outgoing::New(_) | Outgoing::Update(_)) {
                            n += 1;
                        }
                        Msg::from(o).encode(&mut buf);
                    }
                    batch = if buf.len() < 60 * 1024 {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                stream.write_all(&buf)?;
                buf.clear();
                with(status, |s| s.flows_sent += n);
            }
            Err(RecvTimeoutError::Timeout) => {
                Msg::Ping.encode(&mut buf);
                stream.write_all(&buf)?;
                buf.clear();
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
    Ok(())
}

/// The receiver: the peer's flows, accepted on `listener`, into `sink`, until `stop`.
pub fn receive_loop(
    listener: TcpListener,
    secret: Secret,
    mut sink: impl Sink,
    status: Status,
    stop: Arc<AtomicBool>,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        warn!("pair: {e}");
    }
    while !stop.load(Ordering::Relaxed) {
        let (stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                warn!("pair: accept: {e}");
                nap(&stop, Duration::from_secs(1));
                continue;
            }
        };
        info!(%from, "pair: the peer connected");
        let r = receive_on(stream, &secret, &mut sink, &status, &stop);
        with(&status, |s| {
            s.receiving = false;
            s.synced = false;
            if let Err(e) = &r {
                s.last_error = Some(format!("stream from {from}: {e:#}"));
            }
        });
        match r {
            Ok(()) => info!(%from, "pair: the peer closed its stream"),
            Err(e) => warn!(%from, "pair: the stream from the peer broke: {e:#}"),
        }
    }
}

fn receive_on(
    stream: TcpStream,
    secret: &Secret,
    sink: &mut impl Sink,
    status: &Status,
    stop: &AtomicBool,
) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SILENCE))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let theirs = match Msg::read(&mut r)? {
        Msg::Hello(n) => n,
        other => bail!("expected a hello, got {other:?}"),
    };
    let mine = nonce()?;
    let mut buf = Vec::new();
    Msg::Challenge(mine, secret.proof(&[BY_RECEIVER, &theirs, &mine])).encode(&mut buf);
    w.write_all(&buf)?;
    match Msg::read(&mut r)? {
        Msg::Proof(p) if secret.verify(&[BY_SENDER, &mine, &theirs], &p) => {}
        Msg::Proof(_) => bail!(
            "the peer does not know this pair's secret (secret_file differs, or one side has none): nothing installed"
        ),
        other => bail!("expected the peer's proof, got {other:?}"),
    }
    with(status, |s| s.receiving = true);
    // A snapshot from the node holding the VIPs, received by one that does not: its flows
    // replace this node's, and what this node has beyond them (flows that ended while it was
    // away: a returning node's leftovers) goes at the snapshot's end.
    let mut mirror: Option<HashSet<(SocketAddrV4, SocketAddrV4)>> = None;
    let mut in_snapshot = false;
    // What the stream brought and is not applied yet: applied together when nothing more
    // is buffered (one batch of table writes per read, not one syscall per entry).
    let mut pending = Pending::default();
    while !stop.load(Ordering::Relaxed) {
        if !pending.ops.is_empty() && (r.buffer().is_empty() || pending.ops.len() >= APPLY_AT_MOST)
        {
            pending.apply(sink, status);
        }
        let m = match Msg::read(&mut r) {
            Ok(m) => m,
            Err(e) => {
                pending.apply(sink, status);
                let kind = e.downcast_ref::<std::io::Error>().map(|io| io.kind());
                return match kind {
                    Some(ErrorKind::UnexpectedEof) => Ok(()),
                    Some(ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        bail!(
                            "the peer sent nothing for {SILENCE:?} (it pings every {PING_EVERY:?})"
                        )
                    }
                    _ => Err(e),
                };
            }
        };
        match m {
            Msg::SnapshotBegin { active } => {
                pending.apply(sink, status);
                in_snapshot = true;
                mirror = (active && !sink.active()).then(HashSet::new);
            }
            Msg::New(f) | Msg::Update(f) => {
                let live_new = !in_snapshot && matches!(m, Msg::New(_));
                if live_new && sink.active() {
                    // The peer opens flows while this node holds the VIPs: both serve. Both keep
                    // every flow either knows; the operator must end it.
                    let first = with_value(status, |s| {
                        s.split_brain_flows += 1;
                        let now = super::unix_now_ns() / 1_000_000_000;
                        let quiet = s.split_brain_at.is_none_or(|t| now >= t + 10);
                        s.split_brain_at = Some(now);
                        quiet
                    });
                    if first {
                        error!(
                            client = %f.client,
                            "pair: SPLIT BRAIN: the peer opens flows while this host holds the VIPs too; \
                             both keep forwarding every flow either knows (check keepalived and the link between the hosts)"
                        );
                    }
                }
                let replace = matches!(m, Msg::Update(_)) || (in_snapshot && mirror.is_some());
                if in_snapshot {
                    if let Some(keep) = &mut mirror {
                        keep.insert((f.client, f.vip));
                    }
                }
                pending.ops.push(Op::Install { flow: f, replace });
                pending
                    .lag_from
                    .push(live_new.then_some(f.last_seen_unix_ns));
            }
            Msg::End { client, vip } => {
                pending.ops.push(Op::End { client, vip });
                pending.lag_from.push(None);
            }
            Msg::SnapshotDone(n) => {
                pending.apply(sink, status);
                in_snapshot = false;
                if let Some(keep) = mirror.take() {
                    match sink.purge_except(&keep) {
                        Ok(0) => {}
                        Ok(gone) => {
                            info!(gone, "pair: flows the active peer does not have deleted");
                            with(status, |s| s.purged += gone);
                        }
                        Err(e) => {
                            warn!("pair: deleting flows the active peer does not have: {e:#}")
                        }
                    }
                }
                info!(flows = n, "pair: the peer's snapshot is in");
                with(status, |s| {
                    s.synced = true;
                    s.last_snapshot_flows = n;
                    s.last_snapshot_at = Some(super::unix_now_ns() / 1_000_000_000);
                });
            }
            Msg::Ping => {}
            Msg::Hello(_) | Msg::Challenge(..) | Msg::Proof(_) => {
                bail!("a handshake message in the middle of the stream")
            }
        }
    }
    pending.apply(sink, status);
    Ok(())
}

/// Ops read from the stream and not applied yet, with, for each live new flow, the wall
/// clock of its handshake on the peer (the sync lag is measured to the moment it is in).
#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    lag_from: Vec<Option<u64>>,
}

impl Pending {
    /// Applies the ops to `sink` and counts what became of them in `status`.
    fn apply(&mut self, sink: &mut impl Sink, status: &Status) {
        if self.ops.is_empty() {
            return;
        }
        let outcomes = sink.apply(&self.ops);
        let now = super::unix_now_ns();
        with(status, |s| {
            for ((op, outcome), lag_from) in self.ops.iter().zip(outcomes).zip(&self.lag_from) {
                match op {
                    Op::Install { flow, .. } => {
                        s.flows_received += 1;
                        match outcome {
                            Ok(true) => {}
                            Ok(false) => s.flows_present += 1,
                            Err(e) => {
                                s.install_errors += 1;
                                s.last_error = Some(format!("install {}: {e:#}", flow.client));
                            }
                        }
                    }
                    Op::End { client, .. } => {
                        s.ends_received += 1;
                        if let Err(e) = outcome {
                            s.last_error = Some(format!("end {client}: {e:#}"));
                        }
                    }
                }
                if let Some(t) = lag_from {
                    s.lag.record(now.saturating_sub(*t) / 1_000);
                }
            }
        });
        self.ops.clear();
        self.lag_from.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::wire;

    #[test]
    fn lag_quantiles_are_within_an_eighth_of_an_octave() {
        let mut l = Lag::default();
        assert_eq!(l.quantile(0.5), None);
        for us in 1..=1000u64 {
            l.record(us * 10);
        }
        let p50 = l.quantile(0.5).unwrap();
        let p99 = l.quantile(0.99).unwrap();
        assert!((5_000..=5_700).contains(&p50), "{p50}");
        assert!((9_900..=10_000).contains(&p99), "{p99}");
        assert_eq!((l.count(), l.max_us()), (1000, 10_000));
        for us in [0u64, 7, 8, 9, 15, 16, 1 << 20] {
            let i = Lag::index(us);
            assert!(
                Lag::upper(i) >= us && (i == 0 || Lag::upper(i - 1) < us),
                "{us}"
            );
        }
    }

    #[test]
    fn a_node_is_eligible_synced_or_alone_never_half_way() {
        let st = |receiving, synced, sending| PairStatus {
            receiving,
            synced,
            sending,
            ..Default::default()
        };
        let long = Duration::from_secs(60);
        assert!(eligibility(&st(true, true, true), long).0);
        assert!(!eligibility(&st(true, false, true), long).0);
        assert!(!eligibility(&st(false, false, true), long).0);
        assert!(eligibility(&st(false, false, false), long).0);
        let (ok, why) = eligibility(&st(false, false, false), Duration::from_secs(1));
        assert!(!ok && why.starts_with("starting"), "{why}");
    }

    #[test]
    fn every_message_reads_back_as_written() {
        let f = wire::tests::sample();
        let msgs = [
            Msg::Hello([7; NONCE]),
            Msg::Challenge([1; NONCE], [2; PROOF]),
            Msg::Proof([3; PROOF]),
            Msg::SnapshotBegin { active: true },
            Msg::New(f),
            Msg::Update(f),
            Msg::End {
                client: f.client,
                vip: f.vip,
            },
            Msg::SnapshotDone(1 << 33),
            Msg::Ping,
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(&Msg::read(&mut r).unwrap(), m);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn a_stranger_or_a_garbled_frame_is_refused_with_the_reason() {
        let mut r: &[u8] = b"\x01\x00\x18GET / HTTP/1.1\r\nHost: x\r\n";
        let e = Msg::read(&mut r).unwrap_err();
        assert!(e.to_string().contains("another lb version"), "{e}");
        let mut r: &[u8] = b"\x04\x00\x02ab";
        let e = Msg::read(&mut r).unwrap_err();
        assert!(e.to_string().contains("expected 12"), "{e}");
        let mut r: &[u8] = b"\x09\x00\x00";
        assert!(Msg::read(&mut r).is_err());
    }

    #[derive(Default)]
    struct Tables {
        flows: Vec<SyncedFlow>,
        ends: Vec<SocketAddrV4>,
        active: bool,
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Tables>>);

    impl Source for Shared {
        fn snapshot(&mut self) -> Result<Vec<SyncedFlow>> {
            Ok(self.0.lock().unwrap().flows.clone())
        }
        fn active(&self) -> bool {
            self.0.lock().unwrap().active
        }
    }

    impl Sink for Shared {
        fn install(&mut self, f: &SyncedFlow, replace: bool) -> Result<bool> {
            let mut t = self.0.lock().unwrap();
            if let Some(old) = t.flows.iter_mut().find(|o| o.client == f.client) {
                if replace {
                    *old = *f;
                }
                return Ok(replace);
            }
            t.flows.push(*f);
            Ok(true)
        }
        fn end(&mut self, client: SocketAddrV4, _vip: SocketAddrV4) -> Result<()> {
            let mut t = self.0.lock().unwrap();
            t.flows.retain(|f| f.client != client);
            t.ends.push(client);
            Ok(())
        }
        fn active(&self) -> bool {
            self.0.lock().unwrap().active
        }
        fn purge_except(&mut self, keep: &HashSet<(SocketAddrV4, SocketAddrV4)>) -> Result<u64> {
            let mut t = self.0.lock().unwrap();
            let before = t.flows.len();
            t.flows.retain(|f| keep.contains(&(f.client, f.vip)));
            Ok((before - t.flows.len()) as u64)
        }
    }

    fn wait(what: &str, cond: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A sender (secret `send`) streaming `active`'s flows, over loopback, to a receiver
    /// (secret `recv`) installing them into `standby`; [`Link::finish`] stops both threads.
    struct Link {
        stop: Arc<AtomicBool>,
        sender: Status,
        receiver: Status,
        tx: Option<std::sync::mpsc::SyncSender<Batch>>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Link {
        fn open(active: &Shared, send: &[u8], standby: &Shared, recv: &[u8]) -> Link {
            let stop = Arc::new(AtomicBool::new(false));
            let (sender, receiver) = (Status::default(), Status::default());
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
                unreachable!()
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(16);
            let recv_thread = {
                let (sink, st, stop) = (standby.clone(), receiver.clone(), stop.clone());
                let secret = Secret::new(recv.to_vec());
                std::thread::spawn(move || receive_loop(listener, secret, sink, st, stop))
            };
            let send_thread = {
                let (src, st, stop) = (active.clone(), sender.clone(), stop.clone());
                let secret = Secret::new(send.to_vec());
                std::thread::spawn(move || send_loop(addr, secret, src, rx, st, stop))
            };
            Link {
                stop,
                sender,
                receiver,
                tx: Some(tx),
                threads: vec![recv_thread, send_thread],
            }
        }

        fn send(&self, batch: Batch) {
            self.tx.as_ref().unwrap().send(batch).unwrap();
        }

        fn finish(mut self) {
            self.stop.store(true, Ordering::Relaxed);
            self.tx.take();
            for t in self.threads.drain(..) {
                t.join().unwrap();
            }
        }
    }

    /// A node that comes back (not holding the VIPs) with flows left from before receives the
    /// active node's snapshot: its tables become that snapshot. A flow the active node mapped
    /// anew replaces the leftover on the same tuple; a leftover the active node does not have
    /// goes. The active node, receiving the returning node's snapshot, keeps its own flows.
    #[test]
    fn a_returning_node_takes_the_active_nodes_flows_as_they_are() {
        let base = wire::tests::sample();
        let port = |p, snat| SyncedFlow {
            client: SocketAddrV4::new(*base.client.ip(), p),
            snat: SocketAddrV4::new(*base.snat.ip(), snat),
            ..base
        };
        let active = Shared::default();
        {
            let mut t = active.0.lock().unwrap();
            t.active = true;
            t.flows = vec![port(1, 5001), port(2, 6002)];
        }
        let returning = Shared::default();
        returning.0.lock().unwrap().flows = vec![port(2, 5002), port(3, 5003)];
        let link = Link::open(&active, b"", &returning, b"");
        wait("the snapshot", || link.receiver.lock().unwrap().synced);
        let mut got = returning.0.lock().unwrap().flows.clone();
        got.sort_by_key(|f| f.client.port());
        assert_eq!(got, vec![port(1, 5001), port(2, 6002)]);
        assert_eq!(link.receiver.lock().unwrap().purged, 1);
        link.finish();

        // The other way round (the returning node's snapshot to the active one): nothing of
        // the active node's changes.
        let (active_flows, _) = {
            let t = active.0.lock().unwrap();
            (t.flows.clone(), ())
        };
        let mut sink = active.clone();
        let mut stale = port(1, 9999);
        stale.forward.seq_end = 1;
        assert!(!sink.install(&stale, false).unwrap());
        assert_eq!(active.0.lock().unwrap().flows, active_flows);
    }

    /// A sender with another secret is turned away before any flow moves, and says why.
    #[test]
    fn a_peer_without_the_secret_installs_nothing() {
        let base = wire::tests::sample();
        let active = Shared::default();
        active.0.lock().unwrap().flows.push(base);
        let standby = Shared::default();
        let link = Link::open(&active, b"wrong", &standby, b"right");
        wait("the sender to give up", || {
            link.sender
                .lock()
                .unwrap()
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("secret"))
        });
        assert!(standby.0.lock().unwrap().flows.is_empty());
        assert!(!link.receiver.lock().unwrap().synced);
        link.finish();
    }

    /// Two nodes on loopback: the active's snapshot and live messages reach the standby; the
    /// standby's snapshot of the same flows changes nothing on the active.
    #[test]
    fn snapshot_then_live_flows_and_ends_reach_the_peer() {
        let port = |f: &SyncedFlow, p| SyncedFlow {
            client: SocketAddrV4::new(*f.client.ip(), p),
            ..*f
        };
        let base = wire::tests::sample();
        let active = Shared::default();
        active.0.lock().unwrap().flows.push(port(&base, 1));
        let standby = Shared::default();
        let link = Link::open(&active, b"s3cret", &standby, b"s3cret");
        wait("the snapshot", || link.receiver.lock().unwrap().synced);
        assert_eq!(standby.0.lock().unwrap().flows, vec![port(&base, 1)]);

        link.send(vec![Outgoing::New(port(&base, 2))]);
        let mut moved = port(&base, 1);
        moved.forward.seq_end += 100;
        link.send(vec![Outgoing::Update(moved)]);
        let k = FlowKey {
            saddr: u32::from_ne_bytes(base.client.ip().octets()),
            sport: 2u16.to_be(),
            ..Default::default()
        };
        link.send(vec![Outgoing::End(k)]);
        wait("the live messages", || {
            standby.0.lock().unwrap().ends.len() == 1
        });
        assert_eq!(standby.0.lock().unwrap().flows, vec![moved]);
        let s = link.receiver.lock().unwrap().clone();
        assert_eq!(
            (s.flows_received, s.ends_received, s.last_snapshot_flows),
            (3, 1, 1)
        );
        assert!(link.sender.lock().unwrap().sending);
        link.finish();
    }
}
