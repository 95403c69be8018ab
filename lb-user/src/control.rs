//! The only writer of the configuration and backend-set maps. Backend sets are replaced
//! atomically: a complete set is written into a spare inner map, the outer slot is swapped to
//! it, and the previous inner map becomes the spare only after the swap returned (the kernel
//! waits for in-flight readers before the update returns). A live inner map is never written.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, DevMapHash, HashMap, MapData},
    Ebpf,
};
use lb_common::{
    addr_be, names, port_be, Backend, BackendKey, BackendSet, Config as MapConfig, Service,
    ServiceKey, CONFIG_F_DEBUG, CONFIG_F_GENERIC, CONFIG_F_OLD_PORTS, CONFIG_F_ROUTE_SRC,
    CONFIG_F_SYNC, IPPROTO_TCP, MAX_SERVICES, MAX_SET_SIZE,
};
use tracing::info;

use crate::config::Config;

/// A backend as the data path sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
}

pub struct Control {
    config: Array<MapData, MapConfig>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: HashMap<MapData, BackendKey, u32>,
    sets: ArrayOfMaps<MapData, Array<MapData, BackendSet>>,
    tx_ports: DevMapHash<MapData>,
    snat_addrs: HashMap<MapData, u32, u32>,
    iface_macs: HashMap<MapData, u32, [u8; 6]>,
    route_src: HashMap<MapData, u32, u32>,
    /// The kernel lacks `BPF_FIB_LOOKUP_SRC`: the data path reads `route_src` instead.
    route_src_fallback: bool,
    old_ports: Array<MapData, lb_common::PortRange>,
    /// An earlier SNAT range whose flows may still be alive (see [`Control::keep_old_ports`]).
    old_range: Option<(u16, u16)>,
    reset_epoch: Array<MapData, u32>,
    /// A second fd on `RESET_EPOCH`, for readers of their own ([`Control::share_reset_epochs`]).
    reset_epoch_fd: std::os::fd::OwnedFd,
    syn_hold: Array<MapData, u64>,
    live: Vec<Option<Array<MapData, BackendSet>>>,
    spare: Vec<Option<Array<MapData, BackendSet>>>,
    generation: u64,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

/// The keys of `map` not in `keep` (what an earlier agent registered and `cfg` no longer has).
fn stale_keys<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    keep: &[K],
) -> Vec<K> {
    map.keys()
        .filter_map(|k| k.ok())
        .filter(|k| !keep.contains(k))
        .collect()
}

impl Control {
    /// Takes the maps it owns out of the loaded object.
    pub fn new(ebpf: &mut Ebpf) -> Result<Self> {
        let n = MAX_SERVICES as usize;
        let reset_epoch_fd = crate::gc::map_fd(
            ebpf.map(names::RESET_EPOCH)
                .with_context(|| format!("the object has no map {}", names::RESET_EPOCH))?,
            names::RESET_EPOCH,
        )?;
        Ok(Self {
            config: take(ebpf, names::CONFIG)?,
            services: take(ebpf, names::SERVICES)?,
            backends: take(ebpf, names::BACKENDS)?,
            sets: take(ebpf, names::BACKEND_SETS)?,
            tx_ports: take(ebpf, names::TX_PORTS)?,
            snat_addrs: take(ebpf, names::SNAT_ADDRS)?,
            iface_macs: take(ebpf, names::IFACE_MACS)?,
            route_src: take(ebpf, names::ROUTE_SRC)?,
            route_src_fallback: false,
            old_ports: take(ebpf, names::OLD_PORTS)?,
            old_range: None,
            reset_epoch: take(ebpf, names::RESET_EPOCH)?,
            reset_epoch_fd,
            syn_hold: take(ebpf, names::SYN_HOLD)?,
            live: (0..n).map(|_| None).collect(),
            spare: (0..n).map(|_| None).collect(),
            generation: 0,
        })
    }

    /// A handle of its own on `RESET_EPOCH` (read-only use: this stays its only writer).
    pub fn share_reset_epochs(&self) -> Result<aya::maps::Map> {
        let data =
            MapData::from_fd(self.reset_epoch_fd.try_clone()?).context("reopen map RESET_EPOCH")?;
        aya::maps::Map::from_map_data(data).context("map RESET_EPOCH")
    }

