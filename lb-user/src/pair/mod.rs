//! A pair of lb nodes for the same VIPs (keepalived moves the addresses): the active node's
//! flows are carried to the standby, so that the first segment after a takeover finds its flow.
//!
//! - [`wire`]: one synced flow as it travels, independent of either node's tables.
//! - here: the two translations, an established flow of the active's data path (`FLOW_SYNC`
//!   record) to a [`SyncedFlow`] ([`export`]), and a [`SyncedFlow`] to the two table entries
//!   the standby installs with its own interfaces, clock, ids and reset epochs ([`entries`],
//!   written by [`install`]).
//!
//! - [`feed`]: what this node tells its peer (gathered on the GC's thread); [`stream`]: the
//!   two TCP streams between the agents (a snapshot, then live flows and ends).
use std::{
    borrow::BorrowMut,
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{anyhow, Context, Result};
use aya::maps::{HashMap, MapData};
use lb_common::{Flow, FlowKey, FlowSync, DIR_FORWARD, DIR_REPLY, FLOW_ESTABLISHED};

pub mod feed;
pub mod keepalived;
pub mod stream;
pub mod tables;
pub mod wire;

pub use wire::{Direction, SyncedFlow};

/// One of this node's interfaces, at its position in the instance's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

fn addr_of(be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(be.to_ne_bytes()), u16::from_be(port_be))
}

fn be(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

fn direction(f: &Flow) -> Direction {
    Direction {
        seq_end: f.seq_end,
        ack: f.ack,
        close: f.close,
        first_fin: f.first_fin,
        bytes: f.bytes,
    }
}

/// The flow the active's data path reported (`FLOW_SYNC`) at `now_ns` (its clock), with its
/// interfaces `ifindexes` in the instance's order.
pub fn export(s: &FlowSync, now_ns: u64, ifindexes: &[u32]) -> Result<SyncedFlow> {
    export_at(s, now_ns, unix_now_ns(), ifindexes)
}

/// The wall clock, ns since the Unix epoch.
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Whether `iface` holds one of `vips` now (keepalived put it there: this node is active).
pub fn holds_a_vip(iface: &str, vips: &[Ipv4Addr]) -> bool {
    crate::host::iface_addrs(iface).is_ok_and(|have| vips.iter().any(|v| have.contains(v)))
}

/// [`export`] with the wall clock given.
pub fn export_at(s: &FlowSync, now_ns: u64, unix_ns: u64, ifindexes: &[u32]) -> Result<SyncedFlow> {
    let position = |ifindex: u32| {
        ifindexes
            .iter()
            .position(|&i| i == ifindex)
            .map(|p| p as u8)
            .ok_or_else(|| anyhow!("the flow leaves by ifindex {ifindex}, not an lb interface"))
    };
    let (fwd, rev) = (&s.fwd, &s.rev);
    let last = fwd.last_seen_ns.max(rev.last_seen_ns);
    Ok(SyncedFlow {
        client: addr_of(s.fwd_key.saddr, s.fwd_key.sport),
        vip: addr_of(s.fwd_key.daddr, s.fwd_key.dport),
        snat: addr_of(fwd.nat_saddr, fwd.nat_sport),
        backend: addr_of(fwd.nat_daddr, fwd.nat_dport),
        client_mac: rev.dmac,
        backend_mac: fwd.dmac,
        client_iface: position(rev.ifindex)?,
        backend_iface: position(fwd.ifindex)?,
        age_ns: now_ns.saturating_sub(fwd.created_ns),
        idle_ns: now_ns.saturating_sub(last),
        last_seen_unix_ns: unix_ns.saturating_sub(now_ns.saturating_sub(last)),
        generation: fwd.generation,
        forward: direction(fwd),
        reply: direction(rev),
    })
}

/// What the standby knows of its own side of a synced flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// Its clock (`CLOCK_MONOTONIC_COARSE`, as the data path's).
    pub now_ns: u64,
    /// Its ids of the flow's service and backend (by VIP:port and backend address:port).
    pub service_id: u32,
    pub backend_id: u32,
    /// The current reset epoch of that (service, backend): the flow is live.
    pub epoch: u32,
    /// Its interfaces towards the client and towards the backend.
    pub client_iface: Iface,
    pub backend_iface: Iface,
}

