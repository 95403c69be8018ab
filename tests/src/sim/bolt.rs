//! The Bolt server of the simulator: version negotiation (classic and manifest-style), chunked
//! framing and the message state machine, enough for the official drivers.
//!
//! Verified with the official Python driver `neo4j==6.4.1`, which proposes
//! `[manifest v1, 5.8..5.0, 4.4..4.2, 3.0]`; we answer with the manifest and offer 5.0..5.8 and 4.4,
//! and the driver picks 5.8.
//!
//! Semantics:
//! - every RUN yields one record with fields `["server", "writes", "role"]`;
//! - a RUN in write mode (no `mode` in the BEGIN/RUN extra, i.e. not `"r"`) counts one write when the role
//!   is master, and fails with `Neo.ClientError.Cluster.NotALeader` otherwise; reads work on every role;
//! - ROUTE answers a routing table naming only this server (the advertised address, or else the local
//!   address the client connected to): WRITE (master only), READ and ROUTE; a member whose role is
//!   unknown answers FAILURE `Neo.TransientError.General.DatabaseUnavailable`;
//! - with credentials configured, HELLO (Bolt < 5.1) or LOGON must carry the `basic` scheme with them;
//!   an authentication failure is answered with FAILURE and the connection is closed;
//! - after any FAILURE, every message but RESET and GOODBYE gets IGNORED until RESET.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::packstream::{self, map, Value};
use super::{Role, SimState};

/// The Bolt magic preamble.
pub const MAGIC: [u8; 4] = [0x60, 0x60, 0xB0, 0x17];
/// The version proposal that asks for manifest-style negotiation (manifest v1).
pub const MANIFEST_V1: [u8; 4] = [0x00, 0x00, 0x01, 0xFF];
/// Server agent reported in HELLO's SUCCESS.
pub const SERVER_AGENT: &str = "Neo4j/5.20.0";
/// Field names of every record.
pub const FIELDS: [&str; 3] = ["server", "writes", "role"];
/// Largest message accepted (de-chunked).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Request message tags.
pub mod tag {
    /// HELLO
    pub const HELLO: u8 = 0x01;
    /// GOODBYE
    pub const GOODBYE: u8 = 0x02;
    /// RESET
    pub const RESET: u8 = 0x0F;
    /// RUN
    pub const RUN: u8 = 0x10;
    /// BEGIN
    pub const BEGIN: u8 = 0x11;
    /// COMMIT
    pub const COMMIT: u8 = 0x12;
    /// ROLLBACK
    pub const ROLLBACK: u8 = 0x13;
    /// DISCARD
    pub const DISCARD: u8 = 0x2F;
    /// PULL
    pub const PULL: u8 = 0x3F;
    /// TELEMETRY
    pub const TELEMETRY: u8 = 0x54;
    /// ROUTE
    pub const ROUTE: u8 = 0x66;
    /// LOGON
    pub const LOGON: u8 = 0x6A;
    /// LOGOFF
    pub const LOGOFF: u8 = 0x6B;
    /// SUCCESS (response)
    pub const SUCCESS: u8 = 0x70;
    /// RECORD (response)
    pub const RECORD: u8 = 0x71;
    /// IGNORED (response)
    pub const IGNORED: u8 = 0x7E;
    /// FAILURE (response)
    pub const FAILURE: u8 = 0x7F;
}

/// A Bolt protocol version (major, minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u8, pub u8);

/// Versions this server speaks, highest first.
pub const SUPPORTED: [Version; 10] = [
    Version(5, 8),
    Version(5, 7),
    Version(5, 6),
    Version(5, 5),
    Version(5, 4),
    Version(5, 3),
    Version(5, 2),
    Version(5, 1),
    Version(5, 0),
    Version(4, 4),
];

/// Whether a 4-byte proposal `[_, range, minor, major]` covers `v`.
fn proposal_covers(p: [u8; 4], v: Version) -> bool {
    let (range, minor, major) = (p[1], p[2], p[3]);
    major == v.0 && minor >= v.1 && minor.saturating_sub(range) <= v.1
}

/// Picks the highest supported version among classic proposals.
pub fn choose_version(proposals: &[[u8; 4]]) -> Option<Version> {
    SUPPORTED
        .iter()
        .copied()
        .find(|v| proposals.iter().any(|p| proposal_covers(*p, *v)))
}

