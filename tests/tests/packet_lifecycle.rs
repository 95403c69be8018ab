//! Connection-table lifecycle through `BPF_PROG_TEST_RUN`: FIN and RST are recorded, never
//! acted on at once (half-close, last ACK, retransmitted FIN, spoofed RST), a SYN on a closing
//! tuple starts a new flow while one on an established tuple keeps the mapping; and the agent's
//! GC (`lb_user::gc`, called directly with a chosen clock) deletes closed, idle and expired
//! embryonic flows and nothing else.
//!
//! Same fixture as `packet.rs`: client 198.18.0.2 behind `cl0`, db01 10.0.1.10 behind `bk0`
//! (10.0.1.1, the SNAT address); VIP 198.18.0.10:7680 "write" -> db01:7687. Connect timeout
//! 30 s (fixture), idle 2 h and close 10 s (defaults) unless a test says otherwise.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use aya::maps::HashMap;
use lb_common::{
    is_closing, names, Counter, Flow, FlowKey, FLOW_CLOSE_FIN, FLOW_CLOSE_RST, FLOW_ESTABLISHED,
};
use lb_tests::fixture::frames::{TcpFrame, ACK, FIN, PSH, RST, SYN};
use lb_tests::fixture::*;
use lb_user::gc::{monotonic_now, Gc, SweepStats, Timeouts};

const SEC: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers (the frame conventions of packet.rs)
// ---------------------------------------------------------------------------------------------

fn default_timeouts(fx: &Fixture) -> Timeouts {
    Timeouts::from_config(&fx.cfg)
}

