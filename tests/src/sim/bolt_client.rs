//! A minimal blocking Bolt client for tests: handshake (classic or manifest), HELLO + LOGON, and
//! RUN + PULL returning the simulator's `{server, writes, role}` record. Works through the balancer too.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::bolt::{frame, tag, Version, MAGIC, MANIFEST_V1};
use super::packstream::{self, map, Value};

/// How to negotiate the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// Four classic proposals: 5.8..5.0, 4.4.
    Classic,
    /// Manifest v1 first (as the 6.x drivers do), then the classic ones.
    Manifest,
}

/// Access mode of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No `mode` in RUN's extra: a write.
    Write,
    /// `mode: "r"`.
    Read,
}

/// The record every simulator query returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRecord {
    /// Name of the server that answered.
    pub server: String,
    /// Writes that server has accepted so far.
    pub writes: i64,
    /// Its role.
    pub role: String,
}

/// A FAILURE answered by the server (downcast an `anyhow::Error` to this to check the code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoltFailure {
    /// Neo4j status code, e.g. `Neo.ClientError.Cluster.NotALeader`.
    pub code: String,
    /// Server message.
    pub message: String,
}

impl std::fmt::Display for BoltFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bolt FAILURE {}: {}", self.code, self.message)
    }
}

impl std::error::Error for BoltFailure {}

/// A connected, authenticated Bolt session.
pub struct BoltClient {
    stream: TcpStream,
    /// Negotiated version.
    pub version: Version,
    /// HELLO's SUCCESS metadata (`server`, `connection_id`, `hints`).
    pub hello: Value,
}

