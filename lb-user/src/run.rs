//! `lb run`: load, attach, fill the maps, serve until SIGINT/SIGTERM, then undo everything.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use std::sync::{Arc, RwLock};

use crate::{
    admin,
    config::{Config, VipMode},
    control::Control,
    dataplane::{self, AttachMode, Pins},
    health::scheduler::{self, Target, Update},
    host::{self, HostChanges},
    live::{Live, LiveView},
    mirror::Mirror,
    ops::{self, OpRequest},
    status::{self, InstanceInfo},
    supervise::Supervisor,
};

pub struct RunArgs {
    pub config: PathBuf,
    /// HAProxy files to run from instead of `config` (`--haproxy-config`).
    pub haproxy: Vec<PathBuf>,
    /// `--faithful`: import them keeping HAProxy's behaviour for role backends.
    pub faithful: bool,
    pub ifaces: Vec<String>,
    pub xdp_mode: AttachMode,
    pub instance: Option<String>,
    pub xdp_object: Option<PathBuf>,
    /// `--snat-ports`: overrides the configuration's `snat_ports`.
    pub snat_ports: Option<(u16, u16)>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let mut cfg = if args.haproxy.is_empty() {
        Config::load(&args.config)?
    } else {
        crate::haproxy::load_for_run(&args.haproxy, &args.ifaces, args.faithful)?
    };
    if let Some(i) = args.instance {
        cfg.instance = i;
    }
    cfg.xdp_object = args.xdp_object;
    if !nix::unistd::geteuid().is_root() {
        bail!("lb run needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it with sudo");
    }
    if args.ifaces.is_empty() {
        bail!("no --iface given: name the interface(s) clients and backends are reached on, e.g. --iface eth0");
    }
    let ifindexes: Vec<u32> = args
        .ifaces
        .iter()
        .map(|i| host::if_index(i))
        .collect::<Result<_>>()?;
    if let Some(ports) = args.snat_ports {
        cfg.set_snat_ports(ports);
    }
    let data_ports: Vec<_> = cfg
        .services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .map(|&b| std::net::SocketAddrV4::new(cfg.backends[b].address, s.backend_port))
        })
        .collect();
    host::check_snat_ports(cfg.snat_ports, &data_ports)?;
    dataplane::ensure_bpffs()?;

    let pin_dir = dataplane::pin_dir(&cfg.instance);
    let (mut ebpf, pins) = dataplane::load_pinned(&mut cfg, &pin_dir)?;
    // Ids by name: an adopted instance's services and backends keep theirs.
    crate::ids::apply(&mut cfg, &pin_dir)?;
    match pins {
        Pins::Fresh => info!(dir = %pin_dir.display(), "new instance: maps pinned"),
        Pins::Adopted { flows } => info!(
            dir = %pin_dir.display(),
            flows,
            "adopting the running instance: its maps, links and {flows} flows are kept"
        ),
    }
    let mut ready = false;
    let result = serve(
        &mut ebpf,
        &cfg,
        &Ifaces {
            names: &args.ifaces,
            indexes: &ifindexes,
            mode: args.xdp_mode,
        },
        pins,
        &pin_dir,
        &mut ready,
    )
    .await;
    if result.is_err() && pins == Pins::Fresh && !ready {
        // Nothing was serving before us and the start failed: leave nothing behind. Once
        // ready, an error (like a panic or a kill) leaves the data path forwarding.
        let _ = dataplane::unpin(&pin_dir);
        let _ = std::fs::remove_file(status::info_path(&cfg.instance));
    }
    result
}

/// `lb detach`: stops the pinned data path of `instance` and restores the host settings its
/// agents changed.
pub fn detach(instance: &str) -> Result<()> {
    let dir = dataplane::pin_dir(instance);
    let existed = dir.exists();
    dataplane::unpin(&dir)?;
    HostChanges::restore_recorded(instance);
    let _ = std::fs::remove_file(status::info_path(instance));
    if existed {
        info!(
            instance,
            "detached: XDP links and maps unpinned, host settings restored"
        );
    } else {
        info!(
            instance,
            "nothing pinned for this instance; host settings restored if recorded"
        );
    }
    Ok(())
}

