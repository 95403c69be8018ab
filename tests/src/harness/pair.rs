//! A pair of lb hosts in a topology with a standby (`TopologyOptions::standby`; one-armed, or
//! two-armed with the client's segment shared by both hosts),
//! shared by the pair tests (`tests/tests/pair.rs`) and `lb-bench pair`: the agents'
//! configuration, keepalived from `lb pair keepalived-config`, moving the addresses by hand,
//! and reading an instance's tables and status.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::maps::HashMap;
use lb_common::{names, Flow, FlowKey};

use super::{lb_bin, LbHost, LbProcess, Ns, Process, Shape, SimProcess, Topology, TopologyOptions};
use crate::sim::bolt_client::{BoltClient, Negotiation};

/// The pair's floating SNAT address (the backends' replies go to whichever host holds it).
pub const FLOATING: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 60);
/// Where each agent listens for its peer's stream.
pub const SYNC_PORT: u16 = 7690;

/// The agent configuration of `instance` as one host of the pair (`me`, streaming to `peer`):
/// the write VIP :7680 to db01, `vip_mode = "routed"` (the addresses are keepalived's or the
/// test's), the floating `snat_address`, a global `maxconn` as the manual's HAProxy has (the
/// standby takes a slot for each synced flow), `[pair]` with a shared secret.
pub fn config(topo: &Topology, instance: &str, me: Ipv4Addr, peer: Ipv4Addr) -> String {
    let secret = topo.log_dir.join("pair.secret");
    std::fs::write(&secret, "a shared secret of the pair\n").expect("writing the pair's secret");
    format!(
        "instance = \"{instance}\"\nvip_mode = \"routed\"\nsnat_address = \"{FLOATING}\"\nmaxconn = 100000\n{}\
         [[service]]\nname = \"write\"\nvip = \"{}:7680\"\nbackend_port = 7687\nbackends = [\"db01\"]\n\
         [pair]\npeer = \"{peer}:{SYNC_PORT}\"\nlisten = \"{me}:{SYNC_PORT}\"\nsecret_file = \"{}\"\n",
        topo.backends_toml(),
        topo.vip,
        secret.display()
    )
}

/// The established-table entries of `instance` (read from its pins).
pub fn established(instance: &str) -> Result<Vec<(FlowKey, Flow)>> {
    let map = lb_user::dataplane::open_pinned(
        &lb_user::dataplane::pin_dir(instance),
        names::CT_ESTABLISHED,
    )?;
    let table: HashMap<_, FlowKey, Flow> = HashMap::try_from(map)?;
    Ok(table.iter().filter_map(|r| r.ok()).collect())
}

/// `lb status --instance INSTANCE --json`.
pub fn status(instance: &str) -> Result<serde_json::Value> {
    let out = std::process::Command::new(lb_bin())
        .args(["status", "--instance", instance, "--json"])
        .output()?;
    ensure!(
        out.status.success(),
        "lb status --instance {instance} failed"
    );
    serde_json::from_slice(&out.stdout).context("lb status --json")
}

/// Polls `ok` every 20 ms until it says yes; an error after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        if ok()? {
            return Ok(());
        }
        ensure!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the standby `instance` holds the session's flow (both entries) and checks that
/// its copy sends from the floating address.
pub fn standby_has_the_flow(instance: &str) -> Result<()> {
    wait_for("the flow on the standby", Duration::from_secs(2), || {
        Ok(established(instance)?.len() >= 2)
    })?;
    let synced = established(instance)?;
    ensure!(
        synced
            .iter()
            .any(|(_, f)| f.nat_saddr == u32::from_ne_bytes(FLOATING.octets())),
        "the standby's copy sends from the floating address: {synced:?}"
    );
    Ok(())
}

