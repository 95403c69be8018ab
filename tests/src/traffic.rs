//! Test traffic: a checksumming sink that runs inside a backend's namespace, and clients that
//! send through the VIP and check what came back.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::harness::Ns;

/// FNV-1a, 64 bit: enough to tell whether a transfer arrived intact.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic pseudo-random payload of `len` bytes.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the sink answered for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkReply {
    /// Name of the backend that received the connection.
    pub backend: String,
    pub len: usize,
    pub hash: u64,
    /// The peer address the backend saw (the balancer's SNAT address when balanced).
    pub peer: SocketAddr,
}

/// A TCP sink in a backend namespace: for each connection it reads to EOF and answers
/// `"<name> <len> <fnv64> <peer>\n"`. Stops when dropped.
pub struct Sink {
    stop: Arc<AtomicBool>,
}

impl Sink {
    pub fn start(ns: &Ns, name: &str, addr: SocketAddrV4) -> Result<Sink> {
        let listener = ns
            .run_in(|| TcpListener::bind(addr))?
            .with_context(|| format!("bind sink {addr} in {}", ns.name))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.to_string();
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let name = name.clone();
                        thread::spawn(move || {
                            let _ = serve(conn, &name, peer);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Sink { stop })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(mut conn: TcpStream, name: &str, peer: SocketAddr) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut data = Vec::new();
    conn.read_to_end(&mut data)?;
    writeln!(conn, "{name} {} {} {peer}", data.len(), fnv64(&data))?;
    Ok(())
}

/// Sends `data` to `to` (run this inside the client's namespace), half-closes, and parses the
/// sink's answer. Also checks that the client only ever talked to `to`.
pub fn send(to: SocketAddrV4, data: &[u8]) -> Result<SinkReply> {
    let mut c = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))
        .with_context(|| format!("connect {to}"))?;
    if c.peer_addr()? != SocketAddr::V4(to) {
        bail!(
            "connected to {to} but the socket's peer is {}",
            c.peer_addr()?
        );
    }
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    c.set_write_timeout(Some(Duration::from_secs(30)))?;
    c.write_all(data).context("send")?;
    c.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)
        .context("read the sink's answer")?;
    let f: Vec<&str> = answer.split_whitespace().collect();
    if f.len() != 4 {
        bail!("unexpected answer {answer:?}");
    }
    Ok(SinkReply {
        backend: f[0].to_string(),
        len: f[1].parse()?,
        hash: f[2].parse()?,
        peer: f[3].parse()?,
    })
}
