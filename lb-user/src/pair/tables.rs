//! This node's tables as the pair's streams see them: the source of the snapshot a sender
//! begins with (every established flow), and the sink a receiver installs the peer's flows
//! into (own handles on the established table and the reset epochs; ids from the
//! configuration, which [`crate::ids`] made this node's).
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    epoch_index, Flow, FlowKey, FlowSync, Slot, SlotClaim, CLAIM_FULL, DIR_FORWARD, IPPROTO_TCP,
};

use super::{export, install, stream, stream::Op, Ids, Iface, Local, SyncedFlow};
use crate::config::Config;

/// This node's ids for a synced flow: its configuration's (which [`crate::ids`] made this
/// node's), by VIP:port and backend address:port.
#[derive(Debug, Clone)]
pub struct Directory {
    /// VIP:port -> (service id, backend port).
    services: Vec<(SocketAddrV4, u32, u16)>,
    /// Backend address -> id.
    backends: Vec<(Ipv4Addr, u32)>,
}

impl Directory {
    pub fn of(cfg: &Config) -> Self {
        Self {
            services: cfg
                .services
                .iter()
                .map(|s| (s.vip, s.id, s.backend_port))
                .collect(),
            backends: cfg.backends.iter().map(|b| (b.address, b.id)).collect(),
        }
    }

    /// The (service id, backend id) of `f` on this node.
    pub fn ids(&self, f: &SyncedFlow) -> Result<(u32, u32)> {
        let &(_, service, port) = self
            .services
            .iter()
            .find(|(vip, ..)| *vip == f.vip)
            .with_context(|| format!("no service at {} on this node", f.vip))?;
        let &(_, backend) = self
            .backends
            .iter()
            .find(|(a, _)| a == f.backend.ip() && port == f.backend.port())
            .with_context(|| format!("no backend {} of that service on this node", f.backend))?;
        Ok((service, backend))
    }
}

/// The `maxconn` slots of synced flows: a standby takes one for each flow of a limited
/// service it installs and gives it back when the flow ends, so that after a takeover its
/// counts hold the flows it carries on.
pub struct Slots {
    /// Own handles on `lb_acquire` and `lb_release`.
    pub acquire: aya::programs::Xdp,
    pub release: aya::programs::Xdp,
    /// The services whose flows hold slots (`backend_maxconn`, or every one under a global
    /// `maxconn`).
    limited: Vec<u32>,
}

impl Slots {
    /// `None` when no service of `cfg` is limited.
    pub fn of(
        cfg: &Config,
        acquire: aya::programs::Xdp,
        release: aya::programs::Xdp,
    ) -> Option<Self> {
        let limited: Vec<u32> = cfg
            .services
            .iter()
            .filter(|s| s.backend_maxconn != 0 || cfg.maxconn != 0)
            .map(|s| s.id)
            .collect();
        (!limited.is_empty()).then_some(Self {
            acquire,
            release,
            limited,
        })
    }
}

/// The node's tables for the pair.
pub struct Tables {
    /// `None`: no service is limited, or this handle only reads (a sender's snapshot).
    slots: Option<Slots>,
    /// The data path's port bitmap: a flow's SNAT port bit is set before the flow is installed
    /// (`crate::port_hints`). `None`: this handle only reads.
    hints: Option<std::sync::Arc<crate::port_hints::HintMap>>,
    established: HashMap<MapData, FlowKey, Flow>,
    /// The same table's fd, for batch writes.
    established_fd: std::os::fd::OwnedFd,
    epochs: Array<MapData, u32>,
    directory: Directory,
    ifaces: Vec<Iface>,
    /// The VIPs, and the interface keepalived puts them on: this node is active while it
    /// holds one.
    vips: Vec<Ipv4Addr>,
    vip_iface: String,
    /// The last answer of [`Tables::holds_a_vip`] and when it was read (the receiver asks at
    /// every flow; the interface's addresses are read at most every 200 ms).
    held: std::cell::Cell<Option<(std::time::Instant, bool)>>,
}