    /// Fills every writer-owned map from `cfg` before the program sees a packet: settings,
    /// redirect targets, SNAT addresses, services and each service's configured backend set.
    pub fn configure(
        &mut self,
        cfg: &Config,
        generic: bool,
        ifindexes: &[u32],
        snat_addrs: &[Ipv4Addr],
    ) -> Result<()> {
        self.write_config(cfg, generic)?;
        self.register_ifaces(ifindexes)?;
        self.register_snat_addrs(snat_addrs)?;
        self.install_services(cfg)?;
        for (id, s) in cfg.services.iter().enumerate() {
            if s.check.is_some() && self.generation > 0 {
                // Adopted instance: the set an earlier agent installed stays until one full
                // round of checks has been seen.
                continue;
            }
            // Checked services start empty: servers are DOWN until their first check passes.
            let members = if s.check.is_some() {
                vec![]
            } else {
                s.backends.clone()
            };
            let generation = self.install_backends(cfg, id, &members)?;
            let names: Vec<&str> = members
                .iter()
                .map(|&b| cfg.backends[b].name.as_str())
                .collect();
            match &s.check {
                None => {
                    info!(service = %s.name, vip = %s.vip, backends = ?names, generation, "service configured (no check: static set)")
                }
                Some(c) => {
                    info!(service = %s.name, vip = %s.vip, check = %c.name, generation, "service configured; its set is empty until checks pass")
                }
            }
        }
        Ok(())
    }

    /// The current reset epoch of (`service`, `backend`) (a pair's standby stamps the flows it
    /// installs with it: they are live).
    pub fn reset_epoch(&self, service: u32, backend: u32) -> u32 {
        self.reset_epoch
            .get(&lb_common::epoch_index(service, backend), 0)
            .unwrap_or(0)
    }

    /// Records each interface's MAC (ifindex, MAC): in a pair the data path forwards only
    /// frames addressed to the interface they arrive on. Before [`Control::write_config`]
    /// sets `CONFIG_F_SYNC`, so that no frame is judged against an empty map.
    pub fn set_iface_macs(&mut self, macs: &[(u32, [u8; 6])]) -> Result<()> {
        for (ifindex, mac) in macs {
            self.iface_macs
                .insert(ifindex, mac, 0)
                .with_context(|| format!("add ifindex {ifindex} to IFACE_MACS"))?;
        }
        Ok(())
    }

    /// Writes the data path's runtime settings.
    pub fn write_config(&mut self, cfg: &Config, generic: bool) -> Result<()> {
        let mut flags = 0;
        if cfg.debug {
            flags |= CONFIG_F_DEBUG;
        }
        if generic {
            flags |= CONFIG_F_GENERIC;
        }
        if self.route_src_fallback {
            flags |= CONFIG_F_ROUTE_SRC;
        }
        if self.old_range.is_some() {
            flags |= CONFIG_F_OLD_PORTS;
        }
        if cfg.pair.is_some() {
            flags |= CONFIG_F_SYNC;
        }
        let c = MapConfig {
            embryonic_timeout_ns: cfg.connect_timeout.as_nanos() as u64,
            idle_timeout_ns: cfg.idle_timeout.as_nanos() as u64,
            close_timeout_ns: cfg.close_timeout.as_nanos() as u64,
            snat_port_min: cfg.snat_ports.0,
            snat_port_max: cfg.snat_ports.1,
            flags,
            rst_per_sec: cfg.rst_per_sec,
            maxconn: cfg.maxconn,
            handshake_slots: lb_common::handshake_slots(cfg.embryonic_entries),
            _pad: 0,
        };
        self.config.set(0, c, 0).context("write CONFIG")
    }

    /// For kernels without `BPF_FIB_LOOKUP_SRC`: new flows to each backend address take the
    /// source address given here (the agent's own route lookup) instead of the FIB's. Takes
    /// effect with the next [`Control::write_config`].
    pub fn use_route_sources(&mut self, sources: &[(Ipv4Addr, Ipv4Addr)]) -> Result<()> {
        for (backend, src) in sources {
            self.route_src
                .insert(addr_be(backend.octets()), addr_be(src.octets()), 0)
                .with_context(|| format!("add {backend} -> {src} to ROUTE_SRC"))?;
        }
        self.route_src_fallback = true;
        Ok(())
    }

