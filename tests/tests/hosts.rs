//! lb on the hosts operators have: a HAProxy host's wide ephemeral port range.
use std::{
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    harness::{repo_root, Topology},
    sim::bolt_client::{Access, BoltClient, Negotiation},
};

/// The manual's Bolt HAProxy configuration with this topology's backend addresses.
fn manual_cfg(topo: &Topology) -> Result<String> {
    let seed = repo_root().join("lb-user/tests/golden/neo4j-ha-bolt.cfg");
    let mut cfg =
        std::fs::read_to_string(&seed).with_context(|| format!("reading {}", seed.display()))?;
    for (i, b) in topo.backends.iter().enumerate() {
        cfg = cfg.replace(&format!("10.0.1.{}:", 10 + i), &format!("{}:", b.addr));
    }
    let path = topo.log_dir.join("haproxy.cfg");
    std::fs::write(&path, &cfg)?;
    Ok(path.display().to_string())
}

fn sysctl(topo: &Topology, key: &str) -> Result<String> {
    let out = topo.lb.ns.exec(&["sysctl", "-n", key])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until a write through the VIP reaches the master.
fn writes_reach(topo: &Topology, master: &str) -> Result<()> {
    let vip = SocketAddr::V4(SocketAddrV4::new(topo.lb.client_addr, 7680));
    topo.client.ns.run_in(|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let server = BoltClient::connect(vip, Negotiation::Classic, None)
                .and_then(|mut c| Ok(c.run("RETURN 1", Access::Write)?.server));
            match server {
                Ok(s) if s == master => return Ok(()),
                Ok(s) => bail!("a write reached {s}, not the master {master}"),
                Err(e) if Instant::now() > deadline => bail!("no write through the VIP: {e:#}"),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    })?
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn on_a_haproxy_hosts_wide_port_range_lb_reserves_its_snat_ports_and_starts() -> Result<()> {
    let topo = Topology::two_armed("wideports")?;
    // How HAProxy hosts are usually tuned, so that HAProxy has enough source ports.
    topo.lb
        .ns
        .exec(&["sysctl", "-w", "net.ipv4.ip_local_port_range=10000 65535"])?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let cfg = manual_cfg(&topo)?;
    let lb = topo
        .start_lb_args(&["--haproxy-config", &cfg, "--xdp-mode", "native"])
        .context("lb did not start on a host whose ephemeral range covers its SNAT range")?;
    let logs = lb.logs();
    ensure!(
        logs.contains("snat_ports 10000-32767: 22768 of them inside the ephemeral range 10000-65535 are reserved")
            && logs.contains("the host keeps 32768 ephemeral ports"),
        "lb did not say what it took: {logs}"
    );
    ensure!(
        sysctl(&topo, "net.ipv4.ip_local_reserved_ports")? == "10000-32767",
        "reserved: {}",
        sysctl(&topo, "net.ipv4.ip_local_reserved_ports")?
    );
    writes_reach(&topo, "db01")?;
    // The host's own connections to a backend get ports the kernel still hands out: never
    // one of lb's.
    let db01 = SocketAddr::V4(SocketAddrV4::new(topo.backends[0].addr, 7474));
    let ports = topo.lb.ns.run_in(|| -> Result<Vec<u16>> {
        (0..200)
            .map(|_| {
                let c = TcpStream::connect_timeout(&db01, Duration::from_secs(2))?;
                Ok(c.local_addr()?.port())
            })
            .collect()
    })??;
    ensure!(
        ports.iter().all(|&p| p > 32767),
        "the host was given SNAT ports: {:?}",
        ports.iter().filter(|&&p| p <= 32767).collect::<Vec<_>>()
    );
    lb.stop()?;
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_host_socket_on_a_snat_port_towards_a_backend_is_refused_and_snat_ports_chooses_another_range(
) -> Result<()> {
    let topo = Topology::two_armed("portclash")?;
    topo.lb
        .ns
        .exec(&["sysctl", "-w", "net.ipv4.ip_local_port_range=10000 65535"])?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let cfg = manual_cfg(&topo)?;
    // A connection of the balancer host's own, from port 20000 to db02's HTTP port.
    let db02 = SocketAddrV4::new(topo.backends[1].addr, 7474);
    let held = topo.lb.ns.run_in(|| -> Result<TcpStream> {
        use nix::sys::socket::{
            bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
            SockaddrIn,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        // Closed with a RST later, so that no TIME_WAIT keeps the port.
        setsockopt(
            &fd,
            sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(topo.lb.backend_addr, 20000)),
        )?;
        connect(fd.as_raw_fd(), &SockaddrIn::from(db02))?;
        Ok(TcpStream::from(fd))
    })??;
    let err = match topo.start_lb_args(&["--haproxy-config", &cfg, "--xdp-mode", "native"]) {
        Ok(_) => bail!("lb started although a host socket holds SNAT port 20000 towards db02"),
        Err(e) => format!("{e:#}"),
    };
    let want = format!("{}:20000 -> {db02} (ESTABLISHED)", topo.lb.backend_addr);
    ensure!(
        err.contains("socket(s) of this host already use a port of snat_ports 10000-32767")
            && err.contains(&want)
            && err.contains("--snat-ports"),
        "{err}"
    );
    // The operator's way out with --haproxy-config: another range.
    let lb = topo
        .start_lb_args(&[
            "--haproxy-config",
            &cfg,
            "--xdp-mode",
            "native",
            "--snat-ports",
            "40000-49999",
        ])
        .context("lb did not start with --snat-ports")?;
    ensure!(
        lb.logs()
            .contains("snat_ports 40000-49999: 10000 of them inside"),
        "{}",
        lb.logs()
    );
    ensure!(sysctl(&topo, "net.ipv4.ip_local_reserved_ports")? == "40000-49999");
    writes_reach(&topo, "db01")?;
    drop(held);
    lb.stop()?;
    Ok(())
}
