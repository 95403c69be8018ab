//! A pair of lb nodes (issue 15): a live Bolt session carried across the balancer's own
//! failover. One segment holds the client, lb1, lb2 and db01..db03 (the simulator); two tests
//! build the two-armed shape instead (the client, lb1 and lb2 on one segment, lb1, lb2 and the
//! members on another). The VIP and the floating SNAT address are on lb1 first. Both agents run with `[pair]` and stream their
//! flows to each other. lb1 then dies as a host does (its interface goes down) and the
//! addresses move to lb2, as keepalived moves them; the client's and the backends' neighbour
//! entries are flushed, as keepalived's gratuitous ARP updates them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    harness::{
        driver::PooledWriter,
        pair::{
            config, established, fail_over, holds, holds_both, links, moved, standby_has_the_flow,
            status, steer, vip_iface, wait_for, Pair, FLOATING,
        },
        Topology,
    },
    sim::bolt_client::{Access, BoltClient},
};

/// Idle pooled connections the keepalived test carries across both moves.
const IDLE: usize = 100;

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_bolt_session_carries_on_through_the_standby_after_the_active_balancer_dies() -> Result<()> {
    takeover(true)
}

/// The same takeover to a standby that does not sync (keepalived alone, as with HAProxy): the
/// session's next write meets no flow on lb2 and is reset.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn without_flow_sync_the_new_active_balancer_resets_the_session() -> Result<()> {
    takeover(false)
}

/// The same takeover in a two-armed pair: the client's segment shared by both hosts, the
/// VIP on their client side and the floating source address on their backend side.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn in_a_two_armed_pair_a_session_carries_on_through_the_standby() -> Result<()> {
    takeover_in(Pair::two_armed("pair_two_armed")?, true)
}

fn takeover(sync: bool) -> Result<()> {
    let pair = Pair::new(if sync {
        "pair_takeover"
    } else {
        "pair_unsynced"
    })?;
    takeover_in(pair, sync)
}

fn takeover_in(pair: Pair, sync: bool) -> Result<()> {
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    // lb1 holds the addresses, as keepalived's master does.
    pair.hold(&topo.lb)?;
    let (c1, mut c2) = pair.configs();
    if !sync {
        c2.truncate(c2.find("[pair]").context("[pair]")?);
    }
    let _agents = pair.start(&c1, &c2)?;

    let mut session = pair.session()?;
    let before = session.run("CREATE (n)", Access::Write)?;
    ensure!(
        before.server == "db01",
        "the write reached {}",
        before.server
    );

    if sync {
        standby_has_the_flow(&standby)?;
    }
    let quiet = status(&standby)?;
    fail_over(topo, lb2)?;

    let next = session.run("CREATE (n)", Access::Write);
    let s = status(&standby)?;
    let moved = |c: &str| moved(&s, &quiet, c);
    if !sync {
        ensure!(next.is_err(), "the session survived without sync: {next:?}");
        ensure!(
            moved("rst_no_flow") > 0,
            "lb2 answered the session with a RST"
        );
        return Ok(());
    }
    let after = next.context("the session's next write, through lb2")?;
    ensure!(
        after.server == "db01" && after.writes == before.writes + 1,
        "after the takeover the same session wrote on {} (writes {} -> {})",
        after.server,
        before.writes,
        after.writes
    );
    for counter in ["rst_no_flow", "new_flows"] {
        ensure!(
            moved(counter) == 0,
            "lb2 counted {counter} +{}: the session went through it as a known flow",
            moved(counter)
        );
    }
    ensure!(
        moved("fwd_packets") > 0 && moved("reply_packets") > 0,
        "lb2 forwarded the session both ways"
    );

    // New sessions go through lb2 too.
    let mut fresh = pair.session()?;
    ensure!(fresh.run("CREATE (n)", Access::Write)?.server == "db01");
    Ok(())
}

/// The same takeover with keepalived moving the addresses (VRRP, gratuitous ARP) from the
/// configuration `lb pair keepalived-config` prints: the session and 100 idle pooled
/// connections carry on once VRRP has moved the VIP; and when lb1 returns, it takes the VIP back (after `preempt_delay`, with
/// lb2's flows) and the session carries on again.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn with_keepalived_the_vip_moves_to_the_standby_and_the_session_follows() -> Result<()> {
    with_keepalived(Pair::new("pair_keepalived")?, IDLE)
}

/// The same with two-armed hosts: keepalived moves the VIP on the clients' side and the
/// floating source address on the backends' side, in one VRRP instance.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn in_a_two_armed_pair_keepalived_moves_each_address_on_its_own_side() -> Result<()> {
    with_keepalived(Pair::two_armed("pair_keepalived2")?, 10)
}