impl Local {
    /// The standby's side of `f` at `now_ns`, with its `ids` and its interfaces `ifaces` (the
    /// instance's order); an error when the flow names an interface this node does not have.
    pub fn of(f: &SyncedFlow, ids: Ids, now_ns: u64, ifaces: &[Iface]) -> Result<Self> {
        let iface = |pos: u8| {
            ifaces.get(pos as usize).copied().ok_or_else(|| {
                anyhow!(
                    "the flow leaves by interface #{pos}; this node has {}",
                    ifaces.len()
                )
            })
        };
        Ok(Local {
            now_ns,
            service_id: ids.service,
            backend_id: ids.backend,
            epoch: ids.epoch,
            client_iface: iface(f.client_iface)?,
            backend_iface: iface(f.backend_iface)?,
        })
    }
}

/// The forward and reply entries (key, value) the standby installs for `f`: the active's
/// rewrite, sent out of the standby's own interfaces with their own MACs.
pub fn entries(f: &SyncedFlow, l: &Local) -> [(FlowKey, Flow); 2] {
    let created_ns = l.now_ns.saturating_sub(f.age_ns);
    let last_seen_ns = l.now_ns.saturating_sub(f.idle_ns);
    let entry = |src: SocketAddrV4, dst: SocketAddrV4, out: Iface, dmac, d: &Direction, dir| {
        let ((nat_saddr, nat_sport), (nat_daddr, nat_dport)) = (be(src), be(dst));
        Flow {
            created_ns,
            last_seen_ns,
            generation: f.generation,
            seq_end: d.seq_end,
            nat_saddr,
            nat_daddr,
            ifindex: out.ifindex,
            backend_id: l.backend_id,
            service_id: l.service_id,
            nat_sport,
            nat_dport,
            smac: out.mac,
            dmac,
            state: FLOW_ESTABLISHED,
            dir,
            close: d.close,
            first_fin: d.first_fin,
            epoch: l.epoch,
            ack: d.ack,
            bytes: d.bytes,
        }
    };
    [
        (
            FlowKey::between(f.client, f.vip),
            entry(
                f.snat,
                f.backend,
                l.backend_iface,
                f.backend_mac,
                &f.forward,
                DIR_FORWARD,
            ),
        ),
        (
            FlowKey::between(f.backend, f.snat),
            entry(
                f.vip,
                f.client,
                l.client_iface,
                f.client_mac,
                &f.reply,
                DIR_REPLY,
            ),
        ),
    ]
}

/// This node's ids for a synced flow, as its configuration maps hold them: the service at
/// the flow's VIP:port, its backend, and that pair's current reset epoch (`Control` answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub service: u32,
    pub backend: u32,
    pub epoch: u32,
}

/// Installs `f` into the standby's established table at `now_ns`, with its `ids` and its
/// interfaces `ifaces` (the instance's order). The reply entry goes in first, as the data
/// path's `promote` does: a reader that finds the forward entry finds its partner. Refused
/// (and nothing written) when the flow names an interface this node does not have.
pub fn install<C: BorrowMut<MapData>>(
    established: &mut HashMap<C, FlowKey, Flow>,
    f: &SyncedFlow,
    ids: Ids,
    now_ns: u64,
    ifaces: &[Iface],
) -> Result<()> {
    let [(fwd_key, fwd), (rev_key, rev)] = entries(f, &Local::of(f, ids, now_ns, ifaces)?);
    established
        .insert(rev_key, rev, 0)
        .context("established table")?;
    if let Err(e) = established.insert(fwd_key, fwd, 0) {
        let _ = established.remove(&rev_key);
        return Err(e).context("established table");
    }
    Ok(())
}

