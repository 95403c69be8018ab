//! `lb capture`: the program copies sampled frames of the captured service to `CAPTURE_EVENTS`,
//! as they arrived and as they left (after the NAT rewrite), and nothing of other services or
//! while capture is off (through `BPF_PROG_TEST_RUN`); the command writes them to a pcap file
//! while connections go through lb, and turns capture off when it ends (in namespaces).
//!
//! Packet fixture of `packet.rs`: client 198.18.0.2 behind `cl0`; write 198.18.0.10:7680 ->
//! db01, read :7681 -> db02, db03.

use std::{
    fs::File,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{
    perf::{PerfEvent, PerfEventArrayBuffer},
    Array, Map, MapData, PerfEventArray,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{
    names, CaptureConfig, CaptureHeader, CAPTURE_DIR_IN, CAPTURE_DIR_OUT, CAPTURE_NO_ACTION,
};
use lb_tests::fixture::frames::{describe_diff, hex, TcpFrame, ACK, SYN};
use lb_tests::fixture::*;
use lb_tests::harness::{self, process::Stream, Shape, Topology, TopologyOptions};
use lb_tests::traffic::{payload, send, Sink};
use lb_user::capture::decode;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;

const WRITE: u32 = 0;
const READ: u32 = 1;
const XDP_REDIRECT: u8 = 4;

/// Writes `CAPTURE[0]`: `service` (None: off), one packet in `sample`, `snaplen` bytes.
fn set_capture(fx: &mut Fixture, service: Option<u32>, sample: u32, snaplen: u32) -> Result<()> {
    let map = fx.ebpf.map_mut(names::CAPTURE).context("no CAPTURE map")?;
    let mut a = Array::<_, CaptureConfig>::try_from(map)?;
    let c = CaptureConfig {
        service: service.map_or(0, |s| s + 1),
        sample,
        snaplen,
        _pad: 0,
    };
    a.set(0, c, 0)?;
    Ok(())
}

/// One perf buffer per online CPU on `CAPTURE_EVENTS` (taken out of the fixture's object; the
/// loaded program keeps its own reference to the map).
fn open_events(fx: &mut Fixture) -> Result<Vec<PerfEventArrayBuffer<MapData>>> {
    let map = fx
        .ebpf
        .take_map(names::CAPTURE_EVENTS)
        .context("no CAPTURE_EVENTS map")?;
    let mut events = PerfEventArray::try_from(map)?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
    cpus.into_iter()
        .map(|cpu| Ok(events.open(cpu, Some(8))?))
        .collect()
}

/// Every event emitted so far, decoded (`BPF_PROG_TEST_RUN` emits synchronously).
fn drain(bufs: &mut [PerfEventArrayBuffer<MapData>]) -> Result<Vec<(CaptureHeader, Vec<u8>)>> {
    let mut raw = Vec::new();
    let mut lost = 0;
    for b in bufs.iter_mut() {
        b.for_each(|e| match e {
            PerfEvent::Sample { head, tail } => raw.push([head, tail].concat()),
            PerfEvent::Lost { count } => lost += count,
        });
    }
    ensure!(lost == 0, "{lost} capture events lost");
    raw.iter()
        .map(|r| decode(r).map(|(h, f)| (h, f.to_vec())))
        .collect()
}

fn check_event(
    what: &str,
    got: &(CaptureHeader, Vec<u8>),
    dir: u8,
    action: u8,
    reply: bool,
    frame: &[u8],
) -> Result<()> {
    let (h, bytes) = got;
    ensure!(
        (h.dir, h.action, h.reply, h.service) == (dir, action, reply as u8, WRITE),
        "{what}: header {h:?}, expected dir {dir} action {action} reply {reply} service {WRITE}"
    );
    ensure!(
        h.len as usize == frame.len() && h.caplen as usize == frame.len() && h.ts_ns != 0,
        "{what}: header {h:?} for a {}-byte frame",
        frame.len()
    );
    ensure!(
        bytes == frame,
        "{what}: captured bytes differ:\n got {}\nwant {}\n{}",
        hex(bytes),
        hex(frame),
        describe_diff(bytes, frame)
    );
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_captured_service_emits_each_frame_as_it_arrived_and_as_it_left() -> Result<()> {
    Fixture::run("capture", |fx| {
        let mut bufs = open_events(fx)?;

        // Off (the state of a fresh instance): nothing is emitted.
        let out = fx.from_client(&client_syn(40000, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect);
        assert!(drain(&mut bufs)?.is_empty(), "events while capture is off");

        set_capture(fx, Some(WRITE), 1, 65_000)?;
        // Forward path: the client's SYN, then the rewritten SYN the backend receives.
        let s = client_syn(40001, WRITE_PORT).bytes()?;
        let out = fx.from_client(&s)?;
        assert_eq!(out.action, Action::Redirect);
        let ev = drain(&mut bufs)?;
        assert_eq!(ev.len(), 2, "forward SYN: {ev:?}");
        check_event(
            "forward in",
            &ev[0],
            CAPTURE_DIR_IN,
            CAPTURE_NO_ACTION,
            false,
            &s,
        )?;
        check_event(
            "forward out",
            &ev[1],
            CAPTURE_DIR_OUT,
            XDP_REDIRECT,
            false,
            &out.frame,
        )?;
        assert_ne!(s, out.frame, "the SYN was rewritten");

        // Reply path: the backend's SYN-ACK to the SNAT port, captured for the flow's service.
        let snat_port = u16::from_be_bytes([out.frame[34], out.frame[35]]);
        let synack = TcpFrame::new(
            DB01_MAC,
            BK0_MAC,
            sa(DB01, BACKEND_PORT),
            sa(SNAT_ADDR, snat_port),
        )
        .with_flags(SYN | ACK)
        .with_seq_ack(0x7000_0000, 0x1000_0001)
        .bytes()?;
        let back = fx.from_backends(&synack)?;
        assert_eq!(back.action, Action::Redirect);
        let ev = drain(&mut bufs)?;
        assert_eq!(ev.len(), 2, "reply SYN-ACK: {ev:?}");
        check_event(
            "reply in",
            &ev[0],
            CAPTURE_DIR_IN,
            CAPTURE_NO_ACTION,
            true,
            &synack,
        )?;
        check_event(
            "reply out",
            &ev[1],
            CAPTURE_DIR_OUT,
            XDP_REDIRECT,
            true,
            &back.frame,
        )?;

        // Another service's packets are not captured.
        let out = fx.from_client(&client_syn(40002, READ_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect);
        assert!(drain(&mut bufs)?.is_empty(), "events of service read");

        // snaplen: the first bytes only, the frame's length in the header.
        set_capture(fx, Some(WRITE), 1, 40)?;
        let s = client_syn(40003, WRITE_PORT).bytes()?;
        let out = fx.from_client(&s)?;
        let ev = drain(&mut bufs)?;
        assert_eq!(ev.len(), 2);
        assert_eq!(
            (ev[1].0.len as usize, ev[1].0.caplen, ev[1].1.as_slice()),
            (out.frame.len(), 40, &out.frame[..40])
        );

        // Sampling: with 1 in 1000 most packets are skipped, and in and out stay paired.
        set_capture(fx, Some(WRITE), 1000, 65_000)?;
        for port in 41000..41100 {
            fx.from_client(&client_syn(port, WRITE_PORT).bytes()?)?;
        }
        let ev = drain(&mut bufs)?;
        assert!(ev.len() <= 8, "{} events for 100 SYNs at 1/1000", ev.len());
        assert_eq!(ev.len() % 2, 0, "in/out pairs");

        // Off again (service id + 1 = 0): nothing.
        set_capture(fx, Some(READ), 1, 65_000)?;
        set_capture(fx, None, 1, 65_000)?;
        fx.from_client(&client_syn(40004, WRITE_PORT).bytes()?)?;
        fx.from_client(&client_syn(40005, READ_PORT).bytes()?)?;
        assert!(drain(&mut bufs)?.is_empty(), "events after capture off");
        Ok(())
    })
}

const SINK_PORT: u16 = 9000;

fn config(topo: &Topology) -> String {
    let mut s = format!(
        "instance = \"{}\"\nsnat_ports = \"10000-32767\"\n",
        topo.instance
    );
    s += &topo.backends_toml();
    for (name, port, members) in [
        ("write", 7680, "\"db01\""),
        ("read", 7681, "\"db02\", \"db03\""),
    ] {
        s += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{}:{port}\"\nbackend_port = {SINK_PORT}\nbackends = [{members}]\n",
            topo.vip
        );
    }
    s
}

/// `(src, dst)` of a captured IPv4/TCP frame.
fn endpoints(frame: &[u8]) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let p = SlicedPacket::from_ethernet(frame).context("parse a captured frame")?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (p.net, p.transport) else {
        bail!("captured frame is not IPv4/TCP: {}", hex(frame));
    };
    Ok((
        SocketAddrV4::new(ip.header().source_addr(), tcp.source_port()),
        SocketAddrV4::new(ip.header().destination_addr(), tcp.destination_port()),
    ))
}

fn lb_command(topo: &Topology, args: &[&str]) -> std::process::Command {
    let mut cmd = topo.lb.ns.command(harness::lb_bin());
    cmd.args(args);
    cmd
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn lb_capture_writes_k_frames_of_the_service_to_a_pcap_and_turns_capture_off() -> Result<()> {
    const K: usize = 24;
    let topo = Topology::new("capture", Shape::TwoArmed, TopologyOptions::default())?;
    let _sinks: Vec<Sink> = topo
        .backends
        .iter()
        .map(|b| Sink::start(&b.ns, &b.name, SocketAddrV4::new(b.addr, SINK_PORT)))
        .collect::<Result<_>>()?;
    let _lb = topo.start_lb(&config(&topo), &["--xdp-mode", "native"])?;
    let inst = topo.instance.as_str();

    // Clear errors before anything is captured.
    let out = lb_command(
        &topo,
        &["capture", "--instance", inst, "--service", "nope", "-w"],
    )
    .arg(topo.log_dir.join("x.pcap"))
    .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unknown service") && err.contains("write, read"),
        "unknown service: {err}"
    );
    let out = lb_command(
        &topo,
        &[
            "capture",
            "--instance",
            "no-such-instance",
            "--service",
            "write",
            "-w",
        ],
    )
    .arg(topo.log_dir.join("x.pcap"))
    .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("is `lb run` running?"),
        "no such instance: {err}"
    );
    let out = lb_command(
        &topo,
        &["capture", "--instance", inst, "--service", "write"],
    )
    .args(["-w", "/proc/nonexistent/x.pcap"])
    .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("cannot write /proc/nonexistent/x.pcap"),
        "unwritable file: {err}"
    );

    let file = topo.log_dir.join("write.pcap");
    let mut cmd = lb_command(
        &topo,
        &["capture", "--instance", inst, "--service", "write"],
    );
    cmd.arg("-w")
        .arg(&file)
        .args(["--count", &K.to_string(), "--duration", "60s"]);
    let cap = topo.spawn_command("capture", cmd)?;
    cap.wait_for_line(Stream::Stderr, "capturing service", Duration::from_secs(10))?;

    // A read connection first (not captured), then write connections until the capture ends.
    let vip = |port| SocketAddrV4::new(topo.vip, port);
    topo.client
        .ns
        .run_in(|| send(vip(7681), &payload(1, 100)))??;
    let start = Instant::now();
    let mut sent = 0u64;
    let status = loop {
        if let Some(status) = cap.try_wait()? {
            break status;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "capture did not end\n{}",
            cap.logs()
        );
        if sent < 20 {
            let r = topo
                .client
                .ns
                .run_in(|| send(vip(7680), &payload(sent, 200)))??;
            ensure!(r.backend == "db01", "write reached {}", r.backend);
            sent += 1;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    ensure!(status.success(), "capture failed\n{}", cap.logs());
    ensure!(
        cap.stderr()
            .contains(&format!("captured {K} frames (0 lost)")),
        "summary line\n{}",
        cap.logs()
    );

    let mut reader = pcap_file::pcap::PcapReader::new(File::open(&file)?)?;
    let mut frames = Vec::new();
    while let Some(p) = reader.next_packet() {
        frames.push(p?.data.into_owned());
    }
    ensure!(frames.len() == K, "{} frames in the pcap", frames.len());

    let client_vip = (topo.client.addr, vip(7680));
    let db01 = SocketAddrV4::new(topo.backend("db01")?.addr, SINK_PORT);
    let snat = topo.lb.backend_addr;
    let (mut fwd_in, mut fwd_out, mut rep_in, mut rep_out) = (0u32, 0u32, 0u32, 0u32);
    for (i, f) in frames.iter().enumerate() {
        let (src, dst) = endpoints(f)?;
        if *src.ip() == client_vip.0 && dst == client_vip.1 {
            fwd_in += 1; // as the client sent it
        } else if *src.ip() == snat && dst == db01 {
            fwd_out += 1; // as db01 receives it
        } else if src == db01 && *dst.ip() == snat {
            rep_in += 1; // db01's reply
        } else if src == client_vip.1 && *dst.ip() == client_vip.0 {
            rep_out += 1; // as the client receives it
        } else {
            bail!("frame {i} {src} -> {dst} is not of service write");
        }
    }
    // Every packet is captured in and out, so the counts pair up (the count may end between
    // the two copies of the last packet).
    ensure!(
        fwd_in.abs_diff(fwd_out) + rep_in.abs_diff(rep_out) <= 1 && fwd_out > 0 && rep_out > 0,
        "forward in/out {fwd_in}/{fwd_out}, reply in/out {rep_in}/{rep_out}"
    );
    let (first_src, first_dst) = endpoints(&frames[0])?;
    ensure!(
        *first_src.ip() == topo.client.addr && first_dst == vip(7680),
        "first frame {first_src} -> {first_dst}"
    );

    ensure!(
        capture_state(inst)? == CaptureConfig::default(),
        "CAPTURE left on"
    );

    // SIGTERM ends a capture without a count cleanly too; a .pcapng file marks directions.
    let file = topo.log_dir.join("write.pcapng");
    let mut cmd = lb_command(
        &topo,
        &["capture", "--instance", inst, "--service", "write"],
    );
    cmd.arg("-w").arg(&file);
    let cap = topo.spawn_command("capture2", cmd)?;
    cap.wait_for_line(Stream::Stderr, "capturing service", Duration::from_secs(10))?;
    ensure!(
        capture_state(inst)?.service == 1,
        "CAPTURE not on for write"
    );
    topo.client
        .ns
        .run_in(|| send(vip(7680), &payload(99, 300)))??;
    let status = cap.stop()?; // SIGTERM
    ensure!(status.success(), "capture after SIGTERM\n{}", cap.logs());
    ensure!(
        capture_state(inst)? == CaptureConfig::default(),
        "CAPTURE left on after SIGTERM"
    );
    let mut reader = pcap_file::pcapng::PcapNgReader::new(File::open(&file)?)?;
    let (mut inbound, mut outbound) = (0u32, 0u32);
    while let Some(block) = reader.next_block() {
        if let pcap_file::pcapng::Block::EnhancedPacket(p) = block? {
            let flags = p.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Flags(f) => Some(*f & 3),
                _ => None,
            });
            match flags {
                Some(1) => inbound += 1,
                Some(2) => outbound += 1,
                other => bail!("packet direction flags {other:?}"),
            }
        }
    }
    ensure!(
        inbound == outbound && inbound >= 5,
        "pcapng: {inbound} inbound, {outbound} outbound frames\n{}",
        cap.logs()
    );
    ensure!(
        cap.stderr()
            .contains(&format!("captured {} frames (0 lost)", inbound + outbound)),
        "summary line\n{}",
        cap.logs()
    );
    Ok(())
}

/// `CAPTURE[0]` of the running instance.
fn capture_state(instance: &str) -> Result<CaptureConfig> {
    let data = MapData::from_pin(lb_user::dataplane::pin_dir(instance).join(names::CAPTURE))?;
    let a = Array::<_, CaptureConfig>::try_from(Map::from_map_data(data)?)?;
    Ok(a.get(&0, 0)?)
}