fn with_keepalived(pair: Pair, idle_conns: usize) -> Result<()> {
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    let _running = pair.with_keepalived(1.0)?;

    let mut session = pair.session()?;
    let before = session.run("CREATE (n)", Access::Write)?;
    // A pool's idle connections: opened (handshake and HELLO) and left alone.
    let mut idle: Vec<BoltClient> = (0..idle_conns)
        .map(|_| pair.session())
        .collect::<Result<_>>()?;
    standby_has_the_flow(&standby)?;
    wait_for(
        "every idle connection on lb2",
        Duration::from_secs(5),
        || Ok(established(&standby)?.len() >= 2 * (idle_conns + 1)),
    )?;
    let quiet = status(&standby)?;
    // Under the global maxconn the standby holds a slot for each synced connection.
    ensure!(
        quiet["maxconn"]["active"] == serde_json::json!(idle_conns + 1),
        "lb2's maxconn count: {}",
        quiet["maxconn"]
    );

    links(&topo.lb, false)?;
    let t = Instant::now();
    wait_for("lb2 to take the VIP over", Duration::from_secs(15), || {
        holds_both(topo, lb2)
    })?;
    eprintln!("VRRP moved the addresses in {:?}", t.elapsed());
    // keepalived told each agent its state (`lb pair notify`), which its status shows.
    let vrrp =
        |instance: &str| lb_user::pair::read_status(instance).and_then(|(s, _)| s.vrrp_state);
    wait_for(
        "keepalived's states in the agents' status",
        Duration::from_secs(5),
        || {
            Ok(vrrp(&standby).as_deref() == Some("MASTER")
                && vrrp(&topo.instance).as_deref() == Some("FAULT"))
        },
    )?;
    let after = session
        .run("CREATE (n)", Access::Write)
        .context("the session's next write, through lb2")?;
    ensure!(
        after.server == "db01" && after.writes == before.writes + 1,
        "after the takeover the session wrote on {} (writes {} -> {})",
        after.server,
        before.writes,
        after.writes
    );
    for (i, c) in idle.iter_mut().enumerate() {
        c.run("CREATE (n)", Access::Write)
            .with_context(|| format!("idle connection {i} after the takeover"))?;
    }
    let s = status(&standby)?;
    let on_lb2 = |c: &str| moved(&s, &quiet, c);
    ensure!(
        on_lb2("rst_no_flow") == 0 && on_lb2("new_flows") == 0,
        "lb2 treated the session as unknown (rst_no_flow +{}, new_flows +{})",
        on_lb2("rst_no_flow"),
        on_lb2("new_flows")
    );

    // lb1 comes back: it receives lb2's flows, then (priority 100 after preempt_delay) takes
    // the VIP back, and the session carries on through it.
    let away = status(&topo.instance)?;
    links(&topo.lb, true)?;
    wait_for("lb1 to take the VIP back", Duration::from_secs(20), || {
        Ok(holds_both(topo, &topo.lb)? && !holds(&lb2.ns, vip_iface(lb2), topo.vip)?)
    })?;
    let back = session
        .run("CREATE (n)", Access::Write)
        .context("the session's write after the switchback, through lb1")?;
    // db01 counts every write: the idle connections' 100 came in between.
    ensure!(
        back.writes == after.writes + idle_conns as i64 + 1,
        "writes {} -> {}",
        after.writes,
        back.writes
    );
    for (i, c) in idle.iter_mut().enumerate() {
        c.run("CREATE (n)", Access::Write)
            .with_context(|| format!("idle connection {i} after the switchback"))?;
    }
    let s1 = status(&topo.instance)?;
    let on_lb1 = |c: &str| moved(&s1, &away, c);
    ensure!(
        on_lb1("rst_no_flow") == 0 && on_lb1("fwd_packets") > 0,
        "lb1 after its return: rst_no_flow +{}, fwd_packets +{}",
        on_lb1("rst_no_flow"),
        on_lb1("fwd_packets")
    );
    Ok(())
}