/// Starts the pair's streams: own handles on the pinned established table and reset epochs
/// for each thread, the interfaces with their MACs.
fn start_pair(
    cfg: &Config,
    pair: &crate::config::PairConfig,
    ifaces: &[String],
    ifindexes: &[u32],
    pin_dir: &Path,
    rx: std::sync::mpsc::Receiver<crate::pair::feed::Batch>,
    receiver: impl FnOnce(crate::pair::tables::Tables) -> crate::pair::tables::Tables,
) -> Result<crate::pair::Running> {
    let own = ifaces
        .iter()
        .zip(ifindexes)
        .map(|(name, &ifindex)| {
            Ok(crate::pair::Iface {
                ifindex,
                mac: host::iface_mac(name)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tables = || {
        crate::pair::tables::Tables::new(
            cfg,
            dataplane::open_pinned(pin_dir, lb_common::names::CT_ESTABLISHED)?,
            dataplane::open_pinned(pin_dir, lb_common::names::RESET_EPOCH)?,
            own.clone(),
            ifaces[0].clone(),
        )
    };
    let mut running = crate::pair::Running::start(pair, tables()?, receiver(tables()?), rx)?;
    running.publish(&cfg.instance, cfg.vip_addrs(), ifaces[0].clone())?;
    info!(peer = %pair.peer, listen = %pair.listen, "pair: streaming this node's flows to the peer, installing the peer's");
    Ok(running)
}

/// The interfaces the program is attached to, and how.
struct Ifaces<'a> {
    names: &'a [String],
    indexes: &'a [u32],
    mode: AttachMode,
}

async fn serve(
    ebpf: &mut aya::Ebpf,
    cfg: &Config,
    at: &Ifaces<'_>,
    pins: Pins,
    pin_dir: &Path,
    ready: &mut bool,
) -> Result<()> {
    let (ifaces, ifindexes, mode) = (at.names, at.indexes, at.mode);
    let mut logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!("the data path's debug log is unavailable: {e}");
            None
        }
    };
    let mut control = Control::new(ebpf)?;
    let mut gc = crate::gc::Gc::new(ebpf, crate::gc::Timeouts::from_config(cfg))?;
    gc.set_log(crate::connlog::ConnLog::new(cfg.connection_log.as_deref())?);
    // A new program's bitmap is empty; tables an earlier one filled need every bit set before
    // this program serves them (the GC's passes then clear the free ports' bits).
    let hints = match ebpf.take_map(lb_common::names::PORT_HINTS) {
        Some(map) => Some(gc.set_port_hints(map, cfg.snat_ports, pins != Pins::Fresh)?),
        None => None,
    };
    if let Some(p) = &cfg.connection_log {
        info!(file = %p.display(), "connection log appended to this file");
    }
    // Connections the data path ends itself (reset, tuple reuse) come through a ring buffer,
    // which the GC's thread drains for the connection log.
    let conn_events = {
        let map = ebpf
            .take_map(lb_common::names::CONN_EVENTS)
            .context("the object has no CONN_EVENTS map")?;
        aya::maps::RingBuf::try_from(map).context("CONN_EVENTS is not a ring buffer")?
    };
    // In a pair: the flows the data path establishes come through `FLOW_SYNC`, which the GC's
    // thread drains with `CONN_EVENTS` and feeds, with the ends and its refreshes, to the
    // sender's thread; the receiver's thread installs the peer's flows.
    let mut pair_rx = None;
    let flow_sync = match &cfg.pair {
        None => None,
        Some(_) => {
            let map = ebpf
                .take_map(lb_common::names::FLOW_SYNC)
                .context("the object has no FLOW_SYNC map")?;
            let (tx, rx) = std::sync::mpsc::sync_channel(crate::pair::feed::QUEUE);
            gc.feed_pair(crate::pair::feed::Feed::new(tx, ifindexes.to_vec()));
            pair_rx = Some(rx);
            Some(aya::maps::RingBuf::try_from(map).context("FLOW_SYNC is not a ring buffer")?)
        }
    };
    // A record of host changes belongs to the pinned instance it was kept for: trusted only when
    // adopting that instance (a fresh one starts from the host as it is).
    let mut host = match pins {
        Pins::Adopted { .. } => HostChanges::load(&cfg.instance),
        Pins::Fresh => HostChanges::forget(&cfg.instance),
    };
    for iface in ifaces {
        host.enable_forwarding(iface)?;
    }
    host.reserve_ports(cfg.snat_ports)?;
    match cfg.vip_mode {
        VipMode::Local => {
            for vip in cfg.vip_addrs() {
                host.ensure_vip(vip, &ifaces[0], ifaces)?;
            }
            info!("vip_mode = local: VIPs are local addresses of the attached interfaces");
        }
        VipMode::Routed => info!(
            "vip_mode = routed: traffic for the VIPs must be routed to this host; no address added"
        ),
    }

    for b in &cfg.backends {
        host.manage_neighbor(b.address)?;
    }
    host.wait_neighbors(std::time::Duration::from_secs(3));

    let vips = cfg.vip_addrs();
    let mut snat_addrs = Vec::new();
    for iface in ifaces {
        snat_addrs.extend(
            host::iface_addrs(iface)?
                .into_iter()
                .filter(|a| !vips.contains(a)),
        );
    }
    if let Some(a) = cfg.snat_address {
        // Not necessarily on an interface yet (a pair's standby: keepalived adds it at
        // takeover); replies to it are translated from the start.
        if !snat_addrs.contains(&a) {
            snat_addrs.push(a);
        }
    }
    if snat_addrs.is_empty() {
        bail!(
            "none of {} has an IPv4 address to use as the SNAT source address",
            ifaces.join(", ")
        );
    }
    info!(addrs = ?snat_addrs, "SNAT source addresses");
    let adopted = if pins == Pins::Fresh {
        vec![]
    } else {
        control.adopt_sets(cfg)
    };
    let mut old_ranges = carry_old_ranges(cfg, &mut control, &mut host)?;
    match dataplane::set_source_addresses(ebpf, &mut control, cfg)? {
        dataplane::Source::Fib => info!(
            "new flows take the source address the kernel's FIB lookup gives (BPF_FIB_LOOKUP_SRC)"
        ),
        dataplane::Source::Routes => info!(
            "this kernel has no BPF_FIB_LOOKUP_SRC (Linux before 6.7): new flows take the source address \
             of this host's route to their backend, resolved now (restart lb after changing such a route)"
        ),
        dataplane::Source::Configured(a) => {
            info!(snat_address = %a, "new flows take the configured snat_address");
        }
    }
    if cfg.pair.is_some() {
        let macs = ifaces
            .iter()
            .zip(ifindexes)
            .map(|(name, &i)| Ok((i, host::iface_mac(name)?)))
            .collect::<Result<Vec<_>>>()?;
        control.set_iface_macs(&macs)?;
    }
    control.configure(cfg, mode == AttachMode::Generic, ifindexes, &snat_addrs)?;

    // Health checks: one task per (checked service, backend); results come back on `updates`.
    // Pairs in a set an earlier agent installed start UP at full health.
    let targets = check_targets(cfg, &adopted);
    let (updates_tx, mut updates) = tokio::sync::mpsc::channel::<Update>(1024);
    let commands = (!targets.is_empty()).then(|| scheduler::spawn(targets.clone(), updates_tx));
    let live: Live = Arc::new(RwLock::new(LiveView::new(
        cfg,
        if mode == AttachMode::Generic {
            "generic"
        } else {
            "native"
        },
        ifaces,
    )));
    let mut supervisor = Supervisor::new(cfg, commands, live.clone());
    // The connection-table GC on a thread of its own, so that a pass over a large table never
    // holds up the checks and failover decisions of this loop.
    let release = match crate::dataplane::own_program(ebpf, "lb_release", pin_dir) {
        Ok(p) => Some(p),
        Err(e) => {
            warn!("connection slots will not be released by the GC: {e:#}");
            None
        }
    };
    let _pair = match (&cfg.pair, pair_rx) {
        (Some(pair), Some(rx)) => {
            // The receiver's own handles on the slot programs, for the synced flows' slots.
            let acquire = crate::dataplane::own_program(ebpf, "lb_acquire", pin_dir)?;
            let release = crate::dataplane::own_program(ebpf, "lb_release", pin_dir)?;
            let slots = crate::pair::tables::Slots::of(cfg, acquire, release);
            Some(start_pair(
                cfg,
                pair,
                ifaces,
                ifindexes,
                pin_dir,
                rx,
                // The receiver's writes: the synced flows' slots, and their ports' bits.
                |t| t.with_slots(slots).with_hints(hints.clone()),
            )?)
        }
        _ => None,
    };
    let gc = crate::gc::Worker::spawn(gc, release, conn_events, flow_sync, {
        let live = live.clone();
        move |fill| {
            if let Ok(mut v) = live.write() {
                v.tables = Some(fill.clone());
            }
        }
    })?;
    if adopted.iter().any(|s| !s.is_empty()) {
        supervisor.adopt(cfg, adopted.clone());
    }
    match Mirror::open_or_create(pin_dir) {
        Ok(m) => supervisor.mirror_to(cfg, m),
        Err(e) => warn!("health will not be mirrored for `lb status`: {e:#}"),
    }
    let (ops_tx, mut ops) = tokio::sync::mpsc::channel::<OpRequest>(16);
    ops::listen(&cfg.instance, ops_tx.clone())?;
    admin::spawn(cfg, live.clone(), ops_tx.clone())?;
    first_round(
        cfg,
        &mut control,
        &mut supervisor,
        &mut updates,
        targets.len(),
    )
    .await?;
    supervisor.release(cfg, &mut control)?;
    let verdict = crate::selftest::run(
        ebpf,
        cfg,
        |i| !supervisor.installed(i).is_empty(),
        (ifindexes[0], host::iface_mac(&ifaces[0])?),
        pin_dir,
    )?;
    info!("{verdict}");

    let modes = dataplane::attach_pinned(ebpf, ifaces, mode, pin_dir)?;
    if let Err(e) = dataplane::attach_failure_tracepoints(ebpf) {
        warn!("XDP failure tracepoints are not counted: {e:#}");
    }
    let generic = modes.contains(&XdpMode::Skb);
    if generic && mode != AttachMode::Generic {
        control.write_config(cfg, true)?;
    }
    if let Ok(mut v) = live.write() {
        // The mode the interfaces actually got (auto may have fallen back to generic).
        v.mode = if generic {
            "generic".into()
        } else {
            "native".into()
        };
    }
    for (iface, m) in ifaces.iter().zip(&modes) {
        if *m == XdpMode::Skb {
            host.disable_receive_offloads(iface)?;
        }
    }
    let range = (cfg.snat_ports.1 - cfg.snat_ports.0) as u64 + 1;
    // A hash-map element: key and value rounded to 8 bytes plus the kernel's htab_elem header
    // (hash node, hash, LRU node): about 48 bytes on x86_64.
    let entry =
        |value: usize| (std::mem::size_of::<lb_common::FlowKey>() + value).next_multiple_of(8) + 48;
    let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
    let index = lb_common::INDEX_SETS as usize * std::mem::size_of::<lb_common::IndexSet>();
    info!(
        "capacity: {range} SNAT ports x {} backends = {} concurrent flows; tables: {} established entries (~{:.1} MiB, preallocated), {} handshakes (~{:.1} MiB, and ~{:.1} MiB of handshake index)",
        cfg.backends.len(),
        range * cfg.backends.len() as u64,
        cfg.established_entries,
        mib(cfg.established_entries as usize * entry(std::mem::size_of::<lb_common::Flow>())),
        lb_common::handshake_slots(cfg.embryonic_entries),
        mib(lb_common::handshake_slots(cfg.embryonic_entries) as usize
            * std::mem::size_of::<lb_common::HandshakeSlot>()),
        mib(index),
    );
    status::write_info(&InstanceInfo::new(
        cfg,
        ifaces,
        if generic { "generic" } else { "native" },
    ))?;
    // From here on the data path forwards on its own: whatever ends this agent (SIGTERM, an
    // error, a panic, a kill) leaves the XDP program, its maps and these host settings in
    // place for the next agent to adopt; only `lb detach` undoes them.
    host.keep(&cfg.instance)?;
    *ready = true;
    eprintln!(
        "lb ready instance={} ifaces={} mode={}",
        cfg.instance,
        ifaces.join(","),
        if generic { "generic" } else { "native" }
    );

    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut log_fd = match logger.take() {
        // SAFETY: the logger owns its ring-buffer fd, which stays open for as long as the
        // AsyncFd (which owns the logger) exists.
        Some(l) => Some(
            unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("poll the data path's log ring: {e}"))?,
        ),
        None => None,
    };
    let mut gc_tick = tokio::time::interval(crate::gc::PERIOD);
    gc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(u) = updates.recv() => supervisor.on_update(cfg, &mut control, &u)?,
            Some(op) = ops.recv() => {
                let r = supervisor.set_admin(cfg, &mut control, &op.backend, op.admin).map_err(|e| format!("{e:#}"));
                let _ = op.reply.send(r);
            }
            _ = gc_tick.tick() => {
                fail::fail_point!("agent-loop", |what: Option<String>| Err(anyhow::anyhow!(
                    "injected failure: {}",
                    what.unwrap_or_default()
                )));
                let range = hull(&old_ranges);
                gc.watch_ports(range);
                if let Some(range) = range {
                    if gc.published().on_watched == Some((range, 0)) {
                        control.keep_old_ports(None)?;
                        for r in old_ranges.drain(..) {
                            host.release_ports(r)?;
                        }
                        host.keep(&cfg.instance)?;
                        info!("the last flow of snat_ports {}-{} ended: those ports are the host's again", range.0, range.1);
                    }
                }
            }
            r = async { match log_fd.as_mut() { Some(fd) => fd.readable_mut().await, None => std::future::pending().await } } => {
                let mut guard = r.context("log ring")?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    info!(
        "stopping the agent: the XDP program, its maps and host settings stay in place and traffic keeps flowing \
         (sets are frozen and no failover happens until an agent runs again); `lb detach --instance {}` removes them",
        cfg.instance
    );
    let _ = std::fs::remove_file(ops::socket_path(&cfg.instance));
    Ok(())
}

/// The smallest range holding all of `ranges`.
fn hull(ranges: &[(u16, u16)]) -> Option<(u16, u16)> {
    let first = *ranges.first()?;
    Some(
        ranges
            .iter()
            .fold(first, |(a, b), (c, d)| (a.min(*c), b.max(*d))),
    )
}

/// A changed `snat_ports`: the running instance's flows hold ports of its range (and of any
/// range before it that still had flows). Replies to them stay translated and those ranges stay
/// reserved until the last such flow ends (the main loop lets them go). Returns those ranges.
fn carry_old_ranges(
    cfg: &Config,
    control: &mut Control,
    host: &mut HostChanges,
) -> Result<Vec<(u16, u16)>> {
    let gone: Vec<(u16, u16)> = control
        .pinned_ranges()
        .into_iter()
        .filter(|r| *r != cfg.snat_ports)
        .collect();
    if let Some(range) = hull(&gone) {
        for r in &gone {
            host.reserve_ports(*r)?;
        }
        control.keep_old_ports(Some(range))?;
        info!(
            "snat_ports changed from {}-{} to {}-{}: replies to the earlier ports are still translated for \
             the flows that hold them, and those ports stay reserved until the last of them ends",
            range.0,
            range.1,
            cfg.snat_ports.0,
            cfg.snat_ports.1
        );
    }
    Ok(gone)
}

/// Every (checked service, backend) pair to check, at the backend's check port (or the
/// check's own port).
fn check_targets(cfg: &Config, adopted: &[Vec<usize>]) -> Vec<Target> {
    let mut out = Vec::new();
    for (si, s) in cfg.services.iter().enumerate() {
        let Some(spec) = &s.check else { continue };
        for &b in &s.backends {
            let be = &cfg.backends[b];
            let port = spec.port.unwrap_or(be.check_port);
            out.push(Target {
                service: si,
                backend: b,
                addr: SocketAddr::V4(SocketAddrV4::new(be.address, port)),
                spec: spec.clone(),
                initially_up: adopted.get(si).is_some_and(|m| m.contains(&b)),
            });
        }
    }
    out
}

/// Applies check results until every target answered once (or its timeout passed), so that
/// the sets are right before the program is attached and "lb ready" is printed.
async fn first_round(
    cfg: &Config,
    control: &mut Control,
    supervisor: &mut Supervisor,
    updates: &mut tokio::sync::mpsc::Receiver<Update>,
    targets: usize,
) -> Result<()> {
    if targets == 0 {
        return Ok(());
    }
    let longest = cfg
        .services
        .iter()
        .filter_map(|s| s.check.as_ref())
        .map(|c| c.timeout)
        .max()
        .unwrap_or_default();
    let deadline = tokio::time::Instant::now() + longest + Duration::from_millis(500);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < targets {
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Some(u)) => {
                seen.insert((u.service, u.backend));
                supervisor.on_update(cfg, control, &u)?;
            }
            Ok(None) | Err(_) => break,
        }
    }
    for (i, s) in cfg.services.iter().enumerate() {
        if s.check.is_some() {
            let names: Vec<&str> = supervisor
                .installed(i)
                .iter()
                .map(|&b| cfg.backends[b].name.as_str())
                .collect();
            info!(service = %s.name, backends = ?names, "after the first round of checks");
        }
    }
    Ok(())
}