impl BoltClient {
    /// Connects, negotiates, and authenticates (`auth` = user, password; `None` sends scheme `none`).
    pub fn connect(
        addr: SocketAddr,
        negotiation: Negotiation,
        auth: Option<(&str, &str)>,
    ) -> Result<BoltClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to Bolt {addr}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .context("setting read timeout")?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let mut client = BoltClient {
            stream,
            version: Version(0, 0),
            hello: Value::Null,
        };
        client.version = client.negotiate(negotiation)?;
        let hello_extra = map([("user_agent", Value::from("lb-tests/0.1"))]);
        let token = match auth {
            Some((user, password)) => map([
                ("scheme", "basic"),
                ("principal", user),
                ("credentials", password),
            ]),
            None => map([("scheme", "none")]),
        };
        if client.version >= Version(5, 1) {
            client.hello = client.summary(Value::Struct(tag::HELLO, vec![hello_extra]))?;
            client.summary(Value::Struct(tag::LOGON, vec![token]))?;
        } else {
            let mut merged = hello_extra;
            if let (Value::Map(m), Value::Map(t)) = (&mut merged, token) {
                m.extend(t);
            }
            client.hello = client.summary(Value::Struct(tag::HELLO, vec![merged]))?;
        }
        Ok(client)
    }

    fn negotiate(&mut self, negotiation: Negotiation) -> Result<Version> {
        let mut hs = MAGIC.to_vec();
        if negotiation == Negotiation::Manifest {
            hs.extend_from_slice(&MANIFEST_V1);
        }
        hs.extend_from_slice(&[0, 8, 8, 5, 0, 0, 4, 4]);
        hs.resize(20, 0);
        self.stream.write_all(&hs).context("sending handshake")?;
        let mut answer = [0u8; 4];
        self.stream
            .read_exact(&mut answer)
            .context("reading handshake answer")?;
        if answer == MANIFEST_V1 {
            let count = self.read_varint()?;
            let mut best: Option<Version> = None;
            for _ in 0..count {
                let mut o = [0u8; 4];
                self.stream.read_exact(&mut o).context("reading offering")?;
                let v = Version(o[3], o[2]);
                best = best.max(Some(v));
            }
            self.read_varint()?; // capabilities
            let v = best.context("server offered no version")?;
            self.stream
                .write_all(&[0, 0, v.1, v.0, 0])
                .context("sending chosen version")?;
            return Ok(v);
        }
        ensure!(
            answer != [0, 0, 0, 0],
            "server refused every proposed version"
        );
        Ok(Version(answer[3], answer[2]))
    }

    fn read_varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8; 1];
            self.stream.read_exact(&mut b).context("reading varint")?;
            value |= u64::from(b[0] & 0x7F) << shift;
            if b[0] & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint too long")
    }

    /// Sends one message.
    pub fn send(&mut self, msg: &Value) -> Result<()> {
        let mut out = Vec::new();
        frame(msg, &mut out)?;
        self.stream.write_all(&out).context("sending message")
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Value> {
        let mut msg = Vec::new();
        loop {
            let mut len = [0u8; 2];
            self.stream
                .read_exact(&mut len)
                .context("reading chunk header")?;
            let len = u16::from_be_bytes(len) as usize;
            if len == 0 {
                if msg.is_empty() {
                    continue;
                }
                return packstream::decode_all(&msg).context("decoding response");
            }
            let start = msg.len();
            msg.resize(start + len, 0);
            self.stream
                .read_exact(&mut msg[start..])
                .context("reading chunk")?;
        }
    }

    /// Sends `msg` and reads up to its summary: returns the records and SUCCESS metadata, or the
    /// FAILURE as a [`BoltFailure`] error (the session is then failed until [`BoltClient::reset`]).
    pub fn exchange(&mut self, msg: Value) -> Result<(Vec<Vec<Value>>, Value)> {
        self.send(&msg)?;
        let mut records = Vec::new();
        loop {
            match self.recv()? {
                Value::Struct(tag::RECORD, mut fields) => match fields.pop() {
                    Some(Value::List(values)) => records.push(values),
                    other => bail!("malformed RECORD {other:?}"),
                },
                Value::Struct(tag::SUCCESS, mut fields) => {
                    return Ok((records, fields.pop().unwrap_or(Value::Null)))
                }
                Value::Struct(tag::FAILURE, fields) => {
                    let meta = fields.first().and_then(Value::as_map);
                    let get = |k: &str| {
                        meta.and_then(|m| m.get(k))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    };
                    return Err(BoltFailure {
                        code: get("neo4j_code")
                            .or_else(|| get("code"))
                            .unwrap_or_default(),
                        message: get("message").unwrap_or_default(),
                    }
                    .into());
                }
                Value::Struct(tag::IGNORED, _) => bail!("request IGNORED (session failed)"),
                other => bail!("unexpected response {other:?}"),
            }
        }
    }

    /// Sends `msg` and returns its SUCCESS metadata (records are not expected).
    pub fn summary(&mut self, msg: Value) -> Result<Value> {
        Ok(self.exchange(msg)?.1)
    }

    /// RESET: clears a failure.
    pub fn reset(&mut self) -> Result<()> {
        self.summary(Value::Struct(tag::RESET, vec![]))?;
        Ok(())
    }

    /// Runs `query` in an auto-commit transaction and pulls its record.
    pub fn run(&mut self, query: &str, access: Access) -> Result<SimRecord> {
        let extra = match access {
            Access::Write => map::<&str, Value>([]),
            Access::Read => map([("mode", "r")]),
        };
        let run = Value::Struct(
            tag::RUN,
            vec![Value::from(query), map::<&str, Value>([]), extra],
        );
        self.summary(run)?;
        let (records, _) =
            self.exchange(Value::Struct(tag::PULL, vec![map([("n", Value::Int(-1))])]))?;
        let [record] = records.as_slice() else {
            bail!("expected one record, got {}", records.len());
        };
        match record.as_slice() {
            [Value::String(server), Value::Int(writes), Value::String(role)] => Ok(SimRecord {
                server: server.clone(),
                writes: *writes,
                role: role.clone(),
            }),
            other => bail!("unexpected record {other:?}"),
        }
    }

    /// Sends GOODBYE and closes.
    pub fn goodbye(mut self) -> Result<()> {
        self.send(&Value::Struct(tag::GOODBYE, vec![]))
    }
}