impl Tables {
    /// `established` and `epochs`: own handles on `CT_ESTABLISHED` and `RESET_EPOCH`; `ifaces`:
    /// the instance's interfaces in order, the first named `vip_iface`.
    pub fn new(
        cfg: &Config,
        established: Map,
        epochs: Map,
        ifaces: Vec<Iface>,
        vip_iface: String,
    ) -> Result<Self> {
        let established_fd = crate::gc::map_fd(&established, "CT_ESTABLISHED")?;
        Ok(Self {
            slots: None,
            hints: None,
            established: HashMap::try_from(established).context("CT_ESTABLISHED")?,
            established_fd,
            epochs: Array::try_from(epochs).context("RESET_EPOCH")?,
            directory: Directory::of(cfg),
            ifaces,
            vips: cfg.vip_addrs(),
            vip_iface,
            held: std::cell::Cell::new(None),
        })
    }

    /// Sets the port bits of the flows this handle installs in `hints`.
    pub fn with_hints(mut self, hints: Option<std::sync::Arc<crate::port_hints::HintMap>>) -> Self {
        self.hints = hints;
        self
    }

    /// Sets the bit of SNAT `port` (host order) of backend id `backend`, for a flow about to be
    /// installed: a port search of this node's data path must not take its port.
    fn hold_port(&self, backend: u32, port: u16) {
        if let Some(h) = &self.hints {
            h.hold(backend, port);
        }
    }

    /// Takes and gives back `maxconn` slots for the flows this handle installs and ends.
    pub fn with_slots(mut self, slots: Option<Slots>) -> Self {
        self.slots = slots;
        self
    }

    /// Takes slots for the installed flows of `installed` (forward key, ids, creation) whose
    /// service is limited; the outcome of each (`Ok` for one that needs none).
    fn take_slots(&self, installed: &[(FlowKey, Ids, u64)]) -> Vec<Result<()>> {
        let Some(s) = &self.slots else {
            return installed.iter().map(|_| Ok(())).collect();
        };
        let limited = |ids: &Ids| s.limited.contains(&ids.service);
        let mut claims: Vec<SlotClaim> = installed
            .iter()
            .filter(|(_, ids, _)| limited(ids))
            .map(|&(key, ids, created_ns)| SlotClaim {
                key,
                slot: Slot {
                    created_ns,
                    index: epoch_index(ids.service, ids.backend),
                    _pad: 0,
                },
            })
            .collect();
        if let Err(e) = crate::gc::acquire_slots(&s.acquire, &mut claims) {
            let e = format!("{e:#}");
            return installed
                .iter()
                .map(|_| Err(anyhow::anyhow!("{e}")))
                .collect();
        }
        let mut outcomes = claims.iter();
        installed
            .iter()
            .map(
                |(_, ids, _)| match limited(ids).then(|| outcomes.next()).flatten() {
                    Some(c) if c.slot._pad == CLAIM_FULL => {
                        Err(anyhow::anyhow!("no maxconn slot for it: SLOTS is full"))
                    }
                    _ => Ok(()),
                },
            )
            .collect()
    }

    /// Gives back the slots of the flows `fwd_keys`, where they hold one.
    fn give_slots(&self, fwd_keys: &[FlowKey]) {
        if let Some(s) = &self.slots {
            if let Err(e) = crate::gc::release_slots(&s.release, fwd_keys) {
                tracing::warn!("pair: releasing synced flows' slots: {e:#}");
            }
        }
    }

    /// Whether this node holds a VIP now.
    pub fn holds_a_vip(&self) -> bool {
        if let Some((at, held)) = self.held.get() {
            if at.elapsed() < std::time::Duration::from_millis(200) {
                return held;
            }
        }
        let held = super::holds_a_vip(&self.vip_iface, &self.vips);
        self.held.set(Some((std::time::Instant::now(), held)));
        held
    }

    fn now() -> u64 {
        crate::gc::monotonic_now().unwrap_or(0)
    }

