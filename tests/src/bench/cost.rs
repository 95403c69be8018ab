//! `lb-bench cost`: the XDP program's cost per packet through `BPF_PROG_TEST_RUN`, in the packet
//! fixture's namespace (the program loaded and configured as the agent does it), against
//! `lb_pass` (XDP_PASS and nothing else) from the same object measured the same way.
//!
//! `repeat` re-runs the program on the buffer the previous run left, so it serves only the paths
//! that leave the frame alone: the non-VIP pass and the floor. The rewriting paths (new-flow SYN,
//! established client segment, reply segment) each run once on N distinct pre-built frames of N
//! distinct flows (`repeat = 1`), and the floor is measured likewise (`lb_pass`, once on each of
//! the N SYN frames); each path is reported as the median over its frames minus that floor, which
//! also removes the syscall's timer overhead that a single run carries. Every round starts from
//! empty connection tables.

use anyhow::{ensure, Context, Result};
use aya::maps::HashMap;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{names, Flow, FlowKey};
use serde::Serialize;

use crate::fixture::frames::{TcpFrame, ACK, PSH, SYN};
use crate::fixture::{
    client_syn, sa, Action, Fixture, BACKEND_PORT, BK0_MAC, CL0_ADDR, CL0_MAC, CLIENT, CLIENT_MAC,
    DB01, DB01_MAC, DB02, DB03, READ_PORT, SNAT_ADDR, SNAT_PORTS, VIP, WRITE_PORT,
};

/// Frames per path and rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CostPlan {
    /// Distinct flows per round (each rewriting path runs once per flow).
    pub frames: usize,
    /// `repeat` of the non-modifying paths.
    pub repeat: u32,
    pub rounds: usize,
}

impl CostPlan {
    pub fn full() -> CostPlan {
        CostPlan {
            frames: 4000,
            repeat: 200_000,
            rounds: 5,
        }
    }
    pub fn quick() -> CostPlan {
        CostPlan {
            frames: 2000,
            repeat: 100_000,
            rounds: 3,
        }
    }
    pub fn smoke() -> CostPlan {
        CostPlan {
            frames: 100,
            repeat: 1000,
            rounds: 1,
        }
    }
}

/// One round's medians, nanoseconds per packet.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CostRound {
    /// `lb_pass`, repeat = 1 over the N SYN frames (median): floor of the rewriting paths.
    pub floor_once_ns: f64,
    /// `lb_pass`, repeat = R on the non-VIP frame: floor of the non-VIP pass.
    pub floor_repeat_ns: f64,
    /// lb_xdp, gross (before subtracting the floor).
    pub syn_ns: f64,
    /// New flows with about 90 % of the SNAT ports to db01 held by established flows.
    pub syn_busy_ns: f64,
    /// The share of those refused (no free port found within the search's tries).
    pub syn_busy_refused: f64,
    /// The backend's SYN-ACK of a new flow, and the client's ACK that establishes it: with
    /// the SYN, what a new flow costs the data path.
    pub syn_ack_ns: f64,
    pub handshake_ack_ns: f64,
    pub established_ns: f64,
    pub reply_ns: f64,
    pub non_vip_ns: f64,
}

