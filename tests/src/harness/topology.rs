//! The two network shapes the end-to-end tests run in.
//!
//! Two-armed (client and backends on different segments, lb routes between them):
//! ```text
//!  [client ns]           [lb ns]                 [switch ns]            [dbNN ns]
//!  c0 198.18.0.2/24 ---- l0 198.18.0.1/24
//!                        l1 10.0.1.1/24   ---- s-l1 -+- br0 -+- s-db01 ---- eth0 10.0.1.10/24
//!                                                            +- s-db02 ---- eth0 10.0.1.11/24
//!                                                            +- s-db03 ---- eth0 10.0.1.12/24
//!  VIP 198.18.0.10 (not assigned here: the agent adds it)
//! ```
//! One-armed (one L2 segment 10.0.1.0/24, everything on the bridge): lb `l0` 10.0.1.1, client `c0`
//! 10.0.1.100, backends .10-.12, VIP 10.0.1.50.
//!
//! Every interface lives in a namespace from birth (`ip link add A netns X type veth peer name B netns
//! Y`), so the short fixed names never meet in the root namespace. Namespace names are
//! `lbt-<test>-<pid>-<role>`, the agent instance is `test-<test>-<pid>`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::cleanup::{self, kill_and_delete};
use super::lock::TestLock;
use super::ns::run;
use super::process::{terminate, LbProcess, Process, SimProcess, Stream, STOP_GRACE};
use super::xdp_pass::XdpPass;
use super::Ns;

/// How long `lb run` and the simulators get to say they are ready: 20 s, or
/// `$LB_READY_TIMEOUT_SECS` (xtask's VM runs raise it: under TCG the verifier alone takes 13 s).
pub fn ready_timeout() -> Duration {
    let secs = std::env::var("LB_READY_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

/// How much slower than this host the machine under test runs: 1, or `$LB_TEST_SLOWDOWN`
/// (xtask's VM runs set it: an emulated CPU answers a check or a SYN several times slower).
/// Timing bounds of tests that are not about timing scale with it; the agent's check timeout
/// in [`Topology::role_checked_config_of`] too, so a slow first answer is not a DOWN.
pub fn slowdown() -> u32 {
    std::env::var("LB_TEST_SLOWDOWN")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Which of the two shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Client segment and backend segment, lb in between with two interfaces.
    TwoArmed,
    /// One segment for everyone, lb with one interface.
    OneArmed,
}

/// Knobs; `TopologyOptions::default()` is what most tests want.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// Number of backends (db01, db02, ...), 1 to 89. Default 3.
    pub backends: usize,
    /// Keep tx checksum offload on the senders (client `c0`, backend `eth0`s). Native-mode XDP needs
    /// it off (the receiver drops partially checksummed frames after a redirect); generic-mode tests
    /// turn it on to exercise the offload path. Default false.
    pub sender_offloads: bool,
    /// Attach `lb_pass` to the peers of the lb's interfaces, to `c0` and to the backends. Default true.
    pub peer_xdp: bool,
    /// Agent instance name; default `test-<test>-<pid>` (the demo uses `demo`).
    pub instance: Option<String>,
    /// A second balancer host on the same segments (`lb2`): a pair's standby. Two-armed, the
    /// client, lb1 and lb2 share a client segment (a second bridge). Default false.
    pub standby: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        TopologyOptions {
            backends: 3,
            sender_offloads: false,
            peer_xdp: true,
            instance: None,
            standby: false,
        }
    }
}

/// A host with one interface: the client.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: Ns,
    pub iface: String,
    pub addr: Ipv4Addr,
}

/// The balancer host.
#[derive(Debug, Clone)]
pub struct LbHost {
    pub ns: Ns,
    /// Interfaces to give `lb run --iface` (client-facing first).
    pub ifaces: Vec<String>,
    /// Address on the client-facing interface.
    pub client_addr: Ipv4Addr,
    /// Address on the backend-facing interface (the SNAT source the backends see).
    pub backend_addr: Ipv4Addr,
}

/// One Neo4j host.
#[derive(Debug, Clone)]
pub struct Backend {
    /// `db01`, `db02`, ...
    pub name: String,
    pub ns: Ns,
    pub iface: String,
    pub addr: Ipv4Addr,
}