/// Frames one encoded message as chunks (at most 65535 bytes each) plus the end marker.
pub fn chunk(message: &[u8], out: &mut Vec<u8>) {
    for part in message.chunks(0xFFFF) {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&[0, 0]);
}

/// Encodes and frames a message structure.
pub fn frame(msg: &Value, out: &mut Vec<u8>) -> Result<()> {
    let mut body = Vec::new();
    packstream::encode(msg, &mut body)?;
    chunk(&body, out);
    Ok(())
}

/// Reads one de-chunked message, skipping NOOP chunks; `None` on a clean EOF between messages.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>> {
    let mut msg = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match r.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && msg.is_empty() => {
                return Ok(None)
            }
            Err(e) => return Err(e).context("reading chunk header"),
        }
        let len = u16::from_be_bytes(len) as usize;
        if len == 0 {
            if msg.is_empty() {
                continue; // NOOP keep-alive chunk
            }
            return Ok(Some(msg));
        }
        ensure!(
            msg.len() + len <= MAX_MESSAGE,
            "message larger than {MAX_MESSAGE} bytes"
        );
        let start = msg.len();
        msg.resize(start + len, 0);
        r.read_exact(&mut msg[start..])
            .await
            .context("reading chunk body")?;
    }
}

/// Accepts Bolt connections until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("Bolt accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let guard = state.bolt_connection();
            let id = guard.id;
            tokio::select! {
                res = connection(stream, &state, id) => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, "Bolt connection ended: {e:#}");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
            drop(guard);
        });
    }
}

/// Runs the handshake and then the message loop of one connection.
async fn connection(stream: TcpStream, state: &SimState, id: u64) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().context("Bolt local address")?;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    let Some(version) = handshake(&mut rd, &mut wr).await? else {
        return Ok(());
    };
    tracing::debug!(conn = id, ?version, "Bolt handshake done");
    let mut session = Session::new(state, version, id, advertised(state, local));
    loop {
        let Some(bytes) = read_message(&mut rd).await? else {
            return Ok(());
        };
        let msg = packstream::decode_all(&bytes).context("decoding request")?;
        let Value::Struct(tag, fields) = msg else {
            bail!("request is not a structure");
        };
        let mut out = Vec::new();
        let close = session.handle(tag, fields, &mut out)?;
        wr.write_all(&out).await.context("writing response")?;
        // Pipelined requests are answered together: flush only when no request is waiting.
        if close || rd.buffer().is_empty() {
            wr.flush().await.context("flushing response")?;
        }
        if close {
            return Ok(());
        }
    }
}

/// The address put in routing tables.
fn advertised(state: &SimState, local: SocketAddr) -> String {
    state
        .advertised()
        .map(str::to_string)
        .unwrap_or_else(|| local.to_string())
}

/// Negotiates the version; `None` when nothing is acceptable (the client was told and we close).
async fn handshake<R, W>(rd: &mut R, wr: &mut W) -> Result<Option<Version>>
where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut hello = [0u8; 20];
    rd.read_exact(&mut hello)
        .await
        .context("reading handshake")?;
    ensure!(hello[..4] == MAGIC, "bad Bolt magic {:02X?}", &hello[..4]);
    let proposals: Vec<[u8; 4]> = hello[4..]
        .chunks(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    if proposals.contains(&MANIFEST_V1) {
        // Manifest v1: we list our offerings, the client answers with its choice.
        let mut offer = MANIFEST_V1.to_vec();
        offer.push(2); // varint: two offerings
        offer.extend_from_slice(&[0x00, 0x08, 0x08, 0x05]); // 5.8 down to 5.0
        offer.extend_from_slice(&[0x00, 0x00, 0x04, 0x04]); // 4.4
        offer.push(0); // varint: no capabilities
        wr.write_all(&offer).await.context("writing manifest")?;
        wr.flush().await.context("flushing manifest")?;
        let mut chosen = [0u8; 4];
        rd.read_exact(&mut chosen)
            .await
            .context("reading chosen version")?;
        read_varint(rd)
            .await
            .context("reading chosen capabilities")?;
        let v = Version(chosen[3], chosen[2]);
        if v == Version(0, 0) {
            return Ok(None);
        }
        ensure!(
            SUPPORTED.contains(&v),
            "client chose unsupported version {v:?}"
        );
        return Ok(Some(v));
    }
    match choose_version(&proposals) {
        Some(v) => {
            wr.write_all(&[0, 0, v.1, v.0])
                .await
                .context("writing version")?;
            wr.flush().await.context("flushing version")?;
            Ok(Some(v))
        }
        None => {
            wr.write_all(&[0, 0, 0, 0]).await.context("refusing")?;
            wr.flush().await.context("flushing refusal")?;
            Ok(None)
        }
    }
}