// ---------------------------------------------------------------------------------------------
// TCP state in the data path
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_half_closed_connection_keeps_translating_both_ways() -> Result<()> {
    Fixture::run("halfclose", |fx| {
        let mut c = Conn::establish(fx, 40000, WRITE_PORT)?;
        c.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (FLOW_CLOSE_FIN, 0), "FIN recorded");
        assert!(!is_closing(&f, &r), "one FIN is a half-close, not a close");

        // The backend keeps sending (e.g. a long result after the client's shutdown(WR)).
        for i in 0..3 {
            c.backend_sends(fx, &format!("backend data #{i}"), PSH | ACK, b"RECORD")?;
            c.client_sends(fx, &format!("client ACK #{i}"), ACK, b"")?;
        }
        assert!(!c.closing(fx)?);
        // Each entry counts the payload of its direction (the connection log's bytes).
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.bytes, r.bytes), (0, 18), "payload bytes in, out");
        assert!(fx.embryonic()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn fins_both_ways_mark_the_flow_closing_and_a_retransmitted_fin_translates() -> Result<()> {
    Fixture::run("finfin", |fx| {
        let mut c = Conn::establish(fx, 40001, WRITE_PORT)?;
        c.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        let before = fx.counters()?;
        c.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (FLOW_CLOSE_FIN, FLOW_CLOSE_FIN));
        assert!(is_closing(&f, &r), "FINs both ways: closing");

        // The backend's FIN, retransmitted (the client's ACK of it is late): same bytes as
        // before, translated.
        c.backend_seq -= 1;
        c.backend_sends(fx, "retransmitted backend FIN", FIN | ACK, b"")?;
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::ReplyPackets, 2)]),
            "translated, nothing deleted, refused or reset"
        );
        assert!(c.closing(fx)?, "still closing, still in the table");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_client_closed_flow_ends_at_its_last_ack_and_its_port_is_free_at_once() -> Result<()> {
    // Two SNAT ports only: two flows take both.
    let cfg = two_snat_ports();
    Fixture::run_with_config("lastack", &cfg, |fx| {
        let mut done = Conn::establish(fx, 41400, WRITE_PORT)?;
        let mut other = Conn::establish(fx, 41401, WRITE_PORT)?;
        done.client_sends(fx, "query", PSH | ACK, b"RUN")?;
        done.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        done.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        conn_events(fx)?;
        let before = fx.counters()?;
        done.client_sends(fx, "last ACK", ACK, b"")?;
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FwdPackets, 1), (Counter::EndedAtLastAck, 1)]),
            "the last ACK goes out and ends the flow"
        );
        assert!(!done.in_table(fx)?, "both entries deleted at once");
        assert!(other.in_table(fx)?, "the other flow untouched");
        assert!(
            !fx.port_hinted(0, done.port)? && fx.port_hinted(0, other.port)?,
            "the port hints free the ended flow's port and keep the other's"
        );
        let ev = conn_events(fx)?;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].key, ev[0].reason, ev[0].bytes_in),
            (done.fwd_key(), lb_common::CONN_END_CLOSED, 3),
            "reported for the connection log"
        );

        // Should the last ACK have been lost after lb, the backend's retransmitted FIN meets no
        // flow and is answered with a RST (which closes the same LAST_ACK socket).
        done.backend_seq -= 1;
        let late_fin = done.backend(FIN | ACK, b"").bytes()?;
        let before = fx.counters()?;
        let out = fx.from_backends(&late_fin)?;
        assert_eq!(out.action, Action::Tx, "answered with a RST");
        assert_eq!(
            fx.counters()?.get(Counter::RstNoFlow) - before.get(Counter::RstNoFlow),
            1
        );

        // Its port is free for the next connection now, not after a quiet time.
        let syn = client_syn(41402, WRITE_PORT);
        let out = fx.from_client(&syn.bytes()?)?;
        assert_eq!(out.action, Action::Redirect, "a new flow");
        assert_eq!(sport_of(&out.frame), done.port, "on the ended flow's port");
        // A FIN of the old flow arriving now is not the new handshake's: never sent to the new
        // client; answered with a RST that ends the backend's stale socket.
        let before = fx.counters()?;
        assert_eq!(fx.from_backends(&late_fin)?.action, Action::Tx);
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::RstHandshakeStale, 1), (Counter::RstSent, 1)])
        );

        // Closed by the client without a last ACK seen yet (or by the backend first): kept.
        other.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        other.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        assert!(other.closing(fx)? && other.in_table(fx)?);
        // A client ACK that does not acknowledge the backend's FIN does not end it.
        other.backend_seq -= 1;
        other.client_sends(fx, "ACK short of the backend's FIN", ACK, b"")?;
        assert!(other.in_table(fx)?);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_late_ack_of_an_earlier_connection_on_a_reused_tuple_is_dropped_not_forwarded_on_the_new_flow(
) -> Result<()> {
    Fixture::run("lateack", |fx| {
        let mut old = Conn::establish(fx, 41410, WRITE_PORT)?;
        old.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        old.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        // The client's last ACK and its next SYN on the same tuple (TIME_WAIT reuse) leave on
        // different CPUs: the SYN is processed first.
        let last_ack = old.client(ACK, b"");
        let syn = client_syn(41410, WRITE_PORT).with_seq_ack(0x7200_0000, 0);
        let out = fx.from_client(&syn.bytes()?)?;
        assert_eq!(out.action, Action::Redirect, "the SYN starts a new flow");
        let port = sport_of(&out.frame);

        // The late ACK, before and after the backend answered the new SYN: dropped.
        let mut new = Conn {
            client_port: 41410,
            service_port: WRITE_PORT,
            backend: DB01,
            port,
            client_seq: syn.seq + 1,
            backend_seq: 0x6100_0000,
        };
        for when in ["before the SYN-ACK", "after the SYN-ACK"] {
            if when == "after the SYN-ACK" {
                let syn_ack = new.backend(SYN | ACK, b"");
                assert_eq!(
                    fx.from_backends(&syn_ack.bytes()?)?.action,
                    Action::Redirect
                );
                new.backend_seq += 1;
            }
            let before = fx.counters()?;
            let out = fx.from_client(&last_ack.bytes()?)?;
            assert_eq!(out.action, Action::Drop, "late ACK {when}");
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[(Counter::DropHandshakeStale, 1)]),
                "{when}"
            );
        }
        // The new connection completes and carries data.
        new.client_sends(fx, "new handshake ACK", ACK, b"")?;
        new.client_sends(fx, "new query", PSH | ACK, b"RUN")?;
        new.backend_sends(fx, "new answer", PSH | ACK, b"OK")?;
        let (f, r) = new.entries(fx)?;
        assert_eq!((f.state, r.state), (FLOW_ESTABLISHED, FLOW_ESTABLISHED));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_rst_marks_the_flow_closing_and_a_later_segment_from_its_side_proves_it_spoofed() -> Result<()>
{
    Fixture::run("rst", |fx| {
        let mut c = Conn::establish(fx, 40002, WRITE_PORT)?;

        // A RST "from the client" (spoofed, say): translated like any segment, flow kept, marked.
        c.client_sends(fx, "client RST", RST | ACK, b"")?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (FLOW_CLOSE_RST, 0));
        assert!(is_closing(&f, &r), "a RST makes the flow closing");
        // The backend's answer does not clear it: it is not the RST's side.
        c.backend_sends(fx, "backend data after the client RST", PSH | ACK, b"x")?;
        assert!(c.closing(fx)?, "only the RST's own side can take it back");
        // The client sends again: its RST cannot have been genuine.
        c.client_sends(fx, "client data after its RST", PSH | ACK, b"y")?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (0, 0), "the spoofed RST's mark is gone");
        assert!(!is_closing(&f, &r));

        // Same from the backend side; a FIN recorded earlier survives the RST being cleared.
        c.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        c.backend_sends(fx, "backend RST", RST, b"")?;
        let (_, r) = c.entries(fx)?;
        assert_eq!(r.close, FLOW_CLOSE_FIN | FLOW_CLOSE_RST);
        assert!(c.closing(fx)?);
        c.backend_seq -= 1;
        c.backend_sends(
            fx,
            "backend FIN retransmitted after its RST",
            FIN | ACK,
            b"",
        )?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (0, FLOW_CLOSE_FIN));
        assert!(!is_closing(&f, &r), "half-closed again, not closing");
        Ok(())
    })
}