fn run_once(prog: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> Result<(Action, f64, Vec<u8>)> {
    let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((
        Action::from(r.return_value),
        r.duration.as_nanos() as f64,
        out,
    ))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// New flows timed at 90 % SNAT-port occupancy, per round.
const BUSY_FRAMES: usize = 500;
/// New flows to the read service run (untimed) before those: the syscalls that fill the table
/// leave the tables' page walks uncached, and the first few hundred new flows after them cost
/// half as much again (measured: 957-1,394 ns for the first 500, 640-1,063 for the next 1,000).
/// The other passes time thousands of frames, mostly in the warm state a stream of connections
/// keeps; this one times 500, so it warms up first. The read service's backends leave db01's
/// ports as they are.
const WARM_FRAMES: usize = 1000;

/// Empties both connection tables, and the port hints as the GC's next pass would.
fn clear_tables(fx: &mut Fixture) -> Result<()> {
    fn clear<V: aya::Pod>(fx: &mut Fixture, name: &str) -> Result<()> {
        let map = fx
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no {name}"))?;
        let mut m = HashMap::<_, FlowKey, V>::try_from(map)?;
        let keys: Vec<FlowKey> = m.keys().collect::<Result<_, _>>()?;
        for k in keys {
            m.remove(&k)?;
        }
        Ok(())
    }
    clear::<Flow>(fx, names::CT_ESTABLISHED)?;
    let mut handshakes = lb_user::handshakes::Handshakes::of(&fx.ebpf)?;
    for (k, _) in handshakes.records()? {
        handshakes.forget(&k, None)?;
    }
    fx.rewrite_port_hints()
}

/// Runs `plan` in a packet fixture; one [`CostRound`] per round.
pub fn measure(plan: &CostPlan) -> Result<Vec<CostRound>> {
    Fixture::run("bench_cost", |fx| {
        {
            let pass: &mut Xdp = fx
                .ebpf
                .program_mut("lb_pass")
                .context("no lb_pass program")?
                .try_into()?;
            pass.load().context("loading lb_pass")?;
        }
        let (cl0, bk0) = (fx.cl0.ifindex, fx.bk0.ifindex);
        let mut rounds = Vec::new();
        let n = plan.frames;
        ensure!(
            (n + BUSY_FRAMES + WARM_FRAMES) * plan.rounds < 58_000,
            "at most 58000 flows (client ports)"
        );
        for round in 0..plan.rounds {
            let lb: &Xdp = fx.ebpf.program("lb_xdp").context("no lb_xdp")?.try_into()?;
            let pass: &Xdp = fx
                .ebpf
                .program("lb_pass")
                .context("no lb_pass")?
                .try_into()?;
            let base = 2000 + (round * n) as u16;
            let syns: Vec<(TcpFrame, Vec<u8>)> = (0..n)
                .map(|i| {
                    let f = TcpFrame::syn(
                        CLIENT_MAC,
                        CL0_MAC,
                        sa(CLIENT, base + i as u16),
                        sa(VIP, WRITE_PORT),
                    );
                    let b = f.bytes()?;
                    Ok((f, b))
                })
                .collect::<Result<_>>()?;
            let mut floor_once = Vec::with_capacity(n);
            for (_, b) in &syns {
                floor_once.push(run_once(pass, b, cl0, 1)?.1);
            }
            // New flows: one SYN each.
            let mut syn_ns = Vec::with_capacity(n);
            let mut snat_ports = Vec::with_capacity(n);
            for (_, b) in &syns {
                let (action, ns, out) = run_once(lb, b, cl0, 1)?;
                ensure!(
                    matches!(action, Action::Redirect | Action::Tx)
                        && out.get(30..34) == Some(&DB01.octets()[..]),
                    "round {round}: SYN {} not forwarded to db01: {action:?}",
                    syn_ns.len()
                );
                snat_ports.push(u16::from_be_bytes([out[34], out[35]]));
                syn_ns.push(ns);
            }
            // Complete the handshakes: SYN-ACK from db01, then the client's ACK, each path in
            // its own pass over the flows (see below).
            let client_seq = syns[0].0.seq.wrapping_add(1);
            let backend_seq = 0x5000_0000u32;
            let backend = |port: u16, flags: u8, payload: &[u8]| {
                TcpFrame::new(
                    DB01_MAC,
                    BK0_MAC,
                    sa(DB01, BACKEND_PORT),
                    sa(SNAT_ADDR, port),
                )
                .with_flags(flags)
                .with_seq_ack(backend_seq, client_seq)
                .with_payload(payload)
            };
            let client = |cport: u16, flags: u8, payload: &[u8]| {
                TcpFrame::new(CLIENT_MAC, CL0_MAC, sa(CLIENT, cport), sa(VIP, WRITE_PORT))
                    .with_flags(flags)
                    .with_seq_ack(client_seq, backend_seq.wrapping_add(1))
                    .with_payload(payload)
            };
            let before = fx.counters()?;
            let syn_acks: Vec<Vec<u8>> = snat_ports
                .iter()
                .map(|&port| backend(port, SYN | ACK, b"").bytes())
                .collect::<Result<_>>()?;
            let acks: Vec<Vec<u8>> = (0..n)
                .map(|i| client(base + i as u16, ACK, b"").bytes())
                .collect::<Result<_>>()?;
            let (mut syn_ack_ns, mut ack_ns) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for (i, f) in syn_acks.iter().enumerate() {
                let (a, ns, _) = run_once(lb, f, bk0, 1)?;
                ensure!(
                    matches!(a, Action::Redirect | Action::Tx),
                    "round {round}, flow {i} (SNAT port {}): SYN-ACK: {a:?}; counters moved: {:?}",
                    snat_ports[i],
                    fx.counters()?.changes_since(&before)
                );
                syn_ack_ns.push(ns);
            }
            for ack in &acks {
                let (a, ns, _) = run_once(lb, ack, cl0, 1)?;
                ensure!(matches!(a, Action::Redirect | Action::Tx), "ACK: {a:?}");
                ack_ns.push(ns);
            }
            // A small Bolt-sized request and response on every flow.
            let request = [0u8; 64];
            let mut est_ns = Vec::with_capacity(n);
            let mut reply_ns = Vec::with_capacity(n);
            let requests: Vec<Vec<u8>> = (0..n)
                .map(|i| client(base + i as u16, PSH | ACK, &request).bytes())
                .collect::<Result<_>>()?;
            let replies: Vec<Vec<u8>> = snat_ports
                .iter()
                .map(|&p| backend(p, PSH | ACK, &request).bytes())
                .collect::<Result<_>>()?;
            // Each path in its own pass over the flows: timed back to back, the second packet
            // of a flow would find the entries the first one pulled into the cache.
            for req in &requests {
                let (a, ns, _) = run_once(lb, req, cl0, 1)?;
                ensure!(
                    matches!(a, Action::Redirect | Action::Tx),
                    "established: {a:?}"
                );
                est_ns.push(ns);
            }
            for rep in &replies {
                let (a, ns, _) = run_once(lb, rep, bk0, 1)?;
                ensure!(matches!(a, Action::Redirect | Action::Tx), "reply: {a:?}");
                reply_ns.push(ns);
            }
            // Not for a VIP: to the lb host's own address (e.g. ssh), left alone.
            let other =
                TcpFrame::syn(CLIENT_MAC, CL0_MAC, sa(CLIENT, 50000), sa(CL0_ADDR, 22)).bytes()?;
            let (a, non_vip, out) = run_once(lb, &other, cl0, plan.repeat)?;
            ensure!(a == Action::Pass, "non-VIP frame: {a:?}");
            ensure!(out == other, "the non-VIP frame was modified");
            let (a, floor_repeat, _) = run_once(pass, &other, cl0, plan.repeat)?;
            ensure!(a == Action::Pass, "lb_pass: {a:?}");
            // New flows again, with 90 % of the SNAT ports to db01 taken: every port but each
            // tenth one (the round's own flows hold some of those too) by an idle flow written
            // into the table. A port search now meets a taken port nine times in ten.
            let (lo, hi) = SNAT_PORTS;
            let held: std::collections::HashSet<u16> = snat_ports.iter().copied().collect();
            fx.occupy_snat_ports((lo..=hi).filter(|p| p % 10 != 0 && !held.contains(p)))?;
            // The agent's GC would now rewrite the port hints from the table: do what a pass does.
            fx.rewrite_port_hints()?;
            let lb: &Xdp = fx.ebpf.program("lb_xdp").context("no lb_xdp")?.try_into()?;
            let warm_base = 2000 + (plan.rounds * (n + BUSY_FRAMES) + round * WARM_FRAMES) as u16;
            for i in 0..WARM_FRAMES {
                let f = client_syn(warm_base + i as u16, READ_PORT).bytes()?;
                let (action, _, out) = run_once(lb, &f, cl0, 1)?;
                ensure!(
                    matches!(action, Action::Redirect | Action::Tx)
                        && [DB02, DB03]
                            .iter()
                            .any(|b| out.get(30..34) == Some(&b.octets()[..])),
                    "round {round}: warm-up SYN {i} to the read service not forwarded: {action:?}"
                );
            }
            let busy_base = 2000 + (plan.rounds * n + round * BUSY_FRAMES) as u16;
            let mut syn_busy_ns = Vec::with_capacity(BUSY_FRAMES);
            let mut busy_refused = 0usize;
            for i in 0..BUSY_FRAMES {
                let f = client_syn(busy_base + i as u16, WRITE_PORT).bytes()?;
                let (action, ns, out) = run_once(lb, &f, cl0, 1)?;
                // Forwarded to db01, or refused (a RST back to the client: every port tried
                // was taken).
                let forwarded = out.get(30..34) == Some(&DB01.octets()[..]);
                let refused = action == Action::Tx && out.get(30..34) == Some(&CLIENT.octets()[..]);
                ensure!(
                    matches!(action, Action::Redirect | Action::Tx) && (forwarded || refused),
                    "round {round}: SYN {i} at 90 % occupancy neither forwarded nor refused: {action:?}"
                );
                busy_refused += usize::from(refused);
                syn_busy_ns.push(ns);
            }
            // Every round starts from empty tables: the same occupancy, and the SNAT ports of the
            // previous rounds' flows free again.
            clear_tables(fx)?;
            rounds.push(CostRound {
                floor_once_ns: median(&mut floor_once),
                floor_repeat_ns: floor_repeat,
                syn_ns: median(&mut syn_ns),
                syn_busy_ns: median(&mut syn_busy_ns),
                syn_busy_refused: busy_refused as f64 / BUSY_FRAMES as f64,
                syn_ack_ns: median(&mut syn_ack_ns),
                handshake_ack_ns: median(&mut ack_ns),
                established_ns: median(&mut est_ns),
                reply_ns: median(&mut reply_ns),
                non_vip_ns: non_vip,
            });
        }
        Ok(rounds)
    })
}
