//! The Bolt load generator of `lb-bench` (tokio, one thread): short Bolt-shaped sessions from N
//! parallel clients for a fixed time, and a persistent connection playing ping-pong.
//!
//! A short session is what a driver does for a one-off query on a fresh connection: connect, the
//! Bolt handshake (magic + version proposals, 4-byte answer), one small request/response (HELLO ->
//! SUCCESS), close. Its latency is taken from just before `connect` to the first byte of the
//! server's handshake answer (connect + first byte), and to the end of the response (session).
//! Ping-pong sends RESET and waits for its SUCCESS on one connection, one at a time.
//!
//! Everything is bounded: each step has a timeout, the run stops at its deadline, and sessions
//! still in flight then are waited for at most [`STEP_TIMEOUT`].

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::sim::bolt::{frame, tag, MAGIC};
use crate::sim::packstream::{map, Value};

/// Longest wait for any one step (connect, handshake answer, response).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// The handshake: magic, then 5.8..5.0, 4.4 and two empty proposals.
fn handshake() -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&[0x00, 0x08, 0x08, 0x05]);
    h.extend_from_slice(&[0x00, 0x00, 0x04, 0x04]);
    h.extend_from_slice(&[0; 8]);
    h
}

/// One chunked message.
pub fn message(tag: u8, fields: Vec<Value>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    frame(&Value::Struct(tag, fields), &mut out)?;
    Ok(out)
}

pub fn hello() -> Result<Vec<u8>> {
    message(
        tag::HELLO,
        vec![map([("user_agent", Value::from("lb-bench/1.0"))])],
    )
}

/// Reads one single-chunk response and returns its message tag.
async fn read_response(s: &mut TcpStream) -> Result<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.context("response header")?;
    let len = usize::from(u16::from_be_bytes(len));
    ensure!(len >= 2, "response chunk of {len} bytes");
    let mut body = vec![0u8; len + 2];
    s.read_exact(&mut body).await.context("response body")?;
    ensure!(
        body[len..] == [0, 0],
        "multi-chunk response (not expected for SUCCESS)"
    );
    Ok(body[1])
}

async fn step<T>(
    what: &'static str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T> {
    match timeout(STEP_TIMEOUT, f).await {
        Ok(r) => r.with_context(|| what),
        Err(_) => bail!("{what}: timeout"),
    }
}

/// One short session; (connect + first byte, whole session).
async fn session(addr: SocketAddrV4, hs: &[u8], hello: &[u8]) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    let mut s = step("connect", TcpStream::connect(addr)).await?;
    s.set_nodelay(true)?;
    step("handshake", s.write_all(hs)).await?;
    let mut v = [0u8; 4];
    step("version", s.read_exact(&mut v)).await?;
    let first = t0.elapsed();
    ensure!(v != [0; 4], "the server refused every version");
    step("HELLO", s.write_all(hello)).await?;
    let t = match timeout(STEP_TIMEOUT, read_response(&mut s)).await {
        Ok(r) => r?,
        Err(_) => bail!("response: timeout"),
    };
    ensure!(t == tag::SUCCESS, "HELLO answered with 0x{t:02X}");
    let whole = t0.elapsed();
    drop(s);
    Ok((first, whole))
}

/// What a short-session run recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sessions {
    pub clients: usize,
    /// Seconds from start to the deadline (sessions started before it count).
    pub seconds: f64,
    pub completed: u64,
    pub failed: u64,
    /// Failure messages by kind.
    pub errors: BTreeMap<String, u64>,
    /// Connect + first byte, microseconds, of every completed session.
    #[serde(skip)]
    pub first_byte_us: Vec<u32>,
    /// Whole session, microseconds.
    #[serde(skip)]
    pub session_us: Vec<u32>,
}

impl Sessions {
    /// Connections the generator opened (completed or not, past the connect step or not).
    pub fn attempts(&self) -> u64 {
        self.completed + self.failed
    }

    /// Adds what another client (or thread) recorded.
    fn absorb(&mut self, other: Sessions) {
        self.completed += other.completed;
        self.failed += other.failed;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.first_byte_us.extend(other.first_byte_us);
        self.session_us.extend(other.session_us);
    }
}

/// `clients` parallel loops of short sessions against `addr` for `duration`, spread over one
/// OS thread per CPU, each with its own single-threaded runtime (one runtime tops out near one
/// core, below what the direct path carries). Call inside the client's namespace: threads
/// started from there inherit it.
pub fn short_sessions(addr: SocketAddrV4, clients: usize, duration: Duration) -> Result<Sessions> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, clients.max(1));
    let deadline = Instant::now() + duration;
    let parts: Vec<Result<Sessions>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                // Clients dealt out evenly: thread i gets every threads-th one.
                let mine = (clients + threads - 1 - i) / threads;
                s.spawn(move || sessions_on_this_thread(addr, mine, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a generator thread panicked")))
            })
            .collect()
    });
    let mut all = Sessions {
        clients,
        seconds: duration.as_secs_f64(),
        ..Sessions::default()
    };
    for part in parts {
        all.absorb(part?);
    }
    Ok(all)
}

