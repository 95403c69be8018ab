//! lb on the hosts operators have: a HAProxy host's wide ephemeral port range.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::{
    harness::Topology,
    sim::bolt_client::{Access, BoltClient, Negotiation},
};

/// The manual's Bolt HAProxy configuration with this topology's backend addresses.
fn manual_cfg(topo: &Topology) -> Result<String> {
    Ok(topo.manual_haproxy_cfg()?.display().to_string())
}

fn sysctl(topo: &Topology, key: &str) -> Result<String> {
    let out = topo.lb.ns.exec(&["sysctl", "-n", key])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits until a write through `vip`:7680 reaches the master.
fn writes_reach(topo: &Topology, vip: Ipv4Addr, master: &str) -> Result<()> {
    let vip = SocketAddr::V4(SocketAddrV4::new(vip, 7680));
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
    writes_reach(&topo, topo.lb.client_addr, "db01")?;
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
    // A connection of the balancer host's own, from port 20000 to db02's Bolt port (a data
    // port of the manual's services).
    let db02 = SocketAddrV4::new(topo.backends[1].addr, 7687);
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
        err.contains("connection(s) of this host already use a port of snat_ports 10000-32767")
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
    writes_reach(&topo, topo.lb.client_addr, "db01")?;
    drop(held);
    lb.stop()?;
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_data_path_that_cannot_forward_is_caught_by_the_self_test_before_ready() -> Result<()> {
    let topo = Topology::two_armed("selftest")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let config = topo.log_dir.join("lb.toml");
    std::fs::write(&config, topo.role_checked_config())?;
    // Attached to the client side only: the backends are reached through an interface the
    // program cannot send to, from an address that is not one of its SNAT addresses. Every
    // new connection would be dropped.
    let mut cmd = topo.lb.ns.command(lb_tests::harness::lb_bin());
    cmd.args([
        "run",
        "--instance",
        &topo.instance,
        "--iface",
        &topo.lb.ifaces[0],
    ])
    .arg("--config")
    .arg(&config)
    .args(["--xdp-mode", "native"]);
    let lb = topo.spawn_command("lb-one-iface", cmd)?;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = lb.try_wait()? {
            break s;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "lb neither refused nor stopped within 20 s: {}",
            lb.logs()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let logs = lb.logs();
    ensure!(!status.success(), "lb exited with {status}: {logs}");
    ensure!(
        !logs.contains("lb ready"),
        "lb said ready with a data path that drops every new connection: {logs}"
    );
    ensure!(
        logs.contains("self-test: a SYN to service write")
            && logs.contains("was not forwarded")
            && logs.contains("drop_no_snat_addr +1"),
        "{logs}"
    );
    // Nothing was left behind: no pins, no VIP.
    ensure!(
        !lb_user::dataplane::pin_dir(&topo.instance).exists(),
        "a refused start left pins"
    );
    // Attached to both sides, the same configuration passes the self-test.
    let ok = topo.start_lb(&topo.role_checked_config(), &["--xdp-mode", "native"])?;
    let want = format!(
        "self-test: a SYN to service write was forwarded to {}:7687 from {}:",
        topo.backends[0].addr, topo.lb.backend_addr
    );
    ensure!(ok.logs().contains(&want), "{}", ok.logs());
    writes_reach(&topo, topo.vip, "db01")?;
    Ok(())
}

/// `lb health` in the lb namespace: (exit code 0, its output).
fn lb_health(topo: &Topology) -> Result<(bool, String)> {
    let mut cmd = topo.lb.ns.command(lb_tests::harness::lb_bin());
    cmd.args(["health", "--instance", &topo.instance]);
    let out = cmd.output().context("run lb health")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Waits up to 10 s for `lb health` to answer `healthy`, its output containing `says`.
fn health_becomes(topo: &Topology, healthy: bool, says: &str) -> Result<String> {
    let t = Instant::now();
    loop {
        let (ok, out) = lb_health(topo)?;
        if ok == healthy && out.contains(says) {
            return Ok(out);
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "lb health did not become {} saying {says:?}:\n{out}",
            if healthy { "healthy" } else { "unhealthy" }
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `lb ARGS... --instance` in the lb namespace.
fn lb(topo: &Topology, args: &[&str]) -> Result<()> {
    let mut cmd = topo.lb.ns.command(lb_tests::harness::lb_bin());
    cmd.args(args).args(["--instance", &topo.instance]);
    lb_tests::harness::ns::run(&mut cmd)?;
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn lb_health_says_by_its_exit_code_whether_this_balancer_can_serve() -> Result<()> {
    let topo = Topology::two_armed("lbhealth")?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let agent = topo.start_lb(&topo.role_checked_config(), &["--xdp-mode", "native"])?;

    // Serving: every check passes, and the output says what was checked.
    let out = health_becomes(&topo, true, "service write: db01")?;
    for line in ["ok   agent running", "XDP program", "data path configured"] {
        ensure!(out.contains(line), "no {line:?} in:\n{out}");
    }
    for iface in &topo.lb.ifaces {
        ensure!(
            out.contains(&format!("ok   {iface}: XDP program")),
            "{iface}:\n{out}"
        );
    }

    // The write service without a backend (its master disabled by the operator): not ready.
    lb(&topo, &["server", "db01", "disable"])?;
    health_becomes(&topo, false, "FAIL service write: no backend in its set")?;
    lb(&topo, &["server", "db01", "enable"])?;
    health_becomes(&topo, true, "service write: db01")?;

    // The agent gone (kill -9): the data path still forwards, but nothing checks or fails
    // over: not ready, so that keepalived moves the VIP.
    agent.signal(nix::sys::signal::Signal::SIGKILL)?;
    health_becomes(&topo, false, "FAIL agent not running")?;

    // Detached: no program on the interfaces.
    lb(&topo, &["detach"])?;
    let (ok, out) = lb_health(&topo)?;
    ensure!(
        !ok && (out.contains("no pinned XDP link") || out.contains("FAIL instance")),
        "after lb detach:\n{out}"
    );
    Ok(())
}