/// A built topology. Dropping it stops every process it started, detaches its XDP programs, deletes
/// its namespaces and the agent instance's pin directory, then releases the machine-wide test lock.
pub struct Topology {
    pub test_name: String,
    pub shape: Shape,
    /// Agent instance name (pins under `/sys/fs/bpf/lb/<instance>`).
    pub instance: String,
    /// The virtual IP; not assigned to any interface by the harness.
    pub vip: Ipv4Addr,
    pub client: Host,
    pub lb: LbHost,
    /// The second balancer host ([`TopologyOptions::standby`]), whose agent runs as
    /// [`Topology::standby_instance`].
    pub lb2: Option<LbHost>,
    /// Same as `lb.ifaces`.
    pub lb_ifaces: Vec<String>,
    /// The namespace holding the bridge `br0`.
    pub switch: Ns,
    pub backends: Vec<Backend>,
    /// Logs and config files of this topology (kept after a panic, printed on stderr).
    pub log_dir: PathBuf,
    pub options: TopologyOptions,
    created: Vec<Ns>,
    xdp: Option<XdpPass>,
    children: Mutex<Vec<Arc<Mutex<Child>>>>,
    _lock: TestLock,
}

impl Topology {
    /// Client ns -- lb ns -- switch ns (bridge) -- db01..db03 (see the module doc).
    pub fn two_armed(test_name: &str) -> Result<Topology> {
        Topology::new(test_name, Shape::TwoArmed, TopologyOptions::default())
    }

    /// One bridge segment shared by client, lb and db01..db03.
    pub fn one_armed(test_name: &str) -> Result<Topology> {
        Topology::new(test_name, Shape::OneArmed, TopologyOptions::default())
    }