    /// The two entries of `f` on this node at `now`; `epochs` holds the reset epochs read
    /// so far (read once per (service, backend) and batch).
    fn entries_of(
        &self,
        f: &SyncedFlow,
        now: u64,
        epochs: &mut foldhash::HashMap<(u32, u32), u32>,
    ) -> Result<(Ids, [(FlowKey, Flow); 2])> {
        let (service, backend) = self.directory.ids(f)?;
        let epoch = *epochs.entry((service, backend)).or_insert_with(|| {
            self.epochs
                .get(&epoch_index(service, backend), 0)
                .unwrap_or(0)
        });
        let ids = Ids {
            service,
            backend,
            epoch,
        };
        Ok((
            ids,
            super::entries(f, &Local::of(f, ids, now, &self.ifaces)?),
        ))
    }

    /// Applies `ops` to a node that does not hold the VIPs, whose tables hold only what its
    /// peer sent: the peer's word goes (every install writes), and the writes of a run of
    /// installs, or the deletes of a run of ends, go in one syscall. An end reads the
    /// forward entry for its partner's key first.
    fn apply_passive(&mut self, ops: &[Op]) -> Vec<Result<bool>> {
        let now = Self::now();
        let mut out: Vec<Result<bool>> = Vec::with_capacity(ops.len());
        let mut epochs = foldhash::HashMap::default();
        // Installs not written yet: keys and entries (reply, then forward: a reader that finds
        // the forward entry finds its partner) and the index of their op.
        let (mut keys, mut values, mut installs) = (Vec::new(), Vec::new(), Vec::new());
        let mut deletes: Vec<FlowKey> = Vec::new();
        for op in ops {
            match op {
                Op::Install { flow, .. } => {
                    self.delete(&mut deletes);
                    match self.entries_of(flow, now, &mut epochs) {
                        Ok((ids, [(fwd_key, fwd), (rev_key, rev)])) => {
                            self.hold_port(rev.backend_id, u16::from_be(rev_key.dport));
                            keys.extend([rev_key, fwd_key]);
                            values.extend([rev, fwd]);
                            installs.push((out.len(), ids, fwd.created_ns));
                            out.push(Ok(true));
                        }
                        Err(e) => out.push(Err(e)),
                    }
                }
                Op::End { client, vip } => {
                    self.write(&mut keys, &mut values, &mut installs, &mut out);
                    let fwd_key = FlowKey::between(*client, *vip);
                    if let Ok(fwd) = self.established.get(&fwd_key, 0) {
                        deletes.extend([fwd_key, fwd.partner_key(IPPROTO_TCP)]);
                    }
                    out.push(Ok(true));
                }
            }
        }
        self.write(&mut keys, &mut values, &mut installs, &mut out);
        self.delete(&mut deletes);
        out
    }

    /// Writes a run of installs; a flow with an entry the kernel refused (a full table) has
    /// its other entry taken out again and its op's outcome set to the error. The flows that
    /// went in take their `maxconn` slots.
    fn write(
        &self,
        keys: &mut Vec<FlowKey>,
        values: &mut Vec<Flow>,
        installs: &mut Vec<(usize, Ids, u64)>,
        out: &mut [Result<bool>],
    ) {
        let mut undo = Vec::new();
        crate::batch::update_all(self.established_fd.as_fd(), keys, values, |k, e| {
            undo.push(keys[k ^ 1]);
            out[installs[k / 2].0] = Err(anyhow::Error::new(e).context("established table"));
        });
        crate::batch::delete_all(self.established_fd.as_fd(), &undo, |_, _| {});
        let (ops, installed): (Vec<usize>, Vec<(FlowKey, Ids, u64)>) = installs
            .iter()
            .enumerate()
            .filter(|(_, (op, ..))| out[*op].is_ok())
            .map(|(i, &(op, ids, created_ns))| (op, (keys[2 * i + 1], ids, created_ns)))
            .unzip();
        for (op, slot) in ops.into_iter().zip(self.take_slots(&installed)) {
            if let Err(e) = slot {
                out[op] = Err(e);
            }
        }
        keys.clear();
        values.clear();
        installs.clear();
    }