/// The pair's two threads (sender, receiver) and their status; stopped when dropped.
pub struct Running {
    pub status: stream::Status,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Binds `pair.listen` (an error says why it cannot) and starts the receiver into `sink`
    /// and the sender of `rx`'s messages (snapshots from `source`) to `pair.peer`.
    pub fn start(
        pair: &crate::config::PairConfig,
        source: impl stream::Source + 'static,
        sink: impl stream::Sink + 'static,
        rx: std::sync::mpsc::Receiver<feed::Batch>,
    ) -> Result<Self> {
        let listener = std::net::TcpListener::bind(pair.listen).with_context(|| {
            format!(
                "[pair] listen = \"{}\": cannot listen there for the peer's flows",
                pair.listen
            )
        })?;
        let status = stream::Status::default();
        if let Ok(mut s) = status.lock() {
            s.peer = pair.peer.to_string();
            s.listen = pair.listen.to_string();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let secret = pair.secret.clone().unwrap_or_default();
        if pair.secret.is_none() {
            tracing::warn!(
                listen = %pair.listen,
                "pair: no secret_file: anyone who reaches this address can install flows; set [pair] secret_file"
            );
        }
        let recv = {
            let (status, stop, secret) = (status.clone(), stop.clone(), secret.clone());
            std::thread::Builder::new()
                .name("lb-pair-recv".into())
                .spawn(move || stream::receive_loop(listener, secret, sink, status, stop))?
        };
        let send = {
            let (status, stop, peer) = (status.clone(), stop.clone(), pair.peer);
            std::thread::Builder::new()
                .name("lb-pair-send".into())
                .spawn(move || stream::send_loop(peer, secret, source, rx, status, stop))?
        };
        Ok(Self {
            status,
            stop,
            threads: vec![recv, send],
        })
    }

    /// Writes the status, with this node's role (whether `iface` holds one of `vips`) and
    /// eligibility, to [`status_path`] every [`STATUS_EVERY`] (for `lb status`, the admin
    /// views and `lb health`) until stopped; removes it then.
    pub fn publish(&mut self, instance: &str, vips: Vec<Ipv4Addr>, iface: String) -> Result<()> {
        let instance_name = instance.to_string();
        let (status, stop, path) = (
            self.status.clone(),
            self.stop.clone(),
            status_path(instance),
        );
        std::fs::create_dir_all("/run/lb").context("create /run/lb")?;
        let started = std::time::Instant::now();
        let t = std::thread::Builder::new()
            .name("lb-pair-status".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut s = status.lock().map(|s| s.clone()).unwrap_or_default();
                    (s.eligible, s.why) = stream::eligibility(&s, started.elapsed());
                    (s.lag_p50_us, s.lag_p99_us) = (s.lag.quantile(0.5), s.lag.quantile(0.99));
                    (s.lag_max_us, s.lag_count) = (s.lag.max_us(), s.lag.count());
                    s.role = if holds_a_vip(&iface, &vips) {
                        "active"
                    } else {
                        "standby"
                    }
                    .into();
                    (s.vrrp_state, s.vrrp_since) = match vrrp_state(&instance_name) {
                        Some((state, at)) => (Some(state), Some(at)),
                        None => (None, None),
                    };
                    s.written_at_ms = unix_now_ns() / 1_000_000;
                    let tmp = path.with_extension("json.tmp");
                    let written = serde_json::to_vec_pretty(&s)
                        .map_err(std::io::Error::other)
                        .and_then(|b| std::fs::write(&tmp, b))
                        .and_then(|()| std::fs::rename(&tmp, &path));
                    if let Err(e) = written {
                        tracing::warn!("pair: writing {}: {e}", path.display());
                    }
                    std::thread::sleep(STATUS_EVERY);
                }
                let _ = std::fs::remove_file(&path);
            })?;
        self.threads.push(t);
        Ok(())
    }
}

/// How often a running pair writes its status file.
pub const STATUS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The pair's status file of `instance` (written by its agent, read by `lb status` and
/// `lb health`).
pub fn status_path(instance: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/lb").join(format!("{instance}.pair.json"))
}

/// Where `lb pair notify` records keepalived's VRRP state for `instance`.
pub fn vrrp_state_path(instance: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/lb").join(format!("{instance}.vrrp"))
}

/// Records the VRRP state keepalived notified (`MASTER`, `BACKUP`, `FAULT`, `STOP`), with
/// the time, for the agent's status.
pub fn record_vrrp_state(instance: &str, state: &str) -> Result<()> {
    if state.is_empty() || state.len() > 16 || !state.chars().all(|c| c.is_ascii_alphabetic()) {
        anyhow::bail!("{state:?} is not a VRRP state (MASTER, BACKUP, FAULT, STOP)");
    }
    let path = vrrp_state_path(instance);
    std::fs::create_dir_all("/run/lb").context("create /run/lb")?;
    let secs = unix_now_ns() / 1_000_000_000;
    std::fs::write(&path, format!("{state} {secs}\n"))
        .with_context(|| format!("write {}", path.display()))
}