/// `clients` loops of short sessions on a runtime of this thread until `deadline`.
fn sessions_on_this_thread(
    addr: SocketAddrV4,
    clients: usize,
    deadline: Instant,
) -> Result<Sessions> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hs = handshake();
    let hello = hello()?;
    rt.block_on(async move {
        let mut tasks = Vec::with_capacity(clients);
        for _ in 0..clients {
            let (hs, hello) = (hs.clone(), hello.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Sessions::default();
                while Instant::now() < deadline {
                    match session(addr, &hs, &hello).await {
                        Ok((first, whole)) => {
                            out.completed += 1;
                            out.first_byte_us.push(micros(first));
                            out.session_us.push(micros(whole));
                        }
                        Err(e) => {
                            out.failed += 1;
                            *out.errors.entry(error_kind(&e)).or_default() += 1;
                            // A refused or reset connect fails fast: do not spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                out
            }));
        }
        let mut all = Sessions::default();
        for t in tasks {
            all.absorb(t.await.context("a client task panicked")?);
        }
        Ok(all)
    })
}

/// What a ping-pong run recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PingPong {
    pub round_trips: u64,
    /// Round-trip times, microseconds (fractional).
    #[serde(skip)]
    pub rtt_us: Vec<f64>,
}

/// One persistent Bolt connection to `addr`: handshake + HELLO, then RESET -> SUCCESS round trips,
/// one at a time, for `duration` (call inside the client's namespace).
pub fn ping_pong(addr: SocketAddrV4, duration: Duration) -> Result<PingPong> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hs = handshake();
    let hello = hello()?;
    let reset = message(tag::RESET, Vec::new())?;
    rt.block_on(async move {
        let mut s = step("connect", TcpStream::connect(addr)).await?;
        s.set_nodelay(true)?;
        step("handshake", s.write_all(&hs)).await?;
        let mut v = [0u8; 4];
        step("version", s.read_exact(&mut v)).await?;
        step("HELLO", s.write_all(&hello)).await?;
        let t = read_response(&mut s).await?;
        ensure!(t == tag::SUCCESS, "HELLO answered with 0x{t:02X}");
        let deadline = Instant::now() + duration;
        let mut out = PingPong::default();
        while Instant::now() < deadline {
            let t0 = Instant::now();
            step("RESET", s.write_all(&reset)).await?;
            let t = match timeout(STEP_TIMEOUT, read_response(&mut s)).await {
                Ok(r) => r?,
                Err(_) => bail!("RESET response: timeout"),
            };
            ensure!(t == tag::SUCCESS, "RESET answered with 0x{t:02X}");
            out.rtt_us.push(t0.elapsed().as_secs_f64() * 1e6);
            out.round_trips += 1;
        }
        Ok(out)
    })
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A short label for an error: its outermost context plus the OS error kind, if any.
fn error_kind(e: &anyhow::Error) -> String {
    let io = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|io| format!(": {:?}", io.kind()))
        .unwrap_or_default();
    let top = e.to_string();
    let top = top.split(':').next().unwrap_or("error").to_string();
    format!("{top}{io}")
}

/// The `q`-quantile (0..=1) of `v` (nearest rank), `None` if empty; sorts `v`.
pub fn quantile<T: Copy + PartialOrd>(v: &mut [T], q: f64) -> Option<T> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let mut v: Vec<u32> = (1..=1000).rev().collect();
        assert_eq!(quantile(&mut v, 0.5), Some(500));
        assert_eq!(quantile(&mut v, 0.99), Some(990));
        assert_eq!(quantile(&mut v, 0.999), Some(999));
        assert_eq!(quantile(&mut v, 1.0), Some(1000));
        assert_eq!(quantile::<u32>(&mut [], 0.5), None);
    }

    #[test]
    fn the_handshake_and_hello_are_well_formed() {
        let h = handshake();
        assert_eq!(h.len(), 20);
        assert_eq!(h[..4], MAGIC);
        let m = hello().unwrap();
        let len = usize::from(u16::from_be_bytes([m[0], m[1]]));
        assert_eq!(m.len(), len + 4);
        assert_eq!((m[2], m[3]), (0xB1, tag::HELLO));
        assert_eq!(m[m.len() - 2..], [0, 0]);
    }
}