    /// Deletes a run of ends' entries, forward and reply key in turn (one that is gone
    /// already is skipped), and gives back the flows' slots.
    fn delete(&self, keys: &mut Vec<FlowKey>) {
        if keys.is_empty() {
            return;
        }
        let forward: Vec<FlowKey> = keys.iter().step_by(2).copied().collect();
        self.give_slots(&forward);
        crate::batch::delete_all(self.established_fd.as_fd(), keys, |_, _| {});
        keys.clear();
    }
}

impl stream::Source for Tables {
    fn snapshot(&mut self) -> Result<Vec<SyncedFlow>> {
        let now = Self::now();
        let all: std::collections::HashMap<FlowKey, Flow> =
            self.established.iter().filter_map(|r| r.ok()).collect();
        let ifindexes: Vec<u32> = self.ifaces.iter().map(|i| i.ifindex).collect();
        Ok(all
            .iter()
            .filter(|(_, f)| f.dir == DIR_FORWARD)
            .filter_map(|(k, f)| {
                let rev = all.get(&f.partner_key(IPPROTO_TCP))?;
                rev.points_back_to(k).then_some(FlowSync {
                    fwd_key: *k,
                    fwd: *f,
                    rev: *rev,
                })
            })
            .filter_map(|s| export(&s, now, &ifindexes).ok())
            .collect())
    }

    fn active(&self) -> bool {
        self.holds_a_vip()
    }
}

impl stream::Sink for Tables {
    fn install(&mut self, f: &SyncedFlow, replace: bool) -> Result<bool> {
        let (service, backend) = self.directory.ids(f)?;
        if !replace {
            let fwd = FlowKey::between(f.client, f.vip);
            let rev = FlowKey::between(f.backend, f.snat);
            if self.established.get(&fwd, 0).is_ok() || self.established.get(&rev, 0).is_ok() {
                return Ok(false);
            }
        }
        let epoch = self
            .epochs
            .get(&epoch_index(service, backend), 0)
            .unwrap_or(0);
        let now = Self::now();
        self.hold_port(backend, f.snat.port());
        install(
            &mut self.established,
            f,
            Ids {
                service,
                backend,
                epoch,
            },
            now,
            &self.ifaces,
        )?;
        let created = now.saturating_sub(f.age_ns);
        let ids = Ids {
            service,
            backend,
            epoch,
        };
        let taken = self.take_slots(&[(FlowKey::between(f.client, f.vip), ids, created)]);
        taken.into_iter().next().unwrap_or(Ok(()))?;
        Ok(true)
    }

    fn active(&self) -> bool {
        self.holds_a_vip()
    }

    fn apply(&mut self, ops: &[Op]) -> Vec<Result<bool>> {
        if self.holds_a_vip() {
            // This node serves (the peer's snapshot to an active node, or a split brain): its
            // own flows stay, each install is checked against the tables.
            stream::one_by_one(self, ops)
        } else {
            self.apply_passive(ops)
        }
    }

    fn purge_except(
        &mut self,
        keep: &std::collections::HashSet<(SocketAddrV4, SocketAddrV4)>,
    ) -> Result<u64> {
        let gone: Vec<FlowKey> = self
            .established
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, f)| f.dir == DIR_FORWARD && !keep.contains(&super::stream::tuple_of(k)))
            .map(|(k, _)| k)
            .collect();
        for k in &gone {
            let (client, vip) = super::stream::tuple_of(k);
            self.end(client, vip)?;
        }
        Ok(gone.len() as u64)
    }

    fn end(&mut self, client: SocketAddrV4, vip: SocketAddrV4) -> Result<()> {
        let fwd_key = FlowKey::between(client, vip);
        let Ok(fwd) = self.established.get(&fwd_key, 0) else {
            return Ok(());
        };
        let rev_key = fwd.partner_key(IPPROTO_TCP);
        self.give_slots(&[fwd_key]);
        let _ = self.established.remove(&fwd_key);
        if self
            .established
            .get(&rev_key, 0)
            .is_ok_and(|r| r.points_back_to(&fwd_key))
        {
            let _ = self.established.remove(&rev_key);
        }
        Ok(())
    }
}
