//! The native connection-rate client of `lb-bench churn`: OS threads, blocking sockets, no
//! runtime. Each thread loops: connect, send the 20-byte Bolt handshake (magic + 4 version
//! proposals), read the server's 4-byte answer, close (the client closes first, as a driver
//! closing a one-off connection does). Latency is from just before `connect` to the answer's
//! last byte. Failures are counted by kind (a refused connect is a RST from the balancer, an
//! answer that never came is a lost or stalled flow, ...).
//!
//! Blocking threads instead of an event loop: on a 2-core machine a runtime's bookkeeping is a
//! visible share of a connection's cost, and the direct path's ceiling is what this client must
//! reach (else it measures nothing about a balancer).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::sim::bolt::MAGIC;

/// Longest wait for a connect or for the answer.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// What a run recorded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Handshakes {
    pub threads: usize,
    pub seconds: f64,
    pub completed: u64,
    pub failed: u64,
    /// Failures by kind ("connect: refused", "answer: timeout", ...).
    pub errors: BTreeMap<String, u64>,
    /// Completed connections per whole second of the run (by start time).
    pub per_second: Vec<u64>,
    /// Connect to answer, microseconds, of every completed connection.
    #[serde(skip)]
    pub latency_us: Vec<u32>,
}

impl Handshakes {
    fn absorb(&mut self, other: Handshakes) {
        self.completed += other.completed;
        self.failed += other.failed;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        if self.per_second.len() < other.per_second.len() {
            self.per_second.resize(other.per_second.len(), 0);
        }
        for (i, n) in other.per_second.into_iter().enumerate() {
            self.per_second[i] += n;
        }
        self.latency_us.extend(other.latency_us);
    }

    /// Completed connections per second over the run.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.seconds.max(1e-9)
    }

    /// The slowest and fastest `window`-second stretch (connections per second), whole windows
    /// only: shows whether a rate holds over the run or sags as state builds up.
    pub fn window_rates(&self, window: usize) -> Option<(f64, f64)> {
        let window = window.max(1);
        let rates: Vec<f64> = self
            .per_second
            .chunks_exact(window)
            .map(|c| c.iter().sum::<u64>() as f64 / window as f64)
            .collect();
        let min = rates.iter().copied().reduce(f64::min)?;
        let max = rates.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }
}

/// The handshake a 5.x driver sends: magic, then 5.8..5.0, 4.4 and two empty proposals.
pub fn bolt_handshake() -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&[0x00, 0x08, 0x08, 0x05]);
    h[8..12].copy_from_slice(&[0x00, 0x00, 0x04, 0x04]);
    h
}

/// `threads` loops of handshake-only connections to `targets` (each thread takes them in
/// turn) for `duration`. Call inside the client's namespace: the threads inherit it.
pub fn run(targets: &[SocketAddrV4], threads: usize, duration: Duration) -> Result<Handshakes> {
    anyhow::ensure!(!targets.is_empty(), "no target");
    let threads = threads.max(1);
    let start = Instant::now();
    let deadline = start + duration;
    let parts: Vec<Handshakes> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| s.spawn(move || one_thread(targets, i, start, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut all = Handshakes {
        threads,
        seconds: duration.as_secs_f64(),
        per_second: vec![0; duration.as_secs() as usize],
        ..Handshakes::default()
    };
    for p in parts {
        all.absorb(p);
    }
    all.per_second.truncate(duration.as_secs() as usize);
    Ok(all)
}

fn one_thread(
    targets: &[SocketAddrV4],
    first: usize,
    start: Instant,
    deadline: Instant,
) -> Handshakes {
    let hs = bolt_handshake();
    let mut out = Handshakes::default();
    let mut next = first;
    loop {
        let addr = SocketAddr::V4(targets[next % targets.len()]);
        next += 1;
        let t0 = Instant::now();
        if t0 >= deadline {
            return out;
        }
        let second = (t0 - start).as_secs() as usize;
        match one(addr, &hs, STEP_TIMEOUT) {
            Ok(()) => {
                out.completed += 1;
                let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
                out.latency_us.push(us);
                if out.per_second.len() <= second {
                    out.per_second.resize(second + 1, 0);
                }
                out.per_second[second] += 1;
            }
            Err(kind) => {
                out.failed += 1;
                *out.errors.entry(kind).or_default() += 1;
                // A refused connect fails at once: do not spin on it.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// One connection (connect, handshake, answer, close), each step within `timeout`; the
/// failure's kind on error.
pub fn one(addr: SocketAddr, hs: &[u8], timeout: Duration) -> std::result::Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| kind("connect", &e))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(timeout))
        .map_err(|e| kind("socket", &e))?;
    s.write_all(hs).map_err(|e| kind("send", &e))?;
    let mut v = [0u8; 4];
    s.read_exact(&mut v).map_err(|e| kind("answer", &e))?;
    if v == [0; 4] {
        return Err("answer: no version agreed".into());
    }
    Ok(())
}

fn kind(step: &str, e: &std::io::Error) -> String {
    let what = match e.kind() {
        ErrorKind::ConnectionRefused => "refused (RST to the SYN)".to_string(),
        ErrorKind::ConnectionReset => "reset".to_string(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".to_string(),
        ErrorKind::UnexpectedEof => "closed before the answer".to_string(),
        ErrorKind::AddrNotAvailable => "no local port".to_string(),
        k => format!("{k:?}"),
    };
    format!("{step}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rates_use_whole_windows() {
        let h = Handshakes {
            per_second: vec![10, 10, 20, 20, 30],
            ..Handshakes::default()
        };
        assert_eq!(h.window_rates(2), Some((10.0, 20.0)));
        assert_eq!(h.window_rates(10), None);
    }

    #[test]
    fn the_handshake_is_a_drivers() {
        let h = bolt_handshake();
        assert_eq!(h[..4], MAGIC);
        assert_eq!(h[4..8], [0, 8, 8, 5]);
    }
}