    /// The SNAT ranges an earlier agent left in the pinned maps: its range and, if it was still
    /// serving flows of a range before that, that one too (before [`Control::write_config`]).
    pub fn pinned_ranges(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        if let Ok(c) = self.config.get(&0, 0) {
            if c.snat_port_max != 0 {
                out.push((c.snat_port_min, c.snat_port_max));
            }
            if c.flags & CONFIG_F_OLD_PORTS != 0 {
                if let Ok(r) = self.old_ports.get(&0, 0) {
                    if r.max != 0 {
                        out.push((r.min, r.max));
                    }
                }
            }
        }
        out
    }

    /// Keeps translating replies to `range`, an earlier SNAT range, for the flows that still
    /// hold its ports (`None`: no more). Takes effect at once (also rewrites CONFIG's flag).
    pub fn keep_old_ports(&mut self, range: Option<(u16, u16)>) -> Result<()> {
        let (min, max) = range.unwrap_or((0, 0));
        self.old_ports
            .set(0, lb_common::PortRange { min, max }, 0)
            .context("write OLD_PORTS")?;
        self.old_range = range;
        if let Ok(mut c) = self.config.get(&0, 0) {
            if range.is_some() {
                c.flags |= CONFIG_F_OLD_PORTS;
            } else {
                c.flags &= !CONFIG_F_OLD_PORTS;
            }
            self.config.set(0, c, 0).context("write CONFIG")?;
        }
        Ok(())
    }

    /// Lets the program redirect to these interfaces.
    pub fn register_ifaces(&mut self, ifindexes: &[u32]) -> Result<()> {
        for &i in ifindexes {
            self.tx_ports
                .insert(i, i, None, 0)
                .with_context(|| format!("add ifindex {i} to TX_PORTS"))?;
        }
        Ok(())
    }

    /// Registers the addresses replies may come back to (the attached interfaces' addresses).
    pub fn register_snat_addrs(&mut self, addrs: &[Ipv4Addr]) -> Result<()> {
        for a in addrs {
            self.snat_addrs
                .insert(addr_be(a.octets()), 1, 0)
                .with_context(|| format!("add {a} to SNAT_ADDRS"))?;
        }
        Ok(())
    }

    /// Registers every service's VIP:port and every backend's data address:port, and removes
    /// those an earlier agent registered that `cfg` no longer has (a removed service's VIP is
    /// no longer balanced; a removed backend's replies are no longer translated).
    pub fn install_services(&mut self, cfg: &Config) -> Result<()> {
        let mut services = Vec::new();
        let mut backends = Vec::new();
        for s in &cfg.services {
            let key = ServiceKey {
                addr: addr_be(s.vip.ip().octets()),
                port: port_be(s.vip.port()),
                proto: IPPROTO_TCP,
                _pad: 0,
            };
            services.push(key);
            self.services
                .insert(
                    key,
                    Service {
                        id: s.id,
                        flags: s.balance.flags()
                            | if s.maxconn_reset {
                                lb_common::SERVICE_F_MAXCONN_RESET
                            } else {
                                0
                            },
                        backend_maxconn: s.backend_maxconn,
                        _pad: 0,
                    },
                    0,
                )
                .with_context(|| format!("add service {} to SERVICES", s.name))?;
            for &b in &s.backends {
                let be = &cfg.backends[b];
                let key = BackendKey {
                    addr: addr_be(be.address.octets()),
                    port: port_be(s.backend_port),
                    _pad: 0,
                };
                backends.push(key);
                self.backends
                    .insert(key, be.id, 0)
                    .with_context(|| format!("add backend {} to BACKENDS", be.name))?;
            }
        }
        for k in stale_keys(&self.services, &services) {
            let vip = std::net::SocketAddrV4::new(
                Ipv4Addr::from(k.addr.to_ne_bytes()),
                u16::from_be(k.port),
            );
            info!(%vip, "a service of the running instance is no longer configured: its VIP is no longer balanced");
            self.services
                .remove(&k)
                .with_context(|| format!("remove {vip} from SERVICES"))?;
        }
        for k in stale_keys(&self.backends, &backends) {
            self.backends.remove(&k).context("remove from BACKENDS")?;
        }
        Ok(())
    }

