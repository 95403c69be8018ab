//! Backend-set swaps are atomic: a flow is only ever sent to a member of the set generation
//! that chose it, while sets flip 1,000 times under continuous connections.
//!
//! The test drives the data plane through the agent's own library (load, host settings,
//! `Control`), because an agent's set changes are paced by health checks; here the only writer
//! is the test, flipping as fast as it can.
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use aya::maps::HashMap as BpfHashMap;
use lb_common::{names, ConnEvent, Counter, Flow, FlowKey, DIR_FORWARD};
use lb_tests::{
    harness::{Ns, Topology},
    traffic::{fnv64, payload, send, Sink},
};
use lb_user::{
    config::Config,
    control::Control,
    dataplane::{self, AttachMode},
    host::{self, HostChanges},
};

const SINK_PORT: u16 = 9000;
/// 8 clients x 3,000 stays below the client namespace's default 28,232 ephemeral ports.
const PER_CLIENT_CAP: usize = 3_000;

/// Restores host settings from inside the namespace they were made in.
struct RestoreIn<'a>(Option<HostChanges>, &'a Ns);

impl Drop for RestoreIn<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = self.1.run_in(move || drop(h));
        }
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn every_flow_goes_to_a_member_of_the_generation_that_chose_it_across_1000_flips() -> Result<()> {
    let topo = Topology::two_armed("atomic")?;
    let _sinks: Vec<Sink> = topo
        .backends
        .iter()
        .map(|b| Sink::start(&b.ns, &b.name, SocketAddrV4::new(b.addr, SINK_PORT)))
        .collect::<Result<_>>()?;
    let mut toml = format!("instance = \"{}\"\n", topo.instance);
    toml += &topo.backends_toml();
    toml += &format!(
        "[[service]]\nname = \"write\"\nvip = \"{}:7680\"\nbackend_port = {SINK_PORT}\nbackends = [\"db01\", \"db02\", \"db03\"]\n",
        topo.vip
    );
    let cfg = Config::parse(std::path::Path::new("atomic.toml"), &toml)?;
    let ifaces = topo.lb.ifaces.clone();

    // Bring the data plane up inside the lb namespace, as `lb run` does.
    let (mut ebpf, mut control, host) = topo.lb.ns.run_in(|| -> Result<_> {
        let mut ebpf = dataplane::load(&cfg)?;
        let mut control = Control::new(&mut ebpf)?;
        let mut host = HostChanges::default();
        let mut ifindexes = Vec::new();
        let mut snat = Vec::new();
        for i in &ifaces {
            host.enable_forwarding(i)?;
            ifindexes.push(host::if_index(i)?);
            snat.extend(host::iface_addrs(i)?);
        }
        for b in &cfg.backends {
            host.manage_neighbor(b.address)?;
        }
        host.wait_neighbors(Duration::from_secs(3));
        host.ensure_vip(*cfg.services[0].vip.ip(), &ifaces[0], &ifaces)?;
        control.configure(&cfg, false, &ifindexes, &snat)?;
        dataplane::attach(&mut ebpf, &ifaces, AttachMode::Native)?;
        Ok((ebpf, control, host))
    })??;

    // Host settings are undone inside the lb namespace, never in the test's own.
    let _host = RestoreIn(Some(host), &topo.lb.ns);
    let sets: [&[usize]; 2] = [&[0], &[1, 2]];
    // Flows record a generation's low 32 bits: 1,001 generations never wrap.
    let mut generations: HashMap<u64, Vec<usize>> = HashMap::new();
    generations.insert(1, vec![0, 1, 2]); // installed by `configure`
    let stop = AtomicBool::new(false);
    let vip = SocketAddrV4::new(topo.vip, 7680);
    // Flows the data path ends itself (at the client's last ACK, mostly) leave the tables at
    // once: their connection-end records say which generation chose their backend. Nothing
    // else drains the ring here, so a thread does, while the clients run.
    let ring = ebpf.take_map(names::CONN_EVENTS).context("CONN_EVENTS")?;
    let mut ring = aya::maps::RingBuf::try_from(ring)?;
    let ring_stop = AtomicBool::new(false);
    let mut ended: Vec<(u32, u32)> = Vec::new();
    let done = thread::scope(|s| -> Result<usize> {
        let drainer = s.spawn(|| {
            let mut out = Vec::new();
            loop {
                let last = ring_stop.load(Ordering::Relaxed);
                while let Some(item) = ring.next() {
                    let n = std::mem::size_of::<ConnEvent>();
                    if item.len() >= n {
                        let e: ConnEvent = bytemuck::pod_read_unaligned(&item[..n]);
                        out.push((e.generation, e.backend_id));
                    }
                }
                if last {
                    return out;
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        let clients: Vec<_> = (0..8u64)
            .map(|c| {
                let (stop, topo) = (&stop, &topo);
                s.spawn(move || {
                    topo.client.ns.run_in(|| -> Result<usize> {
                        let mut n = 0;
                        // Each connection leaves a TIME_WAIT on the client, and the client's
                        // ephemeral range (28,232 ports) is shared by all 8: a cap keeps a slow
                        // flip loop from exhausting it (connect fails with EADDRNOTAVAIL).
                        while !stop.load(Ordering::Relaxed) && n < PER_CLIENT_CAP {
                            let data = payload(c * 1_000_000 + n as u64, 64 + n % 512);
                            let r = send(vip, &data)
                                .with_context(|| format!("client {c} connection {n}"))?;
                            ensure!(
                                r.len == data.len() && r.hash == fnv64(&data),
                                "client {c} connection {n} arrived damaged: {r:?}"
                            );
                            n += 1;
                        }
                        Ok(n)
                    })?
                })
            })
            .collect();
        for i in 0..1000 {
            let members = sets[i % 2];
            let generation = control.install_backends(&cfg, 0, members)?;
            generations.insert(generation, members.to_vec());
            thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for c in clients {
            total += c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        // The last clients' final ACKs have passed once their connections returned.
        ring_stop.store(true, Ordering::Relaxed);
        ended = drainer
            .join()
            .map_err(|_| anyhow::anyhow!("drainer panicked"))?;
        Ok(total)
    })?;
    ensure!(
        done >= 200,
        "only {done} connections completed during the flips"
    );

    let mut checked = 0;
    let mut forward = Vec::new();
    {
        let map = ebpf.map(names::CT_ESTABLISHED).context("table")?;
        let flows: BpfHashMap<_, FlowKey, Flow> = BpfHashMap::try_from(map)?;
        for entry in flows.iter() {
            let (_, f) = entry?;
            if f.dir == DIR_FORWARD {
                forward.push(f);
            }
        }
        let records = lb_user::handshakes::Handshakes::of(&ebpf)?;
        for (_, hs) in records.records()? {
            forward.push(hs.fwd);
        }
    }
    {
        for f in forward {
            let set = generations
                .get(&u64::from(f.generation))
                .with_context(|| format!("flow with unknown generation {}", f.generation))?;
            ensure!(
                set.contains(&(f.backend_id as usize)),
                "a flow of generation {} went to backend {} outside its set {set:?}",
                f.generation,
                f.backend_id
            );
            checked += 1;
        }
    }
    // The flows the data path ended, from their records.
    for (generation, backend) in &ended {
        let set = generations
            .get(&u64::from(*generation))
            .with_context(|| format!("ended flow with unknown generation {generation}"))?;
        ensure!(
            set.contains(&(*backend as usize)),
            "an ended flow of generation {generation} went to backend {backend} outside its set {set:?}"
        );
    }
    // Records lost to a full ring are counted, not silently skipped.
    let lost = {
        let map = ebpf.map(names::STATS_GLOBAL).context("STATS_GLOBAL")?;
        let stats = aya::maps::PerCpuArray::<_, u64>::try_from(map)?;
        let sum = |c: Counter| -> Result<u64> { Ok(stats.get(&(c as u32), 0)?.iter().sum()) };
        (sum(Counter::EndedAtLastAck)?
            + sum(Counter::ClosedTupleReused)?
            + sum(Counter::ClosedPortTakenOver)?)
        .saturating_sub(ended.len() as u64)
    };
    let seen = checked as u64 + ended.len() as u64;
    ensure!(
        seen >= done as u64 && lost == 0,
        "checked {checked} flows in the tables and {} the data path ended ({lost} records lost) of {done} connections",
        ended.len()
    );
    Ok(())
}
