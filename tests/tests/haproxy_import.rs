//! `lb run --haproxy-config` with the manual's Bolt configuration as is (addresses mapped to the
//! topology): no other file, `bind *:PORT` served on the first address of the first --iface,
//! and in steady state the same backend set per role as HAProxy: writes to the master, reads
//! round-robin over the slaves.
use std::{
    net::{SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    harness::Topology,
    sim::bolt_client::{Access, BoltClient, Negotiation},
};

fn ask(vip: SocketAddrV4, access: Access) -> Result<String> {
    let mut c = BoltClient::connect(SocketAddr::V4(vip), Negotiation::Classic, None)?;
    Ok(c.run("RETURN 1", access)?.server)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_manuals_bolt_haproxy_cfg_routes_writes_to_the_master_and_reads_over_the_slaves() -> Result<()>
{
    let topo = Topology::two_armed("haproxy_import")?;
    let path = topo.manual_haproxy_cfg()?;
    let _sims = topo.start_sims(&["master", "slave", "slave"])?;
    let path_s = path.display().to_string();
    let lb = topo
        .start_lb_args(&["--haproxy-config", &path_s, "--xdp-mode", "native"])
        .context("lb run --haproxy-config did not start")?;
    // `bind *:7680`: the first IPv4 address of the first --iface (the client-facing one).
    let (w, r) = (
        SocketAddrV4::new(topo.lb.client_addr, 7680),
        SocketAddrV4::new(topo.lb.client_addr, 7681),
    );
    let (writes, reads) = topo
        .client
        .ns
        .run_in(|| -> Result<(Vec<String>, Vec<String>)> {
            // Steady state: every role settled (checks at the manual's timings, inter 2s).
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let seen: Vec<String> = (0..6).filter_map(|_| ask(r, Access::Read).ok()).collect();
                let both = ["db02", "db03"].iter().all(|n| seen.iter().any(|s| s == n));
                if ask(w, Access::Write).is_ok() && both {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the VIP did not answer within 15 s"
                );
                thread::sleep(Duration::from_millis(200));
            }
            let writes = (0..40)
                .map(|_| ask(w, Access::Write))
                .collect::<Result<Vec<_>>>()?;
            let reads = (0..40)
                .map(|_| ask(r, Access::Read))
                .collect::<Result<Vec<_>>>()?;
            Ok((writes, reads))
        })??;
    ensure!(
        writes.iter().all(|s| s == "db01"),
        "writes reached {writes:?}; lb log:\n{}",
        lb.stderr()
    );
    let db02 = reads.iter().filter(|s| *s == "db02").count();
    let db03 = reads.iter().filter(|s| *s == "db03").count();
    ensure!(
        db02 + db03 == 40 && db02.abs_diff(db03) <= 1,
        "reads: db02 {db02}, db03 {db03}, others {:?}",
        reads
            .iter()
            .filter(|s| *s != "db02" && *s != "db03")
            .collect::<Vec<_>>()
    );
    Ok(())
}