/// lb1 dies as a host does (its links go down); the addresses move to lb2, and the client's
/// and the backends' neighbour entries are flushed (keepalived's gratuitous ARP).
pub fn fail_over(topo: &Topology, lb2: &LbHost) -> Result<()> {
    links(&topo.lb, false)?;
    hold(topo, lb2)?;
    topo.client
        .ns
        .ip(&["neigh", "flush", "dev", &topo.client.iface])?;
    for db in &topo.backends {
        db.ns.ip(&["neigh", "flush", "dev", &db.iface])?;
    }
    Ok(())
}

/// Puts the VIP (on the host's first interface) and the floating address (on its last: the
/// backends' side) on `host`, as keepalived's master does.
pub fn hold(topo: &Topology, host: &LbHost) -> Result<()> {
    for (addr, iface) in [(topo.vip, vip_iface(host)), (FLOATING, snat_iface(host))] {
        host.ns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", iface])?;
    }
    Ok(())
}

/// Whether `host` holds both the VIP and the floating address.
pub fn holds_both(topo: &Topology, host: &LbHost) -> Result<bool> {
    Ok(holds(&host.ns, vip_iface(host), topo.vip)? && holds(&host.ns, snat_iface(host), FLOATING)?)
}

/// The interface of `host` the VIP goes on (the clients' side).
pub fn vip_iface(host: &LbHost) -> &str {
    &host.ifaces[0]
}

/// The interface of `host` the floating address goes on (the backends' side).
pub fn snat_iface(host: &LbHost) -> &str {
    host.ifaces.last().expect("an lb host has an interface")
}

/// Takes every link of `host` up or down (a host that dies, or comes back).
pub fn links(host: &LbHost, up: bool) -> Result<()> {
    for iface in &host.ifaces {
        host.ns
            .ip(&["link", "set", iface, if up { "up" } else { "down" }])?;
    }
    Ok(())
}

/// Whether `addr` is on `iface` in `ns`.
pub fn holds(ns: &Ns, iface: &str, addr: Ipv4Addr) -> Result<bool> {
    let out = ns.ip(&["-4", "-o", "addr", "show", "dev", iface])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("inet {addr}/")))
}

