//! `maxconn` end to end: with `backend_maxconn = 32` and 32 connections held, 32 more clients'
//! SYNs are dropped (counted) and time out. A SYN retransmitted after a slot frees gets in (the
//! client's retransmit is the queue). After every connection closed the counts are back to
//! zero. 64 clients at once into the empty pool: the backend never holds more than 32
//! connections; a client whose handshake completed over the limit waits (its ACK and data are
//! dropped, as behind HAProxy's queue) and is served once a slot frees.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddrV4, TcpListener, TcpStream},
    sync::{Arc, Barrier, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::maps::{Array, Map, PerCpuArray};
use lb_common::{epoch_index, names, Counter, MAXCONN_GLOBAL};
use lb_tests::harness::Topology;

const PORT: u16 = 9100;
const VIP_PORT: u16 = 7680;
const LIMIT: usize = 32;

fn config(topo: &Topology) -> String {
    let mut s = format!(
        "instance = \"{}\"\nsnat_ports = \"10000-32767\"\n",
        topo.instance
    );
    s += &topo.backends_toml();
    s += &format!(
        "[[service]]\nname = \"http\"\nvip = \"{}:{VIP_PORT}\"\nbackend_port = {PORT}\nbackends = [\"db01\"]\nbackend_maxconn = {LIMIT}\n",
        topo.vip
    );
    s
}

fn pinned(topo: &Topology, name: &str) -> Result<Map> {
    lb_user::dataplane::open_pinned(&lb_user::dataplane::pin_dir(&topo.instance), name)
}

/// (the (http, db01) count, the global count) from the pinned `MAXCONN_ACTIVE`.
fn counts(topo: &Topology) -> Result<(u64, u64)> {
    let a = Array::<_, u64>::try_from(pinned(topo, names::MAXCONN_ACTIVE)?)?;
    Ok((a.get(&epoch_index(0, 0), 0)?, a.get(&MAXCONN_GLOBAL, 0)?))
}

fn counter(topo: &Topology, c: Counter) -> Result<u64> {
    let a = PerCpuArray::<_, u64>::try_from(pinned(topo, names::STATS_GLOBAL)?)?;
    Ok(a.get(&(c as u32), 0)?.iter().sum())
}

/// Connects `n` clients at once (each with `timeout`); the connected streams.
fn connect_all(topo: &Topology, n: usize, timeout: Duration) -> Result<Vec<TcpStream>> {
    let vip = SocketAddrV4::new(topo.vip, VIP_PORT);
    let got = Arc::new(Mutex::new(Vec::new()));
    topo.client.ns.run_in(|| {
        let start = Arc::new(Barrier::new(n));
        thread::scope(|s| {
            for _ in 0..n {
                let (start, got) = (start.clone(), got.clone());
                // Threads started here inherit the client namespace of this thread.
                s.spawn(move || {
                    start.wait();
                    if let Ok(c) = TcpStream::connect_timeout(&vip.into(), timeout) {
                        if let Ok(mut g) = got.lock() {
                            g.push(c);
                        }
                    }
                });
            }
        });
    })?;
    let v = std::mem::take(&mut *got.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    Ok(v)
}

/// One byte each way over every connection; returns the accepted server ends reordered so
/// that `servers[i]` is `clients[i]`'s peer (matched by the byte client `i` sent).
fn exchange(clients: &mut [TcpStream], servers: Vec<TcpStream>) -> Result<Vec<TcpStream>> {
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(&[i as u8])?;
    }
    let mut paired: Vec<Option<TcpStream>> = (0..clients.len()).map(|_| None).collect();
    for mut s in servers {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .context("a backend connection got no byte")?;
        s.write_all(&b)?;
        let slot = paired.get_mut(b[0] as usize).context("unexpected byte")?;
        ensure!(slot.is_none(), "two connections sent byte {}", b[0]);
        *slot = Some(s);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        ensure!(b[0] == i as u8, "echo");
    }
    paired
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.with_context(|| format!("client {i} reached no backend connection")))
        .collect()
}

fn accept(listener: &TcpListener, n: usize) -> Result<Vec<TcpStream>> {
    listener.set_nonblocking(false)?;
    (0..n)
        .map(|_| Ok(listener.accept().context("accept")?.0))
        .collect()
}

