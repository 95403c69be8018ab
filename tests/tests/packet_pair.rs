//! A pair's flow sync at the packet level (issue 15, first part): the active's data path reports
//! each flow it establishes (`FLOW_SYNC`, only in a pair), and a standby that installs the
//! reported flow (`lb_user::pair`, through the wire encoding) forwards the flow's next segments
//! both ways exactly as the active did.
//!
//! Also `snat_address`, the pair's floating source address: new flows take it instead of the
//! route's, and replies to it are translated.
//!
//! Same fixture as `packet.rs`: client 198.18.0.2 behind `cl0`, db01 10.0.1.10 behind `bk0`
//! (10.0.1.1, the SNAT address); VIP 198.18.0.10:7680 "write" -> db01:7687.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use lb_tests::fixture::frames::{self, TcpFrame, ACK, PSH, SYN};
use lb_tests::fixture::*;
use lb_user::pair::{self, stream::Op, SyncedFlow};

/// The fixture's configuration as one node of a pair.
fn paired() -> String {
    format!("{CONFIG}\n[pair]\npeer = \"127.0.0.1:7690\"\n")
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn each_flow_established_in_a_pair_is_reported_once_with_its_entries() -> Result<()> {
    Fixture::run_with_config("pairreport", &paired(), |fx| {
        let mut c = Conn::handshake(fx, 40100, WRITE_PORT)?;
        assert!(
            fx.synced_flows()?.is_empty(),
            "a handshake in progress is not reported"
        );
        c.client_sends(fx, "handshake ACK", ACK, b"")?;
        let (fwd, rev) = c.entries(fx)?;
        let reported = fx.synced_flows()?;
        assert_eq!(reported.len(), 1, "one record for the established flow");
        let r = reported[0];
        assert_eq!(r.fwd_key, c.fwd_key());
        assert_eq!(
            (r.fwd, r.rev),
            (fwd, rev),
            "the record holds both entries as they went into the table"
        );
        c.client_sends(fx, "data", PSH | ACK, b"hello")?;
        c.backend_sends(fx, "answer", PSH | ACK, b"world")?;
        assert!(
            fx.synced_flows()?.is_empty(),
            "segments of an established flow report nothing more"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn outside_a_pair_nothing_is_reported() -> Result<()> {
    Fixture::run("pairnone", |fx| {
        let mut c = Conn::establish(fx, 40101, WRITE_PORT)?;
        c.client_sends(fx, "data", PSH | ACK, b"hello")?;
        assert!(fx.synced_flows()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_standby_that_installed_the_reported_flow_forwards_its_next_segments_as_the_active(
) -> Result<()> {
    Fixture::run_with_config("pairinstall", &paired(), |fx| {
        let mut c = Conn::establish(fx, 40102, WRITE_PORT)?;
        c.client_sends(fx, "data on the active", PSH | ACK, b"BEGIN")?;
        c.backend_sends(fx, "answer on the active", PSH | ACK, b"SUCCESS")?;
        let [r] = fx.synced_flows()?[..] else {
            panic!("one reported flow");
        };
        let ifindexes = [fx.cl0.ifindex, fx.bk0.ifindex];
        let flow = pair::export(&r, lb_user::gc::monotonic_now()?, &ifindexes)?;
        let mut wire = Vec::new();
        flow.encode(&mut wire);
        let flow = SyncedFlow::decode(&wire)?;

        // A standby without the flow: the tables lose it, and the client's next segment meets
        // no flow (answered with a RST).
        fx.remove_established(&c.fwd_key())?;
        fx.remove_established(&c.rev_key())?;
        let orphan = fx.from_client(&c.client(PSH | ACK, b"RUN").bytes()?)?;
        assert_eq!(orphan.action, Action::Tx, "no flow: refused with a RST");

        fx.install_synced(&flow)?;
        c.assert_established(fx, true);
        // The segments after the takeover, sequence numbers past what the record says.
        c.client_sends(fx, "data after the install", PSH | ACK, b"RUN")?;
        c.backend_sends(fx, "answer after the install", PSH | ACK, b"RECORD")?;
        c.assert_alive(fx, "after the install")?;
        Ok(())
    })
}

/// A standby applies what one read of the stream brought in one go: installs and ends in
/// their order, with one write per run of installs. A flow ended in the same batch is gone;
/// an end of a flow it never had and a flow naming an interface it lacks fail alone.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_standby_applies_a_batch_of_installs_and_ends_in_order() -> Result<()> {
    Fixture::run_with_config("pairbatch", &paired(), |fx| {
        let mut conns = Vec::new();
        for port in [40201, 40202, 40203] {
            let mut c = Conn::establish(fx, port, WRITE_PORT)?;
            c.client_sends(fx, "data on the active", PSH | ACK, b"BEGIN")?;
            conns.push(c);
        }
        let ifindexes = [fx.cl0.ifindex, fx.bk0.ifindex];
        let now = lb_user::gc::monotonic_now()?;
        let mut flows = Vec::new();
        let reported = fx.synced_flows()?;
        for c in &conns {
            let r = *reported
                .iter()
                .find(|r| r.fwd_key == c.fwd_key())
                .context("each flow reported")?;
            flows.push(pair::export(&r, now, &ifindexes)?);
            // The standby does not have it yet.
            fx.remove_established(&c.fwd_key())?;
            fx.remove_established(&c.rev_key())?;
        }
        // Nor their ports' bits (the active's data path set them in this fixture's bitmap).
        fx.set_port_hints(0, lb_common::PortHints::default())?;
        let [a, b, c] = [flows[0], flows[1], flows[2]];
        let stranger = SyncedFlow {
            client: "198.18.0.99:999".parse()?,
            ..a
        };
        let elsewhere = SyncedFlow {
            backend_iface: 7,
            client: "198.18.0.98:998".parse()?,
            ..a
        };
        let install = |flow| Op::Install {
            flow,
            replace: false,
        };
        let end = |f: SyncedFlow| Op::End {
            client: f.client,
            vip: f.vip,
        };
        let out = fx.apply_synced(&[
            install(a),
            install(b),
            end(stranger),
            install(elsewhere),
            install(c),
            end(b),
        ])?;
        let ok: Vec<bool> = out.iter().map(|r| r.is_ok()).collect();
        assert_eq!(ok, [true, true, true, false, true, true], "{out:?}");
        let e = out[3].as_ref().unwrap_err().to_string();
        assert!(e.contains("interface #7"), "{e}");

        conns[0].assert_established(fx, true);
        conns[2].assert_established(fx, true);
        conns[1].assert_established(fx, false);
        // An installed flow's port has its bit set: once this node serves, a new flow's port
        // search (which trusts a clear bit) must not take it.
        for i in [0, 2] {
            assert!(
                fx.port_hinted(0, conns[i].port)?,
                "installed flow {i}: its SNAT port's bit"
            );
        }
        let keys: Vec<_> = fx.established()?.into_iter().map(|(k, _)| k).collect();
        assert!(
            !keys.contains(&conns[1].rev_key()),
            "b's reply entry went too"
        );
        for i in [0, 2] {
            let c = &mut conns[i];
            c.client_sends(
                fx,
                &format!("data after the install ({i})"),
                PSH | ACK,
                b"RUN",
            )?;
            c.backend_sends(
                fx,
                &format!("answer after the install ({i})"),
                PSH | ACK,
                b"OK",
            )?;
        }
        Ok(())
    })
}

/// Under `maxconn`, a standby takes a slot for each synced flow it installs and gives it
/// back when the flow's end comes: after a takeover its counts hold the flows it carries, so
/// the limit still holds; an update of a flow it has takes none twice.
#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_standby_counts_the_synced_flows_against_maxconn() -> Result<()> {
    let cfg = paired().replace("instance = \"pkt\"\n", "instance = \"pkt\"\nmaxconn = 3\n");
    Fixture::run_with_config("pairslots", &cfg, |fx| {
        let global = |fx: &Fixture| -> Result<u64> {
            let map = fx
                .ebpf
                .map(lb_common::names::MAXCONN_ACTIVE)
                .context("MAXCONN_ACTIVE")?;
            Ok(aya::maps::Array::<_, u64>::try_from(map)?.get(&lb_common::MAXCONN_GLOBAL, 0)?)
        };
        let mut conns = Vec::new();
        for port in [40401, 40402] {
            conns.push(Conn::establish(fx, port, WRITE_PORT)?);
        }
        assert_eq!(global(fx)?, 2, "the active's own two flows");
        let ifindexes = [fx.cl0.ifindex, fx.bk0.ifindex];
        let now = lb_user::gc::monotonic_now()?;
        let reported = fx.synced_flows()?;
        let mut flows = Vec::new();
        for c in &conns {
            let r = reported
                .iter()
                .find(|r| r.fwd_key == c.fwd_key())
                .context("each flow reported")?;
            flows.push(pair::export(r, now, &ifindexes)?);
        }
        // This node as the standby, which has neither flow nor slot yet: the flows end here
        // without their slots' release being seen (the active's own), so start from zero.
        for c in &conns {
            fx.remove_established(&c.fwd_key())?;
            fx.remove_established(&c.rev_key())?;
            let release = lb_user::gc::release_program(&fx.ebpf).context("lb_release")?;
            lb_user::gc::release_slot(release, &c.fwd_key())?;
        }
        assert_eq!(global(fx)?, 0);

        let install = |flow| Op::Install {
            flow,
            replace: false,
        };
        let out = fx.apply_synced(&[install(flows[0]), install(flows[1])])?;
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        assert_eq!(global(fx)?, 2, "a slot for each synced flow");
        // A refresh of a flow it has takes no second slot.
        fx.apply_synced(&[Op::Install {
            flow: flows[0],
            replace: true,
        }])?;
        assert_eq!(global(fx)?, 2);
        // The limit holds for new flows: one more fits, the fourth is refused.
        Conn::establish(fx, 40403, WRITE_PORT)?;
        assert_eq!(global(fx)?, 3);
        let syn =
            frames::TcpFrame::syn(CLIENT_MAC, CL0_MAC, sa(CLIENT, 40404), sa(VIP, WRITE_PORT));
        assert_eq!(
            fx.from_client(&syn.bytes()?)?.action,
            Action::Drop,
            "over maxconn"
        );
        // An end gives the slot back.
        fx.apply_synced(&[Op::End {
            client: flows[1].client,
            vip: flows[1].vip,
        }])?;
        assert_eq!(global(fx)?, 2);
        Ok(())
    })
}

/// A floating SNAT address on the backends' segment, not on any interface of the fixture.
const FLOATING: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn with_snat_address_new_flows_leave_from_it_and_replies_to_it_come_back() -> Result<()> {
    let config = CONFIG.replace(
        "instance = ",
        &format!("snat_address = \"{FLOATING}\"\ninstance = "),
    );
    assert_ne!(config, CONFIG, "the fixture config names its instance");
    Fixture::run_with_config("pairsnat", &config, |fx| {
        let syn = client_syn(40200, WRITE_PORT);
        let out = fx.from_client(&syn.bytes()?)?;
        let port = sport_of(&out.frame);
        assert_frame(
            "SYN to db01 from the configured address",
            &out,
            Action::Redirect,
            &syn.clone()
                .forwarded(BK0_MAC, DB01_MAC)
                .translated(sa(FLOATING, port), sa(DB01, BACKEND_PORT)),
        )?;
        let syn_ack = TcpFrame::new(
            DB01_MAC,
            BK0_MAC,
            sa(DB01, BACKEND_PORT),
            sa(FLOATING, port),
        )
        .with_flags(SYN | ACK)
        .with_seq_ack(0x5000_0000, syn.seq.wrapping_add(1));
        let back = fx.from_backends(&syn_ack.bytes()?)?;
        assert_frame(
            "SYN-ACK back to the client",
            &back,
            Action::Redirect,
            &syn_ack
                .clone()
                .forwarded(CL0_MAC, CLIENT_MAC)
                .translated(sa(VIP, WRITE_PORT), sa(CLIENT, 40200)),
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn in_a_pair_a_frame_flooded_to_this_node_for_the_other_passes_untouched() -> Result<()> {
    Fixture::run_with_config("pairflood", &paired(), |fx| {
        let other = [0x02, 0xee, 0, 0, 0, 0x01];
        // A client SYN and a backend reply, both addressed to the other node's MAC.
        let syn = TcpFrame::syn(CLIENT_MAC, other, sa(CLIENT, 40300), sa(VIP, WRITE_PORT));
        let reply = TcpFrame::new(
            DB01_MAC,
            other,
            sa(DB01, BACKEND_PORT),
            sa(SNAT_ADDR, 12345),
        )
        .with_flags(ACK);
        let before = fx.counters()?;
        for frame in [syn.bytes()?, reply.bytes()?] {
            let out = fx.test_run(&frame, fx.cl0.ifindex)?;
            assert_bytes("a frame for the other node", &out, Action::Pass, &frame);
        }
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(lb_common::Counter::PassOtherHost, 2)])
        );
        assert!(
            fx.embryonic()?.is_empty(),
            "no flow for a frame meant for the other node"
        );
        // The same SYN addressed to this node is balanced.
        Conn::syn(fx, 40300, WRITE_PORT)?;

        // An ICMP error about an established flow, flooded too: the other node translates it.
        let c = Conn::establish(fx, 40301, WRITE_PORT)?;
        // A reply lb sent to the client, which a router on the way could not deliver.
        let sent = c.to_client(&c.backend(PSH | ACK, b"SUCCESS"));
        let router = Ipv4Addr::new(198, 18, 0, 254);
        let icmp = frames::icmp_error(
            [0x02, 0, 0, 0, 0, 0xfe],
            other,
            router,
            VIP,
            64,
            11,
            0,
            [0; 4],
            &sent.ip_bytes()?[..40],
        )?;
        let before = fx.counters()?;
        let out = fx.test_run(&icmp, fx.cl0.ifindex)?;
        assert_bytes(
            "an ICMP error for the other node",
            &out,
            Action::Pass,
            &icmp,
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(lb_common::Counter::PassOtherHost, 1)])
        );
        Ok(())
    })
}
