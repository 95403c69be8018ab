//! The contestants of `lb-bench all` and the cell they run in: a fresh two-armed topology with the
//! simulators (Bolt on 7687, role checks on 7474) in db01..db03 and an iperf3 server in db01, plus a
//! direct leg for the no-balancer baseline, and one balancer set up in the lb namespace.
//!
//! ```text
//!  [client] c0 198.18.0.2 ---- l0 [lb] l1 10.0.1.1 ---- br0 ---- db01..db03 10.0.1.10-12
//!           c1 10.0.1.200 ------------------------------ br0       (direct leg, s-c1)
//! ```
//!
//! Every cell gets the same topology (the direct leg exists in every cell, the lb namespace is the
//! same in the direct cells, just unused), the same sender offloads (tx checksum offload off on
//! `c0`, `c1` and the backends' `eth0`, which native XDP on veth needs; GRO on where the harness
//! turns it on, and on `c1`/`s-c1` likewise), and the same socket sysctls: `tcp_tw_reuse=1` and
//! ports 1024-65000 in the client namespace (short sessions close from the client side and would
//! otherwise exhaust its ephemeral ports in TIME_WAIT). The one exception is
//! [`Contestant::DirectOffloads`], the direct path with the senders' offloads left on.
//!
//! Balancers (the manual's two Bolt services, write 7680 -> db01, read 7681 -> db02/db03, plus
//! 5201 -> db01 for iperf3, a set of ONE backend so the control and data connections meet):
//! - lb: static sets (the sets the manual's role checks settle on), `--xdp-mode native|generic`;
//! - HAProxy 2.6: the manual's `neo4j-ha-bolt.cfg` (addresses mapped, see
//!   [`failover::haproxy_config`]) plus `listen bench-iperf` in `mode tcp`; the VIP as a /32 on
//!   `l0`, forwarding off; `tcp_tw_reuse=1` and ports 1024-65000 in the lb namespace too (its
//!   server-side connections close first);
//! - nftables: DNAT at prerouting to the same backends (`numgen inc` for the read set) and
//!   masquerade out of `l1`, forwarding on, the VIP as a /32 on `l0` (so the lb namespace answers
//!   ARP for it).

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::failover;
use crate::harness::{
    ns::run, LbProcess, Ns, Process, Shape, SimProcess, Topology, TopologyOptions,
};

/// The Bolt write port of the VIP (the manual's `frontend neo4j-write`).
pub const WRITE_PORT: u16 = 7680;
/// The backends' Bolt port.
pub const BOLT_PORT: u16 = 7687;
/// iperf3's port, on the VIP and on db01.
pub const IPERF_PORT: u16 = 5201;
/// lb only (`lb-bench churn`): a read service over all three members.
pub const READ_ALL_PORT: u16 = 7682;
/// The client's address on the direct leg.
pub const DIRECT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 200);

/// A way for the client to reach the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Contestant {
    /// Client -> backend over the direct leg, no balancer: the baseline.
    Direct,
    /// The same with the senders' checksum/segmentation offloads on.
    DirectOffloads,
    LbNative,
    LbGeneric,
    Haproxy,
    Nftables,
}

impl Contestant {
    pub const ALL: [Contestant; 6] = [
        Contestant::Direct,
        Contestant::DirectOffloads,
        Contestant::LbNative,
        Contestant::LbGeneric,
        Contestant::Haproxy,
        Contestant::Nftables,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Contestant::Direct => "direct",
            Contestant::DirectOffloads => "direct-offloads",
            Contestant::LbNative => "lb-native",
            Contestant::LbGeneric => "lb-generic",
            Contestant::Haproxy => "haproxy",
            Contestant::Nftables => "nftables",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Contestant::Direct => "direct (no balancer)",
            Contestant::DirectOffloads => "direct, sender offloads on",
            Contestant::LbNative => "lb, native XDP",
            Contestant::LbGeneric => "lb, generic XDP",
            Contestant::Haproxy => "HAProxy 2.6, manual config",
            Contestant::Nftables => "nftables DNAT + masquerade",
        }
    }

    pub fn parse(s: &str) -> Result<Contestant> {
        Contestant::ALL
            .into_iter()
            .find(|c| c.id() == s)
            .with_context(|| {
                let ids: Vec<&str> = Contestant::ALL.iter().map(|c| c.id()).collect();
                format!("unknown contestant {s:?} (one of {})", ids.join(", "))
            })
    }

    pub fn is_lb(self) -> bool {
        matches!(self, Contestant::LbNative | Contestant::LbGeneric)
    }

    pub fn is_direct(self) -> bool {
        matches!(self, Contestant::Direct | Contestant::DirectOffloads)
    }
}

