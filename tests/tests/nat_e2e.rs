//! End to end through the XDP data path, in network namespaces: client -> VIP -> lb (XDP full
//! NAT) -> backends, in native and generic mode, two-armed and one-armed.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    harness::{Shape, Topology, TopologyOptions},
    traffic::{fnv64, payload, send, Sink},
};

const SINK_PORT: u16 = 9000;

/// write :7680 -> db01:9000, read :7681 -> db02/db03:9000, http :80 -> all:7474,
/// bolt :7687 -> db01:7687 (the simulator).
fn config(topo: &Topology) -> String {
    let mut s = format!(
        "instance = \"{}\"\nsnat_ports = \"10000-32767\"\n",
        topo.instance
    );
    s += &topo.backends_toml();
    let svc = |name: &str, port: u16, bport: u16, members: &str| {
        format!("[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = {bport}\nbackends = [{members}]\n", topo.vip)
    };
    s += &svc("write", 7680, SINK_PORT, "\"db01\"");
    s += &svc("read", 7681, SINK_PORT, "\"db02\", \"db03\"");
    s += &svc("http", 80, 7474, "\"db01\", \"db02\", \"db03\"");
    s += &svc("bolt", 7687, 7687, "\"db01\"");
    s
}

fn sinks(topo: &Topology) -> Result<Vec<Sink>> {
    topo.backends
        .iter()
        .map(|b| Sink::start(&b.ns, &b.name, SocketAddrV4::new(b.addr, SINK_PORT)))
        .collect()
}

/// In generic mode the senders keep their checksum offload (frames carry partial checksums)
/// but segment in software: the kernel's generic XDP redirect refuses frames larger than the
/// egress MTU, and on a wire (unlike on a veth) a sender's TSO super-packet never reaches the
/// balancer whole. The agent turns GRO/LRO off on its interfaces for the same reason.
fn topology(name: &str, shape: Shape, generic: bool) -> Result<Topology> {
    let options = TopologyOptions {
        sender_offloads: generic,
        ..Default::default()
    };
    let topo = Topology::new(name, shape, options)?;
    if generic {
        topo.client.ns.exec(&[
            "ethtool",
            "-K",
            &topo.client.iface,
            "tso",
            "off",
            "gso",
            "off",
        ])?;
        for b in &topo.backends {
            b.ns.exec(&["ethtool", "-K", &b.iface, "tso", "off", "gso", "off"])?;
        }
    }
    Ok(topo)
}

fn mode_args(generic: bool) -> &'static [&'static str] {
    if generic {
        &["--xdp-mode", "generic"]
    } else {
        &["--xdp-mode", "native"]
    }
}

fn status(topo: &Topology) -> Result<serde_json::Value> {
    topo.lb_status()
}

fn global(s: &serde_json::Value, name: &str) -> u64 {
    Topology::global_counter(s, name)
}

