//! `maxconn` through `BPF_PROG_TEST_RUN`: a connection takes its slot when its handshake
//! completes (a handshake that never does, a spoofed SYN, holds none); a SYN over a limit (per
//! backend of a service, or global) is dropped and counted (or answered with a RST when the
//! service says `on_maxconn = "reset"`), and a handshake completing over it waits (its ACK
//! dropped) until a slot frees; a slot is released exactly once, by whoever deletes it: the data
//! path when the flow closes with FINs both ways or is reset, the agent's GC (through
//! `lb_release`) when the flow (also one closed by a RST) expired or vanished. The counts never go below zero. The
//! program is built for BPF v3 and the verifier's (xlated) program uses the fetch form of the
//! atomic add.
//!
//! Fixture of `packet.rs`: client 198.18.0.2 behind `cl0`; write 198.18.0.10:7680 -> db01,
//! read :7681 -> db02, db03.

use std::process::Command;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap},
    programs::Xdp,
};
use lb_common::{epoch_index, names, Counter, Flow, FlowKey, Slot, MAXCONN_GLOBAL};
use lb_tests::fixture::frames::{ACK, FIN, PSH, RST, SYN};
use lb_tests::fixture::*;
use lb_user::gc::{monotonic_now, release_program, release_slot, Gc, Timeouts};

const SEC: u64 = 1_000_000_000;

/// The fixture's configuration with `extra` settings added to the write service (after its
/// backends line) and `global` ones at the top.
fn config(global: &str, write_extra: &str) -> String {
    let c = CONFIG.replace(
        "backends = [\"db01\"]\n",
        &format!("backends = [\"db01\"]\n{write_extra}\n"),
    );
    c.replace(
        "instance = \"pkt\"\n",
        &format!("instance = \"pkt\"\n{global}\n"),
    )
}

fn active(fx: &Fixture, index: u32) -> Result<u64> {
    let map = fx
        .ebpf
        .map(names::MAXCONN_ACTIVE)
        .context("MAXCONN_ACTIVE")?;
    let a = Array::<_, u64>::try_from(map)?;
    Ok(a.get(&index, 0)?)
}

/// (write/db01 count, read/db02 count, read/db03 count, global count).
fn counts(fx: &Fixture) -> Result<(u64, u64, u64, u64)> {
    Ok((
        active(fx, epoch_index(0, 0))?,
        active(fx, epoch_index(1, 1))?,
        active(fx, epoch_index(1, 2))?,
        active(fx, MAXCONN_GLOBAL)?,
    ))
}

