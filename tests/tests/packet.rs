//! Packet-level tests of the XDP program through `BPF_PROG_TEST_RUN`: an input frame, the action
//! the program must return and the exact bytes it must leave in the frame. Expected frames are
//! built with `etherparse` from a description of what the balancer should have done (the input's
//! description with the translated fields changed), never copied from the program's output.
//! Every XDP_PASS must leave the frame byte for byte as it was.
//!
//! Each test builds its own namespace and program (see `lb_tests::fixture`): client 198.18.0.2
//! behind `cl0`, backends db01-db03 (10.0.1.10-12) behind `bk0` (10.0.1.1, the SNAT address),
//! services VIP 198.18.0.10:7680 "write" -> db01:7687 and :7681 "read" -> db02, db03.

use std::net::Ipv4Addr;

use anyhow::Result;
use lb_common::{
    index_set_of, Counter, Flow, FlowKey, IndexWay, DIR_FORWARD, DIR_REPLY, FLOW_ESTABLISHED,
    FLOW_SYN_RECV, FLOW_SYN_SENT, IPPROTO_TCP,
};
use lb_tests::fixture::frames::{
    self, describe_diff, hex, TcpFrame, XorShift, ACK, FIN, PSH, RST, SYN,
};
use lb_tests::fixture::*;

const CLIENT_PORT: u16 = 40000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A client segment with `flags` on the connection from `port` to the write service.
fn client_segment(port: u16, flags: u8) -> TcpFrame {
    TcpFrame::new(CLIENT_MAC, CL0_MAC, sa(CLIENT, port), sa(VIP, WRITE_PORT))
        .with_flags(flags)
        .with_seq_ack(0x1000_0001, 0x5000_0001)
}

/// A segment from `backend:7687` (`mac`) to the SNAT address's `snat_port`.
fn backend_segment(backend: Ipv4Addr, mac: [u8; 6], snat_port: u16, flags: u8) -> TcpFrame {
    TcpFrame::new(
        mac,
        BK0_MAC,
        sa(backend, BACKEND_PORT),
        sa(SNAT_ADDR, snat_port),
    )
    .with_flags(flags)
    .with_seq_ack(0x5000_0000, 0x1000_0001)
}

/// Runs `frame` on `ingress` and checks it passed byte for byte without touching any counter.
#[track_caller]
fn assert_passes_untouched(fx: &Fixture, what: &str, frame: &[u8], ingress: u32) -> Result<()> {
    let before = fx.counters()?;
    let out = fx.test_run(frame, ingress)?;
    assert_eq!(out.action, Action::Pass, "{what}: action");
    assert!(
        out.frame == frame,
        "{what}: a passed frame must be unchanged:\n{}",
        describe_diff(&out.frame, frame)
    );
    assert_eq!(
        fx.counters()?.changes_since(&before),
        moved(&[]),
        "{what}: counters"
    );
    Ok(())
}

/// Runs `frame` on `ingress`, checks it was dropped and that exactly `counters` moved.
#[track_caller]
fn assert_dropped(
    fx: &Fixture,
    what: &str,
    frame: &[u8],
    ingress: u32,
    counters: &[(Counter, u64)],
) -> Result<()> {
    let before = fx.counters()?;
    let out = fx.test_run(frame, ingress)?;
    assert_eq!(out.action, Action::Drop, "{what}: action");
    assert_eq!(
        fx.counters()?.changes_since(&before),
        moved(counters),
        "{what}: counters"
    );
    Ok(())
}

fn tuples(table: &[(FlowKey, Flow)]) -> Vec<String> {
    table
        .iter()
        .map(|(k, f)| format!("{:?} -> {:?}", key_tuple(k), nat_tuple(f)))
        .collect()
}

/// Sends the client's SYN from `client_port` to the write service and returns the SNAT port the
/// program claimed (after checking the forwarded frame byte for byte).
fn open_write_flow(fx: &Fixture, client_port: u16) -> Result<(TcpFrame, u16)> {
    let syn = client_syn(client_port, WRITE_PORT);
    let out = fx.from_client(&syn.bytes()?)?;
    assert_eq!(out.action, Action::Redirect, "SYN from {client_port}");
    let port = sport_of(&out.frame);
    assert_bytes(
        "output",
        &out,
        Action::Redirect,
        &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
    );
    Ok((syn, port))
}

/// Opens a write flow and lets db01 answer with a SYN-ACK; returns (syn, syn-ack, SNAT port).
fn handshake_until_syn_ack(fx: &Fixture, client_port: u16) -> Result<(TcpFrame, TcpFrame, u16)> {
    let (syn, port) = open_write_flow(fx, client_port)?;
    let syn_ack = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
        .with_seq_ack(0x5000_0000, syn.seq.wrapping_add(1))
        .with_options(&frames::SYN_OPTIONS);
    let out = fx.from_backends(&syn_ack.bytes()?)?;
    assert_bytes(
        "output",
        &out,
        Action::Redirect,
        &to_client(&syn_ack, client_port, WRITE_PORT).bytes()?,
    );
    Ok((syn, syn_ack, port))
}

/// The RST a TCP stack answers `seg` with (RFC 9293 3.10.7.1), as the balancer must build it:
/// MACs, addresses and ports swapped, TTL 64, IP id 0, DF, window 0, no options or payload;
/// for a segment with ACK: RST, seq = SEG.ACK, ack 0; without: RST|ACK, seq 0,
/// ack = SEG.SEQ + SEG.LEN (payload, +1 for SYN, +1 for FIN).
fn rst_answer(seg: &TcpFrame) -> TcpFrame {
    let (seq, ack, flags) = if seg.flags & ACK != 0 {
        (seg.ack, 0, RST)
    } else {
        let len = seg.payload.len() as u32
            + u32::from(seg.flags & SYN != 0)
            + u32::from(seg.flags & FIN != 0);
        (0, seg.seq.wrapping_add(len), RST | ACK)
    };
    let mut rst = TcpFrame::new(seg.eth_dst, seg.eth_src, seg.dst, seg.src)
        .with_flags(flags)
        .with_seq_ack(seq, ack);
    rst.id = 0;
    rst.window = 0;
    rst
}

/// Runs `seg` on `ingress` and checks it was answered with exactly `want` (XDP_TX, 54 bytes)
/// and that exactly `counters` moved.
#[track_caller]
fn assert_rst(
    fx: &Fixture,
    what: &str,
    seg: &TcpFrame,
    ingress: u32,
    want: &TcpFrame,
    counters: &[(Counter, u64)],
) -> Result<()> {
    let want = want.bytes()?;
    assert_eq!(
        want.len(),
        54,
        "{what}: a RST frame has no options or payload"
    );
    let before = fx.counters()?;
    let out = fx.test_run(&seg.bytes()?, ingress)?;
    assert_eq!(
        out.action,
        Action::Tx,
        "{what}: action (output frame {})",
        hex(&out.frame)
    );
    assert!(
        out.frame == want,
        "{what}: the RST is not the expected one:\n{}",
        describe_diff(&out.frame, &want)
    );
    assert_eq!(
        fx.counters()?.changes_since(&before),
        moved(counters),
        "{what}: counters"
    );
    Ok(())
}