/// Reads a little-endian base-128 varint (the manifest handshake's integers).
async fn read_varint<R: AsyncRead + Unpin>(rd: &mut R) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = rd.read_u8().await?;
        value |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("varint too long")
}

/// An open explicit transaction.
struct Tx {
    write: bool,
    db: String,
}

/// A result waiting for PULL or DISCARD (always exactly one record).
struct Pending {
    qid: i64,
    record: Vec<Value>,
    write: bool,
    db: String,
}

/// The per-connection Bolt state machine.
struct Session<'a> {
    state: &'a SimState,
    version: Version,
    id: u64,
    advertised: String,
    hello_done: bool,
    authenticated: bool,
    failed: bool,
    tx: Option<Tx>,
    results: Vec<Pending>,
    next_qid: i64,
}

/// A failure to report: Neo4j status code and message.
struct Failure {
    code: &'static str,
    message: String,
    /// Close the connection after reporting (authentication failures).
    close: bool,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            close: false,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Failure::new("Neo.ClientError.Request.Invalid", message)
    }
}

type Reply = std::result::Result<Vec<Value>, Failure>;

fn success(meta: Value) -> Value {
    Value::Struct(tag::SUCCESS, vec![meta])
}

fn empty() -> Value {
    Value::Map(Default::default())
}

/// The `extra` map at `fields[i]`, or an empty map.
fn extra_at(fields: &[Value], i: usize) -> std::collections::BTreeMap<String, Value> {
    fields
        .get(i)
        .and_then(Value::as_map)
        .cloned()
        .unwrap_or_default()
}

impl<'a> Session<'a> {
    fn new(state: &'a SimState, version: Version, id: u64, advertised: String) -> Self {
        Session {
            state,
            version,
            id,
            advertised,
            hello_done: false,
            authenticated: false,
            failed: false,
            tx: None,
            results: Vec::new(),
            next_qid: 0,
        }
    }

    /// Handles one request, appending framed responses to `out`; returns whether to close.
    fn handle(&mut self, tag: u8, fields: Vec<Value>, out: &mut Vec<u8>) -> Result<bool> {
        if tag == tag::GOODBYE {
            return Ok(true);
        }
        if self.failed && tag != tag::RESET {
            frame(&Value::Struct(tag::IGNORED, vec![]), out)?;
            return Ok(false);
        }
        match self.dispatch(tag, &fields) {
            Ok(replies) => {
                for r in &replies {
                    frame(r, out)?;
                }
                Ok(false)
            }
            Err(f) => {
                tracing::debug!(conn = self.id, code = f.code, "FAILURE {}", f.message);
                self.failed = true;
                self.tx = None;
                self.results.clear();
                frame(&self.failure_message(&f), out)?;
                Ok(f.close)
            }
        }
    }

    /// FAILURE in the shape the negotiated version expects (GQL fields from 5.7 on).
    fn failure_message(&self, f: &Failure) -> Value {
        let meta = if self.version >= Version(5, 7) {
            map([
                ("neo4j_code", Value::from(f.code)),
                ("message", Value::from(f.message.clone())),
                ("gql_status", Value::from("50N42")),
                (
                    "description",
                    Value::from(format!(
                        "error: general processing exception - unexpected error. {}",
                        f.message
                    )),
                ),
                (
                    "diagnostic_record",
                    map([
                        ("OPERATION", Value::from("")),
                        ("OPERATION_CODE", Value::from("0")),
                        ("CURRENT_SCHEMA", Value::from("/")),
                    ]),
                ),
            ])
        } else {
            map([
                ("code", Value::from(f.code)),
                ("message", Value::from(f.message.clone())),
            ])
        };
        Value::Struct(tag::FAILURE, vec![meta])
    }