fn sequential_connections_reach_the_master(shape: Shape, generic: bool, name: &str) -> Result<()> {
    let topo = topology(name, shape, generic)?;
    let _sinks = sinks(&topo)?;
    let _lb = topo.start_lb(&config(&topo), mode_args(generic))?;
    let vip = SocketAddrV4::new(topo.vip, 7680);
    let snat = topo.lb.backend_addr;
    let replies = topo.client.ns.run_in(|| -> Result<Vec<_>> {
        (0..1000u64)
            .map(|i| send(vip, &payload(i, 100 + i as usize % 1000)))
            .collect()
    })??;
    for (i, r) in replies.iter().enumerate() {
        let sent = payload(i as u64, 100 + i % 1000);
        ensure!(
            r.backend == "db01",
            "connection {i} reached {} instead of the master",
            r.backend
        );
        ensure!(
            r.len == sent.len() && r.hash == fnv64(&sent),
            "connection {i} arrived damaged: {r:?}"
        );
        ensure!(
            r.peer.ip() == std::net::IpAddr::V4(snat),
            "backend saw {} instead of the SNAT address {snat}",
            r.peer
        );
        let port = r.peer.port();
        ensure!(
            (10000..=32767).contains(&port),
            "SNAT port {port} outside the configured range"
        );
    }
    let s = status(&topo)?;
    ensure!(
        global(&s, "new_flows") >= 1000,
        "lb created {} flows for 1000 connections",
        global(&s, "new_flows")
    );
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn native_1000_sequential_connections_reach_the_master_intact_via_snat() -> Result<()> {
    sequential_connections_reach_the_master(Shape::TwoArmed, false, "seq_native")
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn generic_with_sender_offloads_1000_sequential_connections_reach_the_master() -> Result<()> {
    sequential_connections_reach_the_master(Shape::TwoArmed, true, "seq_generic")
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn one_armed_topology_balances_through_a_single_nic() -> Result<()> {
    sequential_connections_reach_the_master(Shape::OneArmed, false, "one_armed")
}

fn parallel_transfers_arrive_intact(generic: bool, name: &str) -> Result<()> {
    let topo = topology(name, Shape::TwoArmed, generic)?;
    let _sinks = sinks(&topo)?;
    let _lb = topo.start_lb(&config(&topo), mode_args(generic))?;
    let vip = SocketAddrV4::new(topo.vip, 7681);
    let results = topo.client.ns.run_in(|| {
        thread::scope(|s| {
            let handles: Vec<_> = (0..16u64)
                .map(|i| {
                    s.spawn(move || -> Result<_> {
                        let data = payload(1000 + i, 4 << 20);
                        let r = send(vip, &data)?;
                        Ok((r, data.len(), fnv64(&data)))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
                .collect::<Result<Vec<_>>>()
        })
    })??;
    let mut per_backend = BTreeMap::new();
    for (r, len, hash) in results {
        ensure!(
            r.len == len && r.hash == hash,
            "a 4 MiB transfer arrived damaged at {}: {r:?}",
            r.backend
        );
        *per_backend.entry(r.backend).or_insert(0) += 1;
    }
    ensure!(
        per_backend.get("db02") == Some(&8) && per_backend.get("db03") == Some(&8),
        "round robin split {per_backend:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn native_16_parallel_4mib_transfers_arrive_intact_split_over_the_readers() -> Result<()> {
    parallel_transfers_arrive_intact(false, "bulk_native")
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn generic_16_parallel_4mib_transfers_arrive_intact_split_over_the_readers() -> Result<()> {
    parallel_transfers_arrive_intact(true, "bulk_generic")
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn official_python_driver_queries_the_master_through_the_vip() -> Result<()> {
    let python = lb_tests::harness::python();
    if !python.exists() {
        eprintln!(
            "skipped: no Python venv with the neo4j driver at {} (cargo xtask setup creates it)",
            python.display()
        );
        return Ok(());
    }
    let topo = Topology::two_armed("driver")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let _lb = topo.start_lb(&config(&topo), mode_args(false))?;
    let probe = lb_tests::harness::repo_root().join("tests/py/driver_probe.py");
    let uri = format!("bolt://{}:7687", topo.vip);
    for expected_writes in 1..=2 {
        let out = topo.client.ns.exec(&[
            python.to_str().context("path")?,
            probe.to_str().context("path")?,
            &uri,
            "write",
        ])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stdout).to_string())?;
        ensure!(
            v["ok"] == true && v["server"] == "db01" && v["writes"] == expected_writes,
            "driver answer {v}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn replies_still_flow_after_the_neighbor_tables_are_flushed() -> Result<()> {
    let topo = Topology::two_armed("neigh_flush")?;
    let backend = &topo.backends[0];
    let listener = backend
        .ns
        .run_in(|| TcpListener::bind(SocketAddrV4::new(backend.addr, SINK_PORT)))??;
    let _lb = topo.start_lb(&config(&topo), mode_args(false))?;
    let vip = SocketAddrV4::new(topo.vip, 7680);
    let mut client = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5)))??;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (mut server, _) = listener.accept()?;
    server.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut ping_pong = |round: u8| -> Result<()> {
        let mut buf = [0u8; 4];
        client.write_all(&[round; 4])?;
        server.read_exact(&mut buf)?;
        ensure!(buf == [round; 4], "backend got {buf:?}");
        server.write_all(&[round + 100; 4])?;
        client.read_exact(&mut buf)?;
        ensure!(buf == [round + 100; 4], "client got {buf:?}");
        Ok(())
    };
    ping_pong(1)?;
    for ns in [&topo.lb.ns, &topo.client.ns, &backend.ns] {
        ns.exec(&["ip", "neigh", "flush", "all"])?;
    }
    for round in 2..6 {
        ping_pong(round).with_context(|| format!("round {round} after ip neigh flush"))?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn host_traffic_is_untouched_while_nat_flows_run_to_the_same_backend_port() -> Result<()> {
    let topo = Topology::two_armed("host_traffic")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let _lb = topo.start_lb(&config(&topo), mode_args(false))?;
    // A long-lived session from the client to the lb host itself.
    let host_addr = SocketAddrV4::new(topo.lb.client_addr, 2222);
    let listener = topo.lb.ns.run_in(|| TcpListener::bind(host_addr))??;
    let mut session = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&host_addr.into(), Duration::from_secs(5)))??;
    session.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (mut host_side, _) = listener.accept()?;
    host_side.set_read_timeout(Some(Duration::from_secs(5)))?;

    let db01 = topo.backends[0].addr;
    let vip = topo.vip;
    thread::scope(|s| -> Result<()> {
        // 1,000 NAT flows to db01:7474 through the HTTP VIP.
        let nat = s.spawn(|| {
            topo.client.ns.run_in(|| -> Result<()> {
                for i in 0..1000 {
                    http_get(SocketAddrV4::new(vip, 80), "/db/manage/server/ha/available")
                        .with_context(|| format!("NAT request {i}"))?;
                }
                Ok(())
            })?
        });
        // Meanwhile the lb host checks db01:7474 itself, as the agent's health checks will.
        let checks = s.spawn(|| {
            topo.lb.ns.run_in(|| -> Result<()> {
                for i in 0..200 {
                    let body =
                        http_get(SocketAddrV4::new(db01, 7474), "/db/manage/server/ha/master")
                            .with_context(|| format!("host check {i}"))?;
                    ensure!(body.ends_with("true"), "host check {i} answered {body:?}");
                }
                Ok(())
            })?
        });
        for round in 0..50u8 {
            session.write_all(&[round; 16])?;
            let mut buf = [0u8; 16];
            host_side.read_exact(&mut buf)?;
            ensure!(
                buf == [round; 16],
                "host session received a foreign segment: {buf:?}"
            );
            host_side.write_all(&[round ^ 0xff; 16])?;
            session.read_exact(&mut buf)?;
            ensure!(
                buf == [round ^ 0xff; 16],
                "client session received a foreign segment: {buf:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        nat.join()
            .map_err(|_| anyhow::anyhow!("NAT client panicked"))??;
        checks
            .join()
            .map_err(|_| anyhow::anyhow!("checker panicked"))??;
        Ok(())
    })?;
    let s = status(&topo)?;
    ensure!(
        global(&s, "new_flows") >= 1000,
        "only {} NAT flows",
        global(&s, "new_flows")
    );
    Ok(())
}

/// A minimal HTTP/1.0 GET; returns the whole response.
fn http_get(to: SocketAddrV4, path: &str) -> Result<String> {
    let mut c = TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", to.ip())?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    ensure!(out.starts_with("HTTP/1."), "not an HTTP answer: {out:?}");
    Ok(out)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn redirects_the_kernel_refuses_are_counted_from_the_xdp_tracepoints() -> Result<()> {
    // Generic mode with a local sender's TSO on: its super-packets reach the program whole and
    // the kernel's generic redirect refuses them (larger than the MTU) after the program
    // returned. Only the xdp:xdp_redirect_err tracepoint sees that.
    let topo = Topology::new(
        "redirect_err",
        Shape::TwoArmed,
        TopologyOptions {
            sender_offloads: true,
            ..Default::default()
        },
    )?;
    let _sinks = sinks(&topo)?;
    let _lb = topo.start_lb(&config(&topo), mode_args(true))?;
    let vip = SocketAddrV4::new(topo.vip, 7681);
    topo.client.ns.run_in(|| -> Result<()> {
        let mut c = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(5))?;
        c.set_write_timeout(Some(Duration::from_secs(2)))?;
        // The transfer stalls (its super-packets are dropped); only the counters matter here.
        let _ = c.write_all(&payload(7, 1 << 20));
        Ok(())
    })??;
    thread::sleep(Duration::from_millis(300));
    let s = status(&topo)?;
    ensure!(
        global(&s, "generic_large_frames") > 0,
        "no super-packets seen: {s}"
    );
    ensure!(
        global(&s, "xdp_redirect_err") > 0,
        "the refused redirects were not counted: {s}"
    );
    Ok(())
}