/// keepalived on `host` with the configuration `lb pair keepalived-config` prints for the
/// agent started with `config`, adverts every `advert_int` seconds.
pub fn keepalived(
    topo: &Topology,
    host: &LbHost,
    name: &str,
    config: &std::path::Path,
    priority: u8,
    advert_int: f64,
) -> Result<Process> {
    let mut cmd = std::process::Command::new(lb_bin());
    cmd.args(["pair", "keepalived-config", "--config"])
        .arg(config);
    for iface in &host.ifaces {
        cmd.args(["--iface", iface]);
    }
    let out = cmd
        .args(["--priority", &priority.to_string()])
        .args(["--advert-int", &advert_int.to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "lb pair keepalived-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = topo.log_dir.join(format!("{name}.conf"));
    std::fs::write(&conf, &out.stdout)?;
    let file = |ext: &str| {
        topo.log_dir
            .join(format!("{name}.{ext}"))
            .display()
            .to_string()
    };
    topo.spawn(
        &host.ns,
        name,
        &[
            "keepalived",
            "--dont-fork",
            "--log-console",
            "--vrrp",
            "--use-file",
            &conf.display().to_string(),
            "--pid",
            &file("pid"),
            "--vrrp_pid",
            &file("vrrp.pid"),
        ],
    )
}

/// The MAC address of `iface` in `ns`.
pub fn mac_of(ns: &Ns, iface: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .context("no MAC in ip -j link")
}

/// Sends the client's VIP traffic and db01's replies to `host` (what ARP would settle on,
/// made permanent).
pub fn steer(topo: &Topology, host: &LbHost) -> Result<()> {
    let mac = &mac_of(&host.ns, vip_iface(host))?;
    topo.client.ns.ip(&[
        "neigh",
        "replace",
        &topo.vip.to_string(),
        "lladdr",
        mac,
        "dev",
        &topo.client.iface,
        "nud",
        "permanent",
    ])?;
    let db01 = topo.backend("db01")?;
    db01.ns.ip(&[
        "neigh",
        "replace",
        &FLOATING.to_string(),
        "lladdr",
        &mac_of(&host.ns, snat_iface(host))?,
        "dev",
        &db01.iface,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

/// A topology with a standby host and the three simulators (db01 the master): what every
/// pair test and `lb-bench pair` start from.
pub struct Pair {
    /// Dropped first: the simulators stop before the topology is taken down.
    pub sims: Vec<SimProcess>,
    pub topo: Topology,
    /// The second host, and its agent's instance name.
    pub lb2: LbHost,
    pub standby: String,
}

impl Pair {
    /// One-armed: the client, both hosts and the members on one segment.
    pub fn new(name: &str) -> Result<Pair> {
        Self::shaped(name, Shape::OneArmed)
    }

    /// Two-armed: the client and both hosts on one segment, both hosts and the members on
    /// another.
    pub fn two_armed(name: &str) -> Result<Pair> {
        Self::shaped(name, Shape::TwoArmed)
    }

    fn shaped(name: &str, shape: Shape) -> Result<Pair> {
        let topo = Topology::new(
            name,
            shape,
            TopologyOptions {
                standby: true,
                ..Default::default()
            },
        )?;
        let sims = topo.start_sims(&["master", "slave", "slave"])?;
        let lb2 = topo.lb2.clone().context("standby host")?;
        let standby = topo.standby_instance();
        Ok(Pair {
            sims,
            topo,
            lb2,
            standby,
        })
    }

    /// lb1's and lb2's configurations, each streaming to the other ([`config`]).
    pub fn configs(&self) -> (String, String) {
        let (a, b) = (self.topo.lb.client_addr, self.lb2.client_addr);
        (
            config(&self.topo, &self.topo.instance, a, b),
            config(&self.topo, &self.standby, b, a),
        )
    }

    /// Puts the VIP and the floating address on `host`, as keepalived's master does.
    pub fn hold(&self, host: &LbHost) -> Result<()> {
        hold(&self.topo, host)
    }

    /// Starts lb1's agent with `lb1` and lb2's with `lb2` (each waits for its `lb ready`).
    pub fn start(&self, lb1: &str, lb2: &str) -> Result<(LbProcess, LbProcess)> {
        Ok((
            self.topo.start_lb(lb1, &[])?,
            self.topo.start_standby_lb(lb2, &[])?,
        ))
    }

    /// The write VIP.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.topo.vip, 7680))
    }

    /// A Bolt session through the write VIP, opened in the client's namespace.
    pub fn session(&self) -> Result<BoltClient> {
        let vip = self.vip();
        self.topo
            .client
            .ns
            .run_in(move || BoltClient::connect(vip, Negotiation::Classic, None))?
    }
}

/// How much the global counter `name` moved from `before` to `after` (two `lb status`).
pub fn moved(after: &serde_json::Value, before: &serde_json::Value, name: &str) -> u64 {
    Topology::global_counter(after, name).saturating_sub(Topology::global_counter(before, name))
}

/// Both agents and both keepalived daemons of a [`Pair`], kept running while this lives.
pub struct Running {
    pub lb1: LbProcess,
    pub lb2: LbProcess,
    pub keepalived: [Process; 2],
}

impl Pair {
    /// Starts both agents with [`Pair::configs`] and keepalived on both hosts (priorities 100
    /// and 90, adverts every `advert_int` s), and waits until lb1 holds the VIP and the
    /// floating address.
    pub fn with_keepalived(&self, advert_int: f64) -> Result<Running> {
        let (c1, c2) = self.configs();
        let (lb1, lb2) = self.start(&c1, &c2)?;
        let topo = &self.topo;
        let k1 = keepalived(topo, &topo.lb, "keepalived1", &lb1.config, 100, advert_int)?;
        let k2 = keepalived(topo, &self.lb2, "keepalived2", &lb2.config, 90, advert_int)?;
        wait_for("lb1 to hold the VIP", Duration::from_secs(20), || {
            holds_both(topo, &topo.lb)
        })?;
        Ok(Running {
            lb1,
            lb2,
            keepalived: [k1, k2],
        })
    }
}