    fn dispatch(&mut self, tag: u8, fields: &[Value]) -> Reply {
        match tag {
            tag::HELLO => self.hello(fields),
            tag::LOGON => self.logon(fields),
            tag::RESET => {
                self.failed = false;
                self.tx = None;
                self.results.clear();
                Ok(vec![success(empty())])
            }
            _ if !self.hello_done => Err(Failure::invalid(format!(
                "message 0x{tag:02X} before HELLO"
            ))),
            tag::LOGOFF => {
                self.authenticated = false;
                Ok(vec![success(empty())])
            }
            _ if !self.authenticated => Err(Failure::new(
                "Neo.ClientError.Security.Unauthorized",
                "the client is not authenticated",
            )),
            tag::RUN => self.run(fields),
            tag::PULL => self.pull(fields, true),
            tag::DISCARD => self.pull(fields, false),
            tag::BEGIN => self.begin(fields),
            tag::COMMIT => {
                if self.tx.take().is_none() {
                    return Err(Failure::invalid("COMMIT outside a transaction"));
                }
                self.results.clear();
                let bookmark = self.state.next_bookmark();
                Ok(vec![success(map([("bookmark", bookmark)]))])
            }
            tag::ROLLBACK => {
                if self.tx.take().is_none() {
                    return Err(Failure::invalid("ROLLBACK outside a transaction"));
                }
                self.results.clear();
                Ok(vec![success(empty())])
            }
            tag::ROUTE => self.route(fields),
            tag::TELEMETRY => Ok(vec![success(empty())]),
            other => Err(Failure::invalid(format!("unknown message 0x{other:02X}"))),
        }
    }

    fn hello(&mut self, fields: &[Value]) -> Reply {
        if self.hello_done {
            return Err(Failure::invalid("HELLO sent twice"));
        }
        let extra = extra_at(fields, 0);
        // Before 5.1 (and leniently after) the credentials travel in HELLO.
        if self.version < Version(5, 1) || extra.contains_key("scheme") {
            self.authenticate(&extra)?;
        }
        self.hello_done = true;
        Ok(vec![success(map([
            ("server", Value::from(SERVER_AGENT)),
            ("connection_id", Value::from(format!("bolt-{}", self.id))),
            ("hints", map([("telemetry.enabled", true)])),
        ]))])
    }

    fn logon(&mut self, fields: &[Value]) -> Reply {
        if !self.hello_done {
            return Err(Failure::invalid("LOGON before HELLO"));
        }
        self.authenticate(&extra_at(fields, 0))?;
        Ok(vec![success(empty())])
    }

    /// Checks the auth token (`scheme`, `principal`, `credentials`) against the configured credentials.
    fn authenticate(
        &mut self,
        token: &std::collections::BTreeMap<String, Value>,
    ) -> Result<(), Failure> {
        if let Some(auth) = self.state.auth() {
            let get = |k: &str| token.get(k).and_then(Value::as_str);
            let ok = get("scheme") == Some("basic")
                && get("principal") == Some(auth.user.as_str())
                && get("credentials") == Some(auth.password.as_str());
            if !ok {
                return Err(Failure {
                    code: "Neo.ClientError.Security.Unauthorized",
                    message: "The client is unauthorized due to authentication failure.".into(),
                    close: true,
                });
            }
        }
        self.authenticated = true;
        Ok(())
    }

    fn begin(&mut self, fields: &[Value]) -> Reply {
        if self.tx.is_some() {
            return Err(Failure::invalid("BEGIN inside a transaction"));
        }
        if !self.results.is_empty() {
            return Err(Failure::invalid("BEGIN while a result is open"));
        }
        let extra = extra_at(fields, 0);
        self.tx = Some(Tx {
            write: extra.get("mode").and_then(Value::as_str) != Some("r"),
            db: db_of(&extra),
        });
        self.next_qid = 0;
        Ok(vec![success(empty())])
    }

