//! A SYN flood fills the (small) handshake table without touching established
//! flows: a session idle during the flood still works afterwards, and new connections succeed
//! once the flood stops. With the manual's global `maxconn 256` and a `backend_maxconn` on the
//! flooded service, the spoofed handshakes hold no slot (before, 32 of them locked the service
//! out for the connect timeout).
use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    harness::{Ns, Topology},
    traffic::{payload, send, Sink},
};

const ECHO_PORT: u16 = 9001;
const SINK_PORT: u16 = 9000;
const FLOOD: usize = 100_000;

fn mac_of(ns: &Ns, iface: &str) -> Result<String> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `n` SYNs from spoofed 198.18.128.0/17 sources to the VIP's sink port. The backend answers
/// them; its SYN-ACKs reach the client namespace, which has no such address and drops them: the
/// handshakes stay half open, as a real flood's do.
fn flood(topo: &Topology, n: usize) -> Result<()> {
    let script = lb_tests::harness::repo_root().join("tests/py/synflood.py");
    let src_mac = mac_of(&topo.client.ns, &topo.client.iface)?;
    let dst_mac = mac_of(&topo.lb.ns, &topo.lb.ifaces[0])?;
    topo.client.ns.exec(&[
        "python3",
        script.to_str().context("path")?,
        &topo.client.iface,
        &src_mac,
        &dst_mac,
        &topo.vip.to_string(),
        &SINK_PORT.to_string(),
        &n.to_string(),
    ])?;
    Ok(())
}

/// The flood's target: a sink on db01's `SINK_PORT`.
fn sink_on_db01(topo: &Topology) -> Result<Sink> {
    let db01 = &topo.backends[0];
    Sink::start(
        &db01.ns,
        &db01.name,
        SocketAddrV4::new(db01.addr, SINK_PORT),
    )
}

/// 20 new connections to the flooded VIP, one after the other, each carrying 256 bytes.
fn connect_after_the_flood(topo: &Topology) -> Result<()> {
    let vip = SocketAddrV4::new(topo.vip, SINK_PORT);
    topo.client.ns.run_in(|| -> Result<()> {
        for i in 0..20u64 {
            let data = payload(i, 256);
            let r = send(vip, &data).with_context(|| format!("connection {i} after the flood"))?;
            ensure!(r.len == data.len(), "connection {i}: {r:?}");
        }
        Ok(())
    })?
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_flood_fills_only_the_embryonic_table_and_service_resumes_after_it() -> Result<()> {
    let topo = Topology::two_armed("synflood")?;
    let db01 = &topo.backends[0];
    let _sinks = sink_on_db01(&topo)?;
    let echo = db01
        .ns
        .run_in(|| TcpListener::bind(SocketAddrV4::new(db01.addr, ECHO_PORT)))??;
    let mut cfg = format!(
        "instance = \"{}\"\nmaxconn = 256\n[tables]\nembryonic = 4096\nestablished = 1024\n",
        topo.instance
    );
    cfg += &topo.backends_toml();
    cfg += &format!("[[service]]\nname = \"flooded\"\nvip = \"{}:{SINK_PORT}\"\nbackend_port = {SINK_PORT}\nbackends = [\"db01\"]\nbackend_maxconn = 32\n", topo.vip);
    cfg += &format!("[[service]]\nname = \"session\"\nvip = \"{}:{ECHO_PORT}\"\nbackend_port = {ECHO_PORT}\nbackends = [\"db01\"]\n", topo.vip);
    let _lb = topo.start_lb(&cfg, &["--xdp-mode", "native"])?;

    // A session established before the flood, idle during it.
    let vip_echo = SocketAddr::V4(SocketAddrV4::new(topo.vip, ECHO_PORT));
    let mut session = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&vip_echo, Duration::from_secs(5)))??;
    session.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (mut server, _) = echo.accept()?;
    server.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut ping = |round: u8| -> Result<()> {
        session.write_all(&[round; 8])?;
        let mut buf = [0u8; 8];
        server.read_exact(&mut buf)?;
        server.write_all(&buf)?;
        session.read_exact(&mut buf)?;
        ensure!(buf == [round; 8], "round {round}: {buf:?}");
        Ok(())
    };
    ping(1)?;

    // 100k spoofed SYNs (bounded, generated inside the test's own namespaces).
    flood(&topo, FLOOD)?;
    thread::sleep(Duration::from_millis(500));

    let s = topo.lb_status()?;
    let counter = |name: &str| Topology::global_counter(&s, name);
    // Handled by the data path: a handshake, or refused when every port it tried had its slot
    // held by a younger handshake (a burst faster than the table's 4,096 slots turn over): a
    // RST, or a drop once the RSTs are over their rate.
    let refused = counter("rst_snat_exhausted") + counter("drop_rst_limited");
    ensure!(
        counter("new_flows") + refused >= FLOOD as u64 / 2,
        "the flood did not reach the data path: {} new flows, {refused} refused",
        counter("new_flows"),
    );
    // Only the idle session holds a slot: the flood's handshakes never completed.
    ensure!(
        s["maxconn"]["active"].as_u64() == Some(1),
        "maxconn slots after the flood: {}",
        s["maxconn"]
    );

    ping(2).context("the idle session after the flood")?;
    connect_after_the_flood(&topo)?;
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn spoofed_handshakes_give_their_snat_ports_back_to_new_connections_within_a_second() -> Result<()>
{
    // 200 SNAT ports and 2,000 spoofed SYNs: the first 200 take every port. Before, they held
    // them for the connect timeout (30 s) and every new connection got a RST.
    let topo = Topology::two_armed("synports")?;
    let _sinks = sink_on_db01(&topo)?;
    let mut cfg = format!(
        "instance = \"{}\"\nsnat_ports = \"20000-20199\"\n",
        topo.instance
    );
    cfg += &topo.backends_toml();
    cfg += &format!("[[service]]\nname = \"flooded\"\nvip = \"{}:{SINK_PORT}\"\nbackend_port = {SINK_PORT}\nbackends = [\"db01\"]\n", topo.vip);
    let _lb = topo.start_lb(&cfg, &["--xdp-mode", "native"])?;
    flood(&topo, 2_000)?;
    thread::sleep(Duration::from_millis(500));
    let s = topo.lb_status()?;
    ensure!(
        Topology::global_counter(&s, "rst_snat_exhausted") > 0,
        "the flood did not use up the 200 ports"
    );
    connect_after_the_flood(&topo)?;
    // The first one had to take a flood handshake's port; later ones may also get the port of
    // an earlier one whose closed tuple the client reused (`closed_tuple_reused`).
    let s = topo.lb_status()?;
    ensure!(
        Topology::global_counter(&s, "half_open_reclaimed") >= 1,
        "new connections did not take over the flood's ports: {}",
        s["global"]
    );
    Ok(())
}