fn slots(fx: &Fixture) -> Result<Vec<(FlowKey, Slot)>> {
    let map = fx.ebpf.map(names::SLOTS).context("SLOTS")?;
    let m = HashMap::<_, FlowKey, Slot>::try_from(map)?;
    Ok(m.iter().filter_map(|r| r.ok()).collect())
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_syn_over_the_backend_limit_is_dropped_and_a_close_frees_the_slot() -> Result<()> {
    Fixture::run_with_config("mcdrop", &config("", "backend_maxconn = 2"), |fx| {
        let mut a = Conn::establish(fx, 40001, WRITE_PORT)?;
        let mut b = Conn::establish(fx, 40002, WRITE_PORT)?;
        assert_eq!(counts(fx)?, (2, 0, 0, 2), "two slots held");
        assert_eq!(slots(fx)?.len(), 2);

        // Third connection: over the limit. Dropped (the client's SYN retransmit waits for a
        // slot, like HAProxy's queue), counted, no flow and no SNAT port taken.
        let before = fx.counters()?;
        let out = fx.from_client(&client_syn(40003, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Drop, "SYN over maxconn");
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::FibResult0, 1), (Counter::DropMaxconn, 1)])
        );
        assert_eq!(fx.backend_stats(0)?.maxconn_refused, 1);
        assert!(fx.embryonic()?.is_empty(), "no flow for the refused SYN");
        assert_eq!(
            counts(fx)?,
            (2, 0, 0, 2),
            "a refusal leaves the counts alone"
        );

        // Held connections keep working, a retransmitted SYN on one of them too.
        assert_eq!(a.client_action(fx, PSH | ACK)?, Action::Redirect);
        let out = fx.from_client(&client_syn(40001, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect, "SYN on an established tuple");
        assert_eq!(counts(fx)?.0, 2);

        // The unlimited read service is not counted at all.
        let out = fx.from_client(&client_syn(40100, READ_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect, "read service has no limit");
        assert_eq!(counts(fx)?, (2, 0, 0, 2));

        // One FIN is a half-close: the slot stays. The second FIN closes: released at once.
        assert_eq!(a.client_action(fx, FIN | ACK)?, Action::Redirect);
        assert_eq!(counts(fx)?.0, 2, "half-closed still holds its slot");
        assert_eq!(a.backend_action(fx, FIN | ACK)?, Action::Redirect);
        assert_eq!(counts(fx)?, (1, 0, 0, 1), "closed: slot released");
        // The last ACK translates and ends the flow, releasing nothing more; a retransmitted
        // FIN of the backend then meets no flow (answered with a RST).
        assert_eq!(a.client_action(fx, ACK)?, Action::Redirect);
        assert_eq!(a.backend_action(fx, FIN | ACK)?, Action::Tx);
        assert_eq!(counts(fx)?, (1, 0, 0, 1), "released once");

        let mut c = Conn::establish(fx, 40003, WRITE_PORT)?;
        assert_eq!(counts(fx)?, (2, 0, 0, 2), "the freed slot is taken");

        // A RST closes too, but the slot stays until the flow is deleted: a spoofed RST that
        // the next genuine segment takes back must not free a slot the connection still uses.
        assert_eq!(b.backend_action(fx, RST)?, Action::Redirect);
        assert_eq!(
            counts(fx)?,
            (2, 0, 0, 2),
            "RST: slot kept until the flow goes"
        );
        assert_eq!(
            b.backend_action(fx, PSH | ACK)?,
            Action::Redirect,
            "the RST taken back"
        );
        assert_eq!(counts(fx)?, (2, 0, 0, 2));
        assert_eq!(b.backend_action(fx, RST)?, Action::Redirect);
        // The GC deletes the reset flow once it is quiet (2 s) and releases its slot.
        let later = monotonic_now()? + 3 * SEC;
        let mut gc = Gc::shared(&fx.ebpf, Timeouts::from_config(&fx.cfg))?;
        let mut st = gc.sweep(later);
        gc.sweep_slots(later, release_program(&fx.ebpf), &mut st);
        // (The FIN-closed flow ended at its last ACK already.)
        assert_eq!((st.closed, st.slots_released), (1, 1), "{st:?}");
        assert_eq!(counts(fx)?, (1, 0, 0, 1));

        // A flow reset by the agent (on_down = "reset") releases its slot on its next segment.
        fx.control.reset_flows(&fx.cfg, 0, 0)?;
        assert_eq!(
            c.client_action(fx, PSH | ACK)?,
            Action::Tx,
            "reset flow answered with RST"
        );
        assert_eq!(counts(fx)?, (0, 0, 0, 0));
        assert!(slots(fx)?.is_empty(), "no slot left");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn on_maxconn_reset_answers_the_syn_over_the_limit_with_a_rst() -> Result<()> {
    let cfg = config("", "backend_maxconn = 1\non_maxconn = \"reset\"");
    Fixture::run_with_config("mcrst", &cfg, |fx| {
        Conn::establish(fx, 40201, WRITE_PORT)?;
        let before = fx.counters()?;
        let out = fx.from_client(&client_syn(40202, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Tx, "RST to the client");
        let tcp_flags = out.frame[47];
        assert_eq!(tcp_flags & RST, RST, "the answer is a RST");
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[
                (Counter::RstSent, 1),
                (Counter::FibResult0, 1),
                (Counter::RstMaxconn, 1)
            ])
        );
        assert_eq!(counts(fx)?, (1, 0, 0, 1));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn handshakes_hold_no_slot_and_one_completing_over_the_limit_waits_for_a_free_slot() -> Result<()> {
    let cfg = config("maxconn = 4", "backend_maxconn = 2");
    Fixture::run_with_config("mchs", &cfg, |fx| {
        // A flood of SYNs that never complete (spoofed sources): every one is let through,
        // none takes a slot, so they cannot use up maxconn (HAProxy's kernel answers such
        // SYNs itself and counts only accepted connections).
        for p in 0..300u16 {
            let out = fx.from_client(&client_syn(20000 + p, WRITE_PORT).bytes()?)?;
            assert_eq!(out.action, Action::Redirect, "SYN {p}");
        }
        assert_eq!(counts(fx)?, (0, 0, 0, 0), "handshakes hold no slot");
        assert!(slots(fx)?.is_empty());

        // Three handshakes admitted below the limit of 2; the third to complete finds it full.
        let mut a = Conn::handshake(fx, 41001, WRITE_PORT)?;
        let mut b = Conn::handshake(fx, 41002, WRITE_PORT)?;
        let mut c = Conn::handshake(fx, 41003, WRITE_PORT)?;
        assert_eq!(a.client_action(fx, ACK)?, Action::Redirect);
        assert_eq!(b.client_action(fx, ACK)?, Action::Redirect);
        assert_eq!(counts(fx)?, (2, 0, 0, 2));
        let before = fx.counters()?;
        assert_eq!(
            c.client_action(fx, ACK)?,
            Action::Drop,
            "ACK over the limit waits"
        );
        assert_eq!(
            fx.counters()?.changes_since(&before),
            moved(&[(Counter::DropMaxconn, 1)])
        );
        assert_eq!(fx.backend_stats(0)?.maxconn_refused, 1);
        c.assert_established(fx, false);
        // Its data waits too (never reaches the backend, which holds no connection yet).
        assert_eq!(
            c.client_action(fx, PSH | ACK)?,
            Action::Drop,
            "data over the limit"
        );
        assert_eq!(counts(fx)?, (2, 0, 0, 2), "a wait takes nothing");

        // A new SYN while the pair is full: refused as before.
        let out = fx.from_client(&client_syn(41004, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Drop, "SYN over the limit");

        // `a` closes (FINs both ways): the waiting connection's next segment takes the slot.
        assert_eq!(a.client_action(fx, FIN | ACK)?, Action::Redirect);
        assert_eq!(a.backend_action(fx, FIN | ACK)?, Action::Redirect);
        assert_eq!(counts(fx)?, (1, 0, 0, 1));
        assert_eq!(
            c.client_action(fx, PSH | ACK)?,
            Action::Redirect,
            "retransmit"
        );
        c.assert_established(fx, true);
        assert_eq!(counts(fx)?, (2, 0, 0, 2));
        assert_eq!(slots(fx)?.len(), 2);
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_global_limit_counts_every_service() -> Result<()> {
    Fixture::run_with_config("mcglobal", &config("maxconn = 3", ""), |fx| {
        Conn::establish(fx, 40301, WRITE_PORT)?;
        for p in [40302, 40303] {
            Conn::establish(fx, p, READ_PORT)?;
        }
        let (w, r2, r3, g) = counts(fx)?;
        assert_eq!((w, r2 + r3, g), (1, 2, 3), "per pair and global");
        for (p, port) in [(40304, WRITE_PORT), (40305, READ_PORT)] {
            let out = fx.from_client(&client_syn(p, port).bytes()?)?;
            assert_eq!(out.action, Action::Drop, "fourth connection (port {port})");
        }
        assert_eq!(counts(fx)?.3, 3, "refusals undo their adds");
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_gc_releases_slots_of_expired_idle_and_vanished_flows_exactly_once() -> Result<()> {
    let cfg = config("", "backend_maxconn = 8\nidle_timeout = \"60s\"");
    Fixture::run_with_config("mcgc", &cfg, |fx| {
        // A handshake that never completes (no slot), an established flow that goes idle, one
        // whose entries vanish (deleted behind the GC's back), and a busy one.
        let out = fx.from_client(&client_syn(40401, WRITE_PORT).bytes()?)?;
        assert_eq!(out.action, Action::Redirect);
        Conn::establish(fx, 40402, WRITE_PORT)?;
        let vanished = Conn::establish(fx, 40403, WRITE_PORT)?;
        fx.remove_established(&vanished.fwd_key())?;
        fx.remove_established(&flow_key(
            sa(DB01, BACKEND_PORT),
            sa(SNAT_ADDR, vanished.port),
        ))?;
        let busy = Conn::establish(fx, 40404, WRITE_PORT)?;
        assert_eq!(counts(fx)?.0, 3, "the handshake holds no slot");

        let t0 = monotonic_now()?;
        let timeouts = Timeouts::from_config(&fx.cfg);
        assert_eq!(
            timeouts.idle_of(0),
            60 * SEC,
            "the write service's own idle timeout"
        );
        assert_eq!(
            timeouts.idle_of(1),
            7200 * SEC,
            "the read service keeps the global one"
        );
        let mut gc = Gc::shared(&fx.ebpf, timeouts)?;

        // Within a second nothing is released (the data path records a slot just before
        // its flow): the vanished flow's slot waits for the next pass.
        let mut st = gc.sweep(t0);
        gc.sweep_slots(t0, release_program(&fx.ebpf), &mut st);
        assert_eq!((st.slots, st.slots_released), (3, 0), "{st:?}");

        // 2 s later: only the vanished flow's slot goes.
        let mut st = gc.sweep(t0 + 2 * SEC);
        gc.sweep_slots(t0 + 2 * SEC, release_program(&fx.ebpf), &mut st);
        assert_eq!(st.slots_released, 1, "{st:?}");
        assert_eq!(counts(fx)?.0, 2);

        // 31 s: the handshake expired (connect timeout 30 s): deleted, no slot to release.
        let mut st = gc.sweep(t0 + 31 * SEC);
        gc.sweep_slots(t0 + 31 * SEC, release_program(&fx.ebpf), &mut st);
        assert_eq!((st.embryonic_expired, st.slots_released), (1, 0), "{st:?}");
        assert_eq!(counts(fx)?.0, 2);

        // 61 s with the busy flow touched: the idle flow goes (its service's 60 s), the busy
        // one stays.
        let mut f: Flow = fx
            .established()?
            .into_iter()
            .find(|(k, _)| *k == busy.fwd_key())
            .map(|(_, f)| f)
            .context("busy flow")?;
        f.last_seen_ns = t0 + 60 * SEC;
        {
            let map = fx.ebpf.map_mut(names::CT_ESTABLISHED).context("CT")?;
            let mut m = HashMap::<_, FlowKey, Flow>::try_from(map)?;
            m.insert(busy.fwd_key(), f, 0)?;
        }
        let mut st = gc.sweep(t0 + 61 * SEC);
        gc.sweep_slots(t0 + 61 * SEC, release_program(&fx.ebpf), &mut st);
        assert_eq!((st.idle, st.slots_released), (1, 1), "{st:?}");
        assert_eq!(counts(fx)?, (1, 0, 0, 1), "only the busy flow holds a slot");

        // Releasing again is a no-op: a slot is released once, and counts never wrap.
        let prog: &Xdp = fx
            .ebpf
            .program("lb_release")
            .context("lb_release")?
            .try_into()?;
        let gone = flow_key(sa(CLIENT, 40402), sa(VIP, WRITE_PORT));
        assert!(!release_slot(prog, &gone)?, "already released");
        assert!(
            release_slot(prog, &busy.fwd_key())?,
            "the busy flow's slot, once"
        );
        assert!(!release_slot(prog, &busy.fwd_key())?, "and not twice");
        assert_eq!(counts(fx)?, (0, 0, 0, 0));
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn the_verified_program_uses_the_fetch_form_of_the_atomic_add_and_stays_small() -> Result<()> {
    Fixture::run("mcxlated", |fx| {
        let prog: &Xdp = fx.ebpf.program("lb_xdp").context("lb_xdp")?.try_into()?;
        let info = prog.info()?;
        let id = info.id();
        // The verifier's work stays far from its 1M-instruction limit (about 168k now; 93k
        // before the port search's cursor, a map value the verifier can relate to nothing, so
        // that it walks the four tries of the bitmap round apart): a change that makes it
        // walk the path once per loop iteration shows up here first.
        let verified = info
            .verified_instruction_count()
            .context("verified count")?;
        eprintln!("lb_xdp: {verified} instructions verified");
        assert!(
            verified < 200_000,
            "the verifier processed {verified} instructions for lb_xdp (budget 200k of its 1M)"
        );
        let out = Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &id.to_string()])
            .output()
            .context("run bpftool (installed by cargo xtask setup)")?;
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let fetch_adds = text.matches("atomic64_fetch_add(").count();
        assert!(
            fetch_adds >= 2,
            "the verifier's program has {fetch_adds} BPF_ATOMIC|BPF_FETCH adds; expected the \
             maxconn take and undo (is the object built with -C target-cpu=v3?)"
        );
        assert!(
            !text.contains("lock *("),
            "no plain (non-fetch) XADD: every maxconn add uses its old value or is an undo"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root and netns: run cargo xtask test"]
fn a_waiting_clients_data_never_turns_the_backends_syn_ack_retransmit_into_a_rst() -> Result<()> {
    Fixture::run_with_config("mcsynack", &config("", "backend_maxconn = 1"), |fx| {
        // Both handshakes admitted below the limit of 1; `w` completes second and waits.
        let mut a = Conn::handshake(fx, 42001, WRITE_PORT)?;
        let mut w = Conn::handshake(fx, 42002, WRITE_PORT)?;
        assert_eq!(a.client_action(fx, ACK)?, Action::Redirect);
        assert_eq!(
            w.client_action(fx, ACK)?,
            Action::Drop,
            "over the limit: waits"
        );
        // Its first data waits too (the client holds an established socket and sends).
        let data = w.client(PSH | ACK, b"RUN");
        assert_eq!(fx.from_client(&data.bytes()?)?.action, Action::Drop);
        // The backend never saw the ACK: it retransmits its SYN-ACK, which acknowledges the
        // client's SYN, not the data. It is this handshake's own: it reaches the client, and
        // is never answered with a RST, which would end the backend's half of the connection
        // (the waiting client would then never be served).
        let again = w
            .backend(SYN | ACK, b"")
            .with_seq_ack(w.backend_seq.wrapping_sub(1), w.client_seq);
        let before = fx.counters()?;
        let out = fx.from_backends(&again.bytes()?)?;
        assert_frame(
            "retransmitted SYN-ACK",
            &out,
            Action::Redirect,
            &w.to_client(&again),
        )?;
        assert_eq!(
            fx.counters()?.get(Counter::RstHandshakeStale) - before.get(Counter::RstHandshakeStale),
            0
        );
        // A slot frees: the data's retransmit completes the handshake and goes through.
        assert_eq!(a.client_action(fx, FIN | ACK)?, Action::Redirect);
        assert_eq!(a.backend_action(fx, FIN | ACK)?, Action::Redirect);
        let out = fx.from_client(&data.bytes()?)?;
        assert_frame(
            "the data, retransmitted",
            &out,
            Action::Redirect,
            &w.to_backend(&data),
        )?;
        w.assert_established(fx, true);
        Ok(())
    })
}