/// The link between the two agents is cut while lb1 serves: lb2's status says it is no longer
/// synced; a session opened meanwhile is not on lb2. Once the link heals, lb1's stream
/// reconnects and its snapshot brings that session to lb2, which then carries it after a
/// takeover.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn after_the_peer_link_heals_the_standby_resyncs_and_carries_what_it_missed() -> Result<()> {
    let pair = Pair::new("pair_link_cut")?;
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    let (a, b) = (topo.lb.client_addr, lb2.client_addr);
    pair.hold(&topo.lb)?;
    let (c1, c2) = pair.configs();
    let _agents = pair.start(&c1, &c2)?;
    let synced = |yes: bool| {
        let standby = standby.clone();
        move || -> Result<bool> {
            Ok(lb_user::pair::read_status(&standby)
                .is_some_and(|(s, _)| s.synced == yes && s.receiving == yes))
        }
    };
    wait_for("lb2 synced", Duration::from_secs(5), synced(true))?;

    // Cut: neither agent can reach the other (the client and the backends still can).
    topo.lb
        .ns
        .ip(&["route", "add", "blackhole", &format!("{b}/32")])?;
    lb2.ns
        .ip(&["route", "add", "blackhole", &format!("{a}/32")])?;
    wait_for(
        "lb2 to say it is not synced",
        Duration::from_secs(10),
        synced(false),
    )?;
    let (s, _) = lb_user::pair::read_status(&standby).context("lb2's pair status")?;
    ensure!(!s.eligible || s.why.starts_with("alone"), "{s:?}");

    let mut session = pair.session()?;
    let before = session.run("CREATE (n)", Access::Write)?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        established(&standby)?.is_empty(),
        "lb2 got the session's flow through a cut link"
    );

    // Heal: lb1's stream reconnects and its snapshot carries the session.
    topo.lb
        .ns
        .ip(&["route", "del", "blackhole", &format!("{b}/32")])?;
    lb2.ns
        .ip(&["route", "del", "blackhole", &format!("{a}/32")])?;
    wait_for("lb2 synced again", Duration::from_secs(10), synced(true))?;
    standby_has_the_flow(&standby)?;

    fail_over(topo, lb2)?;
    let after = session
        .run("CREATE (n)", Access::Write)
        .context("the session opened during the cut, after the takeover")?;
    ensure!(
        after.writes == before.writes + 1,
        "writes {} -> {}",
        before.writes,
        after.writes
    );
    Ok(())
}

/// A database failover while lb2 is active after the balancer's own: lb2 runs its own role
/// checks, and the old master's synced session is reset as any of its own would be; a new
/// session reaches the new master.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_database_failover_after_the_takeover_resets_the_old_masters_synced_session() -> Result<()> {
    use lb_tests::sim::{control::SimControl, Role};
    let pair = Pair::new("pair_db_failover")?;
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    let (a, b) = (topo.lb.client_addr, lb2.client_addr);
    let all: Vec<&str> = topo.backends.iter().map(|b| b.name.as_str()).collect();
    let checked = |instance: &str, me: Ipv4Addr, peer: Ipv4Addr| {
        let base = topo.role_checked_config_of(None, &all, &[("write", 7680, "master")]);
        let pair = config(topo, instance, me, peer);
        format!(
            "instance = \"{instance}\"\nvip_mode = \"routed\"\nsnat_address = \"{FLOATING}\"\n{}\n{}",
            base.split_once('\n').map_or("", |(_, rest)| rest),
            &pair[pair.find("[pair]").unwrap_or(pair.len())..]
        )
    };
    pair.hold(&topo.lb)?;
    let _lb1 = topo.start_lb(&checked(&topo.instance, a, b), &[])?;
    let _lb2 = topo.start_standby_lb(&checked(&standby, b, a), &[])?;
    let connect = || pair.session();
    let mut session = None;
    wait_for("the write set on lb1", Duration::from_secs(10), || {
        Ok(match connect() {
            Ok(mut c) => {
                let ok = c.run("CREATE (n)", Access::Write).is_ok();
                session = Some(c);
                ok
            }
            Err(_) => false,
        })
    })?;
    let mut session = session.context("a session")?;
    standby_has_the_flow(&standby)?;
    fail_over(topo, lb2)?;
    ensure!(session.run("CREATE (n)", Access::Write)?.server == "db01");

    let quiet = status(&standby)?;
    SimControl::new(&pair.sims[0].control).set_role(Role::Slave)?;
    SimControl::new(&pair.sims[1].control).set_role(Role::Master)?;
    let mut fresh = None;
    wait_for(
        "a new session to reach db02",
        Duration::from_secs(10),
        || {
            Ok(
                match connect().and_then(|mut c| c.run("CREATE (n)", Access::Write)) {
                    Ok(r) => {
                        fresh = Some(r.server.clone());
                        r.server == "db02"
                    }
                    Err(_) => false,
                },
            )
        },
    )?;
    let old = session.run("CREATE (n)", Access::Write);
    ensure!(
        old.is_err(),
        "the old master's session still wrote: {old:?}"
    );
    let s = status(&standby)?;
    ensure!(
        Topology::global_counter(&s, "rst_flow_reset")
            > Topology::global_counter(&quiet, "rst_flow_reset"),
        "lb2 reset the synced session of the demoted master"
    );
    Ok(())
}

