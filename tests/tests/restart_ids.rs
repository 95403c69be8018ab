//! Services and backends keep their identity across an agent restart with a changed
//! configuration: ids are given by name, not by position in the file, so swapping services,
//! inserting a backend first or removing a service never sends a connection to a wrong member,
//! and a failover after the restart resets the pre-restart connections to the old master.
use std::{
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use lb_tests::{
    harness::{Shape, SimProcess, Topology, TopologyOptions},
    sim::{
        bolt_client::{Access, BoltClient, Negotiation},
        control::SimControl,
        Role,
    },
};
use nix::sys::signal::Signal;

fn ask(vip: SocketAddrV4, access: Access) -> Result<String> {
    let mut c = BoltClient::connect(SocketAddr::V4(vip), Negotiation::Classic, None)?;
    Ok(c.run("RETURN 1", access)?.server)
}

/// Waits until writes through `w` reach `master` and reads through `r` reach every one of
/// `slaves`.
fn settled(
    topo: &Topology,
    w: SocketAddrV4,
    r: SocketAddrV4,
    master: &str,
    slaves: &[&str],
) -> Result<()> {
    topo.client.ns.run_in(|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reads: Vec<String> = (0..2 * slaves.len())
                .filter_map(|_| ask(r, Access::Read).ok())
                .collect();
            let write = ask(w, Access::Write).ok();
            if write.as_deref() == Some(master)
                && slaves.iter().all(|s| reads.iter().any(|x| x == s))
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "not settled within 10 s: write {write:?}, reads {reads:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    })?
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One probe: through the write VIP (else the read VIP), the server that answered or the error.
type Probe = (bool, Result<String, String>);

fn control(sims: &[SimProcess], i: usize) -> SimControl {
    SimControl::new(&sims[i].control)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_restart_with_services_swapped_a_backend_inserted_and_a_service_removed_keeps_every_identity(
) -> Result<()> {
    let topo = Topology::new(
        "ids",
        Shape::TwoArmed,
        TopologyOptions {
            backends: 4,
            ..TopologyOptions::default()
        },
    )?;
    let sims = topo.start_sims(&["master", "slave", "slave", "slave"])?;
    let (w, r) = (
        SocketAddrV4::new(topo.vip, 7680),
        SocketAddrV4::new(topo.vip, 7681),
    );
    let before = topo.role_checked_config_of(
        Some("10000-32767"),
        &["db01", "db02", "db03"],
        &[
            ("write", 7680, "master"),
            ("read", 7681, "slave"),
            ("http", 80, "available"),
        ],
    );
    // Reordered services, a new backend first (every other backend's position shifts), the
    // HTTP service gone, another SNAT range.
    let after = topo.role_checked_config_of(
        Some("40000-49999"),
        &["db04", "db01", "db02", "db03"],
        &[("read", 7681, "slave"), ("write", 7680, "master")],
    );
    let lb = topo.start_lb(&before, &["--xdp-mode", "native"])?;
    settled(&topo, w, r, "db01", &["db02", "db03"])?;
    // A pooled connection to the master from before the restart.
    let mut pooled = topo
        .client
        .ns
        .run_in(|| BoltClient::connect(SocketAddr::V4(w), Negotiation::Classic, None))??;
    ensure!(pooled.run("RETURN 1", Access::Write)?.server == "db01");

    // New connections every 10 ms on both VIPs across the restart.
    let stop = AtomicBool::new(false);
    let (seen, lb2) = thread::scope(|s| -> Result<(Vec<Probe>, _)> {
        // Whatever way this closure ends, the probe stops (the scope waits for it).
        let _stop = StopOnDrop(&stop);
        let probe = s.spawn(|| {
            topo.client.ns.run_in(|| {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for (write, vip, access) in [(true, w, Access::Write), (false, r, Access::Read)]
                    {
                        seen.push((write, ask(vip, access).map_err(|e| format!("{e:#}"))));
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                seen
            })
        });
        thread::sleep(Duration::from_millis(500));
        lb.process.signal(Signal::SIGKILL)?;
        thread::sleep(Duration::from_millis(300));
        let lb2 = topo.start_lb(&after, &["--xdp-mode", "native"])?;
        ensure!(
            lb2.logs().contains("adopting the running instance"),
            "{}",
            lb2.logs()
        );
        // The new backend joins the read set once its checks rise.
        thread::sleep(Duration::from_millis(2500));
        stop.store(true, Ordering::Relaxed);
        let seen = probe
            .join()
            .map_err(|_| anyhow::anyhow!("probe panicked"))??;
        Ok((seen, lb2))
    })?;
    let wrong: Vec<String> = seen
        .iter()
        .filter_map(|(write, got)| match (write, got) {
            (true, Ok(s)) if s != "db01" => Some(format!("write answered by {s}")),
            (false, Ok(s)) if s == "db01" => Some(format!("read answered by {s}")),
            _ => None,
        })
        .collect();
    let answered = seen.iter().filter(|(_, g)| g.is_ok()).count();
    eprintln!(
        "{} probes across the restart, {answered} answered, {} wrong",
        seen.len(),
        wrong.len()
    );
    ensure!(wrong.is_empty(), "answers from a wrong member: {wrong:?}");
    ensure!(
        answered * 10 >= seen.len() * 9,
        "only {answered} of {} probes were answered",
        seen.len()
    );
    ensure!(
        seen.iter().any(|(w, g)| !w && g.as_deref() == Ok("db04")),
        "the inserted backend db04 never served a read"
    );
    // The removed service's VIP is no longer balanced (the kernel refuses: nothing listens).
    let http = SocketAddr::V4(SocketAddrV4::new(topo.vip, 80));
    let c = topo
        .client
        .ns
        .run_in(|| TcpStream::connect_timeout(&http, Duration::from_secs(2)))?;
    ensure!(
        c.is_err(),
        "the removed HTTP service still answers on its VIP"
    );

    // The pre-restart connection (its SNAT port in the earlier range) still gets its answers,
    // and that range stays reserved while it lives.
    ensure!(pooled.run("RETURN 1", Access::Write)?.server == "db01");
    let reserved = || -> Result<String> {
        let out = topo
            .lb
            .ns
            .exec(&["sysctl", "-n", "net.ipv4.ip_local_reserved_ports"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    ensure!(
        reserved()? == "10000-32767,40000-49999",
        "reserved: {}",
        reserved()?
    );
    ensure!(
        lb2.logs()
            .contains("snat_ports changed from 10000-32767 to 40000-49999"),
        "{}",
        lb2.logs()
    );

    // A failover after the restart resets the pre-restart connection to the old master.
    control(&sims, 0).set_role(Role::Slave)?;
    control(&sims, 1).set_role(Role::Master)?;
    settled(&topo, w, r, "db02", &["db01", "db03", "db04"])?;
    match pooled.run("RETURN 1", Access::Write) {
        Err(e) if format!("{e:#}").to_lowercase().contains("reset") => {}
        other => bail!(
            "the pre-restart connection to the old master was not reset: {other:?}\n{}",
            lb2.logs()
        ),
    }
    // Its last flow gone (a RST-closed flow goes about 2 s later), the earlier range is the
    // host's again.
    let deadline = Instant::now() + Duration::from_secs(8);
    while reserved()? != "40000-49999" {
        ensure!(
            Instant::now() < deadline,
            "the earlier range is still reserved: {}\n{}",
            reserved()?,
            lb2.logs()
        );
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(lb2
        .logs()
        .contains("the last flow of snat_ports 10000-32767 ended"));
    Ok(())
}