    fn run(&mut self, fields: &[Value]) -> Reply {
        let extra = extra_at(fields, 2);
        let (write, db) = match &self.tx {
            Some(tx) => (tx.write, tx.db.clone()),
            None => {
                if !self.results.is_empty() {
                    return Err(Failure::invalid("RUN while a result is open"));
                }
                (
                    extra.get("mode").and_then(Value::as_str) != Some("r"),
                    db_of(&extra),
                )
            }
        };
        let (role, writes) = if write {
            match self.state.try_write() {
                Ok(n) => (Role::Master, n),
                Err(role) => {
                    return Err(Failure::new(
                        "Neo.ClientError.Cluster.NotALeader",
                        format!(
                            "No write operations are allowed on this database. \
                             This is a read only Neo4j instance (role {role})."
                        ),
                    ))
                }
            }
        } else {
            self.state.role_and_writes()
        };
        let record = vec![
            Value::from(self.state.name()),
            Value::from(writes),
            Value::from(role.as_str()),
        ];
        let mut meta = vec![
            (
                "fields",
                Value::List(FIELDS.iter().map(|f| Value::from(*f)).collect()),
            ),
            ("t_first", Value::Int(0)),
        ];
        let qid = if self.tx.is_some() {
            let qid = self.next_qid;
            self.next_qid += 1;
            meta.push(("qid", Value::Int(qid)));
            qid
        } else {
            -1
        };
        self.results.push(Pending {
            qid,
            record,
            write,
            db,
        });
        Ok(vec![success(map(meta))])
    }

    /// PULL (`with_records`) or DISCARD: the result named by `qid` (default: the latest).
    fn pull(&mut self, fields: &[Value], with_records: bool) -> Reply {
        let extra = extra_at(fields, 0);
        let qid = extra.get("qid").and_then(Value::as_int).unwrap_or(-1);
        let idx = if qid == -1 {
            self.results.len().checked_sub(1)
        } else {
            self.results.iter().position(|p| p.qid == qid)
        };
        let Some(idx) = idx else {
            return Err(Failure::invalid("no open result to PULL or DISCARD"));
        };
        let pending = self.results.remove(idx);
        let mut replies = Vec::new();
        if with_records {
            replies.push(Value::Struct(
                tag::RECORD,
                vec![Value::List(pending.record)],
            ));
        }
        let mut meta = vec![
            ("t_last", Value::Int(0)),
            ("type", Value::from(if pending.write { "w" } else { "r" })),
            ("db", Value::from(pending.db)),
        ];
        if self.tx.is_none() {
            meta.push(("bookmark", Value::from(self.state.next_bookmark())));
        }
        replies.push(success(map(meta)));
        Ok(replies)
    }

    fn route(&mut self, fields: &[Value]) -> Reply {
        // 4.4+: ROUTE {routing} [bookmarks] {db, imp_user}; 4.3 sent the db name as a string.
        let db = match fields.get(2) {
            Some(Value::Map(m)) => db_of(m),
            Some(Value::String(s)) => s.clone(),
            _ => "neo4j".to_string(),
        };
        let role = self.state.role();
        if role == Role::Unknown {
            return Err(Failure::new(
                "Neo.TransientError.General.DatabaseUnavailable",
                "The cluster member's role is not settled.",
            ));
        }
        let entry = |r: &str| {
            map([
                (
                    "addresses",
                    Value::List(vec![Value::from(self.advertised.clone())]),
                ),
                ("role", Value::from(r)),
            ])
        };
        let mut servers = Vec::new();
        if role == Role::Master {
            servers.push(entry("WRITE"));
        }
        servers.push(entry("READ"));
        servers.push(entry("ROUTE"));
        let rt = map([
            ("ttl", Value::Int(300)),
            ("db", Value::from(db)),
            ("servers", Value::List(servers)),
        ]);
        Ok(vec![success(map([("rt", rt)]))])
    }
}

/// The database named in an extra map, or `neo4j`.
fn db_of(extra: &std::collections::BTreeMap<String, Value>) -> String {
    extra
        .get("db")
        .and_then(Value::as_str)
        .unwrap_or("neo4j")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_negotiation_picks_highest() {
        let p = [[0, 8, 8, 5], [0, 2, 4, 4], [0, 0, 0, 3], [0, 0, 0, 0]];
        assert_eq!(choose_version(&p), Some(Version(5, 8)));
        assert_eq!(choose_version(&[[0, 0, 4, 5]]), Some(Version(5, 4)));
        assert_eq!(choose_version(&[[0, 2, 4, 4]]), Some(Version(4, 4)));
        assert_eq!(choose_version(&[[0, 0, 0, 3]]), None);
    }

    #[test]
    fn chunking_splits_large_messages() {
        let mut out = Vec::new();
        chunk(&vec![7u8; 70000], &mut out);
        assert_eq!(&out[..2], &[0xFF, 0xFF]);
        assert_eq!(out.len(), 2 + 65535 + 2 + (70000 - 65535) + 2);
        assert_eq!(&out[out.len() - 2..], &[0, 0]);
    }
}