/// The balancer process of a cell, if any.
pub enum Balancer {
    None,
    Lb(LbProcess),
    Haproxy(Process),
    Nftables,
}

/// One contestant ready to measure. Dropping it removes the topology and everything in it.
pub struct Cell {
    pub contestant: Contestant,
    pub balancer: Balancer,
    /// Where the client sends Bolt sessions.
    pub bolt: SocketAddrV4,
    /// Where the client runs iperf3 against.
    pub iperf: SocketAddrV4,
    /// The balancer's configuration as given to it (empty for direct).
    pub config: String,
    pub sims: Vec<SimProcess>,
    pub iperf_server: Process,
    // Last: dropped after the processes above.
    pub topo: Topology,
}

/// lb's configuration: the manual's services as static sets, plus iperf3 -> db01.
pub fn lb_config(topo: &Topology) -> String {
    let mut s = format!("instance = \"{}\"\n", topo.instance);
    for b in &topo.backends {
        s += &format!(
            "\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            b.name, b.addr
        );
    }
    for (name, port, bport, members) in [
        ("write", WRITE_PORT, BOLT_PORT, "\"db01\""),
        ("read", 7681, BOLT_PORT, "\"db02\", \"db03\""),
        ("iperf", IPERF_PORT, IPERF_PORT, "\"db01\""),
        (
            "read-all",
            READ_ALL_PORT,
            BOLT_PORT,
            "\"db01\", \"db02\", \"db03\"",
        ),
    ] {
        s += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = {bport}\nbackends = [{members}]\n",
            topo.vip
        );
    }
    s
}

/// The manual's HAProxy configuration (mapped) plus a `mode tcp` listener for iperf3 -> db01.
pub fn haproxy_config(topo: &Topology) -> Result<String> {
    let mut cfg = failover::haproxy_config(topo, false)?;
    let db01 = topo.backend("db01")?;
    cfg += &format!(
        "\n# lb-bench: bulk throughput through the same HAProxy (one server, so iperf3's control and\n\
         # data connections meet on it).\nlisten bench-iperf\n    bind *:{IPERF_PORT}\n    mode tcp\n    server db01 {}:{IPERF_PORT}\n",
        db01.addr
    );
    Ok(cfg)
}

/// The nftables ruleset: the same services as DNAT rules, masquerade towards the backends.
pub fn nft_ruleset(topo: &Topology) -> Result<String> {
    let (db01, db02, db03) = (
        topo.backend("db01")?.addr,
        topo.backend("db02")?.addr,
        topo.backend("db03")?.addr,
    );
    let vip = topo.vip;
    let out = topo.lb.ifaces.get(1).context("two-armed lb has l1")?;
    Ok(format!(
        "table ip lbbench {{\n\
         \tchain pre {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {vip} tcp dport {WRITE_PORT} dnat to {db01}:{BOLT_PORT}\n\
         \t\tip daddr {vip} tcp dport 7681 dnat to numgen inc mod 2 map {{ 0 : {db02}, 1 : {db03} }}:{BOLT_PORT}\n\
         \t\tip daddr {vip} tcp dport {IPERF_PORT} dnat to {db01}:{IPERF_PORT}\n\
         \t}}\n\
         \tchain post {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{out}\" masquerade\n\
         \t}}\n}}\n"
    ))
}

fn sysctl(ns: &Ns, settings: &[&str]) -> Result<()> {
    let mut args = vec!["sysctl", "-qw"];
    args.extend_from_slice(settings);
    ns.exec(&args)?;
    Ok(())
}

