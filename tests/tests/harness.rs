//! The netns harness itself: topologies come up with working links and go away completely.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use anyhow::{Context, Result};
use lb_tests::harness::{Ns, Topology};

fn ping(from: &Ns, to: Ipv4Addr) -> Result<()> {
    from.exec(&["ping", "-c", "1", "-W", "2", &to.to_string()])
        .with_context(|| format!("ping {to} from {}", from.name))?;
    Ok(())
}

fn all_gone(names: &[Ns]) -> Vec<String> {
    names
        .iter()
        .filter(|ns| ns.exists())
        .map(|ns| ns.name.clone())
        .collect()
}

/// A TCP echo of `payload` from `client` to a listener in `server` at `addr`.
fn tcp_echo(server: &Ns, client: &Ns, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
    let listener = server.run_in(|| TcpListener::bind(addr))??;
    std::thread::scope(|s| {
        let echo = s.spawn(|| -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; payload.len()];
            conn.read_exact(&mut buf)?;
            conn.write_all(&buf)?;
            Ok(())
        });
        let got = client.run_in(|| -> Result<Vec<u8>> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(payload)?;
            let mut buf = vec![0u8; payload.len()];
            c.read_exact(&mut buf)?;
            Ok(buf)
        })??;
        echo.join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        Ok(got)
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn two_armed_client_reaches_lb_and_backends_reach_lb_backend_side() -> Result<()> {
    let topo = Topology::two_armed("two_armed_links")?;
    ping(&topo.client.ns, topo.lb.client_addr)?;
    for b in &topo.backends {
        ping(&b.ns, topo.lb.backend_addr)?;
    }
    // Backends share one L2 segment through the switch's bridge.
    ping(&topo.backends[0].ns, topo.backends[2].addr)?;
    // The VIP is left for the agent to add.
    let addrs = topo.lb.ns.ip(&["-4", "addr"])?;
    assert!(!String::from_utf8_lossy(&addrs.stdout).contains(&topo.vip.to_string()));
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn two_armed_tcp_from_client_to_lb_echoes_through_xdp_pass_peers() -> Result<()> {
    let topo = Topology::two_armed("two_armed_tcp")?;
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let addr = SocketAddr::from((topo.lb.client_addr, 9000));
    let got = tcp_echo(&topo.lb.ns, &topo.client.ns, addr, &payload)?;
    assert_eq!(got, payload);
    let addr = SocketAddr::from((topo.lb.backend_addr, 9001));
    let got = tcp_echo(&topo.lb.ns, &topo.backends[1].ns, addr, &payload)?;
    assert_eq!(got, payload);
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn one_armed_puts_client_lb_and_backends_on_one_segment() -> Result<()> {
    let topo = Topology::one_armed("one_armed_links")?;
    assert_eq!(topo.lb_ifaces, vec!["l0".to_string()]);
    ping(&topo.client.ns, topo.lb.client_addr)?;
    ping(&topo.client.ns, topo.backends[0].addr)?;
    for b in &topo.backends {
        ping(&b.ns, topo.lb.backend_addr)?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn senders_have_tx_offload_off_and_receivers_gro_on_and_peers_carry_xdp() -> Result<()> {
    let topo = Topology::two_armed("platform_settings")?;
    let features = |ns: &Ns, iface: &str| -> Result<String> {
        Ok(String::from_utf8_lossy(&ns.exec(&["ethtool", "-k", iface])?.stdout).into_owned())
    };
    let c0 = features(&topo.client.ns, "c0")?;
    assert!(c0.contains("tx-checksumming: off"), "{c0}");
    assert!(c0.contains("generic-receive-offload: on"), "{c0}");
    let sw = features(&topo.switch, "s-l1")?;
    assert!(sw.contains("generic-receive-offload: on"), "{sw}");
    for (ns, iface) in [
        (&topo.switch, "s-l1"),
        (&topo.client.ns, "c0"),
        (&topo.backends[0].ns, "eth0"),
    ] {
        let link = String::from_utf8_lossy(&ns.ip(&["link", "show", iface])?.stdout).into_owned();
        assert!(
            link.contains("xdp"),
            "{iface} carries no XDP program: {link}"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn dropping_the_topology_removes_every_namespace_and_process() -> Result<()> {
    let topo = Topology::two_armed("drop_removes_all")?;
    let names = topo.namespaces();
    assert!(names.iter().all(|n| n.exists()));
    let sleeper = topo.spawn(&topo.backends[0].ns, "sleeper", &["sleep", "600"])?;
    let pid = sleeper.pid();
    std::mem::forget(sleeper); // the topology must still kill it
    drop(topo);
    assert_eq!(all_gone(&names), Vec::<String>::new());
    assert!(!lb_tests::harness::cleanup::pid_alive(pid));
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_panicking_test_body_still_removes_every_namespace() -> Result<()> {
    let mut names = Vec::new();
    let mut logs = std::path::PathBuf::new();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::one_armed("panicking_body").expect("topology");
        names = topo.namespaces();
        logs = topo.log_dir.clone();
        panic!("deliberate panic inside a test body");
    }));
    assert!(outcome.is_err());
    // A failing test's logs are kept for its reader; this failure was staged, so its (empty)
    // log directory goes too.
    assert!(logs.exists(), "the panicking body's logs were kept");
    std::fs::remove_dir_all(&logs)?;
    assert_eq!(names.len(), 6);
    let still_there: Vec<String> = names
        .iter()
        .filter(|n| n.exists())
        .map(|n| n.name.clone())
        .collect();
    assert!(still_there.is_empty(), "left behind: {still_there:?}");
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn namespaces_of_dead_test_processes_are_removed_at_start() -> Result<()> {
    // A name owned by a pid that cannot exist.
    let stale = Ns::create(&format!("lbt-stale_fixture-{}-lb", i32::MAX))?;
    let pin_dir =
        std::path::Path::new("/sys/fs/bpf/lb").join(format!("test-stale_fixture-{}", i32::MAX));
    let bpffs = std::fs::read_to_string("/proc/mounts")?.contains(" /sys/fs/bpf bpf ");
    if bpffs {
        std::fs::create_dir_all(&pin_dir)?;
    }
    let _topo = Topology::two_armed("stale_removed")?;
    assert!(!stale.exists(), "stale namespace {} survived", stale.name);
    assert!(
        !pin_dir.exists(),
        "stale pin dir {} survived",
        pin_dir.display()
    );
    Ok(())
}
