//! The start-up self-test: before the agent says ready, one client SYN goes through the loaded
//! program with the live maps (`BPF_PROG_TEST_RUN`), as if it had arrived on the first
//! interface. A program that would drop every new flow (a kernel that refuses a helper flag, a
//! backend without a route, a source address that is not the balancer's) is caught here, with
//! the reason, instead of after "ready". The test's flow is removed again; its packet is
//! counted like any other (one new flow per start).
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{names, Counter, FlowKey, COUNTER_MAX, COUNTER_NAMES};

use crate::{config::Config, dataplane::open_pinned};

/// The self-test's client: an address of TEST-NET-2 (RFC 5737), never a real client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// What the self-test saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The SYN to `service` left rewritten towards `backend` from `snat`.
    Forwards {
        service: String,
        backend: SocketAddrV4,
        snat: SocketAddrV4,
    },
    /// Nothing conclusive (no service has a backend yet, or a limit refused the SYN).
    Skipped(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Forwards {
                service,
                backend,
                snat,
            } => write!(
                f,
                "self-test: a SYN to service {service} was forwarded to {backend} from {snat}"
            ),
            Verdict::Skipped(why) => write!(f, "self-test skipped: {why}"),
        }
    }
}

/// A client SYN to `vip` as the first interface (MAC `dst`) would receive it.
fn syn(vip: SocketAddrV4, sport: u16, dst: [u8; 6]) -> Result<Vec<u8>> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], dst)
        .ipv4(CLIENT.octets(), vip.ip().octets(), 64)
        .tcp(sport, vip.port(), 0x5e1f_7e57, 64240)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut frame, &[])
        .context("build the self-test SYN")?;
    Ok(frame)
}

/// Sums of the global counters over CPUs.
fn counters(dir: &Path) -> Result<Vec<u64>> {
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(open_pinned(dir, names::STATS_GLOBAL)?)?;
    (0..COUNTER_MAX)
        .map(|i| Ok(map.get(&i, 0)?.iter().sum()))
        .collect()
}

/// Runs the self-test on the first service whose set (per `installed`) is not empty.
pub fn run(
    ebpf: &Ebpf,
    cfg: &Config,
    installed: impl Fn(usize) -> bool,
    (ingress_ifindex, ingress_mac): (u32, [u8; 6]),
    pin_dir: &Path,
) -> Result<Verdict> {
    let Some((_, service)) = cfg.services.iter().enumerate().find(|(i, _)| installed(*i)) else {
        return Ok(Verdict::Skipped(
            "no service has a healthy backend yet".into(),
        ));
    };
    let prog: &Xdp = ebpf
        .program("lb_xdp")
        .context("the object has no lb_xdp program")?
        .try_into()?;
    // A source port of its own per start, far from anything a real client uses at that moment.
    let sport = 1024 + (std::process::id() % 60000) as u16;
    let frame = syn(service.vip, sport, ingress_mac)?;
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let md: [u32; 6] = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let before = counters(pin_dir)?;
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN of lb_xdp (self-test)")?;
    out.truncate(r.data_size_out as usize);
    let after = counters(pin_dir)?;
    let moved: Vec<(usize, u64)> = after
        .iter()
        .zip(&before)
        .enumerate()
        .filter(|(_, (a, b))| a > b)
        .map(|(i, (a, b))| (i, a - b))
        .collect();
    let did = |c: Counter| moved.iter().any(|(i, _)| *i == c as usize);
    let fwd_key = FlowKey::between(SocketAddrV4::new(CLIENT, sport), service.vip);
    // XDP_TX (3) or XDP_REDIRECT (4) with a rewritten SYN: the data path forwards.
    if (r.return_value == 3 || r.return_value == 4) && did(Counter::NewFlows) {
        let parsed = etherparse::SlicedPacket::from_ethernet(&out)
            .context("the self-test SYN came out unreadable")?;
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(tcp))) =
            (parsed.net, parsed.transport)
        else {
            bail!("the self-test SYN came out without IPv4/TCP headers");
        };
        let backend = SocketAddrV4::new(ip.header().destination_addr(), tcp.destination_port());
        let snat = SocketAddrV4::new(ip.header().source_addr(), tcp.source_port());
        // The flow's handshake record sits under its reply key: the rewritten tuple, reversed.
        let record = FlowKey::between(backend, snat);
        remove_flow(ebpf, pin_dir, &fwd_key, &record)?;
        return Ok(Verdict::Forwards {
            service: service.name.clone(),
            backend,
            snat,
        });
    }
    let names: Vec<String> = moved
        .iter()
        .map(|(i, d)| format!("{} +{d}", COUNTER_NAMES[*i]))
        .collect();
    if did(Counter::DropMaxconn) || did(Counter::RstMaxconn) || did(Counter::RstNoBackend) {
        return Ok(Verdict::Skipped(format!(
            "the SYN to service {} was refused by a limit or an empty set ({})",
            service.name,
            names.join(", ")
        )));
    }
    let why = if did(Counter::DropFib) {
        "the kernel's route lookup (bpf_fib_lookup) failed for the backend: is forwarding on, is \
         there a route and a resolved neighbor to it?"
    } else if did(Counter::DropNoSnatAddr) {
        "the source address of the route to the backend is not an address of an --iface"
    } else if did(Counter::DropNoEgress) {
        "the route to the backend leaves through an interface lb is not attached to (add it with --iface)"
    } else {
        "see the counters"
    };
    bail!(
        "self-test: a SYN to service {} ({}) was not forwarded (XDP action {}; counters {}): {why}. \
         lb did not start, so as not to report ready with a data path that drops every new connection",
        service.name,
        service.vip,
        r.return_value,
        names.join(", ")
    )
}

/// Deletes the self-test flow's handshake record (at `record`) and releases its connection
/// slot, if it took one. (Its index way stays: a hint without a record.)
fn remove_flow(ebpf: &Ebpf, pin_dir: &Path, fwd_key: &FlowKey, record: &FlowKey) -> Result<()> {
    let mut table = crate::handshakes::Handshakes::new(open_pinned(pin_dir, names::CT_EMBRYONIC)?)?;
    table.forget(record, Some(fwd_key))?;
    let slots: HashMap<MapData, FlowKey, lb_common::Slot> =
        HashMap::try_from(open_pinned(pin_dir, names::SLOTS)?)?;
    if slots.get(fwd_key, 0).is_ok() {
        let prog: &Xdp = ebpf
            .program("lb_release")
            .context("the object has no lb_release program")?
            .try_into()?;
        crate::gc::release_slot(prog, fwd_key)?;
    }
    Ok(())
}