/// Client-side socket settings for many short connections (see the module doc).
const SHORT_CONNECTION_SYSCTLS: [&str; 2] = [
    "net.ipv4.tcp_tw_reuse=1",
    "net.ipv4.ip_local_port_range=1024 65000",
];

/// The direct leg: `c1` in the client namespace, `s-c1` on the bridge.
fn add_direct_leg(topo: &Topology, offloads: bool) -> Result<()> {
    let (client, sw) = (&topo.client.ns, &topo.switch);
    run(std::process::Command::new("ip").args([
        "link",
        "add",
        "c1",
        "netns",
        &client.name,
        "type",
        "veth",
        "peer",
        "name",
        "s-c1",
        "netns",
        &sw.name,
    ]))?;
    client.ip(&["addr", "add", &format!("{DIRECT_ADDR}/24"), "dev", "c1"])?;
    client.ip(&["link", "set", "c1", "up"])?;
    sw.ip(&["link", "set", "s-c1", "master", "br0"])?;
    sw.ip(&["link", "set", "s-c1", "up"])?;
    sw.exec(&["ethtool", "-K", "s-c1", "gro", "on"])?;
    client.exec(&["ethtool", "-K", "c1", "gro", "on"])?;
    if !offloads {
        client.exec(&["ethtool", "-K", "c1", "tx", "off"])?;
    }
    Ok(())
}

/// Polls `ss` in `ns` until something listens on TCP `port`.
fn wait_listening(ns: &Ns, port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec_unchecked(&["ss", "-Hltn", &format!("sport = :{port}")])?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within 10 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Builds a fresh topology for `c` (named after the round too: an agent instance name must not
/// come back within one process, since `lb` keeps its host changes in `/run/lb/<instance>.host.json`
/// when stopped and a later agent of that name would trust them) and starts everything in it.
pub fn setup(c: Contestant, round: usize) -> Result<Cell> {
    let options = TopologyOptions {
        sender_offloads: c == Contestant::DirectOffloads,
        ..TopologyOptions::default()
    };
    let topo = Topology::new(
        &format!("bench_{}_r{round}", c.id()),
        Shape::TwoArmed,
        options,
    )?;
    add_direct_leg(&topo, c == Contestant::DirectOffloads)?;
    sysctl(&topo.client.ns, &SHORT_CONNECTION_SYSCTLS)?;
    let sims = topo.start_sims(&["master", "slave", "slave"])?;
    let db01 = topo.backend("db01")?.clone();
    let iperf_server = topo.spawn(
        &db01.ns,
        "iperf3",
        &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
    )?;
    wait_listening(&db01.ns, IPERF_PORT, "iperf3 -s")?;

    let vip_bolt = SocketAddrV4::new(topo.vip, WRITE_PORT);
    let vip_iperf = SocketAddrV4::new(topo.vip, IPERF_PORT);
    let lb_ns = topo.lb.ns.clone();
    let l0 = topo.lb.ifaces[0].clone();
    let (balancer, config, bolt, iperf) = match c {
        Contestant::Direct | Contestant::DirectOffloads => (
            Balancer::None,
            String::new(),
            SocketAddrV4::new(db01.addr, BOLT_PORT),
            SocketAddrV4::new(db01.addr, IPERF_PORT),
        ),
        Contestant::LbNative | Contestant::LbGeneric => {
            let cfg = lb_config(&topo);
            let mode = if c == Contestant::LbNative {
                "native"
            } else {
                "generic"
            };
            let lb = topo
                .start_lb(&cfg, &["--xdp-mode", mode])
                .context("lb did not start")?;
            (Balancer::Lb(lb), cfg, vip_bolt, vip_iperf)
        }
        Contestant::Haproxy => {
            let cfg = haproxy_config(&topo)?;
            let p = start_haproxy(&topo, &cfg)?;
            (Balancer::Haproxy(p), cfg, vip_bolt, vip_iperf)
        }
        Contestant::Nftables => {
            let rules = nft_ruleset(&topo)?;
            lb_ns.ip(&["addr", "add", &format!("{}/32", topo.vip), "dev", &l0])?;
            sysctl(
                &lb_ns,
                &[
                    "net.ipv4.conf.all.forwarding=1",
                    "net.ipv4.conf.l0.forwarding=1",
                    "net.ipv4.conf.l1.forwarding=1",
                ],
            )?;
            let path = topo.log_dir.join("lbbench.nft");
            std::fs::write(&path, &rules).with_context(|| format!("writing {}", path.display()))?;
            lb_ns.exec(&["nft".as_ref(), "-f".as_ref(), path.as_os_str()])?;
            (Balancer::Nftables, rules, vip_bolt, vip_iperf)
        }
    };
    // Something answers Bolt at the target before the clock starts.
    let up = topo.client.ns.run_in(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&bolt.into(), Duration::from_millis(300)).is_ok() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    })?;
    if !up {
        bail!("{}: nothing answered at {bolt} within 10 s", c.id());
    }
    Ok(Cell {
        contestant: c,
        balancer,
        bolt,
        iperf,
        config,
        sims,
        iperf_server,
        topo,
    })
}