    /// Builds `shape` for `test_name`. Takes the machine-wide test lock first (blocks while another
    /// topology exists) and removes leftovers of dead test processes.
    pub fn new(test_name: &str, shape: Shape, options: TopologyOptions) -> Result<Topology> {
        if !nix::unistd::geteuid().is_root() {
            bail!("network namespaces and XDP need root: run `cargo xtask test` (as root)");
        }
        if options.backends == 0 || options.backends > 89 {
            bail!("backends must be 1..=89, not {}", options.backends);
        }
        let lock = TestLock::acquire()?;
        let stale = cleanup::remove_stale()?;
        if !stale.is_empty() {
            eprintln!(
                "harness: removed leftovers of dead test runs: {}",
                stale.join(", ")
            );
        }

        let short = short_name(test_name);
        let pid = std::process::id();
        let ns = |role: &str| Ns::existing(&format!("{}{short}-{pid}-{role}", cleanup::NS_PREFIX));
        let instance = options
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}{short}-{pid}", cleanup::INSTANCE_PREFIX));
        let log_dir = std::env::temp_dir().join(format!("lbt-{short}-{pid}"));
        let backends = (0..options.backends)
            .map(|i| Backend {
                name: format!("db{:02}", i + 1),
                ns: ns(&format!("db{:02}", i + 1)),
                iface: "eth0".to_string(),
                addr: Ipv4Addr::new(10, 0, 1, 10 + i as u8),
            })
            .collect();
        let (client, lb, vip) = match shape {
            Shape::TwoArmed => (
                Host {
                    ns: ns("client"),
                    iface: "c0".into(),
                    addr: Ipv4Addr::new(198, 18, 0, 2),
                },
                LbHost {
                    ns: ns("lb"),
                    ifaces: vec!["l0".into(), "l1".into()],
                    client_addr: Ipv4Addr::new(198, 18, 0, 1),
                    backend_addr: Ipv4Addr::new(10, 0, 1, 1),
                },
                Ipv4Addr::new(198, 18, 0, 10),
            ),
            Shape::OneArmed => (
                Host {
                    ns: ns("client"),
                    iface: "c0".into(),
                    addr: Ipv4Addr::new(10, 0, 1, 100),
                },
                LbHost {
                    ns: ns("lb"),
                    ifaces: vec!["l0".into()],
                    client_addr: Ipv4Addr::new(10, 0, 1, 1),
                    backend_addr: Ipv4Addr::new(10, 0, 1, 1),
                },
                Ipv4Addr::new(10, 0, 1, 50),
            ),
        };
        let lb2 = match (options.standby, shape) {
            (false, _) => None,
            (true, Shape::OneArmed) => Some(LbHost {
                ns: ns("lb2"),
                ifaces: vec!["l0".into()],
                client_addr: Ipv4Addr::new(10, 0, 1, 2),
                backend_addr: Ipv4Addr::new(10, 0, 1, 2),
            }),
            (true, Shape::TwoArmed) => Some(LbHost {
                ns: ns("lb2"),
                ifaces: vec!["l0".into(), "l1".into()],
                client_addr: Ipv4Addr::new(198, 18, 0, 3),
                backend_addr: Ipv4Addr::new(10, 0, 1, 2),
            }),
        };
        let mut topo = Topology {
            test_name: test_name.to_string(),
            shape,
            lb2,
            instance,
            vip,
            lb_ifaces: lb.ifaces.clone(),
            client,
            lb,
            switch: ns("switch"),
            backends,
            log_dir,
            options,
            created: Vec::new(),
            xdp: None,
            children: Mutex::new(Vec::new()),
            _lock: lock,
        };
        // From here on a failure drops `topo`, which removes whatever was built.
        topo.build()?;
        Ok(topo)
    }

    fn build(&mut self) -> Result<()> {
        cleanup::remove_pin_dir(&self.instance)?;
        if self.lb2.is_some() {
            cleanup::remove_pin_dir(&self.standby_instance())?;
        }
        match fs::remove_dir_all(&self.log_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", self.log_dir.display()))
            }
        }
        fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("creating {}", self.log_dir.display()))?;

        let mut all = vec![
            self.client.ns.clone(),
            self.lb.ns.clone(),
            self.switch.clone(),
        ];
        all.extend(self.lb2.iter().map(|h| h.ns.clone()));
        all.extend(self.backends.iter().map(|b| b.ns.clone()));
        for ns in &all {
            if ns.exists() {
                kill_and_delete(ns)?;
            }
            Ns::create(&ns.name)?;
            self.created.push(ns.clone());
        }

        let sw = self.switch.clone();
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;

        // (namespace, interface, address) of every host-side end, and the switch ports.
        let mut switch_ports: Vec<String> = Vec::new();
        let mut peer_xdp: Vec<(Ns, String)> = Vec::new();
        let (client, lb) = (self.client.clone(), self.lb.clone());
        // A pair's client segment: a second bridge for the client and both balancers.
        let mut client_ports: Vec<String> = Vec::new();
        match self.shape {
            Shape::TwoArmed if self.lb2.is_some() => {
                sw.ip(&["link", "add", "br1", "type", "bridge"])?;
                sw.ip(&["link", "set", "br1", "up"])?;
                let lb2 = self.lb2.clone().unwrap_or_else(|| lb.clone());
                for (ns, iface, port) in [
                    (&client.ns, "c0", "s-c0"),
                    (&lb.ns, "l0", "s-l0"),
                    (&lb2.ns, "l0", "s-lb2"),
                ] {
                    veth(ns, iface, &sw, port)?;
                    client_ports.push(port.into());
                    peer_xdp.push((sw.clone(), port.into()));
                }
                for (ns, port) in [(&lb.ns, "s-l1"), (&lb2.ns, "s-lb2b")] {
                    veth(ns, "l1", &sw, port)?;
                    switch_ports.push(port.into());
                    peer_xdp.push((sw.clone(), port.into()));
                }
                for h in [&lb, &lb2] {
                    addr_up(&h.ns, "l0", h.client_addr)?;
                    addr_up(&h.ns, "l1", h.backend_addr)?;
                }
            }
            Shape::TwoArmed => {
                veth(&client.ns, "c0", &lb.ns, "l0")?;
                veth(&lb.ns, "l1", &sw, "s-l1")?;
                switch_ports.push("s-l1".into());
                addr_up(&lb.ns, "l0", lb.client_addr)?;
                addr_up(&lb.ns, "l1", lb.backend_addr)?;
                peer_xdp.push((sw.clone(), "s-l1".into()));
            }
            Shape::OneArmed => {
                veth(&client.ns, "c0", &sw, "s-c0")?;
                veth(&lb.ns, "l0", &sw, "s-l0")?;
                switch_ports.push("s-c0".into());
                switch_ports.push("s-l0".into());
                addr_up(&lb.ns, "l0", lb.client_addr)?;
                peer_xdp.push((sw.clone(), "s-l0".into()));
                if let Some(lb2) = self.lb2.clone() {
                    veth(&lb2.ns, "l0", &sw, "s-lb2")?;
                    switch_ports.push("s-lb2".into());
                    addr_up(&lb2.ns, "l0", lb2.client_addr)?;
                    peer_xdp.push((sw.clone(), "s-lb2".into()));
                }
            }
        }
        addr_up(&client.ns, "c0", client.addr)?;
        peer_xdp.push((client.ns.clone(), "c0".into()));
        // Senders of locally generated TCP that crosses the balancer's XDP path.
        let mut senders: Vec<(Ns, String)> = vec![(client.ns.clone(), "c0".into())];
        for b in self.backends.clone() {
            let port = format!("s-{}", b.name);
            veth(&b.ns, &b.iface, &sw, &port)?;
            addr_up(&b.ns, &b.iface, b.addr)?;
            switch_ports.push(port);
            peer_xdp.push((b.ns.clone(), b.iface.clone()));
            senders.push((b.ns.clone(), b.iface.clone()));
        }
        for (port, bridge) in switch_ports
            .iter()
            .map(|p| (p, "br0"))
            .chain(client_ports.iter().map(|p| (p, "br1")))
        {
            sw.ip(&["link", "set", port, "master", bridge])?;
            sw.ip(&["link", "set", port, "up"])?;
        }
        switch_ports.extend(client_ports);

        // platform-facts: redirected frames arrive only at peers with GRO on (or an XDP program).
        let mut gro: Vec<(Ns, String)> = switch_ports
            .iter()
            .map(|p| (sw.clone(), p.clone()))
            .collect();
        gro.extend(senders.iter().cloned());
        for (ns, iface) in &gro {
            ns.exec(&["ethtool", "-K", iface, "gro", "on"])?;
        }
        // platform-facts: partially checksummed TCP is dropped after a native redirect/TX.
        if !self.options.sender_offloads {
            for (ns, iface) in &senders {
                ns.exec(&["ethtool", "-K", iface, "tx", "off"])?;
            }
        }
        // platform-facts: XDP_TX into a veth arrives only if the peer carries an XDP program.
        if self.options.peer_xdp {
            let mut xdp = XdpPass::load()?;
            for (ns, iface) in &peer_xdp {
                xdp.attach(ns, iface)?;
            }
            self.xdp = Some(xdp);
        }
        Ok(())
    }

    /// Every namespace of this topology (client, lb, switch, backends).
    pub fn namespaces(&self) -> Vec<Ns> {
        let mut all = vec![
            self.client.ns.clone(),
            self.lb.ns.clone(),
            self.switch.clone(),
        ];
        all.extend(self.lb2.iter().map(|h| h.ns.clone()));
        all.extend(self.backends.iter().map(|b| b.ns.clone()));
        all
    }

    /// The agent instance of the second balancer host (`lb2`).
    pub fn standby_instance(&self) -> String {
        format!("{}-b", self.instance)
    }

    /// The backend called `name`.
    pub fn backend(&self, name: &str) -> Result<&Backend> {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("no backend named {name} in this topology"))
    }

    /// Spawns `args` in `ns` (via nsenter) with output captured in `log_dir/<name>.stdout|stderr`;
    /// the topology kills it at drop if the returned handle has not.
    pub fn spawn(&self, ns: &Ns, name: &str, args: &[&str]) -> Result<Process> {
        let (program, rest) = args
            .split_first()
            .with_context(|| format!("spawn {name}: empty command"))?;
        let mut cmd = ns.command(program);
        cmd.args(rest);
        self.spawn_command(name, cmd)
    }

    /// Like [`Topology::spawn`] for a prepared command (e.g. from [`Ns::command`] with env vars set).
    pub fn spawn_command(&self, name: &str, cmd: Command) -> Result<Process> {
        let process = Process::spawn(name, cmd, &self.log_dir)?;
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(process.shared());
        Ok(process)
    }

    /// The standard Neo4j config for this topology: write VIP port 7680 -> master db01:7687, read
    /// 7681 -> the other backends (db01 too if it is the only one), HTTP 80 -> all backends' 7474.
    /// The `[[backend]]` tables of this topology's backends (name and address).
    pub fn backends_toml(&self) -> String {
        self.backends
            .iter()
            .map(|b| {
                format!(
                    "\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                    b.name, b.addr
                )
            })
            .collect()
    }

    /// The manual's three services over every backend, each with its role check (presets
    /// `neo4j-ha-master|slave|available`) at test timings: every 200 ms, rise 2, fall 2.
    /// `lb status --json` of this topology's instance, run in the lb namespace (by nsenter,
    /// which keeps bpffs visible, unlike `ip netns exec`).
    /// Writes `n` idle established flows of (`service_id`, `backend_id`) to `vip_port` straight
    /// into the running agent's pinned table (fake clients 10.111.x.x and backends 10.222.x.x:
    /// nothing sends on them), as a busy balancer holds; their last segment is now.
    pub fn fill_with_idle_flows(
        &self,
        n: u32,
        vip_port: u16,
        service_id: u32,
        backend_id: u32,
    ) -> Result<()> {
        use aya::maps::HashMap;
        use lb_common::{Flow, FlowKey, FLOW_ESTABLISHED};
        use std::net::SocketAddrV4;
        let dir = lb_user::dataplane::pin_dir(&self.instance);
        let map = lb_user::dataplane::open_pinned(&dir, lb_common::names::CT_ESTABLISHED)?;
        let mut table = HashMap::<_, FlowKey, Flow>::try_from(map)?;
        let now = lb_user::gc::monotonic_now()?;
        let base = Flow {
            created_ns: now,
            last_seen_ns: now,
            service_id,
            backend_id,
            state: FLOW_ESTABLISHED,
            ..Default::default()
        };
        for i in 0..n {
            let pair = crate::fixture::flow_pair(
                SocketAddrV4::new(Ipv4Addr::from(0x0a6f_0000 + i), 40_000),
                SocketAddrV4::new(self.vip, vip_port),
                SocketAddrV4::new(self.lb.backend_addr, 1024 + (i % 60_000) as u16),
                SocketAddrV4::new(
                    Ipv4Addr::new(
                        10,
                        222,
                        (i / 60_000 / 250) as u8,
                        (i / 60_000 % 250 + 1) as u8,
                    ),
                    7474,
                ),
                base,
            );
            for (k, f) in pair {
                table
                    .insert(k, f, 0)
                    .with_context(|| format!("writing idle flow {i} of {n}"))?;
            }
        }
        Ok(())
    }

    pub fn lb_status(&self) -> Result<serde_json::Value> {
        let mut cmd = self.lb.ns.command(super::lb_bin());
        cmd.args(["status", "--instance", &self.instance, "--json"]);
        let out = run(&mut cmd)?;
        serde_json::from_slice(&out.stdout).context("lb status --json")
    }

    /// One global counter (by its exported name, e.g. `new_flows`) of `status`; 0 if absent.
    pub fn global_counter(status: &serde_json::Value, name: &str) -> u64 {
        Self::find_global_counter(status, name).unwrap_or(0)
    }

    /// One global counter of `status`, if it has it.
    pub fn find_global_counter(status: &serde_json::Value, name: &str) -> Option<u64> {
        status["global"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e[0] == name)
            .and_then(|e| e[1].as_u64())
    }

    pub fn role_checked_config(&self) -> String {
        let all: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        self.role_checked_config_of(
            None,
            &all,
            &[
                ("write", 7680, "master"),
                ("read", 7681, "slave"),
                ("http", 80, "available"),
            ],
        )
    }

    /// Like [`Topology::role_checked_config`] with the `backends` named (in this order) and the
    /// `services` given as (name, VIP port, check: `master`, `slave` or `available`), each over
    /// every listed backend (port 80 to the backends' 7474, others to 7687), and `snat_ports`.
    pub fn role_checked_config_of(
        &self,
        snat_ports: Option<&str>,
        backends: &[&str],
        services: &[(&str, u16, &str)],
    ) -> String {
        let mut s = format!("instance = \"{}\"\n", self.instance);
        if let Some(p) = snat_ports {
            s += &format!("snat_ports = \"{p}\"\n");
        }
        for (name, preset) in [
            ("master", "neo4j-ha-master"),
            ("slave", "neo4j-ha-slave"),
            ("available", "neo4j-ha-available"),
        ] {
            s += &format!(
                "[[check]]\nname = \"{name}\"\npreset = \"{preset}\"\ninter = \"200ms\"\nfastinter = \"100ms\"\nrise = 2\nfall = 2\ntimeout = \"{}ms\"\n",
                300 * slowdown()
            );
        }
        // In the order asked for (a backend's position is what some tests change).
        for b in backends.iter().filter_map(|n| self.backend(n).ok()) {
            s += &format!(
                "\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n",
                b.name, b.addr
            );
        }
        let order: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        for (name, port, check) in services {
            let bport = if *port == 80 { 7474 } else { 7687 };
            s += &format!(
                "[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = {bport}\nbackends = [{}]\ncheck = \"{check}\"\n",
                self.vip,
                order.join(", ")
            );
        }
        s
    }

    /// The manual's Bolt HAProxy configuration (the golden seed copy) with this topology's
    /// backend addresses, written to `log_dir/haproxy.cfg`; returns its path.
    pub fn manual_haproxy_cfg(&self) -> Result<PathBuf> {
        let seed = super::repo_root().join("lb-user/tests/golden/neo4j-ha-bolt.cfg");
        let mut cfg =
            fs::read_to_string(&seed).with_context(|| format!("reading {}", seed.display()))?;
        for (i, b) in self.backends.iter().enumerate() {
            cfg = cfg.replace(&format!("10.0.1.{}:", 10 + i), &format!("{}:", b.addr));
        }
        let path = self.log_dir.join("haproxy.cfg");
        fs::write(&path, &cfg)?;
        Ok(path)
    }

    pub fn neo4j_config(&self) -> String {
        let mut s = format!(
            "instance = \"{}\"\nsnat_ports = \"10000-32767\"\n",
            self.instance
        );
        s.push_str(&self.backends_toml());
        let names: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("\"{}\"", b.name))
            .collect();
        let readers = if names.len() > 1 {
            &names[1..]
        } else {
            &names[..]
        };
        let service = |name: &str, port: u16, backend_port: u16, members: &[String]| {
            format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = {backend_port}\nbackends = [{}]\n",
                self.vip,
                members.join(", ")
            )
        };
        s.push_str(&service("write", 7680, 7687, &names[..1]));
        s.push_str(&service("read", 7681, 7687, readers));
        s.push_str(&service("http", 80, 7474, &names));
        s
    }

    /// Writes `config_toml` to `log_dir/lb.toml` and starts
    /// `$LB_BIN run --config F --instance <instance> --iface ... <extra_args>` in the lb namespace
    /// (via nsenter, so its pins land in the host's bpffs). Waits up to 20 s for a stderr line
    /// containing `lb ready`; on exit or timeout the error carries the agent's captured log.
    pub fn start_lb(&self, config_toml: &str, extra_args: &[&str]) -> Result<LbProcess> {
        self.start_lb_env(config_toml, extra_args, &[])
    }

    /// [`Topology::start_lb`] with environment variables set for the agent (e.g. `FAILPOINTS`).
    pub fn start_lb_env(
        &self,
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<LbProcess> {
        self.start_agent(&self.lb, &self.instance, config_toml, extra_args, env)
    }

    /// Starts the agent of the second balancer host (`lb2`) as [`Topology::standby_instance`].
    pub fn start_standby_lb(&self, config_toml: &str, extra_args: &[&str]) -> Result<LbProcess> {
        let lb2 = self
            .lb2
            .as_ref()
            .context("this topology has no second balancer (TopologyOptions::standby)")?;
        self.start_agent(lb2, &self.standby_instance(), config_toml, extra_args, &[])
    }

    /// Starts `lb run` on `host` as `instance` with `config_toml` and waits for it to be ready.
    fn start_agent(
        &self,
        host: &LbHost,
        instance: &str,
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<LbProcess> {
        let (config, name) = if instance == self.instance {
            (self.log_dir.join("lb.toml"), "lb".to_string())
        } else {
            (
                self.log_dir.join(format!("{instance}.toml")),
                instance.to_string(),
            )
        };
        fs::write(&config, config_toml).with_context(|| format!("writing {}", config.display()))?;
        let mut cmd = host.ns.command(super::lb_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--instance", instance]);
        for iface in &host.ifaces {
            cmd.args(["--iface", iface]);
        }
        cmd.args(extra_args).envs(env.iter().copied());
        let process = self.spawn_command(&name, cmd)?;
        let ready_line = process.wait_for_line(Stream::Stderr, "lb ready", ready_timeout())?;
        Ok(LbProcess {
            process,
            config,
            ready_line,
        })
    }

    /// Starts `$LB_BIN run --instance <instance> --iface ... <args>` in the lb namespace with no
    /// config file of the harness's own (e.g. `--haproxy-config F`); waits for `lb ready` like
    /// [`Topology::start_lb`].
    pub fn start_lb_args(&self, args: &[&str]) -> Result<LbProcess> {
        let mut cmd = self.lb.ns.command(super::lb_bin());
        cmd.arg("run").args(["--instance", &self.instance]);
        for iface in &self.lb.ifaces {
            cmd.args(["--iface", iface]);
        }
        cmd.args(args);
        let process = self.spawn_command("lb", cmd)?;
        let ready_line = process.wait_for_line(Stream::Stderr, "lb ready", ready_timeout())?;
        Ok(LbProcess {
            process,
            config: PathBuf::new(),
            ready_line,
        })
    }

    /// Starts `neo4j-sim` for backend `index` with `role` (`master`, `slave`, ...), HTTP on 7474 and
    /// Bolt on 7687 of all its addresses, control socket `log_dir/<name>.sock`; waits for its
    /// `neo4j-sim <name> ready` line.
    pub fn start_sim(&self, index: usize, role: &str) -> Result<SimProcess> {
        let b = self
            .backends
            .get(index)
            .with_context(|| format!("no backend #{index}"))?;
        let control = self.log_dir.join(format!("{}.sock", b.name));
        let mut cmd = b.ns.command(super::sim_bin());
        cmd.args([
            "--name",
            &b.name,
            "--http",
            "0.0.0.0:7474",
            "--bolt",
            "0.0.0.0:7687",
        ])
        .args(["--role", role])
        .arg("--control")
        .arg(&control);
        let process = self.spawn_command(&b.name, cmd)?;
        process.wait_for_line(
            Stream::Stdout,
            &format!("neo4j-sim {} ready", b.name),
            ready_timeout(),
        )?;
        Ok(SimProcess {
            process,
            name: b.name.clone(),
            control,
        })
    }

    /// Starts one simulator per entry of `roles` (backend 0 gets `roles[0]`, ...).
    pub fn start_sims(&self, roles: &[&str]) -> Result<Vec<SimProcess>> {
        roles
            .iter()
            .enumerate()
            .map(|(i, role)| self.start_sim(i, role))
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|p| p.into_inner()));
        for child in children {
            let _ = terminate(&child, STOP_GRACE);
        }
        // Processes a test started on its own (ns.spawn) would keep a namespace alive.
        for ns in self.created.iter().rev() {
            if let Ok(out) = run(Command::new("ip").args(["netns", "pids", &ns.name])) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        self.xdp = None;
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ns.delete() {
                eprintln!("harness: could not delete namespace {}: {e:#}", ns.name);
            }
        }
        // The agent's records under /run/lb outlive it by design (for `lb detach`); the
        // namespaces they describe are gone now.
        let mut instances = vec![self.instance.clone()];
        if self.lb2.is_some() {
            instances.push(self.standby_instance());
        }
        for instance in &instances {
            for suffix in [".json", ".host.json", ".sock", ".pair.json", ".vrrp"] {
                let _ = fs::remove_file(format!("/run/lb/{instance}{suffix}"));
            }
            if let Err(e) = cleanup::remove_pin_dir(instance) {
                eprintln!("harness: {e:#}");
            }
        }
        if std::thread::panicking() || std::env::var_os("LB_KEEP_LOGS").is_some() {
            eprintln!(
                "harness: logs of {} kept in {}",
                self.test_name,
                self.log_dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}

/// The test name as it appears in resource names: `[a-z0-9_]`, at most 24 characters (the last
/// path segment of `module::test` names).
pub fn short_name(test_name: &str) -> String {
    let last = test_name.rsplit("::").next().unwrap_or(test_name);
    let s: String = last
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    if s.is_empty() {
        "t".to_string()
    } else {
        s
    }
}

/// A veth pair with each end created directly in its namespace.
fn veth(a_ns: &Ns, a: &str, b_ns: &Ns, b: &str) -> Result<()> {
    run(Command::new("ip").args([
        "link", "add", a, "netns", &a_ns.name, "type", "veth", "peer", "name", b, "netns",
        &b_ns.name,
    ]))?;
    Ok(())
}

/// Assigns `addr/24` to `iface` and brings it up.
fn addr_up(ns: &Ns, iface: &str, addr: Ipv4Addr) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface])?;
    ns.ip(&["link", "set", iface, "up"])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::short_name;

    #[test]
    fn short_names_keep_only_the_last_path_segment_in_safe_characters() {
        assert_eq!(short_name("harness::client_pings_lb"), "client_pings_lb");
        assert_eq!(short_name("Weird-Name!"), "weird_name_");
        assert_eq!(short_name(""), "t");
        assert_eq!(short_name(&"x".repeat(40)).len(), 24);
    }
}