    /// Installs the configured backends `members` (indexes into `cfg.backends`) as service
    /// `service`'s set; returns the generation.
    pub fn install_backends(
        &mut self,
        cfg: &Config,
        service: usize,
        members: &[usize],
    ) -> Result<u64> {
        let s = &cfg.services[service];
        let m: Vec<Member> = members
            .iter()
            .map(|&b| Member {
                id: cfg.backends[b].id,
                addr: cfg.backends[b].address,
                port: s.backend_port,
            })
            .collect();
        self.install_set(s.id, &m)
    }

    /// The sets installed now (by an earlier agent, when the maps were adopted), as indexes
    /// into `cfg.backends` matched by address and port; continues the generation count after
    /// the highest one found.
    pub fn adopt_sets(&mut self, cfg: &Config) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for s in &cfg.services {
            let mut members = Vec::new();
            if let Ok(inner) = self.sets.get(&s.id, 0) {
                if let Ok(set) = inner.get(&0, 0) {
                    self.generation = self.generation.max(set.generation);
                    for m in set.members.iter().take(set.count as usize) {
                        let found = s.backends.iter().copied().find(|&b| {
                            cfg.backends[b].id == m.id
                                && addr_be(cfg.backends[b].address.octets()) == m.addr
                                && port_be(s.backend_port) == m.port
                        });
                        if let Some(b) = found {
                            members.push(b);
                        }
                    }
                }
            }
            out.push(members);
        }
        out
    }

    /// Resets the flows of backend `backend` in service `service` (positions in `cfg`) on their
    /// next segment, in the data path.
    pub fn reset_flows(&mut self, cfg: &Config, service: usize, backend: usize) -> Result<()> {
        let i = lb_common::epoch_index(cfg.services[service].id, cfg.backends[backend].id);
        let cur = self.reset_epoch.get(&i, 0).context("read RESET_EPOCH")?;
        self.reset_epoch
            .set(i, cur.wrapping_add(1), 0)
            .context("write RESET_EPOCH")?;
        Ok(())
    }

    /// Holds new SYNs to service `service` that find no backend until `until_ns`
    /// (`bpf_ktime_get_coarse_ns`, i.e. CLOCK_MONOTONIC_COARSE) instead of refusing them; 0
    /// ends a hold.
    pub fn hold_syns(&mut self, cfg: &Config, service: usize, until_ns: u64) -> Result<()> {
        self.syn_hold
            .set(cfg.services[service].id, until_ns, 0)
            .context("write SYN_HOLD")
    }

    /// Installs `members` as service `service`'s backend set, atomically. Returns the
    /// generation installed.
    pub fn install_set(&mut self, service: u32, members: &[Member]) -> Result<u64> {
        let slot = service as usize;
        anyhow::ensure!(slot < self.live.len(), "service id {service} out of range");
        anyhow::ensure!(
            members.len() <= MAX_SET_SIZE,
            "at most {MAX_SET_SIZE} backends per set"
        );
        self.generation += 1;
        let mut set = BackendSet {
            generation: self.generation,
            count: members.len() as u32,
            ..Default::default()
        };
        for (m, out) in members.iter().zip(set.members.iter_mut()) {
            *out = Backend {
                addr: addr_be(m.addr.octets()),
                port: port_be(m.port),
                _pad: 0,
                id: m.id,
            };
        }
        let keys: Vec<String> = members
            .iter()
            .map(|m| format!("backend-{}", m.id))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        set.maglev = crate::maglev::table(&keys);
        let mut inner = match self.spare[slot].take() {
            Some(m) => m,
            None => crate::dataplane::create_set_map()?,
        };
        inner
            .set(0, set, 0)
            .context("fill the spare backend-set map")?;
        self.sets
            .set(service, &inner, 0)
            .context("swap the backend-set map in")?;
        // The update returned: no reader still sees the previous inner map.
        self.spare[slot] = self.live[slot].replace(inner);
        info!(
            service,
            generation = self.generation,
            members = members.len(),
            "backend set installed"
        );
        Ok(self.generation)
    }
}