/// Runs `seg` (a RST) on `ingress` and checks it was dropped, counted as out of window, and
/// left the flow's entries as they were.
#[track_caller]
fn assert_blind_rst_dropped(
    fx: &Fixture,
    c: &Conn,
    what: &str,
    seg: &TcpFrame,
    from_client: bool,
) -> Result<()> {
    let entries = c.entries(fx)?;
    let before = fx.counters()?;
    let out = if from_client {
        fx.from_client(&seg.bytes()?)?
    } else {
        fx.from_backends(&seg.bytes()?)?
    };
    assert_eq!(out.action, Action::Drop, "{what}: action");
    assert_eq!(
        fx.counters()?.changes_since(&before),
        moved(&[(Counter::DropRstOutOfWindow, 1)]),
        "{what}: counters"
    );
    assert_eq!(c.entries(fx)?, entries, "{what}: the flow changed");
    Ok(())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_rst_outside_the_receivers_window_is_dropped_and_the_idle_connection_lives() -> Result<()> {
    Fixture::run("rstwin", |fx| {
        let mut c = Conn::establish(fx, 40005, WRITE_PORT)?;
        c.client_sends(fx, "client data", PSH | ACK, b"RUN")?;
        c.backend_sends(fx, "backend answer", PSH | ACK, b"SUCCESS")?;
        c.client_sends(fx, "client ACK", ACK, b"")?;

        // Blind RSTs with the connection's addresses and ports and a guessed sequence number,
        // from either side (RFC 5961: only the receiver's next expected number is in window
        // on an idle connection).
        for (what, seq_off) in [
            ("far ahead", 0x4000_0000u32),
            ("just ahead", 1),
            ("behind", 2u32.wrapping_neg()),
        ] {
            let mut rst = c.client(RST, b"");
            rst.seq = c.client_seq.wrapping_add(seq_off);
            assert_blind_rst_dropped(fx, &c, &format!("client-side RST {what}"), &rst, true)?;
            let mut rst = c.backend(RST, b"");
            rst.seq = c.backend_seq.wrapping_add(seq_off);
            assert_blind_rst_dropped(fx, &c, &format!("backend-side RST {what}"), &rst, false)?;
        }
        // A blind data segment far ahead does not widen the window for a later RST.
        let mut blind = c.client(PSH | ACK, b"x");
        blind.seq = c.client_seq.wrapping_add(0x2000_0000);
        let out = fx.from_client(&blind.bytes()?)?;
        assert_eq!(
            out.action,
            Action::Redirect,
            "blind data is the endpoint's to judge"
        );
        let mut rst = c.client(RST, b"");
        rst.seq = c.client_seq.wrapping_add(0x2000_0000);
        assert_blind_rst_dropped(fx, &c, "a RST after the blind data", &rst, true)?;
        assert!(!c.closing(fx)?, "the flow is not closing");
        c.client_sends(fx, "client data after the blind RSTs", PSH | ACK, b"RUN")?;
        c.backend_sends(fx, "backend answer after the blind RSTs", PSH | ACK, b"OK")?;

        // With data in flight (3 bytes not acknowledged yet), a RST anywhere in it is the
        // sender's to send: forwarded and marked.
        c.client_sends(fx, "client data in flight", PSH | ACK, b"abc")?;
        c.client_seq = c.client_seq.wrapping_sub(1);
        c.client_sends(fx, "client RST inside its unacknowledged data", RST, b"")?;
        let (f, r) = c.entries(fx)?;
        assert_eq!((f.close, r.close), (FLOW_CLOSE_RST, 0));

        // And the exact RST of an idle connection, from the backend.
        let mut d = Conn::establish(fx, 40006, WRITE_PORT)?;
        d.client_sends(fx, "client data", PSH | ACK, b"RUN")?;
        d.backend_sends(fx, "backend ACK", ACK, b"")?;
        d.backend_sends(fx, "backend's exact RST", RST, b"")?;
        let (f, r) = d.entries(fx)?;
        assert_eq!((f.close, r.close), (0, FLOW_CLOSE_RST));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_on_a_closing_tuple_starts_a_new_flow() -> Result<()> {
    Fixture::run("reuse", |fx| {
        for (what, client_port) in [("FINs both ways", 40003u16), ("a RST", 40004)] {
            let mut c = Conn::establish(fx, client_port, WRITE_PORT)?;
            if client_port == 40003 {
                // No last ACK yet (it would end the flow): the SYN overtook it.
                c.client_sends(fx, "client FIN", FIN | ACK, b"")?;
                c.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
            } else {
                c.backend_sends(fx, "backend RST", RST, b"")?;
            }
            assert!(c.closing(fx)?, "{what}: closing");

            // The client reuses the tuple (TIME_WAIT reuse): a new SYN, a new sequence space.
            let syn = client_syn(client_port, WRITE_PORT).with_seq_ack(0x7000_0000, 0);
            let before = fx.counters()?;
            let out = fx.from_client(&syn.bytes()?)?;
            let port = sport_of(&out.frame);
            assert_frame(
                &format!("{what}: SYN on the closing tuple"),
                &out,
                Action::Redirect,
                &to_backend(&syn, DB01, DB01_MAC, port),
            )?;
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[
                    (Counter::FwdPackets, 1),
                    (Counter::NewFlows, 1),
                    (Counter::FibResult0, 1),
                    (Counter::ClosedTupleReused, 1),
                ]),
                "{what}: counters"
            );
            assert!(
                !c.in_table(fx)?,
                "{what}: the old flow's entries are deleted"
            );
            let emb = fx.embryonic()?;
            let new_rev = flow_key(sa(DB01, BACKEND_PORT), sa(SNAT_ADDR, port));
            let fwd = entry(&emb, &c.fwd_key()).expect("new embryonic forward entry");
            let rev = entry(&emb, &new_rev).expect("new embryonic reply entry");
            assert_eq!((fwd.close, rev.close), (0, 0), "{what}: a clean new flow");
            assert!(fwd.points_back_to(&new_rev) && rev.points_back_to(&c.fwd_key()));

            // The new flow completes its handshake like any other.
            let mut n = Conn {
                client_port,
                service_port: WRITE_PORT,
                backend: DB01,
                port,
                client_seq: syn.seq + 1,
                backend_seq: 0x6000_0000,
            };
            let syn_ack = n.backend(SYN | ACK, b"");
            let out = fx.from_backends(&syn_ack.bytes()?)?;
            assert_frame(
                "new SYN-ACK",
                &out,
                Action::Redirect,
                &to_client(&syn_ack, client_port, WRITE_PORT),
            )?;
            n.backend_seq += 1;
            n.client_sends(fx, "new handshake ACK", ACK, b"")?;
            n.backend_sends(fx, "new flow data", PSH | ACK, b"hello")?;
            assert!(!n.closing(fx)?);
            assert!(fx.embryonic()?.is_empty());
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_on_an_established_or_half_closed_tuple_is_forwarded_on_the_existing_mapping() -> Result<()>
{
    Fixture::run("synest", |fx| {
        let mut c = Conn::establish(fx, 40005, WRITE_PORT)?;
        for what in ["established", "half-closed"] {
            let syn = client_syn(c.client_port, WRITE_PORT);
            let before = fx.counters()?;
            let out = fx.from_client(&syn.bytes()?)?;
            assert_frame(
                &format!("SYN on the {what} tuple"),
                &out,
                Action::Redirect,
                &to_backend(&syn, DB01, DB01_MAC, c.port),
            )?;
            assert_eq!(
                fx.counters()?.changes_since(&before),
                moved(&[(Counter::FwdPackets, 1)]),
                "{what}: no new flow"
            );
            assert_eq!(fx.established()?.len(), 2, "{what}: same flow");
            assert!(fx.embryonic()?.is_empty());
            c.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The GC
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_deletes_closed_flows_after_the_close_timeout_and_keeps_open_and_half_closed_ones(
) -> Result<()> {
    Fixture::run("gcclose", |fx| {
        // Closed by the client first (the backend holds no TIME_WAIT), by a RST, and by the
        // backend first (it holds TIME_WAIT on the tuple: the SNAT port waits longer).
        // (`fin`'s last ACK was lost: with it the data path would have ended the flow itself.)
        let mut fin = Conn::establish(fx, 41000, WRITE_PORT)?;
        fin.client_sends(fx, "FIN", FIN | ACK, b"")?;
        fin.backend_sends(fx, "FIN", FIN | ACK, b"")?;
        let mut rst = Conn::establish(fx, 41001, WRITE_PORT)?;
        rst.client_sends(fx, "RST", RST, b"")?;
        let mut bfin = Conn::establish(fx, 41004, WRITE_PORT)?;
        bfin.backend_sends(fx, "FIN", FIN | ACK, b"")?;
        bfin.client_sends(fx, "FIN", FIN | ACK, b"")?;
        bfin.backend_sends(fx, "last ACK", ACK, b"")?;
        let (f, r) = bfin.entries(fx)?;
        assert_eq!(
            (f.first_fin, r.first_fin),
            (0, 1),
            "the backend's FIN came first"
        );
        let (f, r) = fin.entries(fx)?;
        assert_eq!(
            (f.first_fin, r.first_fin),
            (1, 0),
            "the client's FIN came first"
        );
        let open = Conn::establish(fx, 41002, WRITE_PORT)?;
        let mut half = Conn::establish(fx, 41003, WRITE_PORT)?;
        half.client_sends(fx, "FIN", FIN | ACK, b"")?;
        let t0 = monotonic_now()?;
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        assert_eq!(gc.timeouts().close_ns, 10 * SEC, "default close timeout");

        let st = gc.sweep(t0 + SEC);
        assert_eq!(
            st.deleted_entries(),
            0,
            "within every close timeout: {st:?}"
        );
        assert_eq!(fx.established()?.len(), 10);

        // After 2 s quiet: the flows the client or a RST closed go (their SNAT ports are free
        // again); the one the backend closed first waits for the close timeout.
        let st = gc.sweep(t0 + 3 * SEC);
        assert_eq!(
            (st.closed, st.idle, st.orphans, st.embryonic_expired),
            (2, 0, 0, 0),
            "{st:?}"
        );
        assert!(
            !fin.in_table(fx)? && !rst.in_table(fx)?,
            "client-closed and reset flows gone"
        );
        assert!(bfin.in_table(fx)?, "backend-closed flow kept");

        let st = gc.sweep(t0 + 11 * SEC);
        assert_eq!((st.closed, st.idle), (1, 0), "{st:?}");
        assert!(
            !bfin.in_table(fx)?,
            "backend-closed flow gone after the close timeout"
        );
        assert!(open.in_table(fx)? && half.in_table(fx)?, "open flows kept");
        assert_eq!(fx.established()?.len(), 4);

        // A half-closed flow is only subject to the idle timeout (2 h by default).
        let st = gc.sweep(t0 + 7200 * SEC + 2 * SEC);
        assert_eq!((st.closed, st.idle), (0, 2), "{st:?}");
        assert!(fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_counts_the_close_timeout_from_the_last_segment() -> Result<()> {
    Fixture::run("gclast", |fx| {
        let mut c = Conn::establish(fx, 41010, WRITE_PORT)?;
        c.client_sends(fx, "FIN", FIN | ACK, b"")?;
        c.backend_sends(fx, "FIN", FIN | ACK, b"")?;
        // Age the marks by hand: the FINs were 20 s ago, the last segment now.
        let t0 = monotonic_now()?;
        let (mut f, r) = c.entries(fx)?;
        let mut r_old = r;
        f.last_seen_ns = t0 - 20 * SEC;
        r_old.last_seen_ns = t0 - 20 * SEC;
        fx.put_established(&c.fwd_key(), &f)?;
        fx.put_established(&c.rev_key(), &r_old)?;
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        let st = gc.sweep(t0);
        assert_eq!(st.closed, 1, "quiet for 20 s: gone ({st:?})");

        let mut c = Conn::establish(fx, 41011, WRITE_PORT)?;
        c.client_sends(fx, "FIN", FIN | ACK, b"")?;
        c.backend_sends(fx, "FIN", FIN | ACK, b"")?;
        let t0 = monotonic_now()?;
        let (mut f, r) = c.entries(fx)?;
        f.last_seen_ns = t0 - 20 * SEC;
        fx.put_established(&c.fwd_key(), &f)?;
        let st = gc.sweep(t0);
        assert_eq!(
            st.deleted_entries(),
            0,
            "the reply side spoke just now: {st:?}"
        );
        assert!(c.in_table(fx)?);
        let st = gc.sweep(r.last_seen_ns + 10 * SEC + SEC / 2);
        assert_eq!(st.closed, 1, "{st:?}");
        Ok(())
    })
}

/// The fixture's configuration with `[timeouts]` replaced.
fn config_with_timeouts(timeouts: &str) -> String {
    CONFIG.replace("[timeouts]\nconnect = \"30s\"", timeouts)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_deletes_idle_flows_after_the_idle_timeout_and_keeps_active_ones() -> Result<()> {
    let cfg = config_with_timeouts("[timeouts]\nconnect = \"30s\"\nidle = \"2s\"\nclose = \"1s\"");
    Fixture::run_with_config("gcidle", &cfg, |fx| {
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        assert_eq!(gc.timeouts(), Timeouts::new(30 * SEC, 2 * SEC, SEC));
        let idle = Conn::establish(fx, 42000, WRITE_PORT)?;
        let mut client_talks = Conn::establish(fx, 42001, WRITE_PORT)?;
        let mut backend_talks = Conn::establish(fx, 42002, WRITE_PORT)?;
        // 3.5 s of real time: one flow silent, the others active in one direction each
        // (`last_seen_ns` is written at most once a second per entry).
        for i in 0..7 {
            std::thread::sleep(Duration::from_millis(500));
            client_talks.client_sends(fx, &format!("client data #{i}"), PSH | ACK, b".")?;
            backend_talks.backend_sends(fx, &format!("backend data #{i}"), PSH | ACK, b".")?;
            let st = gc.sweep(monotonic_now()?);
            assert_eq!(st.closed + st.orphans + st.embryonic_expired, 0, "{st:?}");
        }
        assert!(!idle.in_table(fx)?, "idle for 3.5 s > 2 s: gone");
        assert!(client_talks.in_table(fx)? && backend_talks.in_table(fx)?);
        assert_eq!(fx.established()?.len(), 4);
        // Once they stop too, they go too.
        std::thread::sleep(Duration::from_millis(3100));
        let st = gc.sweep(monotonic_now()?);
        assert_eq!(st.idle, 2, "{st:?}");
        assert!(fx.established()?.is_empty());
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_counts_each_handshake_past_the_connect_timeout_once_and_frees_its_port_in_the_hints(
) -> Result<()> {
    Fixture::run("gcemb", |fx| {
        let syn = client_syn(43000, WRITE_PORT);
        let out = fx.from_client(&syn.bytes()?)?;
        assert_eq!(out.action, Action::Redirect);
        let port = u16::from_be_bytes([out.frame[34], out.frame[35]]);
        let t0 = monotonic_now()?;
        assert_eq!(fx.handshakes()?.len(), 1);
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        let hints = lb_user::gc::share(&fx.ebpf, lb_common::names::PORT_HINTS)?;
        gc.set_port_hints(hints, fx.cfg.snat_ports, false)?;
        assert_eq!(
            gc.sweep(t0 + 29 * SEC),
            SweepStats {
                embryonic_entries: 1,
                ..Default::default()
            }
        );
        assert!(fx.port_hinted(0, port)?, "a live handshake holds its port");

        // Past the connect timeout: counted once, and its port free in the hints. The record
        // stays where it is: the data path treats it as absent and a claim takes its slot
        // (see packet.rs, a_handshake_slot_shared_by_two_ports_...).
        let st = gc.sweep(t0 + 31 * SEC);
        assert_eq!(
            (st.embryonic_entries, st.embryonic_expired),
            (1, 1),
            "{st:?}"
        );
        assert!(!fx.port_hinted(0, port)?, "its port is free in the hints");
        let st = gc.sweep(t0 + 32 * SEC);
        assert_eq!(st.embryonic_expired, 0, "counted once: {st:?}");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn an_agent_that_adopts_tables_holds_every_port_until_its_gc_has_looked_at_them() -> Result<()> {
    Fixture::run("gcadopt", |fx| {
        // A new program's port bitmap is empty, and the tables it adopts hold flows whose
        // bits it lacks: a search trusting a clear bit would give their ports again. The agent
        // sets every bit first; its GC's first pass then clears the bits of free ports.
        let c = Conn::establish(fx, 44_300, WRITE_PORT)?;
        fx.set_port_hints(0, lb_common::PortHints::default())?;
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        let hints = lb_user::gc::share(&fx.ebpf, lb_common::names::PORT_HINTS)?;
        gc.set_port_hints(hints, fx.cfg.snat_ports, true)?;
        let (lo, hi) = fx.cfg.snat_ports;
        let count = |fx: &Fixture| -> Result<u32> {
            Ok(fx.port_hints(0)?.words.iter().map(|w| w.count_ones()).sum())
        };
        assert_eq!(
            count(fx)?,
            u32::from(hi - lo) + 1,
            "every port of the range"
        );
        // Meanwhile a new flow still gets a port: the random search checks the tables.
        let n = Conn::syn(fx, 44_301, WRITE_PORT)?;
        assert_ne!(n.port, c.port);
        gc.sweep(monotonic_now()?);
        assert!(fx.port_hinted(0, c.port)?, "the established flow's port");
        assert!(fx.port_hinted(0, n.port)?, "the handshake's port");
        assert_eq!(count(fx)?, 2, "every other port's bit cleared");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_deletes_an_established_entry_whose_partner_is_gone_after_a_grace_period() -> Result<()> {
    Fixture::run("gcorphan", |fx| {
        let c = Conn::establish(fx, 44000, WRITE_PORT)?;
        let other = Conn::establish(fx, 44001, WRITE_PORT)?;
        fx.remove_established(&c.fwd_key())?;
        let t0 = monotonic_now()?;
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        assert_eq!(
            gc.sweep(t0).deleted_entries(),
            0,
            "a delete may be in progress"
        );
        let st = gc.sweep(t0 + 11 * SEC);
        assert_eq!((st.orphans, st.idle, st.closed), (1, 0, 0), "{st:?}");
        assert!(!c.in_table(fx)?);
        assert!(other.in_table(fx)?);
        Ok(())
    })
}

/// The data path's `CONN_EVENTS` records, oldest first.
fn conn_events(fx: &mut Fixture) -> Result<Vec<lb_common::ConnEvent>> {
    let map = fx.ebpf.map_mut(names::CONN_EVENTS).expect("CONN_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(map)?;
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        let n = std::mem::size_of::<lb_common::ConnEvent>();
        assert!(item.len() >= n, "short record: {} bytes", item.len());
        let e: lb_common::ConnEvent = bytemuck::pod_read_unaligned(&item[..n]);
        out.push(e);
    }
    Ok(out)
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_data_path_reports_the_flows_it_deletes_itself_for_the_connection_log() -> Result<()> {
    Fixture::run("connev", |fx| {
        assert!(conn_events(fx)?.is_empty(), "no events before any flow");
        // A flow of a backend demoted with reset: deleted on its next segment, reported.
        let mut c = Conn::establish(fx, 41200, WRITE_PORT)?;
        c.client_sends(fx, "query", PSH | ACK, b"RETURN 1")?;
        c.backend_sends(fx, "answer", PSH | ACK, b"RECORD 1 DONE")?;
        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        let out = fx.from_client(&c.client(PSH | ACK, b"more").bytes()?)?;
        assert_eq!(out.action, Action::Tx, "reset flow answered with RST");
        let ev = conn_events(fx)?;
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = ev[0];
        assert_eq!(e.key, c.fwd_key());
        assert_eq!(e.reason, lb_common::CONN_END_RESET);
        assert_eq!((e.bytes_in, e.bytes_out), (8, 13), "payload each way");
        assert_eq!(
            (e.snat_port, e.backend_addr, e.backend_port),
            (
                c.port.to_be(),
                u32::from(DB01).to_be(),
                BACKEND_PORT.to_be()
            )
        );
        assert!(e.ended_ns >= e.created_ns && e.created_ns > 0);

        // A closed flow whose tuple a new SYN reuses before the GC deleted it: reported once.
        let mut d = Conn::establish(fx, 41201, WRITE_PORT)?;
        d.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        d.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        let syn = client_syn(41201, WRITE_PORT).with_seq_ack(0x7100_0000, 0);
        assert_eq!(fx.from_client(&syn.bytes()?)?.action, Action::Redirect);
        let ev = conn_events(fx)?;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].key, ev[0].reason),
            (d.fwd_key(), lb_common::CONN_END_REUSED)
        );
        // Flows the GC expires are logged by the GC, not here: no event for them.
        assert!(conn_events(fx)?.is_empty());
        Ok(())
    })
}

/// The fixture's configuration with two SNAT ports only: two flows take both.
fn two_snat_ports() -> String {
    CONFIG.replace(
        "snat_ports = \"10000-32767\"",
        "snat_ports = \"10000-10001\"",
    )
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn with_every_snat_port_taken_a_new_flow_takes_over_the_port_of_a_quiet_client_closed_flow(
) -> Result<()> {
    // Two SNAT ports only: two flows take both.
    let cfg = two_snat_ports();
    Fixture::run_with_config("takeover", &cfg, |fx| {
        let mut client_closed = Conn::establish(fx, 41300, WRITE_PORT)?;
        let mut backend_closed = Conn::establish(fx, 41301, WRITE_PORT)?;
        client_closed.client_sends(fx, "query", PSH | ACK, b"RUN")?;
        client_closed.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        client_closed.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        // Its last ACK was lost (with it, the flow would have ended at once).
        backend_closed.backend_sends(fx, "backend FIN", FIN | ACK, b"")?;
        backend_closed.client_sends(fx, "client FIN", FIN | ACK, b"")?;
        backend_closed.backend_sends(fx, "last ACK", ACK, b"")?;
        conn_events(fx)?;

        // Just closed: no port is free yet (the last ACK or a FIN may still come).
        let before = fx.counters()?;
        let out = fx.from_client(&client_syn(41302, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Tx, "refused while both flows are fresh");
        assert_eq!(
            fx.counters()?.get(Counter::RstSnatExhausted) - before.get(Counter::RstSnatExhausted),
            1
        );

        // Both closed flows quiet for 2 s (aged by hand).
        for c in [&client_closed, &backend_closed] {
            c.quiet_for(fx, 2 * SEC)?;
        }
        // The new flow gets the client-closed flow's port; the backend-closed one (TIME_WAIT at
        // the backend) keeps its own.
        let syn = client_syn(41303, WRITE_PORT);
        let before = fx.counters()?;
        let out = fx.from_client(&syn.bytes()?)?;
        assert_eq!(out.action, Action::Redirect, "a port taken over");
        assert_eq!(
            fx.counters()?.get(Counter::ClosedPortTakenOver)
                - before.get(Counter::ClosedPortTakenOver),
            1,
            "counted"
        );
        let port = sport_of(&out.frame);
        assert_eq!(port, client_closed.port, "the client-closed flow's port");
        assert_frame(
            "SYN",
            &out,
            Action::Redirect,
            &to_backend(&syn, DB01, DB01_MAC, port),
        )?;
        assert!(!client_closed.in_table(fx)?, "the closed flow is gone");
        assert!(
            backend_closed.in_table(fx)?,
            "the backend-closed flow stays"
        );
        let ev = conn_events(fx)?;
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].key, ev[0].reason, ev[0].bytes_in),
            (client_closed.fwd_key(), lb_common::CONN_END_CLOSED, 3)
        );

        // No other port to take: the next SYN is refused, the backend-closed flow untouched.
        let out = fx.from_client(&client_syn(41304, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Tx);
        assert!(backend_closed.in_table(fx)?);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn gc_reads_a_table_larger_than_one_batch_whole_and_expires_exactly_the_idle_half() -> Result<()> {
    // 12,000 flows (24,000 entries: several of the GC's 4,096-entry batch reads), every
    // other one idle for longer than the 2 s idle timeout.
    let cfg = config_with_timeouts("[timeouts]\nconnect = \"30s\"\nidle = \"2s\"\nclose = \"1s\"");
    Fixture::run_with_config("gcbatch", &cfg, |fx| {
        let now = monotonic_now()?;
        let n: u32 = 12_000;
        {
            let map = fx
                .ebpf
                .map_mut(names::CT_ESTABLISHED)
                .expect("CT_ESTABLISHED");
            let mut m = HashMap::<_, FlowKey, Flow>::try_from(map)?;
            for i in 0..n {
                let client = sa(Ipv4Addr::from(0x0a6f_0000 + i), 40_000);
                let snat = sa(SNAT_ADDR, 10_000 + (i % 20_000) as u16);
                let backend = sa(
                    Ipv4Addr::new(10, 0, 2, (i / 20_000 + 1) as u8),
                    BACKEND_PORT,
                );
                let seen = if i % 2 == 0 { now - 3 * SEC } else { now };
                let base = Flow {
                    created_ns: seen,
                    last_seen_ns: seen,
                    state: lb_common::FLOW_ESTABLISHED,
                    ..Default::default()
                };
                for (k, f) in flow_pair(client, sa(VIP, WRITE_PORT), snat, backend, base) {
                    m.insert(k, f, 0)?;
                }
            }
        }
        let mut gc = Gc::shared(&fx.ebpf, default_timeouts(fx))?;
        let st = gc.sweep(now);
        assert_eq!(st.established_entries, 2 * n as usize, "{st:?}");
        assert_eq!(
            (st.idle, st.orphans, st.closed),
            (n as usize / 2, 0, 0),
            "{st:?}"
        );
        assert_eq!(fx.established()?.len(), n as usize, "the active half stays");
        Ok(())
    })
}