fn close_all(clients: Vec<TcpStream>, servers: Vec<TcpStream>) -> Result<()> {
    for c in &clients {
        c.shutdown(Shutdown::Write)?;
    }
    for mut s in servers {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        drop(s);
    }
    for mut c in clients {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    Ok(())
}

fn wait_counts(topo: &Topology, want: (u64, u64), within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let got = counts(topo)?;
        if got == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "maxconn counts {got:?}, expected {want:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn maxconn_32_holds_under_64_parallel_connections_and_counts_return_to_zero() -> Result<()> {
    let topo = Topology::two_armed("maxconn")?;
    let db01 = &topo.backends[0];
    let listener = db01
        .ns
        .run_in(|| TcpListener::bind(SocketAddrV4::new(db01.addr, PORT)))??;
    let lb = topo.start_lb(&config(&topo), &["--xdp-mode", "native"])?;

    // 32 connect and carry data; then 32 more at once are dropped at SYN and time out (1.5 s:
    // one SYN retransmit each, also dropped).
    let mut clients = connect_all(&topo, LIMIT, Duration::from_secs(3))?;
    ensure!(
        clients.len() == LIMIT,
        "{} of {LIMIT} connected",
        clients.len()
    );
    let mut servers = exchange(&mut clients, accept(&listener, LIMIT)?)?;
    assert_eq!(counts(&topo)?, (LIMIT as u64, LIMIT as u64));
    let dropped_before = counter(&topo, Counter::DropMaxconn)?;
    let over = connect_all(&topo, LIMIT, Duration::from_millis(1500))?;
    ensure!(
        over.is_empty(),
        "{} connected over backend_maxconn = {LIMIT}",
        over.len()
    );
    let dropped = counter(&topo, Counter::DropMaxconn)? - dropped_before;
    ensure!(
        dropped >= LIMIT as u64,
        "{dropped} SYNs counted as over maxconn; expected at least one per refused client"
    );
    eprintln!("{LIMIT} clients over the limit: none connected, {dropped} SYNs dropped");

    // The queue: a client waiting while all slots are held gets in by its SYN retransmit
    // once one closes.
    let waiting = thread::scope(|s| -> Result<Vec<TcpStream>> {
        let w = s.spawn(|| connect_all(&topo, 1, Duration::from_secs(5)));
        thread::sleep(Duration::from_millis(300));
        let (c, srv) = (clients.pop().context("a client")?, servers.pop());
        close_all(vec![c], srv.into_iter().collect())?;
        w.join()
            .map_err(|_| anyhow::anyhow!("waiting client panicked"))?
    })?;
    ensure!(
        waiting.len() == 1,
        "the waiting client did not get the freed slot"
    );
    clients.extend(waiting);
    let mut last = exchange(&mut clients[LIMIT - 1..], accept(&listener, 1)?)?;
    servers.append(&mut last);
    assert_eq!(counts(&topo)?, (LIMIT as u64, LIMIT as u64));

    // Every connection closes: the counts go back to zero (the data path releases a slot
    // when the flow's second FIN passes).
    close_all(clients, servers)?;
    wait_counts(&topo, (0, 0), Duration::from_secs(3))?;

    // 64 at once into the empty pool.
    burst(&topo, &listener)?;
    wait_counts(&topo, (0, 0), Duration::from_secs(3))?;

    // A connection the client resets: its slot stays until the flow is deleted (a spoofed RST
    // must not free it), then the agent's GC releases it (through `lb_release`, from its own
    // thread) within a few seconds.
    let mut reset = connect_all(&topo, 1, Duration::from_secs(3))?;
    let servers = exchange(&mut reset, accept(&listener, 1)?)?;
    assert_eq!(counts(&topo)?, (1, 1));
    let c = reset.pop().context("the connection")?;
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
    drop(c);
    wait_counts(&topo, (0, 0), Duration::from_secs(6))
        .with_context(|| format!("the GC released no slot; lb log:\n{}", lb.stderr()))?;
    drop(servers);
    lb.process.stop()?;
    Ok(())
}

/// 64 clients at once with no connection held: every SYN may pass (the count is 0 when they
/// arrive), but only 32 handshakes complete at the backend; the backend holds no 33rd while
/// those 32 are open. Clients whose connect succeeded beyond them wait and are served, one per
/// slot, as the 32 close.
fn burst(topo: &Topology, listener: &TcpListener) -> Result<()> {
    let mut clients = connect_all(topo, 2 * LIMIT, Duration::from_millis(1500))?;
    ensure!(
        clients.len() >= LIMIT,
        "{} of 64 connected in a burst",
        clients.len()
    );
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        c.write_all(&[i as u8])?;
    }
    let first = accept(listener, LIMIT)?;
    ensure!(
        accept_within(listener, Duration::from_secs(1))?.is_none(),
        "a 33rd connection reached the backend while {LIMIT} were open"
    );
    assert_eq!(counts(topo)?, (LIMIT as u64, LIMIT as u64));
    // The waiting ones: served as the first ones close.
    let mut waiting = clients.len() - LIMIT;
    eprintln!(
        "burst of 64: {} connected, {waiting} of them waiting",
        clients.len()
    );
    let mut open = Vec::new();
    for mut s in first {
        let i = serve_one(&mut s, &mut clients)?;
        open.push((s, i));
    }
    while let Some((s, i)) = open.pop() {
        // FINs both ways: the slot is released as the second passes.
        s.shutdown(Shutdown::Both)?;
        clients[i].shutdown(Shutdown::Write)?;
        if waiting > 0 {
            // It gets in with its next retransmit (its data, or its ACK of the backend's
            // SYN-ACK retransmit).
            let mut s = accept_within(listener, Duration::from_secs(15))?.with_context(|| {
                format!(
                    "a waiting client was not served within 15 s after a slot freed; counts {:?}, drop_maxconn {:?}",
                    counts(topo).ok(),
                    counter(topo, Counter::DropMaxconn).ok()
                )
            })?;
            waiting -= 1;
            let i = serve_one(&mut s, &mut clients)?;
            open.insert(0, (s, i));
        }
    }
    Ok(())
}

/// Reads the byte a client sent on backend connection `s`, echoes it and checks the client
/// `clients[byte]` reads it back; returns that client's index.
fn serve_one(s: &mut TcpStream, clients: &mut [TcpStream]) -> Result<usize> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .context("a backend connection got no byte")?;
    s.write_all(&b)?;
    let c = clients.get_mut(b[0] as usize).context("unexpected byte")?;
    let mut e = [0u8; 1];
    c.read_exact(&mut e).context("echo")?;
    ensure!(e == b, "echo");
    Ok(b[0] as usize)
}

/// One connection accepted within `within`, or none.
fn accept_within(listener: &TcpListener, within: Duration) -> Result<Option<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Ok(None);
                }
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}