/// Pins the calling thread to CPU 0, so that every test run uses the same per-CPU maps
/// (`RST_BUCKET`).
fn pin_to_cpu0() -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// New flows, replies, establishment
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn syn_to_vip_is_dnatted_and_snatted_to_the_master() -> Result<()> {
    Fixture::run("syn", |fx| {
        let syn = client_syn(CLIENT_PORT, WRITE_PORT);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;

        assert_eq!(out.action, Action::Redirect, "bk0 is not the ingress cl0");
        let port = sport_of(&out.frame);
        assert!(
            (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port),
            "SNAT port {port} outside {SNAT_PORTS:?}"
        );
        // eth bk0 -> db01, IP 10.0.1.1 -> 10.0.1.10, TTL - 1, ports <snat> -> 7687, the rest
        // (seq, options) untouched, both checksums valid.
        let want = to_backend(&syn, DB01, DB01_MAC, port);
        assert_eq!(want.ttl, 63);
        assert_bytes("output", &out, Action::Redirect, &want.bytes()?);

        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1)
            ])
        );

        let (svc, be) = (fx.service_stats(0)?, fx.backend_stats(0)?);
        let len = syn.bytes()?.len() as u64;
        assert_eq!(
            (svc.new_flows, svc.packets, svc.bytes, svc.drops),
            (1, 1, len, 0)
        );
        assert_eq!((be.new_flows, be.packets, be.bytes), (1, 1, len));

        let emb = fx.embryonic()?;
        assert_eq!(emb.len(), 2, "embryonic: {:?}", tuples(&emb));
        let fwd_key = flow_key(sa(CLIENT, CLIENT_PORT), sa(VIP, WRITE_PORT));
        let rev_key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        let fwd = entry(&emb, &fwd_key).expect("forward entry");
        let rev = entry(&emb, &rev_key).expect("reverse entry {db01:7687 -> 10.0.1.1:port}");
        assert_eq!(
            nat_tuple(&fwd),
            (sa(SNAT_ADDR, port), sa(DB01, BACKEND_PORT))
        );
        assert_eq!(
            (fwd.ifindex, fwd.smac, fwd.dmac, fwd.dir, fwd.state),
            (
                fx.bk0.ifindex,
                BK0_MAC,
                DB01_MAC,
                DIR_FORWARD,
                FLOW_SYN_SENT
            )
        );
        assert_eq!(
            nat_tuple(&rev),
            (sa(VIP, WRITE_PORT), sa(CLIENT, CLIENT_PORT))
        );
        assert_eq!(
            (rev.ifindex, rev.smac, rev.dmac, rev.dir, rev.state),
            (
                fx.cl0.ifindex,
                CL0_MAC,
                CLIENT_MAC,
                DIR_REPLY,
                FLOW_SYN_SENT
            )
        );
        assert_eq!((fwd.service_id, fwd.backend_id), (0, 0));
        assert_eq!((rev.service_id, rev.backend_id), (0, 0));
        assert!(fwd.points_back_to(&rev_key) && rev.points_back_to(&fwd_key));
        assert_eq!(fwd.partner_key(IPPROTO_TCP), rev_key);
        assert_eq!(rev.partner_key(IPPROTO_TCP), fwd_key);
        assert!(fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_retransmitted_syn_reuses_the_flow_and_its_snat_port() -> Result<()> {
    Fixture::run("synrtx", |fx| {
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FwdPackets, 1)])
        );
        assert_eq!(fx.embryonic()?.len(), 2);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn backend_syn_ack_is_translated_back_to_the_client() -> Result<()> {
    Fixture::run("synack", |fx| {
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        let syn_ack = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn.seq + 1)
            .with_options(&frames::SYN_OPTIONS);
        let before = fx.counters()?;
        let out = fx.from_backends(&syn_ack.bytes()?)?;

        // eth cl0 (the client frame's destination) -> client (its source), IP VIP -> client,
        // ports 7680 -> 40000.
        let want = to_client(&syn_ack, CLIENT_PORT, WRITE_PORT);
        assert_eq!((want.eth_src, want.eth_dst), (syn.eth_dst, syn.eth_src));
        assert_bytes("output", &out, Action::Redirect, &want.bytes()?);
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::ReplyPackets, 1)])
        );
        let fwd_key = flow_key(sa(CLIENT, CLIENT_PORT), sa(VIP, WRITE_PORT));
        let fwd = entry(&fx.embryonic()?, &fwd_key).expect("forward entry");
        assert_eq!(fwd.state, FLOW_SYN_RECV, "the SYN-ACK marks the flow");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_clients_ack_establishes_the_flow_and_data_takes_the_established_path() -> Result<()> {
    Fixture::run("establish", |fx| {
        let (syn, syn_ack, port) = handshake_until_syn_ack(fx, CLIENT_PORT)?;
        let fwd_key = flow_key(sa(CLIENT, CLIENT_PORT), sa(VIP, WRITE_PORT));
        let rev_key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));

        let ack = client_segment(CLIENT_PORT, ACK).with_seq_ack(syn.seq + 1, syn_ack.seq + 1);
        let before = fx.counters()?;
        let out = fx.from_client(&ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&ack, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FwdPackets, 1), (Counter::Established, 1)])
        );
        let emb = fx.embryonic()?;
        assert!(emb.is_empty(), "embryonic left: {:?}", tuples(&emb));
        let est = fx.established()?;
        assert_eq!(est.len(), 2, "established: {:?}", tuples(&est));
        let fwd = entry(&est, &fwd_key).expect("established forward entry");
        let rev = entry(&est, &rev_key).expect("established reverse entry");
        assert_eq!((fwd.state, rev.state), (FLOW_ESTABLISHED, FLOW_ESTABLISHED));
        assert!(fwd.points_back_to(&rev_key) && rev.points_back_to(&fwd_key));

        // Data both ways, then the client's FIN: exact bytes, counted, no table changes.
        let data = client_segment(CLIENT_PORT, PSH | ACK)
            .with_seq_ack(syn.seq + 1, syn_ack.seq + 1)
            .with_payload(b"\x60\x60\xb0\x17\x00\x00\x04\x04\x00\x00\x00\x00");
        let before = fx.counters()?;
        let out = fx.from_client(&data.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&data, DB01, DB01_MAC, port).bytes()?,
        );
        let answer = backend_segment(DB01, DB01_MAC, port, PSH | ACK)
            .with_seq_ack(syn_ack.seq + 1, syn.seq + 13)
            .with_payload(b"\x00\x00\x04\x04");
        let out = fx.from_backends(&answer.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&answer, CLIENT_PORT, WRITE_PORT).bytes()?,
        );
        let fin =
            client_segment(CLIENT_PORT, FIN | ACK).with_seq_ack(syn.seq + 13, syn_ack.seq + 5);
        let out = fx.from_client(&fin.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&fin, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FwdPackets, 2), (Counter::ReplyPackets, 1)])
        );
        assert_eq!(fx.established()?.len(), 2);
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_backend_behind_the_ingress_interface_gets_the_syn_by_xdp_tx() -> Result<()> {
    // One-armed: the backend lives on the client's segment, the SNAT address is cl0's.
    let near = Ipv4Addr::new(198, 18, 0, 20);
    let near_mac = [0x02, 0, 0, 0, 0, 0x20];
    let config = format!(
        "{CONFIG}\n[[backend]]\nname = \"near\"\naddress = \"{near}\"\n\
         [[service]]\nname = \"near\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\nbackends = [\"near\"]\n"
    );
    Fixture::run_with_config("onearm", &config, |fx| {
        fx.ns.ip(&[
            "neigh",
            "add",
            &near.to_string(),
            "lladdr",
            "02:00:00:00:00:20",
            "dev",
            "cl0",
            "nud",
            "permanent",
        ])?;
        let syn = client_syn(CLIENT_PORT, 7682);
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        let want = syn
            .clone()
            .forwarded(CL0_MAC, near_mac)
            .translated(sa(CL0_ADDR, port), sa(near, BACKEND_PORT));
        assert_bytes("output", &out, Action::Tx, &want.bytes()?);

        let syn_ack = TcpFrame::new(
            near_mac,
            CL0_MAC,
            sa(near, BACKEND_PORT),
            sa(CL0_ADDR, port),
        )
        .with_flags(SYN | ACK)
        .with_seq_ack(0x5000_0000, syn.seq + 1);
        let out = fx.from_client(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Tx,
            &to_client(&syn_ack, CLIENT_PORT, 7682).bytes()?,
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn an_embryonic_flow_older_than_the_connect_timeout_counts_as_no_flow() -> Result<()> {
    Fixture::run("expired", |fx| {
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        let fwd_key = flow_key(sa(CLIENT, CLIENT_PORT), sa(VIP, WRITE_PORT));
        let rev_key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        // Age both entries: created at boot, far more than 30 s ago.
        for key in [fwd_key, rev_key] {
            let mut flow = entry(&fx.embryonic()?, &key).expect("entry");
            flow.created_ns = 0;
            fx.put_embryonic(&key, &flow)?;
        }
        // No flow any more: each side's segment is answered with a RST (seq = its ACK).
        let syn_ack =
            backend_segment(DB01, DB01_MAC, port, SYN | ACK).with_seq_ack(0x5000_0000, syn.seq + 1);
        let mut want = TcpFrame::new(
            BK0_MAC,
            DB01_MAC,
            sa(SNAT_ADDR, port),
            sa(DB01, BACKEND_PORT),
        )
        .with_flags(RST)
        .with_seq_ack(syn.seq + 1, 0);
        want.id = 0;
        want.window = 0;
        assert_eq!(want, rst_answer(&syn_ack));
        assert_rst(
            fx,
            "SYN-ACK for an expired flow",
            &syn_ack,
            fx.bk0.ifindex,
            &want,
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        let ack = client_segment(CLIENT_PORT, ACK).with_seq_ack(syn.seq + 1, 0x5000_0001);
        assert_rst(
            fx,
            "ACK for an expired flow",
            &ack,
            fx.cl0.ifindex,
            &rst_answer(&ack),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        // A new SYN on the same tuple opens a fresh flow.
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1)
            ])
        );
        // The expired record stays for the GC (or a port claim) to take; the client's tuple
        // leads to the fresh one.
        let fresh: Vec<Flow> = fx
            .embryonic()?
            .into_iter()
            .filter(|(k, f)| *k == fwd_key && f.created_ns != 0)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(fresh.len(), 1, "one fresh forward entry: {fresh:?}");
        assert_eq!(nat_tuple(&fresh[0]).0, sa(SNAT_ADDR, port));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn syns_to_the_read_service_alternate_between_its_backends() -> Result<()> {
    Fixture::run("rr", |fx| {
        let expected = [
            (DB02, DB02_MAC, 1),
            (DB03, DB03_MAC, 2),
            (DB02, DB02_MAC, 1),
            (DB03, DB03_MAC, 2),
            (DB02, DB02_MAC, 1),
        ];
        for (i, (backend, mac, id)) in expected.into_iter().enumerate() {
            let client_port = 41000 + i as u16;
            let syn = client_syn(client_port, READ_PORT);
            let out = fx.from_client(&syn.bytes()?)?;
            let port = sport_of(&out.frame);
            assert_bytes(
                "output",
                &out,
                Action::Redirect,
                &to_backend(&syn, backend, mac, port).bytes()?,
            );
            let fwd = entry(
                &fx.embryonic()?,
                &flow_key(sa(CLIENT, client_port), sa(VIP, READ_PORT)),
            )
            .expect("forward entry");
            assert_eq!((fwd.service_id, fwd.backend_id), (1, id), "SYN #{i}");
        }
        assert_eq!(fx.embryonic()?.len(), 2 * expected.len());
        Ok(())
    })
}

/// Sends the client's SYN from `client_port` to the VIP's `service_port`, checks the forwarded
/// frame byte for byte, forgets the flow (both embryonic entries) and returns the backend the
/// program chose.
fn pick_backend(fx: &mut Fixture, client_port: u16, service_port: u16) -> Result<Ipv4Addr> {
    let syn = client_syn(client_port, service_port);
    let out = fx.from_client(&syn.bytes()?)?;
    assert_eq!(out.action, Action::Redirect, "SYN from {client_port}");
    let (backend, port) = (daddr_of(&out.frame), sport_of(&out.frame));
    assert_bytes(
        "output",
        &out,
        Action::Redirect,
        &to_backend(&syn, backend, backend_mac(backend), port).bytes()?,
    );
    fx.remove_embryonic(&flow_key(sa(CLIENT, client_port), sa(VIP, service_port)))?;
    fx.remove_embryonic(&flow_key(sa(backend, BACKEND_PORT), sa(SNAT_ADDR, port)))?;
    Ok(backend)
}

fn member(id: u32, addr: Ipv4Addr) -> lb_user::control::Member {
    lb_user::control::Member {
        id,
        addr,
        port: BACKEND_PORT,
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn balance_first_always_picks_the_first_member_of_the_set() -> Result<()> {
    let config = format!(
        "{CONFIG}\n[[service]]\nname = \"first\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\n\
         backends = [\"db02\", \"db03\"]\nbalance = \"first\"\n"
    );
    Fixture::run_with_config("first", &config, |fx| {
        for i in 0..6 {
            assert_eq!(pick_backend(fx, 42000 + i, 7682)?, DB02, "SYN #{i}");
        }
        // The agent reorders the set: the new first member takes every new flow.
        fx.control
            .install_set(2, &[member(2, DB03), member(1, DB02)])?;
        for i in 0..6 {
            assert_eq!(
                pick_backend(fx, 42100 + i, 7682)?,
                DB03,
                "SYN #{i} after reorder"
            );
        }
        // The round-robin service next to it still alternates.
        let rr: Vec<Ipv4Addr> = (0..4)
            .map(|i| pick_backend(fx, 42200 + i, READ_PORT))
            .collect::<Result<_>>()?;
        assert_eq!(rr, [DB02, DB03, DB02, DB03]);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn balance_maglev_maps_tuples_stably_evenly_and_with_minimal_disruption() -> Result<()> {
    let config = format!(
        "{CONFIG}\n[[service]]\nname = \"hash\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\n\
         backends = [\"db01\", \"db02\", \"db03\"]\nbalance = \"maglev\"\n"
    );
    Fixture::run_with_config("maglev", &config, |fx| {
        let ports: Vec<u16> = (43000..43300).collect();
        let round = |fx: &mut Fixture| -> Result<Vec<Ipv4Addr>> {
            ports.iter().map(|&p| pick_backend(fx, p, 7682)).collect()
        };
        let first = round(fx)?;
        let share = |v: &[Ipv4Addr], b: Ipv4Addr| v.iter().filter(|&&x| x == b).count();
        let shares = [
            share(&first, DB01),
            share(&first, DB02),
            share(&first, DB03),
        ];
        eprintln!("maglev shares of 300 tuples (db01, db02, db03): {shares:?}");
        assert!(
            shares.iter().all(|&s| s >= 50),
            "300 client ports over 3 backends: {shares:?}"
        );

        // The same tuple, sent again once its flow is forgotten, lands on the same backend.
        assert_eq!(round(fx)?, first, "a second round of the same tuples");
        // Also after the same set is installed again (new generation).
        fx.control
            .install_set(2, &[member(0, DB01), member(1, DB02), member(2, DB03)])?;
        assert_eq!(round(fx)?, first, "after re-installing the same set");

        // db02 leaves: its tuples move, those of db01 and db03 stay (almost all).
        fx.control
            .install_set(2, &[member(0, DB01), member(2, DB03)])?;
        let after = round(fx)?;
        assert!(
            after.iter().all(|&b| b != DB02),
            "a tuple still maps to the removed db02"
        );
        let survivors: Vec<usize> = (0..ports.len()).filter(|&i| first[i] != DB02).collect();
        let kept = survivors.iter().filter(|&&i| after[i] == first[i]).count();
        eprintln!(
            "maglev: {kept} of {} tuples of surviving backends kept their backend",
            survivors.len()
        );
        assert!(
            kept * 10 >= survivors.len() * 9,
            "only {kept} of {} tuples of db01/db03 kept their backend",
            survivors.len()
        );
        // Spread over the two survivors.
        assert!(
            share(&after, DB01) >= 75 && share(&after, DB03) >= 75,
            "{after:?}"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Traffic that is not the balancer's passes untouched
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn traffic_not_for_a_service_passes_byte_for_byte() -> Result<()> {
    Fixture::run("notours", |fx| {
        let cl0 = fx.cl0.ifindex;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "TCP to the host's own address (ssh)",
                client_syn(CLIENT_PORT, 22)
                    .translated(sa(CLIENT, CLIENT_PORT), sa(CL0_ADDR, 22))
                    .bytes()?,
            ),
            (
                "TCP to the VIP on a port that is no service",
                client_syn(CLIENT_PORT, 80).bytes()?,
            ),
            (
                "TCP ACK to the VIP on a port that is no service",
                client_segment(CLIENT_PORT, ACK)
                    .translated(sa(CLIENT, CLIENT_PORT), sa(VIP, 7474))
                    .bytes()?,
            ),
            (
                "UDP to the VIP's service port",
                frames::udp(
                    CLIENT_MAC,
                    CL0_MAC,
                    sa(CLIENT, CLIENT_PORT),
                    sa(VIP, WRITE_PORT),
                    b"not tcp",
                )?,
            ),
            (
                "ICMP echo to the VIP",
                frames::icmp_echo(CLIENT_MAC, CL0_MAC, CLIENT, VIP, b"ping payload")?,
            ),
            (
                "ARP who-has the VIP",
                frames::arp_request(CLIENT_MAC, CLIENT, VIP),
            ),
            (
                "IPv6 SYN",
                frames::ipv6_syn(
                    CLIENT_MAC,
                    CL0_MAC,
                    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10],
                    WRITE_PORT,
                )?,
            ),
            (
                "VLAN-tagged SYN to the VIP:port",
                frames::vlan_syn(
                    CLIENT_MAC,
                    CL0_MAC,
                    100,
                    sa(CLIENT, CLIENT_PORT),
                    sa(VIP, WRITE_PORT),
                )?,
            ),
        ];
        for (what, frame) in &cases {
            assert_passes_untouched(fx, what, frame, cl0)?;
        }
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn host_traffic_on_snat_range_ports_passes_unless_it_comes_from_a_backend_data_port() -> Result<()>
{
    Fixture::run("hostsnat", |fx| {
        let bk0 = fx.bk0.ifindex;
        let other = Ipv4Addr::new(10, 0, 1, 99);
        let cases = [
            (
                "a non-backend host to an SNAT-range port",
                TcpFrame::new(
                    [2, 0, 0, 0, 1, 0x99],
                    BK0_MAC,
                    sa(other, 7687),
                    sa(SNAT_ADDR, 15000),
                ),
            ),
            (
                "a backend address from a port that is not its data port",
                TcpFrame::new(DB01_MAC, BK0_MAC, sa(DB01, 7474), sa(SNAT_ADDR, 15000)),
            ),
            (
                "a backend data port to an SNAT-range port of another host (lb routes for it)",
                TcpFrame::new(
                    DB01_MAC,
                    BK0_MAC,
                    sa(DB01, BACKEND_PORT),
                    sa(Ipv4Addr::new(10, 0, 1, 11), 15000),
                ),
            ),
            (
                "a backend data port to a port outside the SNAT range",
                TcpFrame::new(
                    DB01_MAC,
                    BK0_MAC,
                    sa(DB01, BACKEND_PORT),
                    sa(SNAT_ADDR, 40000),
                ),
            ),
        ];
        for (what, seg) in cases {
            for flags in [SYN, SYN | ACK, ACK, PSH | ACK, RST] {
                let frame = seg.clone().with_flags(flags).bytes()?;
                assert_passes_untouched(fx, &format!("{what}, flags {flags:#x}"), &frame, bk0)?;
            }
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn after_a_change_of_snat_ports_the_earlier_ranges_flows_keep_their_replies_and_its_ports_go_back_to_the_host(
) -> Result<()> {
    Fixture::run("oldports", |fx| {
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        // An agent restarted with another range keeps translating the earlier one's flows.
        fx.cfg.set_snat_ports((40000, 49999));
        fx.control.keep_old_ports(Some(SNAT_PORTS))?;
        fx.control.write_config(&fx.cfg, false)?;
        let syn_ack = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn.seq + 1)
            .with_options(&frames::SYN_OPTIONS);
        let before = fx.counters()?;
        let out = fx.from_backends(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&syn_ack, CLIENT_PORT, WRITE_PORT).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::ReplyPackets, 1)])
        );
        // Another port of the earlier range without a flow: the host's, not answered.
        let other = if port == SNAT_PORTS.0 {
            port + 1
        } else {
            port - 1
        };
        for flags in [SYN | ACK, ACK, RST] {
            let seg = backend_segment(DB01, DB01_MAC, other, flags).bytes()?;
            assert_passes_untouched(
                fx,
                &format!("old-range port without a flow, flags {flags:#x}"),
                &seg,
                fx.bk0.ifindex,
            )?;
        }
        // New flows take ports of the new range.
        let out = fx.from_client(&client_syn(CLIENT_PORT + 1, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect);
        assert!(
            (40000..=49999).contains(&sport_of(&out.frame)),
            "{}",
            sport_of(&out.frame)
        );
        // Once the agent let the earlier range go, its ports are the host's again.
        fx.control.keep_old_ports(None)?;
        let seg = backend_segment(DB01, DB01_MAC, port, ACK).bytes()?;
        assert_passes_untouched(
            fx,
            "old-range port after the range was let go",
            &seg,
            fx.bk0.ifindex,
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Packets for the balancer that match no flow
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_backend_segment_without_a_flow_is_answered_with_a_rst() -> Result<()> {
    Fixture::run("replynoflow", |fx| {
        // db01:7687 -> 10.0.1.1:15000, seq 0x5000_0000, ack 0x1000_0001: no such flow.
        let seg = |flags| backend_segment(DB01, DB01_MAC, 15000, flags);
        // (segment, RST flags, seq, ack): with ACK, seq = SEG.ACK; without, RST|ACK and
        // ack = SEG.SEQ + payload (+1 for SYN, +1 for FIN).
        let cases = [
            (seg(ACK), RST, 0x1000_0001, 0),
            (
                seg(SYN | ACK).with_options(&frames::SYN_OPTIONS),
                RST,
                0x1000_0001,
                0,
            ),
            (
                seg(PSH | ACK).with_payload(&[0xab; 100]),
                RST,
                0x1000_0001,
                0,
            ),
            (seg(FIN | ACK), RST, 0x1000_0001, 0),
            (seg(SYN), RST | ACK, 0, 0x5000_0001),
            (seg(FIN), RST | ACK, 0, 0x5000_0001),
            (seg(FIN).with_payload(b"bye"), RST | ACK, 0, 0x5000_0004),
            (seg(SYN | FIN), RST | ACK, 0, 0x5000_0002),
            (seg(PSH).with_payload(b"x"), RST | ACK, 0, 0x5000_0001),
        ];
        for (seg, flags, seq, ack) in cases {
            let what = format!(
                "flags {:#x}, {} bytes of data",
                seg.flags,
                seg.payload.len()
            );
            // MACs, addresses and ports swapped: back to db01 over bk0.
            let mut want = TcpFrame::new(
                BK0_MAC,
                DB01_MAC,
                sa(SNAT_ADDR, 15000),
                sa(DB01, BACKEND_PORT),
            )
            .with_flags(flags)
            .with_seq_ack(seq, ack);
            want.id = 0;
            want.window = 0;
            assert_eq!(want, rst_answer(&seg), "{what}: the helper agrees");
            assert_rst(
                fx,
                &what,
                &seg,
                fx.bk0.ifindex,
                &want,
                &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
            )?;
        }
        // A RST is never answered.
        for flags in [RST, RST | ACK] {
            assert_dropped(
                fx,
                &format!("flags {flags:#x}"),
                &seg(flags).bytes()?,
                fx.bk0.ifindex,
                &[(Counter::DropNoFlow, 1)],
            )?;
        }
        assert!(fx.embryonic()?.is_empty() && fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_non_syn_segment_to_a_vip_without_a_flow_is_answered_with_a_rst() -> Result<()> {
    Fixture::run("nonsyn", |fx| {
        // client:40001 -> VIP:7680, seq 0x1000_0001, ack 0x5000_0001: no such flow, and only a
        // plain SYN may open one.
        let seg = |flags| client_segment(40001, flags);
        let cases = [
            (seg(ACK), RST, 0x5000_0001, 0),
            (
                seg(PSH | ACK)
                    .with_options(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
                    .with_payload(&[0x42; 200]),
                RST,
                0x5000_0001,
                0,
            ),
            (seg(FIN | ACK), RST, 0x5000_0001, 0),
            (seg(SYN | ACK), RST, 0x5000_0001, 0),
            (seg(SYN | FIN), RST | ACK, 0, 0x1000_0003),
            (
                seg(SYN | FIN).with_payload(&[7; 10]),
                RST | ACK,
                0,
                0x1000_000d,
            ),
            (seg(FIN), RST | ACK, 0, 0x1000_0002),
            (seg(0), RST | ACK, 0, 0x1000_0001),
            (seg(PSH).with_payload(b"hello"), RST | ACK, 0, 0x1000_0006),
        ];
        let n = cases.len() as u64;
        for (seg, flags, seq, ack) in cases {
            let what = format!(
                "flags {:#x}, {} bytes of data",
                seg.flags,
                seg.payload.len()
            );
            let mut want =
                TcpFrame::new(CL0_MAC, CLIENT_MAC, sa(VIP, WRITE_PORT), sa(CLIENT, 40001))
                    .with_flags(flags)
                    .with_seq_ack(seq, ack);
            want.id = 0;
            want.window = 0;
            assert_eq!(want, rst_answer(&seg), "{what}: the helper agrees");
            assert_rst(
                fx,
                &what,
                &seg,
                fx.cl0.ifindex,
                &want,
                &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
            )?;
        }
        // A minimum-size Ethernet frame (54 bytes padded to 60, as NICs deliver it): the IP
        // length counts, the padding is cut.
        let ack = seg(ACK);
        let mut padded = ack.bytes()?;
        padded.extend_from_slice(&[0; 6]);
        let want = rst_answer(&ack).bytes()?;
        let before = fx.counters()?;
        let out = fx.from_client(&padded)?;
        assert_bytes("output", &out, Action::Tx, &want);
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)]),
            "padded ACK"
        );
        // The read service, too (its own VIP port in the answer).
        let read_ack = seg(ACK).translated(sa(CLIENT, 40001), sa(VIP, READ_PORT));
        assert_rst(
            fx,
            "ACK to the read service",
            &read_ack,
            fx.cl0.ifindex,
            &rst_answer(&read_ack),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        // A RST is never answered.
        let rsts = [RST, RST | ACK, SYN | RST, FIN | RST];
        for flags in rsts {
            assert_dropped(
                fx,
                &format!("flags {flags:#x}"),
                &seg(flags).bytes()?,
                fx.cl0.ifindex,
                &[(Counter::DropNoFlow, 1)],
            )?;
        }
        let (write, read) = (fx.service_stats(0)?, fx.service_stats(1)?);
        assert_eq!(
            (write.drops, write.new_flows, write.packets),
            (n + 1 + rsts.len() as u64, 0, 0),
            "write service: every refused segment counts as a drop"
        );
        assert_eq!((read.drops, read.new_flows), (1, 0));
        assert!(fx.embryonic()?.is_empty() && fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_handshake_whose_record_is_gone_counts_as_no_flow_on_either_side() -> Result<()> {
    Fixture::run("partner", |fx| {
        // The record disappears (its slot taken by another claim): the client's ACK finds a stale index way.
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        let rev_key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        fx.remove_embryonic(&rev_key)?;
        let ack = client_segment(CLIENT_PORT, ACK).with_seq_ack(syn.seq + 1, 0x5000_0001);
        let mut want = TcpFrame::new(
            CL0_MAC,
            CLIENT_MAC,
            sa(VIP, WRITE_PORT),
            sa(CLIENT, CLIENT_PORT),
        )
        .with_flags(RST)
        .with_seq_ack(0x5000_0001, 0);
        want.id = 0;
        want.window = 0;
        assert_rst(
            fx,
            "client ACK, record gone",
            &ack,
            fx.cl0.ifindex,
            &want,
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;

        // The same from the backend's side: its SYN-ACK meets no record.
        let (syn, port) = open_write_flow(fx, CLIENT_PORT + 1)?;
        fx.remove_embryonic(&flow_key(sa(CLIENT, CLIENT_PORT + 1), sa(VIP, WRITE_PORT)))?;
        let syn_ack =
            backend_segment(DB01, DB01_MAC, port, SYN | ACK).with_seq_ack(0x5000_0000, syn.seq + 1);
        let mut want = TcpFrame::new(
            BK0_MAC,
            DB01_MAC,
            sa(SNAT_ADDR, port),
            sa(DB01, BACKEND_PORT),
        )
        .with_flags(RST)
        .with_seq_ack(syn.seq + 1, 0);
        want.id = 0;
        want.window = 0;
        assert_rst(
            fx,
            "backend SYN-ACK, record gone",
            &syn_ack,
            fx.bk0.ifindex,
            &want,
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        Ok(())
    })
}

/// The index way naming client tuple `key`, if its set has one.
fn way_of(fx: &Fixture, key: &FlowKey) -> Result<Option<IndexWay>> {
    Ok(fx.index_ways(key)?.into_iter().find(|w| w.names(key)))
}

/// The forward key of the write service's connection from `port`.
fn write_key(port: u16) -> FlowKey {
    flow_key(sa(CLIENT, port), sa(VIP, WRITE_PORT))
}

/// The client's ACK of `syn_ack` on the connection from `port`, run; returns the action.
fn client_ack(fx: &Fixture, port: u16, syn: &TcpFrame, syn_ack: &TcpFrame) -> Result<Action> {
    let ack = client_segment(port, ACK).with_seq_ack(syn.seq + 1, syn_ack.seq + 1);
    Ok(fx.from_client(&ack.bytes()?)?.action)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_new_flow_is_one_handshake_record_which_the_clients_side_finds_through_the_index() -> Result<()>
{
    Fixture::run("hsrecord", |fx| {
        let (_syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        let rev_key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        let hs = fx.handshakes()?;
        assert_eq!(hs.len(), 1, "one record per new flow: {hs:?}");
        let (k, rec) = hs[0];
        assert_eq!(
            (k, rec.key(), rec.fwd_key()),
            (rev_key, rev_key, write_key(CLIENT_PORT))
        );
        assert_eq!((rec.fwd.dir, rec.rev.dir), (DIR_FORWARD, DIR_REPLY));
        let way = way_of(fx, &write_key(CLIENT_PORT))?.expect("an index way names the tuple");
        assert_eq!(way.record(), rev_key);
        assert_ne!(way.stamp, 0);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_client_segment_finds_its_handshake_only_through_a_way_whose_record_points_back() -> Result<()>
{
    Fixture::run("hsway", |fx| {
        let (syn, syn_ack, port) = handshake_until_syn_ack(fx, CLIENT_PORT)?;
        let (_, other_port) = open_write_flow(fx, CLIENT_PORT + 1)?;
        let key = write_key(CLIENT_PORT);
        let good = way_of(fx, &key)?.expect("way");
        let other = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, other_port));
        // A way naming the tuple but another flow's record (stale, or torn by a concurrent
        // write), and a way naming another tuple: no flow, the ACK is refused with a RST.
        let stale = IndexWay {
            backend: other.saddr,
            snat: other.daddr,
            backend_port: other.sport,
            snat_port: other.dport,
            ..good
        };
        let foreign = IndexWay {
            client_port: (CLIENT_PORT + 7).to_be(),
            ..good
        };
        fx.put_index_ways(&key, [stale, foreign])?;
        let before = fx.counters()?;
        assert_eq!(client_ack(fx, CLIENT_PORT, &syn, &syn_ack)?, Action::Tx);
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)])
        );
        assert!(fx.established()?.is_empty());
        // The backend's side finds the record by its own key, index or not.
        let rtx = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn.seq.wrapping_add(1))
            .with_options(&frames::SYN_OPTIONS);
        assert_eq!(fx.from_backends(&rtx.bytes()?)?.action, Action::Redirect);
        // The stale way first, the right one second: the lookup goes on to the second way.
        fx.put_index_ways(&key, [stale, good])?;
        let before = fx.counters()?;
        assert_eq!(
            client_ack(fx, CLIENT_PORT, &syn, &syn_ack)?,
            Action::Redirect
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FwdPackets, 1), (Counter::Established, 1)])
        );
        assert_eq!(fx.established()?.len(), 2);
        Ok(())
    })
}

/// `n` client ports of the write service whose tuples share one index set.
fn ports_in_one_set(n: usize) -> Vec<u16> {
    let mut by_set: std::collections::HashMap<u32, Vec<u16>> = Default::default();
    for port in 20_000..65_000u16 {
        let v = by_set.entry(index_set_of(&write_key(port))).or_default();
        v.push(port);
        if v.len() == n {
            return v.clone();
        }
    }
    panic!("no {n} ports share an index set");
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_new_handshake_takes_its_tuples_own_way_else_the_older_way_of_its_set() -> Result<()> {
    Fixture::run("hsset", |fx| {
        let ports = ports_in_one_set(3);
        let (a, b, c) = (ports[0], ports[1], ports[2]);
        let names = |fx: &Fixture| -> Result<Vec<u16>> {
            Ok(fx
                .index_ways(&write_key(a))?
                .iter()
                .map(|w| u16::from_be(w.client_port))
                .collect())
        };
        let (syn_a, syn_ack_a, _) = handshake_until_syn_ack(fx, a)?;
        let (syn_b, _) = open_write_flow(fx, b)?;
        assert_eq!(names(fx)?, [a, b], "an empty set fills way by way");
        // b's record is lost (evicted); its way stays, newer than a's. b's SYN retransmit
        // opens a new handshake in b's own way, not in a's older one: a's handshake lives on.
        fx.remove_embryonic(&write_key(b))?;
        let mut ways = fx.index_ways(&write_key(a))?;
        ways[0].stamp = ways[1].stamp.wrapping_sub(1000);
        fx.put_index_ways(&write_key(a), ways)?;
        assert_eq!(fx.from_client(&syn_b.bytes()?)?.action, Action::Redirect);
        assert_eq!(names(fx)?, [a, b], "b took its own way");
        assert_eq!(client_ack(fx, a, &syn_a, &syn_ack_a)?, Action::Redirect);
        // A third handshake in a full set takes the older way (a's, whose flow is
        // established now), and b's still completes.
        let (_, _, _) = handshake_until_syn_ack(fx, c)?;
        assert_eq!(names(fx)?, [c, b], "c took the older way");
        let out = fx.from_client(&syn_b.bytes()?)?;
        let port_b = sport_of(&out.frame);
        let syn_ack_b = backend_segment(DB01, DB01_MAC, port_b, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn_b.seq.wrapping_add(1))
            .with_options(&frames::SYN_OPTIONS);
        assert_eq!(
            fx.from_backends(&syn_ack_b.bytes()?)?.action,
            Action::Redirect
        );
        assert_eq!(client_ack(fx, b, &syn_b, &syn_ack_b)?, Action::Redirect);
        assert_eq!(fx.established()?.len(), 4, "a and b established");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn generated_rsts_pass_a_per_cpu_token_bucket() -> Result<()> {
    let config = format!("rst_per_sec = 3\n{CONFIG}");
    Fixture::run_with_config("rstlimit", &config, |fx| {
        // One CPU, one bucket (capacity and refill: 3 per second).
        pin_to_cpu0()?;
        let rst_counters = [(Counter::RstNoFlow, 1), (Counter::RstSent, 1)];
        let limited = [(Counter::DropRstLimited, 1)];
        let ack = |port: u16| client_segment(port, ACK);
        for port in 40001..=40003 {
            let seg = ack(port);
            assert_rst(
                fx,
                &format!("no-flow ACK #{}", port - 40000),
                &seg,
                fx.cl0.ifindex,
                &rst_answer(&seg),
                &rst_counters,
            )?;
        }
        assert_dropped(
            fx,
            "4th no-flow ACK in quick succession",
            &ack(40004).bytes()?,
            fx.cl0.ifindex,
            &limited,
        )?;
        // The same bucket serves the backend side.
        assert_dropped(
            fx,
            "no-flow backend segment with the bucket empty",
            &backend_segment(DB01, DB01_MAC, 15000, ACK).bytes()?,
            fx.bk0.ifindex,
            &limited,
        )?;
        // A RST is dropped as before, without touching the bucket.
        assert_dropped(
            fx,
            "RST with the bucket empty",
            &ack(40005).with_flags(RST).bytes()?,
            fx.cl0.ifindex,
            &[(Counter::DropNoFlow, 1)],
        )?;

        // A third of a second later one token is back.
        std::thread::sleep(std::time::Duration::from_millis(400));
        let seg = ack(40006);
        assert_rst(
            fx,
            "no-flow ACK 400 ms later",
            &seg,
            fx.cl0.ifindex,
            &rst_answer(&seg),
            &rst_counters,
        )?;
        // After more than a second the bucket is full again, but holds no more than 3.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        for port in 40007..=40009 {
            let seg = ack(port);
            assert_rst(
                fx,
                &format!("no-flow ACK from {port} after a refill"),
                &seg,
                fx.cl0.ifindex,
                &rst_answer(&seg),
                &rst_counters,
            )?;
        }
        assert_dropped(
            fx,
            "4th no-flow ACK after a refill",
            &ack(40010).bytes()?,
            fx.cl0.ifindex,
            &limited,
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_to_a_service_without_backends_is_refused_with_a_rst_or_held_while_its_role_moves(
) -> Result<()> {
    // A role-checked service: its set stays empty until a check passes (none runs here).
    let config = format!(
        "{CONFIG}\n[[service]]\nname = \"master\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\n\
         backends = [\"db01\", \"db02\", \"db03\"]\ncheck = \"neo4j-ha-master\"\n"
    );
    Fixture::run_with_config("nobackend", &config, |fx| {
        let refused = [(Counter::RstNoBackend, 1), (Counter::RstSent, 1)];
        for (client_port, payload) in [(40001u16, &b""[..]), (40002, &b"early data"[..])] {
            let syn = client_syn(client_port, 7682).with_payload(payload);
            let mut want =
                TcpFrame::new(CL0_MAC, CLIENT_MAC, sa(VIP, 7682), sa(CLIENT, client_port))
                    .with_flags(RST | ACK)
                    .with_seq_ack(0, syn.seq + 1 + payload.len() as u32);
            want.id = 0;
            want.window = 0;
            assert_rst(
                fx,
                &format!("SYN to the empty service, {} bytes", payload.len()),
                &syn,
                fx.cl0.ifindex,
                &want,
                &refused,
            )?;
        }
        let svc = fx.service_stats(2)?;
        assert_eq!((svc.drops, svc.new_flows, svc.packets), (2, 0, 0));
        assert!(fx.embryonic()?.is_empty());

        // The write service emptied by the agent (its master lost the role): new connections
        // are refused, an established one drains.
        let est = Conn::establish(fx, 40010, WRITE_PORT)?;
        fx.control.install_set(0, &[])?;
        let syn = client_syn(40011, WRITE_PORT);
        assert_rst(
            fx,
            "SYN to the emptied write service",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &refused,
        )?;
        est.assert_alive(fx, "established flow after its set was emptied")?;
        // The agent holds the emptied role's SYNs while a new holder is checked: dropped,
        // counted, no flow and no RST (the client's SYN retransmit finds the new holder).
        let cfg = fx.cfg.clone();
        let now = lb_user::gc::monotonic_now()?;
        fx.control.hold_syns(&cfg, 0, now + 10_000_000_000)?;
        for (client_port, what) in [(40013u16, "SYN in the hold"), (40013, "its retransmit")] {
            assert_dropped(
                fx,
                what,
                &client_syn(client_port, WRITE_PORT).bytes()?,
                fx.cl0.ifindex,
                &[(Counter::SynHeld, 1)],
            )?;
        }
        assert!(fx.embryonic()?.is_empty(), "a held SYN makes no flow");
        // Only the service on hold: the empty "master" service still refuses.
        let syn = client_syn(40014, 7682);
        assert_rst(
            fx,
            "SYN to another empty service",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &refused,
        )?;
        // A hold that ran out refuses again.
        fx.control.hold_syns(&cfg, 0, now)?;
        let syn = client_syn(40015, WRITE_PORT);
        assert_rst(
            fx,
            "SYN after the hold ran out",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &refused,
        )?;
        // Installed again: new flows go through.
        fx.control.install_set(
            0,
            &[lb_user::control::Member {
                id: 0,
                addr: DB01,
                port: BACKEND_PORT,
            }],
        )?;
        open_write_flow(fx, 40012)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// on_down = "reset": flows of a demoted backend are reset on their next segment
// ---------------------------------------------------------------------------------------------

/// The fixture's services plus "any" (service 2, VIP:7682) -> db01.
fn config_with_second_db01_service() -> String {
    format!(
        "{CONFIG}\n[[service]]\nname = \"any\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\n\
         backends = [\"db01\"]\n"
    )
}

#[track_caller]
fn assert_flow_gone(fx: &Fixture, what: &str, est: &Conn) -> Result<()> {
    for (name, table) in [
        ("established", fx.established()?),
        ("embryonic", fx.embryonic()?),
    ] {
        assert!(
            entry(&table, &est.fwd_key()).is_none() && entry(&table, &est.rev_key()).is_none(),
            "{what}: entries left in {name}: {:?}",
            tuples(&table)
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn reset_flows_answers_the_clients_next_segment_with_a_rst_and_deletes_the_flow() -> Result<()> {
    Fixture::run_with_config("resetcl", &config_with_second_db01_service(), |fx| {
        let a = Conn::establish(fx, 40000, WRITE_PORT)?;
        let b = Conn::establish(fx, 40001, 7682)?;
        let c = Conn::establish(fx, 40002, READ_PORT)?;
        let d = Conn::establish(fx, 40003, READ_PORT)?;
        assert_eq!(
            (a.backend, b.backend, c.backend, d.backend),
            (DB01, DB01, DB02, DB03)
        );
        assert_eq!(fx.established()?.len(), 8);

        // db01 demoted in "write" (service 0, backend 0).
        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        let data = a.client(PSH | ACK, b"CREATE (n)");
        let mut want = TcpFrame::new(CL0_MAC, CLIENT_MAC, sa(VIP, WRITE_PORT), sa(CLIENT, 40000))
            .with_flags(RST)
            .with_seq_ack(a.backend_seq, 0);
        want.id = 0;
        want.window = 0;
        let drops = fx.service_stats(0)?.drops;
        assert_rst(
            fx,
            "client data after the reset",
            &data,
            fx.cl0.ifindex,
            &want,
            &[(Counter::RstFlowReset, 1), (Counter::RstSent, 1)],
        )?;
        assert_eq!(fx.service_stats(0)?.drops, drops + 1);
        assert_flow_gone(fx, "after the client's reset segment", &a)?;
        assert_eq!(fx.established()?.len(), 6);
        // The flow is gone: further segments of it are no-flow segments.
        let again = a.client(PSH | ACK, b"again");
        assert_rst(
            fx,
            "client data once the flow is gone",
            &again,
            fx.cl0.ifindex,
            &rst_answer(&again),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        let late = a.backend(PSH | ACK, b"late");
        assert_rst(
            fx,
            "backend data once the flow is gone",
            &late,
            fx.bk0.ifindex,
            &rst_answer(&late),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;

        // db01 in another service, and other backends, are untouched.
        b.assert_alive(fx, "db01 in service \"any\"")?;
        c.assert_alive(fx, "db02 in \"read\"")?;
        d.assert_alive(fx, "db03 in \"read\"")?;

        // Another backend of the same service: only its flows.
        fx.control.reset_flows(&fx.cfg, 1, 2)?;
        let data = d.client(PSH | ACK, b"MATCH (n)");
        assert_rst(
            fx,
            "client data to db03 after its reset",
            &data,
            fx.cl0.ifindex,
            &rst_answer(&data),
            &[(Counter::RstFlowReset, 1), (Counter::RstSent, 1)],
        )?;
        assert_flow_gone(fx, "db03's flow", &d)?;
        c.assert_alive(fx, "db02 in \"read\" after db03's reset")?;
        b.assert_alive(fx, "db01 in \"any\" after db03's reset")?;
        assert_eq!(fx.established()?.len(), 4);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_demoted_masters_answer_in_flight_reaches_the_client_before_the_rst_on_its_next_segment(
) -> Result<()> {
    Fixture::run_with_config("resetbk", &config_with_second_db01_service(), |fx| {
        let a = Conn::establish(fx, 40000, WRITE_PORT)?;
        let b = Conn::establish(fx, 40001, 7682)?;
        let c = Conn::establish(fx, 40002, READ_PORT)?;

        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        // db01's SUCCESS to a COMMIT, already on its way when db01 was demoted: delivered,
        // translated as usual (the client must learn that its write happened).
        let success = a.backend(PSH | ACK, b"\x00\x03\xb1\x70\xa0\x00\x00");
        let before = fx.counters()?;
        let out = fx.from_backends(&success.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&success, a.client_port, WRITE_PORT).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::ReplyPackets, 1)]),
            "the answer in flight: counters"
        );
        // The client's next segment (its ACK of that answer) gets the RST: from the VIP,
        // seq = its ACK.
        let ack = TcpFrame::new(
            CLIENT_MAC,
            CL0_MAC,
            sa(CLIENT, a.client_port),
            sa(VIP, WRITE_PORT),
        )
        .with_flags(ACK)
        .with_seq_ack(a.client_seq, a.backend_seq + 7);
        assert_rst(
            fx,
            "the client's ACK after the reset",
            &ack,
            fx.cl0.ifindex,
            &rst_answer(&ack),
            &[(Counter::RstFlowReset, 1), (Counter::RstSent, 1)],
        )?;
        assert_flow_gone(fx, "after the client's segment", &a)?;
        // db01's later segments find no flow: it gets its RST too.
        let late = a.backend(PSH | ACK, b"late");
        assert_rst(
            fx,
            "backend data once the flow is gone",
            &late,
            fx.bk0.ifindex,
            &rst_answer(&late),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        b.assert_alive(fx, "db01 in service \"any\"")?;
        c.assert_alive(fx, "db02 in \"read\"")?;

        // A flow opened after the reset records the new epoch and lives.
        let n = Conn::establish(fx, 40004, WRITE_PORT)?;
        n.assert_alive(fx, "a write flow opened after the reset")?;
        assert_eq!(fx.established()?.len(), 6);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_handshake_to_a_demoted_master_is_refused_to_it_and_the_clients_syn_retransmit_starts_over(
) -> Result<()> {
    Fixture::run_with_config("reseths", CONFIG, |fx| {
        // The SYN-ACK of a handshake the reset caught: db01 gets a RST, the client nothing.
        let (syn, port) = open_write_flow(fx, 40005)?;
        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        let syn_ack =
            backend_segment(DB01, DB01_MAC, port, SYN | ACK).with_seq_ack(0x5000_0000, syn.seq + 1);
        assert_rst(
            fx,
            "SYN-ACK of an embryonic flow after the reset",
            &syn_ack,
            fx.bk0.ifindex,
            &rst_answer(&syn_ack),
            &[(Counter::RstFlowReset, 1), (Counter::RstSent, 1)],
        )?;
        let emb = fx.embryonic()?;
        assert!(emb.is_empty(), "embryonic left: {:?}", tuples(&emb));

        // A handshake caught before the backend answered: the client's SYN retransmit is not
        // refused, it starts a new flow on the current set.
        let (syn, _) = open_write_flow(fx, 40006)?;
        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::NewFlows, 1),
                (Counter::FwdPackets, 1),
                (Counter::FibResult0, 1)
            ]),
            "the SYN retransmit: counters"
        );
        let emb = fx.embryonic()?;
        assert_eq!(emb.len(), 2, "one flow, two entries: {:?}", tuples(&emb));
        let fwd = entry(&emb, &flow_key(sa(CLIENT, 40006), sa(VIP, WRITE_PORT)))
            .expect("the new forward entry");
        assert_eq!(fwd.nat_sport, port.to_be(), "the new flow's SNAT port");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Malformed, truncated, fragmented, optioned, expiring packets
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn truncated_frames_are_never_forwarded() -> Result<()> {
    Fixture::run("truncated", |fx| {
        // Shorter than an Ethernet header: the kernel refuses to run the program at all.
        for len in [1usize, 13] {
            assert!(
                fx.from_client(&vec![0xaa; len]).is_err(),
                "a {len}-byte test run should be refused by the kernel"
            );
        }

        // Every prefix of an option-less SYN to the VIP (and of a backend reply): without the
        // IPv4 header or the ports it is not recognisably ours and passes; with the ports but
        // not the whole TCP header it is ours and malformed.
        let syn = client_syn(CLIENT_PORT, WRITE_PORT)
            .with_options(&[])
            .bytes()?;
        let reply = backend_segment(DB01, DB01_MAC, 15000, ACK).bytes()?;
        assert_eq!((syn.len(), reply.len()), (54, 54));
        for (what, frame, ingress) in [
            ("SYN to the VIP", &syn, fx.cl0.ifindex),
            ("backend reply", &reply, fx.bk0.ifindex),
        ] {
            for len in 14..54 {
                let cut = &frame[..len];
                let what = format!("{what} cut to {len} bytes");
                if len < 14 + 20 + 8 {
                    assert_passes_untouched(fx, &what, cut, ingress)?;
                } else {
                    assert_dropped(fx, &what, cut, ingress, &[(Counter::DropMalformed, 1)])?;
                }
            }
        }
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

/// Checks that `out` is the RST answering the TCP segment `input` (which has ACK set): 54
/// bytes, MACs, addresses and ports swapped, flags RST, seq = the input's ACK, both checksums
/// valid.
#[track_caller]
fn assert_is_rst_answer(input: &[u8], out: &[u8], i: usize) {
    let what = format!(
        "random frame #{i} ({}) answered with {}",
        hex(input),
        hex(out)
    );
    assert_eq!(out.len(), 54, "{what}: length");
    assert_eq!(
        (&out[0..6], &out[6..12], &out[12..14]),
        (&input[6..12], &input[0..6], &input[12..14]),
        "{what}: Ethernet"
    );
    assert_eq!(
        (&out[26..30], &out[30..34], &out[34..36], &out[36..38]),
        (
            &input[30..34],
            &input[26..30],
            &input[36..38],
            &input[34..36]
        ),
        "{what}: addresses and ports"
    );
    assert_eq!(&out[38..42], &input[42..46], "{what}: seq = SEG.ACK");
    assert_eq!(out[47], RST, "{what}: flags");
    let p = etherparse::SlicedPacket::from_ethernet(out).expect("parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("{what}: not IPv4")
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("{what}: not TCP")
    };
    let iph = ip.header().to_header();
    assert_eq!(
        iph.header_checksum,
        iph.calc_header_checksum(),
        "{what}: IP checksum"
    );
    assert_eq!(
        tcp.checksum(),
        tcp.to_header()
            .calc_checksum_ipv4(&iph, tcp.payload())
            .expect("checksum"),
        "{what}: TCP checksum"
    );
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn random_frames_are_passed_unchanged_dropped_or_answered_with_a_rst() -> Result<()> {
    Fixture::run("random", |fx| {
        let mut rng = XorShift::new(0x5eed_b0a7_0001);
        let to_vip = client_segment(CLIENT_PORT, ACK).bytes()?;
        let to_snat = backend_segment(DB01, DB01_MAC, 15000, ACK).bytes()?;
        let mut actions = std::collections::BTreeMap::new();
        for i in 0..600 {
            let len = rng.range(14, 160);
            let mut frame = rng.bytes(len);
            match i % 3 {
                // Random bytes.
                0 => {}
                // An IPv4 ethertype and version, the rest random.
                1 => {
                    frame[12] = 0x08;
                    frame[13] = 0x00;
                    if len > 14 {
                        frame[14] = 0x40 | (frame[14] & 0x0f);
                    }
                }
                // A TCP segment to the VIP:7680 (or from db01:7687 to an SNAT port) with a
                // mostly valid IHL, mostly unfragmented, random TCP bytes (but always ACK set, so
                // no flow can be opened), cut at a random length.
                _ => {
                    let template = if i % 2 == 0 { &to_vip } else { &to_snat };
                    // Ethernet, IPv4 and the ports from the template; the rest stays random.
                    let n = len.min(38);
                    frame[..n].copy_from_slice(&template[..n]);
                    if len > 14 && rng.range(0, 3) == 0 {
                        frame[14] = 0x40 | (rng.range(0, 15) as u8);
                    }
                    if len > 21 {
                        let frag: u16 = match rng.range(0, 5) {
                            0 => 0x2000,                      // MF
                            1 => rng.range(1, 0x1fff) as u16, // a later fragment
                            _ => 0x4000,                      // DF
                        };
                        frame[20..22].copy_from_slice(&frag.to_be_bytes());
                    }
                    if len > 47 {
                        frame[47] |= ACK;
                    }
                }
            }
            let ingress = if i % 2 == 0 {
                fx.cl0.ifindex
            } else {
                fx.bk0.ifindex
            };
            let out = fx.test_run(&frame, ingress)?;
            match out.action {
                Action::Pass => assert!(
                    out.frame == frame,
                    "random frame #{i} passed modified:\n{}",
                    describe_diff(&out.frame, &frame)
                ),
                Action::Drop => {}
                // A well-formed no-flow segment with ACK: answered with a RST.
                Action::Tx => assert_is_rst_answer(&frame, &out.frame, i),
                a => panic!("random frame #{i} got {a:?}: {}", hex(&frame)),
            }
            *actions.entry(format!("{:?}", out.action)).or_insert(0) += 1;
        }
        eprintln!("random frames: {actions:?}");
        assert!(
            actions.contains_key("Drop"),
            "the VIP-shaped frames must hit the drop paths"
        );
        assert!(
            actions.contains_key("Tx"),
            "some VIP-shaped frames must be answered with a RST"
        );
        assert!(fx.embryonic()?.is_empty() && fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_first_fragment_for_a_vip_is_dropped_and_later_fragments_pass() -> Result<()> {
    Fixture::run("frag", |fx| {
        let mut first = client_syn(CLIENT_PORT, WRITE_PORT);
        first.dont_fragment = false;
        first.more_fragments = true;
        assert_dropped(
            fx,
            "first fragment (MF, offset 0) to the VIP",
            &first.bytes()?,
            fx.cl0.ifindex,
            &[(Counter::DropFragment, 1)],
        )?;

        let mut reply_first = backend_segment(DB01, DB01_MAC, 15000, ACK);
        reply_first.dont_fragment = false;
        reply_first.more_fragments = true;
        assert_dropped(
            fx,
            "first fragment from a backend to an SNAT port",
            &reply_first.bytes()?,
            fx.bk0.ifindex,
            &[(Counter::DropFragment, 1)],
        )?;

        // A later fragment carries no ports (whatever its first bytes look like): the kernel's.
        for more in [true, false] {
            let mut later = client_syn(CLIENT_PORT, WRITE_PORT);
            later.dont_fragment = false;
            later.more_fragments = more;
            later.fragment_offset = 185;
            assert_passes_untouched(
                fx,
                &format!("later fragment (offset 185, MF {more})"),
                &later.bytes()?,
                fx.cl0.ifindex,
            )?;
        }
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn ip_options_on_a_vip_packet_are_dropped() -> Result<()> {
    Fixture::run("ipopts", |fx| {
        let mut syn = client_syn(CLIENT_PORT, WRITE_PORT);
        syn.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
        let frame = syn.bytes()?;
        assert_eq!(frame[14], 0x46);
        assert_dropped(
            fx,
            "SYN with IP options",
            &frame,
            fx.cl0.ifindex,
            &[(Counter::DropIpOptions, 1)],
        )?;
        // Not ours with options: untouched.
        let mut other =
            client_syn(CLIENT_PORT, 22).translated(sa(CLIENT, CLIENT_PORT), sa(CL0_ADDR, 22));
        other.ip_options = vec![1, 1, 1, 0];
        assert_passes_untouched(
            fx,
            "host SYN with IP options",
            &other.bytes()?,
            fx.cl0.ifindex,
        )?;
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_with_ttl_1_is_left_to_the_kernel() -> Result<()> {
    Fixture::run("ttl", |fx| {
        for ttl in [1, 0] {
            let mut syn = client_syn(CLIENT_PORT, WRITE_PORT);
            syn.ttl = ttl;
            let frame = syn.bytes()?;
            let before = fx.counters()?;
            let out = fx.from_client(&frame)?;
            assert_bytes("output", &out, Action::Pass, &frame);
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[(Counter::PassTtl, 1)]),
                "TTL {ttl}"
            );
        }
        assert!(fx.embryonic()?.is_empty(), "no flow for an expiring SYN");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Next hop and SNAT failures
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_to_an_unroutable_backend_is_dropped_without_a_flow() -> Result<()> {
    let config = format!(
        "{CONFIG}\n[[backend]]\nname = \"far\"\naddress = \"203.0.113.5\"\n\
         [[service]]\nname = \"far\"\nvip = \"198.18.0.10:7682\"\nbackend_port = 7687\nbackends = [\"far\"]\n"
    );
    Fixture::run_with_config("fibroute", &config, |fx| {
        // No route to 203.0.113.0/24 (no default route either): fib says "not forwarded".
        assert_dropped(
            fx,
            "SYN to a backend without a route",
            &client_syn(CLIENT_PORT, 7682).bytes()?,
            fx.cl0.ifindex,
            &[(Counter::DropFib, 1), (Counter::FibResult4, 1)],
        )?;
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_cpu_reuses_a_backends_next_hop_for_100_ms_and_never_a_failed_lookup() -> Result<()> {
    Fixture::run("hopreuse", |fx| {
        pin_to_cpu0()?;
        let dst_mac = |out: &Outcome| -> [u8; 6] { out.frame[0..6].try_into().unwrap() };
        let new_mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
        let new_mac_text = "02:00:00:00:00:99";
        // A first SYN looks db01's next hop up: its MAC.
        open_write_flow(fx, CLIENT_PORT)?;
        let found = std::time::Instant::now();
        // db01's neighbour entry changes: a new flow within 100 ms still goes by the hop this
        // CPU found (the FIB lookup is skipped).
        let set_neigh = |fx: &Fixture, verb: &str| {
            fx.ns.ip(&[
                "neigh",
                verb,
                "10.0.1.10",
                "lladdr",
                new_mac_text,
                "dev",
                "bk0",
                "nud",
                "permanent",
            ])
        };
        set_neigh(fx, "replace")?;
        let before = fx.counters()?;
        let out = fx.from_client(&client_syn(CLIENT_PORT + 1, WRITE_PORT).bytes()?)?;
        if found.elapsed() < std::time::Duration::from_millis(90) {
            assert_eq!(
                (out.action, dst_mac(&out)),
                (Action::Redirect, DB01_MAC),
                "reused"
            );
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[
                    (Counter::FwdPackets, 1),
                    (Counter::NewFlows, 1),
                    (Counter::FibResult0, 1)
                ])
            );
        } else {
            eprintln!("the machine took over 90 ms between two SYNs: reuse not checked");
        }
        // Past 100 ms: looked up again, the new MAC.
        std::thread::sleep(std::time::Duration::from_millis(120));
        let out = fx.from_client(&client_syn(CLIENT_PORT + 2, WRITE_PORT).bytes()?)?;
        assert_eq!((out.action, dst_mac(&out)), (Action::Redirect, new_mac));
        // A failed lookup is never reused: without the neighbour the SYN is dropped, and once
        // it is back the next SYN goes through at once.
        std::thread::sleep(std::time::Duration::from_millis(120));
        fx.ns.ip(&["neigh", "del", "10.0.1.10", "dev", "bk0"])?;
        assert_dropped(
            fx,
            "SYN to db01 without its neighbour",
            &client_syn(CLIENT_PORT + 3, WRITE_PORT).bytes()?,
            fx.cl0.ifindex,
            &[(Counter::DropFib, 1), (Counter::FibResult7, 1)],
        )?;
        set_neigh(fx, "add")?;
        let out = fx.from_client(&client_syn(CLIENT_PORT + 4, WRITE_PORT).bytes()?)?;
        assert_eq!((out.action, dst_mac(&out)), (Action::Redirect, new_mac));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_to_a_backend_without_a_neighbour_entry_is_dropped_without_a_flow() -> Result<()> {
    Fixture::run("fibneigh", |fx| {
        fx.ns.ip(&["neigh", "del", "10.0.1.10", "dev", "bk0"])?;
        assert_dropped(
            fx,
            "SYN to db01 without its neighbour",
            &client_syn(CLIENT_PORT, WRITE_PORT).bytes()?,
            fx.cl0.ifindex,
            &[(Counter::DropFib, 1), (Counter::FibResult7, 1)],
        )?;
        assert!(fx.embryonic()?.is_empty() && fx.established()?.is_empty());
        Ok(())
    })
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut it = release.trim().split(['.', '-']).map(|p| p.parse::<u32>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => anyhow::bail!("cannot read the kernel version from {release:?}"),
    }
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_fib_source_probe_tells_whether_this_kernel_has_bpf_fib_lookup_src() -> Result<()> {
    Fixture::run("fibprobe", |fx| {
        let has = lb_user::dataplane::fib_src_supported(&fx.ebpf)?;
        let version = kernel_version()?;
        eprintln!("kernel {version:?}: BPF_FIB_LOOKUP_SRC {has}");
        // Mainline has it from 6.7; stable kernels may have it backported (Debian 12's 6.1.0-57
        // does), so below 6.7 either answer can be right. What the probe says must hold: where
        // it says yes, the FIB lookup fills the source address (a SYN leaves from lb's bk0
        // address, not from 0.0.0.0, which would be dropped as "no SNAT address").
        if version >= (6, 7) {
            assert!(has, "kernel {version:?} has BPF_FIB_LOOKUP_SRC");
        }
        if has {
            let syn = client_syn(CLIENT_PORT, WRITE_PORT);
            let out = fx.from_client(&syn.bytes()?)?;
            assert_eq!(out.action, Action::Redirect);
            assert_eq!(daddr_of(&out.frame), DB01);
            assert_eq!(
                Ipv4Addr::new(out.frame[26], out.frame[27], out.frame[28], out.frame[29]),
                SNAT_ADDR
            );
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn without_fib_lookup_src_a_new_flow_takes_the_source_the_agent_resolved_for_its_backend(
) -> Result<()> {
    Fixture::run("routesrc", |fx| {
        // What the agent does on a kernel before 6.7 (its probe says so there; forced here):
        // db01's route source is lb's bk0 address, db02's resolved to an address that is not
        // lb's, db03 has none.
        fx.control
            .use_route_sources(&[(DB01, SNAT_ADDR), (DB02, Ipv4Addr::new(10, 0, 1, 99))])?;
        fx.control.write_config(&fx.cfg, false)?;
        let syn = client_syn(CLIENT_PORT, WRITE_PORT);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1)
            ])
        );
        // The read service alternates between db02 and db03: neither has a usable source.
        for (i, client_port) in [CLIENT_PORT + 1, CLIENT_PORT + 2].into_iter().enumerate() {
            assert_dropped(
                fx,
                &format!("read SYN {i} without a source address"),
                &client_syn(client_port, READ_PORT).bytes()?,
                fx.cl0.ifindex,
                &[(Counter::DropNoSnatAddr, 1), (Counter::FibResult0, 1)],
            )?;
        }
        assert_eq!(fx.embryonic()?.len(), 2, "only db01's flow");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn when_the_snat_ports_run_out_the_syn_is_answered_with_a_rst() -> Result<()> {
    let config = CONFIG.replace("10000-32767", "10000-10001");
    Fixture::run_with_config("snatfull", &config, |fx| {
        let (_, a) = open_write_flow(fx, 40000)?;
        let (_, b) = open_write_flow(fx, 40001)?;
        let mut ports = [a, b];
        ports.sort();
        assert_eq!(ports, [10000, 10001]);

        for (client_port, payload) in [(40002u16, &b""[..]), (40003, &b"early data"[..])] {
            let syn = client_syn(client_port, WRITE_PORT).with_payload(payload);
            let before = fx.counters()?;
            let out = fx.from_client(&syn.bytes()?)?;

            // The RST a TCP stack would answer the SYN with: addresses, ports and MACs swapped,
            // TTL 64, ID 0, DF, seq 0, ack = SEG.SEQ + SEG.LEN (SYN counts 1), RST|ACK, window
            // 0, no options and no payload: 54 bytes.
            let mut rst = TcpFrame::new(
                CL0_MAC,
                CLIENT_MAC,
                sa(VIP, WRITE_PORT),
                sa(CLIENT, client_port),
            )
            .with_flags(RST | ACK)
            .with_seq_ack(0, syn.seq + 1 + payload.len() as u32);
            rst.id = 0;
            rst.window = 0;
            let want = rst.bytes()?;
            assert_eq!(want.len(), 54);
            assert_bytes("output", &out, Action::Tx, &want);
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[
                    (Counter::RstSnatExhausted, 1),
                    (Counter::RstSent, 1),
                    (Counter::FibResult0, 1)
                ]),
                "SYN from {client_port}"
            );
        }
        assert_eq!(fx.embryonic()?.len(), 4, "only the two admitted flows");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn when_the_ports_run_out_a_half_open_handshake_older_than_250ms_gives_its_port_to_a_new_flow_and_the_backends_stale_answers_get_a_rst(
) -> Result<()> {
    let config = CONFIG.replace("10000-32767", "10000-10001");
    Fixture::run_with_config("halfopen", &config, |fx| {
        // A: the backend answered, the client never completes (a spoofed SYN). B: the backend
        // has not answered yet (it may be slow: B keeps its port).
        let (_, a_syn_ack, a_port) = handshake_until_syn_ack(fx, 40010)?;
        let (_, b_port) = open_write_flow(fx, 40011)?;
        let snat_exhausted = [
            (Counter::RstSnatExhausted, 1),
            (Counter::RstSent, 1),
            (Counter::FibResult0, 1),
        ];
        // Young: no port for a new flow.
        let syn = client_syn(40012, WRITE_PORT);
        assert_rst(
            fx,
            "SYN while both handshakes are young",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &snat_exhausted,
        )?;

        // 300 ms later (their entries aged by hand).
        let now = lb_user::gc::monotonic_now()?;
        for (k, mut f) in fx.embryonic()? {
            f.created_ns = now - 300_000_000;
            fx.put_embryonic(&k, &f)?;
        }
        // (Its own initial sequence number: the backend's stale answers below acknowledge A's.)
        let syn = client_syn(40013, WRITE_PORT).with_seq_ack(0x7300_0000, 0);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, a_port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1),
                (Counter::HalfOpenReclaimed, 1),
            ]),
            "the half-open handshake's port taken over"
        );
        // The backend still holds A's half-open handshake on that tuple: it answers the new SYN
        // with a duplicate ACK (of A's SYN), and may retransmit A's SYN-ACK. Neither reaches
        // the new client: each is answered with the RST that ends A's handshake at the backend
        // (the new client's SYN retransmit then opens a clean one).
        let stale_ack = backend_segment(DB01, DB01_MAC, a_port, ACK)
            .with_seq_ack(a_syn_ack.seq.wrapping_add(1), a_syn_ack.ack);
        let stale_syn_ack = a_syn_ack.clone();
        for (what, seg) in [
            ("the backend's duplicate ACK of A's SYN", &stale_ack),
            ("A's SYN-ACK, retransmitted", &stale_syn_ack),
        ] {
            assert_rst(
                fx,
                what,
                seg,
                fx.bk0.ifindex,
                &rst_answer(seg),
                &[(Counter::RstHandshakeStale, 1), (Counter::RstSent, 1)],
            )?;
        }
        // The new flow's own SYN-ACK passes.
        let syn_ack = backend_segment(DB01, DB01_MAC, a_port, SYN | ACK)
            .with_seq_ack(0x5100_0000, syn.seq.wrapping_add(1))
            .with_options(&frames::SYN_OPTIONS);
        let out = fx.from_backends(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&syn_ack, 40013, WRITE_PORT).bytes()?,
        );
        // The handshake the backend never answered keeps its port.
        let syn = client_syn(40014, WRITE_PORT);
        assert_rst(
            fx,
            "SYN with only B's port left",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &snat_exhausted,
        )?;
        let held: Vec<u16> = fx
            .embryonic()?
            .into_iter()
            .filter(|(_, f)| f.dir == DIR_REPLY)
            .map(|(k, _)| u16::from_be(k.dport))
            .collect();
        assert!(held.contains(&b_port) && held.contains(&a_port), "{held:?}");
        // A's late ACK finds no flow (its port belongs to the new one): refused, never
        // forwarded to the new flow's backend connection.
        let ack =
            client_segment(40010, ACK).with_seq_ack(a_syn_ack.ack, a_syn_ack.seq.wrapping_add(1));
        let out = fx.from_client(&ack.bytes()?)?;
        assert_bytes("output", &out, Action::Tx, &rst_answer(&ack).bytes()?);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn when_the_ports_run_out_a_handshake_the_backend_left_unanswered_for_over_a_second_gives_its_port_to_a_new_flow(
) -> Result<()> {
    // A backend that stops answering (its SYN queue full under a flood, or gone) must not let
    // unanswered handshakes hold every port for the connect timeout. The client retransmits
    // an unanswered SYN after its initial RTO (1 s): from then on the handshake may go.
    let config = CONFIG.replace("10000-32767", "10000-10001");
    Fixture::run_with_config("unanswered", &config, |fx| {
        // Neither handshake is answered; their ages are set by hand below.
        let (old_syn, old_port) = open_write_flow(fx, 40020)?;
        let (_, young_port) = open_write_flow(fx, 40021)?;
        let snat_exhausted = [
            (Counter::RstSnatExhausted, 1),
            (Counter::RstSent, 1),
            (Counter::FibResult0, 1),
        ];
        // Ages by hand: the old one 1.5 s, the young one none, so that it stays younger than
        // 1 s however slow the machine (an emulated VM) is until the SYN that follows.
        let age = |fx: &mut Fixture, ages: &[(u16, u64)]| -> Result<()> {
            let now = lb_user::gc::monotonic_now()?;
            for (k, mut f) in fx.embryonic()? {
                let port = u16::from_be(if f.dir == DIR_REPLY {
                    k.dport
                } else {
                    f.nat_sport
                });
                if let Some(&(_, ns)) = ages.iter().find(|(p, _)| *p == port) {
                    f.created_ns = now - ns;
                    fx.put_embryonic(&k, &f)?;
                }
            }
            Ok(())
        };
        age(fx, &[(old_port, 1_500_000_000), (young_port, 0)])?;
        // A new SYN takes the port of the one unanswered for 1.5 s, not the young one's.
        let syn = client_syn(40022, WRITE_PORT).with_seq_ack(0x7400_0000, 0);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, old_port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1),
                (Counter::UnansweredReclaimed, 1),
            ]),
            "the unanswered handshake's port taken over"
        );
        // The slow backend's late SYN-ACK of the old handshake never reaches the new client:
        // the RST ends that half-open connection at the backend.
        let late = backend_segment(DB01, DB01_MAC, old_port, SYN | ACK)
            .with_seq_ack(0x5000_0000, old_syn.seq.wrapping_add(1))
            .with_options(&frames::SYN_OPTIONS);
        assert_rst(
            fx,
            "the old handshake's late SYN-ACK",
            &late,
            fx.bk0.ifindex,
            &rst_answer(&late),
            &[(Counter::RstHandshakeStale, 1), (Counter::RstSent, 1)],
        )?;
        // The young one keeps its port: the next SYN finds none.
        age(fx, &[(young_port, 0)])?;
        let syn = client_syn(40023, WRITE_PORT);
        assert_rst(
            fx,
            "SYN with only the young unanswered handshake's port left",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &snat_exhausted,
        )?;
        let held: Vec<u16> = fx
            .embryonic()?
            .into_iter()
            .filter(|(_, f)| f.dir == DIR_REPLY)
            .map(|(k, _)| u16::from_be(k.dport))
            .collect();
        assert!(
            held.contains(&old_port) && held.contains(&young_port),
            "{held:?}"
        );
        // The new flow's own SYN-ACK passes.
        let syn_ack = backend_segment(DB01, DB01_MAC, old_port, SYN | ACK)
            .with_seq_ack(0x5100_0000, 0x7400_0001)
            .with_options(&frames::SYN_OPTIONS);
        let out = fx.from_backends(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&syn_ack, 40022, WRITE_PORT).bytes()?,
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_agent_reads_handshake_records_in_place_and_skips_a_slot_being_written() -> Result<()> {
    // The GC reads the handshake table every pass: mapped into the agent, not copied slot by
    // slot through a syscall. It must see exactly the records a map read sees, and, like the
    // data path, no record whose slot is being written.
    Fixture::run("inplace", |fx| {
        let table = lb_user::handshakes::Handshakes::of(&fx.ebpf)?;
        assert!(
            table.in_place(),
            "CT_EMBRYONIC is not mapped into the agent"
        );
        let mut ports = Vec::new();
        for client_port in [40040, 40041, 40042] {
            ports.push(open_write_flow(fx, client_port)?.1);
        }
        let records = table.records()?;
        assert_eq!(records.len(), 3, "{records:?}");
        for (key, hs) in &records {
            assert!(ports.contains(&u16::from_be(key.dport)), "{key:?}");
            let (_, slot) = fx.handshake_slot(key)?;
            assert!(slot.holds_key(key), "{key:?}");
            assert_eq!(
                slot.hs, *hs,
                "the record read in place differs from the map's"
            );
        }
        // One slot with its writing bit set, as a claim in progress leaves it.
        let (key, _) = records[0];
        let (i, slot) = fx.handshake_slot(&key)?;
        let mut writing = slot;
        writing.ctrl |= lb_common::HANDSHAKE_WRITING;
        fx.put_handshake_slot(i, writing)?;
        let left: Vec<FlowKey> = table.records()?.into_iter().map(|(k, _)| k).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(!left.contains(&key));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_handshake_stamped_ahead_of_the_data_paths_clock_is_young_not_expired() -> Result<()> {
    // The data path's clock is the coarse one (the last tick's time); a stamp taken with a
    // finer clock, or on another CPU a moment later, can be ahead of its `now`. Such a stamp
    // must read as age 0: an age that wraps to a huge one would expire a live handshake (its
    // SYN-ACK refused) and free its slot (its port given to another flow).
    let config = CONFIG.replace("10000-32767", "10000-10000");
    Fixture::run_with_config("ahead", &config, |fx| {
        let (syn, port) = open_write_flow(fx, 40030)?;
        let ahead = lb_user::gc::monotonic_now()? + 500_000_000;
        for (k, mut f) in fx.embryonic()? {
            f.created_ns = ahead;
            fx.put_embryonic(&k, &f)?;
        }
        // The only port stays taken.
        let other = client_syn(40031, WRITE_PORT);
        assert_rst(
            fx,
            "SYN while the only port's handshake is stamped ahead",
            &other,
            fx.cl0.ifindex,
            &rst_answer(&other),
            &[
                (Counter::RstSnatExhausted, 1),
                (Counter::RstSent, 1),
                (Counter::FibResult0, 1),
            ],
        )?;
        // And the handshake goes on.
        let syn_ack = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn.seq.wrapping_add(1))
            .with_options(&frames::SYN_OPTIONS);
        let out = fx.from_backends(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&syn_ack, 40030, WRITE_PORT).bytes()?,
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_handshake_slot_shared_by_two_ports_is_kept_by_a_live_handshake_and_given_up_by_an_expired_one(
) -> Result<()> {
    // Two SNAT ports, and a handshake table of one slot: both ports' reply keys share it. (A
    // connect timeout of 2 s: a VM's clock may have started less than 30 s ago.)
    let config = format!(
        "{}[tables]\nembryonic = 1\n",
        CONFIG
            .replace("10000-32767", "10000-10001")
            .replace("connect = \"30s\"", "connect = \"2s\"")
    );
    Fixture::run_with_config("hsslot", &config, |fx| {
        let snat_exhausted = [
            (Counter::RstSnatExhausted, 1),
            (Counter::RstSent, 1),
            (Counter::FibResult0, 1),
        ];
        open_write_flow(fx, 40020)?;
        // A live handshake holds the slot: neither port can be claimed, although no flow holds
        // the other one (its key's slot is taken).
        let syn = client_syn(40021, WRITE_PORT);
        assert_rst(
            fx,
            "SYN while the slot holds a live handshake",
            &syn,
            fx.cl0.ifindex,
            &rst_answer(&syn),
            &snat_exhausted,
        )?;
        assert_eq!(fx.handshakes()?.len(), 1);

        // The handshake older than the connect timeout (aged by hand: the slot's word says when
        // it was claimed): the next SYN claims the slot, on either port, with no GC pass.
        let now = lb_user::gc::monotonic_now()?;
        let (k, mut old) = fx.handshakes()?.remove(0);
        old.rev.created_ns = now - 3_000_000_000;
        fx.put_embryonic(&k, &old.rev)?;
        let syn = client_syn(40022, WRITE_PORT);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        assert!(port == 10000 || port == 10001, "SNAT port {port}");
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port).bytes()?,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::FwdPackets, 1),
                (Counter::NewFlows, 1),
                (Counter::FibResult0, 1),
            ]),
            "an expired handshake's slot is free: nothing is evicted"
        );
        let records = fx.handshakes()?;
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(
            records[0].1.fwd_key(),
            flow_key(sa(CLIENT, 40022), sa(VIP, WRITE_PORT))
        );
        // The expired handshake's late ACK finds no flow, whichever port the new one took.
        let ack = client_segment(40020, ACK);
        let out = fx.from_client(&ack.bytes()?)?;
        assert_bytes("output", &out, Action::Tx, &rst_answer(&ack).bytes()?);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_handshake_slot_being_written_is_invisible_to_lookups_and_taken_for_claims() -> Result<()> {
    let config = format!(
        "{}[tables]\nembryonic = 1\n",
        CONFIG.replace("10000-32767", "10000-10001")
    );
    Fixture::run_with_config("hswriting", &config, |fx| {
        let (syn, port) = open_write_flow(fx, 40030)?;
        let key = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        let (i, slot) = fx.handshake_slot(&key)?;
        assert!(slot.holds_key(&key), "the claim left a complete record");
        // Another CPU's claim in progress: the word's writing bit set.
        let mut writing = slot;
        writing.ctrl |= lb_common::HANDSHAKE_WRITING;
        fx.put_handshake_slot(i, writing)?;
        let syn_ack = backend_segment(DB01, DB01_MAC, port, SYN | ACK)
            .with_seq_ack(0x5000_0000, syn.seq.wrapping_add(1));
        assert_rst(
            fx,
            "SYN-ACK while its record is being written",
            &syn_ack,
            fx.bk0.ifindex,
            &rst_answer(&syn_ack),
            &[(Counter::RstNoFlow, 1), (Counter::RstSent, 1)],
        )?;
        let other = client_syn(40031, WRITE_PORT);
        assert_rst(
            fx,
            "SYN while the only slot is being written",
            &other,
            fx.cl0.ifindex,
            &rst_answer(&other),
            &[
                (Counter::RstSnatExhausted, 1),
                (Counter::RstSent, 1),
                (Counter::FibResult0, 1),
            ],
        )?;
        // Written: the record is found again.
        fx.put_handshake_slot(i, slot)?;
        let out = fx.from_backends(&syn_ack.bytes()?)?;
        assert_bytes(
            "output",
            &out,
            Action::Redirect,
            &to_client(&syn_ack, 40030, WRITE_PORT).bytes()?,
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn with_90_percent_of_the_snat_ports_taken_every_new_flow_finds_a_free_one_through_the_port_hints(
) -> Result<()> {
    Fixture::run("porthints", |fx| {
        // Every port to db01 but each tenth held by an idle flow, and the hints rewritten from
        // the table as the agent's GC pass does. Before the hints, the random search found no
        // free port in its tries for about 1 SYN in 20 here, and probed ten ports on average.
        let (lo, hi) = SNAT_PORTS;
        fx.occupy_snat_ports((lo..=hi).filter(|p| p % 10 != 0))?;
        fx.rewrite_port_hints()?;
        let before = fx.counters()?;
        let mut ports = std::collections::HashSet::new();
        for i in 0..1000u16 {
            let (_, port) = open_write_flow(fx, 20_000 + i)?;
            assert_eq!(port % 10, 0, "SYN {i}: a port the table says is free");
            assert!(ports.insert(port), "SYN {i}: port {port} given twice");
        }
        assert_eq!(
            fx.counters()?.get(Counter::RstSnatExhausted) - before.get(Counter::RstSnatExhausted),
            0,
            "none refused"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn stale_port_hints_never_refuse_a_new_flow() -> Result<()> {
    Fixture::run("stalehints", |fx| {
        // Hints that say every port is taken while the tables are empty (a GC that has not run
        // since flows ended): the search falls back to probing ports, and finds them free.
        fx.set_port_hints(
            0,
            lb_common::PortHints {
                words: [u64::MAX; lb_common::PORT_HINT_WORDS as usize],
            },
        )?;
        for i in 0..100u16 {
            open_write_flow(fx, 21_000 + i)?;
        }
        // The next pass rewrites them from the tables: 100 ports held, the rest free again.
        fx.rewrite_port_hints()?;
        let held: u32 = fx.port_hints(0)?.words.iter().map(|w| w.count_ones()).sum();
        assert_eq!(held, 100, "one bit per flow's port");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_flow_sets_its_ports_bit_when_it_is_established_even_if_the_bit_was_cleared_since_its_syn(
) -> Result<()> {
    Fixture::run("estbit", |fx| {
        // A port search tests a port whose bit is clear in the handshake table only: every
        // established flow's port must have its bit set. The SYN's claim sets it; a GC pass
        // may clear it while the handshake is in flight (the handshake's slot still guards the
        // port then); the handshake's ACK sets it again, before the slot is freed.
        let mut c = Conn::handshake(fx, 44_100, WRITE_PORT)?;
        assert!(fx.port_hinted(0, c.port)?, "the SYN's claim set the bit");
        fx.set_port_hints(0, lb_common::PortHints::default())?;
        c.client_sends(fx, "handshake ACK", ACK, b"")?;
        assert!(
            fx.port_hinted(0, c.port)?,
            "the ACK that established it set the bit"
        );
        assert!(
            fx.handshakes()?.is_empty(),
            "and its slot is free: the bit alone keeps the port from new flows"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_backend_segment_on_a_port_with_a_clear_bit_finds_its_handshake_and_a_flow_established_since(
) -> Result<()> {
    Fixture::run("replybit", |fx| {
        // A backend's segment to a port whose bit is clear reads the handshake table first
        // (no established flow held the port when the bit was read), then the established
        // table: both kinds of flow are found whatever the bit says.
        let mut h = Conn::syn(fx, 44_400, WRITE_PORT)?;
        let mut e = Conn::establish(fx, 44_401, WRITE_PORT)?;
        // Both bits clear: the handshake's (a GC pass may clear it while the handshake's slot
        // guards the port) and the flow's (the GC's window between clearing a bit and looking
        // its port up again).
        fx.set_port_hints(0, lb_common::PortHints::default())?;
        let before = fx.counters()?;
        h.backend_sends(fx, "SYN-ACK to the clear bit", SYN | ACK, b"")?;
        e.backend_sends(fx, "data of the established flow", PSH | ACK, b"OK")?;
        h.client_sends(fx, "handshake ACK", ACK, b"")?;
        h.backend_sends(fx, "data after the handshake", PSH | ACK, b"HI")?;
        e.client_sends(fx, "the client's answer", PSH | ACK, b"RUN")?;
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::ReplyPackets, 3),
                (Counter::FwdPackets, 2),
                (Counter::Established, 1)
            ])
        );
        // And a segment to a port no flow holds is still refused.
        let free = (SNAT_PORTS.0..)
            .find(|p| ![h.port, e.port].contains(p))
            .unwrap();
        let stray = backend_segment(DB01, DB01_MAC, free, ACK).bytes()?;
        let out = fx.from_backends(&stray)?;
        assert_eq!(out.action, Action::Tx, "a RST for a segment of no flow");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// ICMP errors
// ---------------------------------------------------------------------------------------------

const FRAG_NEEDED: (u8, u8) = (3, 4);
const MTU_1400: [u8; 4] = [0, 0, 0x05, 0x78];

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn frag_needed_about_a_forwarded_packet_is_translated_to_the_client() -> Result<()> {
    Fixture::run("icmpfwd", |fx| {
        let (syn, port) = open_write_flow(fx, CLIENT_PORT)?;
        // The packet the router refused, as the balancer sent it, and as the client sent it.
        let sent = to_backend(&syn, DB01, DB01_MAC, port);
        let original = sent
            .clone()
            .translated(sa(CLIENT, CLIENT_PORT), sa(VIP, WRITE_PORT));
        assert_eq!(original.tcp_checksum()?, syn.tcp_checksum()?);
        let (sent_ip, original_ip) = (sent.ip_bytes()?, original.ip_bytes()?);

        // Quoting the IP header + 8 bytes (RFC 792), then the whole TCP header (RFC 1812).
        for quote_len in [28usize, 40] {
            let icmp = frames::icmp_error(
                ROUTER_MAC,
                BK0_MAC,
                ROUTER,
                SNAT_ADDR,
                64,
                FRAG_NEEDED.0,
                FRAG_NEEDED.1,
                MTU_1400,
                &sent_ip[..quote_len],
            )?;
            // Outer: to the client over cl0, source (the router) kept, TTL - 1; inner: the
            // client's own packet again (addresses, ports, IP checksum and, when quoted, the TCP
            // checksum); ICMP checksum valid.
            let want = frames::icmp_error(
                CL0_MAC,
                CLIENT_MAC,
                ROUTER,
                CLIENT,
                63,
                FRAG_NEEDED.0,
                FRAG_NEEDED.1,
                MTU_1400,
                &original_ip[..quote_len],
            )?;
            let before = fx.counters()?;
            let out = fx.from_backends(&icmp)?;
            assert_bytes("output", &out, Action::Redirect, &want);
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[(Counter::IcmpTranslated, 1)]),
                "quote of {quote_len} bytes"
            );
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn time_exceeded_about_a_reply_is_translated_to_the_backend() -> Result<()> {
    Fixture::run("icmprev", |fx| {
        let (_, syn_ack, port) = handshake_until_syn_ack(fx, CLIENT_PORT)?;
        let sent = to_client(&syn_ack, CLIENT_PORT, WRITE_PORT);
        let original = sent
            .clone()
            .translated(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
        let client_router = Ipv4Addr::new(198, 18, 0, 254);
        let router_mac = [0x02, 0, 0, 0, 0, 0xfe];
        let icmp = frames::icmp_error(
            router_mac,
            CL0_MAC,
            client_router,
            VIP,
            64,
            11,
            0,
            [0; 4],
            &sent.ip_bytes()?[..40],
        )?;
        let want = frames::icmp_error(
            BK0_MAC,
            DB01_MAC,
            client_router,
            DB01,
            63,
            11,
            0,
            [0; 4],
            &original.ip_bytes()?[..40],
        )?;
        let before = fx.counters()?;
        let out = fx.from_client(&icmp)?;
        assert_bytes("output", &out, Action::Redirect, &want);
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::IcmpTranslated, 1)])
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn icmp_errors_about_balancer_tuples_without_a_flow_are_dropped() -> Result<()> {
    Fixture::run("icmpnoflow", |fx| {
        // About a "reply" VIP:7680 -> client that belongs to no flow.
        let reply = TcpFrame::new(CL0_MAC, CLIENT_MAC, sa(VIP, WRITE_PORT), sa(CLIENT, 40001))
            .with_flags(ACK);
        let icmp = frames::icmp_error(
            CLIENT_MAC,
            CL0_MAC,
            CLIENT,
            VIP,
            64,
            3,
            3,
            [0; 4],
            &reply.ip_bytes()?[..28],
        )?;
        assert_dropped(
            fx,
            "port unreachable about VIP:7680 -> client",
            &icmp,
            fx.cl0.ifindex,
            &[(Counter::DropIcmpNoFlow, 1)],
        )?;
        // About a "forwarded" SNAT:15000 -> db01:7687 that belongs to no flow.
        let fwd = TcpFrame::new(
            BK0_MAC,
            DB01_MAC,
            sa(SNAT_ADDR, 15000),
            sa(DB01, BACKEND_PORT),
        )
        .with_flags(ACK);
        let icmp = frames::icmp_error(
            ROUTER_MAC,
            BK0_MAC,
            ROUTER,
            SNAT_ADDR,
            64,
            FRAG_NEEDED.0,
            FRAG_NEEDED.1,
            MTU_1400,
            &fwd.ip_bytes()?[..28],
        )?;
        assert_dropped(
            fx,
            "frag needed about SNAT:15000 -> db01:7687",
            &icmp,
            fx.bk0.ifindex,
            &[(Counter::DropIcmpNoFlow, 1)],
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn icmp_errors_about_host_traffic_pass_byte_for_byte() -> Result<()> {
    Fixture::run("icmphost", |fx| {
        // A flow exists, to make sure the lookups have something to (not) find.
        open_write_flow(fx, CLIENT_PORT)?;
        let host_tcp =
            TcpFrame::new(BK0_MAC, DB01_MAC, sa(SNAT_ADDR, 45000), sa(DB01, 22)).with_flags(SYN);
        let host_to_backend_port_outside_range = TcpFrame::new(
            BK0_MAC,
            DB01_MAC,
            sa(SNAT_ADDR, 45000),
            sa(DB01, BACKEND_PORT),
        )
        .with_flags(SYN);
        let host_udp = frames::udp(BK0_MAC, DB01_MAC, sa(SNAT_ADDR, 33000), sa(DB01, 53), b"q")?;
        let cases = [
            ("host ssh to db01", host_tcp.ip_bytes()?[..28].to_vec()),
            (
                "host TCP from a non-SNAT port to db01:7687",
                host_to_backend_port_outside_range.ip_bytes()?[..28].to_vec(),
            ),
            ("host UDP", host_udp[14..14 + 28].to_vec()),
        ];
        for (what, quote) in cases {
            for (ty, code) in [(3u8, 3u8), (3, 4), (11, 0)] {
                let icmp = frames::icmp_error(
                    DB01_MAC, BK0_MAC, DB01, SNAT_ADDR, 64, ty, code, [0; 4], &quote,
                )?;
                assert_passes_untouched(
                    fx,
                    &format!("ICMP {ty}/{code} about {what}"),
                    &icmp,
                    fx.bk0.ifindex,
                )?;
            }
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_cpu_takes_a_backends_free_ports_in_order_from_its_cursor() -> Result<()> {
    Fixture::run("portcursor", |fx| {
        // The cursor is per CPU.
        pin_to_one_cpu()?;
        let (min, max) = SNAT_PORTS;
        let syn =
            |fx: &Fixture, client_port| Conn::syn(fx, client_port, WRITE_PORT).map(|c| c.port);
        // A CPU with no cursor yet starts at a fixed offset (`u32::MAX` modulo the range), then
        // takes the ports after it.
        let range = u32::from(max - min) + 1;
        let first = syn(fx, 45_000)?;
        assert_eq!(first, min + (u32::MAX % range) as u16, "the first new flow");
        assert_eq!(syn(fx, 45_001)?, first + 1, "the next one");
        assert_eq!(syn(fx, 45_002)?, first + 2);
        // Ports whose bits are set are skipped (held by established flows, `hints`' rule).
        fx.hint_ports(0, [first + 3, first + 4])?;
        assert_eq!(syn(fx, 45_003)?, first + 5, "past two held ports");
        // Past a word with no port free: the next word's first free port.
        let next_word = min + ((first + 6 - min) / 64 + 1) * 64;
        fx.hint_ports(0, first + 6..=next_word)?;
        assert_eq!(
            syn(fx, 45_004)?,
            next_word + 1,
            "the next word, past its held first port"
        );
        assert_eq!(fx.handshakes()?.len(), 5, "five handshakes, none lost");
        Ok(())
    })
}