/// Split brain: both hosts hold the VIPs, and each opens a session of its own. Each learns
/// the other's session through the sync and says so loudly (`split_brain_flows`); whichever
/// host the traffic then reaches carries both sessions, and neither host resets the other's.
/// (A segment that reaches a host before the sync brought its flow there, a few ms after the
/// handshake, is answered with a RST: the test moves traffic only after the sync.)
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn in_a_split_brain_both_hosts_carry_every_session_either_opened() -> Result<()> {
    let pair = Pair::new("pair_split_brain")?;
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    pair.hold(&topo.lb)?;
    pair.hold(lb2)?;
    let (c1, c2) = pair.configs();
    let _agents = pair.start(&c1, &c2)?;

    let open = || -> Result<BoltClient> {
        let mut c = pair.session()?;
        c.run("CREATE (n)", Access::Write)?;
        Ok(c)
    };
    // Each session is opened once the other host has every flow so far: a segment that meets
    // a host not knowing its flow (the sync's lag, a few ms) would be answered with a RST.
    let both_have = |n: usize| -> Result<()> {
        for instance in [topo.instance.as_str(), standby.as_str()] {
            wait_for("the flows on both hosts", Duration::from_secs(5), || {
                Ok(established(instance)?.len() >= 2 * n)
            })?;
        }
        Ok(())
    };
    steer(topo, &topo.lb)?;
    let mut on_lb1 = open()?;
    both_have(1)?;
    steer(topo, lb2)?;
    let mut on_lb2 = open()?;
    both_have(2)?;
    let loud = |instance: &str| {
        lb_user::pair::read_status(instance).is_some_and(|(s, _)| s.split_brain_flows > 0)
    };
    wait_for(
        "both hosts to report the split brain",
        Duration::from_secs(3),
        || Ok(loud(&topo.instance) && loud(&standby)),
    )?;
    let before = [status(&topo.instance)?, status(&standby)?];
    for (host, name) in [(&topo.lb, "lb1"), (lb2, "lb2"), (&topo.lb, "lb1")] {
        steer(topo, host)?;
        on_lb1
            .run("CREATE (n)", Access::Write)
            .with_context(|| format!("lb1's session through {name}"))?;
        on_lb2
            .run("CREATE (n)", Access::Write)
            .with_context(|| format!("lb2's session through {name}"))?;
    }
    for (i, instance) in [topo.instance.as_str(), standby.as_str()]
        .iter()
        .enumerate()
    {
        let s = status(instance)?;
        let moved = Topology::global_counter(&s, "rst_no_flow")
            - Topology::global_counter(&before[i], "rst_no_flow");
        ensure!(
            moved == 0,
            "{instance} reset {moved} segments of a known session"
        );
    }
    Ok(())
}

/// The official Python driver's pooled session through a keepalived takeover: the driver's
/// next write after the VIP moved goes over the same pooled Bolt connection (the server's
/// connection id is unchanged: no RST, no reconnect), and db01 counts exactly one write more.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_official_drivers_pooled_connection_carries_on_through_the_takeover() -> Result<()> {
    let pair = Pair::new("pair_driver")?;
    let (topo, lb2, standby) = (&pair.topo, &pair.lb2, pair.standby.clone());
    let _running = pair.with_keepalived(1.0)?;
    let uri = format!("bolt://{}:7680", topo.vip);
    let Some(mut driver) = PooledWriter::start(&topo.client.ns, &uri)? else {
        return Ok(());
    };
    let first = driver.write()?;
    ensure!(
        first["ok"] == true && first["server"] == "db01" && first["connection"].is_string(),
        "{first}"
    );
    standby_has_the_flow(&standby)?;
    let quiet = status(&standby)?;

    links(&topo.lb, false)?;
    wait_for("lb2 to take the VIP over", Duration::from_secs(15), || {
        holds_both(topo, lb2)
    })?;
    let second = driver.write()?;
    ensure!(
        second["ok"] == true
            && second["server"] == "db01"
            && second["connection"] == first["connection"]
            && second["writes"].as_i64() == first["writes"].as_i64().map(|w| w + 1),
        "the driver's write after the takeover: {second} (before: {first})"
    );
    let s = status(&standby)?;
    ensure!(
        moved(&s, &quiet, "rst_no_flow") == 0 && moved(&s, &quiet, "new_flows") == 0,
        "lb2 treated the driver's connection as unknown"
    );
    Ok(())
}