/// HAProxy in the lb namespace as the failover bench runs it (`haproxy -f CFG -db`, VIP on `l0`,
/// forwarding off), plus the short-connection sysctls.
fn start_haproxy(topo: &Topology, cfg: &str) -> Result<Process> {
    let path = topo.log_dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).with_context(|| format!("writing {}", path.display()))?;
    let lb_ns = &topo.lb.ns;
    lb_ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", topo.vip),
        "dev",
        &topo.lb.ifaces[0],
    ])?;
    sysctl(lb_ns, &["net.ipv4.conf.all.forwarding=0"])?;
    sysctl(lb_ns, &SHORT_CONNECTION_SYSCTLS)?;
    let p = failover::spawn_haproxy(topo, &path, cfg)?;
    for port in [WRITE_PORT, IPERF_PORT] {
        if let Err(e) = wait_listening(lb_ns, port, "haproxy") {
            bail!("{e:#}\n{}", p.logs());
        }
    }
    Ok(p)
}

impl Drop for Cell {
    fn drop(&mut self) {
        // Stop lb first (it records its host changes on the way out), then forget them: the
        // namespace they were made in goes away with the topology.
        if let Balancer::Lb(lb) = &self.balancer {
            let _ = lb.process.stop();
        }
        for suffix in ["json", "host.json"] {
            let _ = std::fs::remove_file(format!("/run/lb/{}.{suffix}", self.topo.instance));
        }
    }
}

impl Cell {
    /// The balancer's process id, if it has one.
    pub fn balancer_pid(&self) -> Option<u32> {
        match &self.balancer {
            Balancer::Lb(lb) => Some(lb.process.pid()),
            Balancer::Haproxy(p) => Some(p.pid()),
            Balancer::None | Balancer::Nftables => None,
        }
    }

    /// Fails with the balancer's log if its process has exited.
    pub fn ensure_alive(&self) -> Result<()> {
        let p = match &self.balancer {
            Balancer::Lb(lb) => &lb.process,
            Balancer::Haproxy(p) => p,
            Balancer::None | Balancer::Nftables => return Ok(()),
        };
        if let Some(status) = p.try_wait()? {
            bail!("{} exited ({status})\n{}", p.name(), p.logs());
        }
        Ok(())
    }

    /// `ethtool -k` lines about checksums and segmentation of the senders, for the report.
    pub fn offloads(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut ifaces: Vec<(&Ns, &str)> =
            vec![(&self.topo.client.ns, "c0"), (&self.topo.client.ns, "c1")];
        if let Some(b) = self.topo.backends.first() {
            ifaces.push((&b.ns, &b.iface));
        }
        for (ns, iface) in ifaces {
            if let Ok(o) = ns.exec_unchecked(&["ethtool", "-k", iface]) {
                let text = String::from_utf8_lossy(&o.stdout);
                let keep: Vec<String> = text
                    .lines()
                    .filter(|l| {
                        [
                            "tx-checksumming:",
                            "tcp-segmentation-offload:",
                            "generic-segmentation-offload:",
                            "generic-receive-offload:",
                        ]
                        .iter()
                        .any(|k| l.trim_start().starts_with(k))
                    })
                    .map(|l| l.trim().to_string())
                    .collect();
                out.push(format!("{iface}: {}", keep.join(", ")));
            }
        }
        out
    }
}