/// keepalived's last notified state for `instance` and when (seconds since the epoch).
pub fn vrrp_state(instance: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(vrrp_state_path(instance)).ok()?;
    let mut words = text.split_whitespace();
    let state = words.next()?.to_string();
    let at = words.next()?.parse().ok()?;
    Some((state, at))
}

/// The pair's status of `instance` as its agent last wrote it, with its age; `None` when the
/// instance is not paired (or its agent never wrote one).
pub fn read_status(instance: &str) -> Option<(stream::PairStatus, std::time::Duration)> {
    let bytes = std::fs::read(status_path(instance)).ok()?;
    let s: stream::PairStatus = serde_json::from_slice(&bytes).ok()?;
    let age = std::time::Duration::from_millis(
        (unix_now_ns() / 1_000_000).saturating_sub(s.written_at_ms),
    );
    Some((s, age))
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::IPPROTO_TCP;

    const ACTIVE: [u32; 2] = [4, 9];
    const STANDBY: [Iface; 2] = [
        Iface {
            ifindex: 31,
            mac: [2, 0xbb, 0, 0, 0, 1],
        },
        Iface {
            ifindex: 32,
            mac: [2, 0xbb, 0, 0, 0, 2],
        },
    ];

    /// A flow as the active's data path reports it: client 198.18.0.2:40001 -> VIP
    /// 198.18.0.10:7680, sent from 10.0.1.1:12345 to 10.0.1.10:7687.
    fn reported() -> FlowSync {
        let f = wire::tests::sample();
        let active = Local {
            now_ns: 1_000_000_000,
            service_id: 3,
            backend_id: 5,
            epoch: 2,
            client_iface: Iface {
                ifindex: ACTIVE[0],
                mac: [2, 0xaa, 0, 0, 0, 1],
            },
            backend_iface: Iface {
                ifindex: ACTIVE[1],
                mac: [2, 0xaa, 0, 0, 0, 2],
            },
        };
        let [(fwd_key, fwd), (_, rev)] = entries(
            &SyncedFlow {
                age_ns: 0,
                idle_ns: 0,
                ..f
            },
            &active,
        );
        FlowSync { fwd_key, fwd, rev }
    }

    #[test]
    fn export_then_entries_gives_the_active_entries_with_the_standbys_own_side() {
        let r = reported();
        let active_now = r.fwd.created_ns + 3_000;
        let f = export(&r, active_now, &ACTIVE).unwrap();
        assert_eq!(f.age_ns, 3_000);
        assert_eq!((f.client_iface, f.backend_iface), (0, 1));
        let standby = Local {
            now_ns: 77_000_000_000,
            service_id: 8,
            backend_id: 1,
            epoch: 0,
            client_iface: STANDBY[0],
            backend_iface: STANDBY[1],
        };
        let [(fwd_key, fwd), (rev_key, rev)] = entries(&f, &standby);
        assert_eq!(fwd_key, r.fwd_key);
        assert_eq!(rev_key, r.fwd.partner_key(IPPROTO_TCP));
        assert!(rev.points_back_to(&fwd_key) && fwd.points_back_to(&rev_key));
        // The rewrite is the active's; what is the node's own is the standby's.
        let same = |a: &Flow, b: &Flow| Flow {
            created_ns: a.created_ns,
            last_seen_ns: a.last_seen_ns,
            ifindex: a.ifindex,
            smac: a.smac,
            service_id: a.service_id,
            backend_id: a.backend_id,
            epoch: a.epoch,
            ..*b
        };
        assert_eq!(fwd, same(&fwd, &r.fwd));
        assert_eq!(rev, same(&rev, &r.rev));
        assert_eq!((fwd.ifindex, fwd.smac), (32, STANDBY[1].mac));
        assert_eq!((rev.ifindex, rev.smac), (31, STANDBY[0].mac));
        assert_eq!((fwd.service_id, fwd.backend_id, rev.epoch), (8, 1, 0));
        assert_eq!(fwd.created_ns, 77_000_000_000 - 3_000);
        assert_eq!(fwd.state, FLOW_ESTABLISHED);
    }

    #[test]
    fn a_flow_by_an_interface_the_active_does_not_list_is_not_exported() {
        let e = export(&reported(), 0, &[4]).unwrap_err();
        assert!(e.to_string().contains("ifindex 9"), "{e}");
    }
}
