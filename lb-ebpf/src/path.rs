//! The two TCP paths: client -> VIP (forward: new flows are created here) and
//! backend -> SNAT address (reply).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use aya_log_ebpf::info;
use lb_common::{
    is_closing, Config, Counter, Flow, FlowKey, Handshake, Service, CAPTURE_DIR_IN,
    CAPTURE_DIR_OUT, CAPTURE_NO_ACTION, CONFIG_F_DEBUG, CONFIG_F_GENERIC, CONFIG_F_ROUTE_SRC,
    CONFIG_F_SYNC, CONN_END_CLOSED, CONN_END_RESET, CONN_END_REUSED, DIR_FORWARD, DIR_REPLY,
    FLOW_SYN_RECV, FLOW_SYN_SENT, IPPROTO_TCP, SERVICE_F_MAXCONN_RESET,
};
use network_types::eth::EthHdr;

use crate::{
    capture,
    conntrack::{self, Side},
    events, forward, hints,
    maps::reset_epoch,
    maxconn, nat,
    parse::{Frame, Ip, Tcp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rst, service, snat, stats,
};

/// One TCP segment of a service or to an SNAT port, as both paths see it (Katran's
/// `packet_description`): its headers, its flow key, and the time and settings it is handled
/// with. The paths take it whole; what they rewrite, they rewrite here.
pub struct Packet<'a> {
    pub ctx: &'a XdpContext,
    pub eth: &'a mut EthHdr,
    pub ip: &'a mut Ip,
    pub tcp: &'a mut Tcp,
    /// The segment's own tuple (as received; a local of the entry's frame, so that only it,
    /// not the whole description, is on the stack where helpers read it).
    pub key: &'a FlowKey,
    pub cfg: &'a Config,
    /// `clock::now()` when the frame arrived.
    pub now: u64,
    /// The frame's length.
    pub bytes: u64,
}

impl<'a> Packet<'a> {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: &'a XdpContext,
        f: Frame,
        eth: &'a mut EthHdr,
        ip: &'a mut Ip,
        tcp: &'a mut Tcp,
        key: &'a FlowKey,
        cfg: &'a Config,
        now: u64,
    ) -> Self {
        Self {
            ctx,
            eth,
            ip,
            tcp,
            key,
            cfg,
            now,
            bytes: f.len() as u64,
        }
    }
}

/// The tuple of a segment with headers `ip` and `tcp`.
#[inline(always)]
pub fn key_of(ip: &Ip, tcp: &Tcp) -> FlowKey {
    FlowKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: tcp.sport,
        dport: tcp.dport,
        proto: IPPROTO_TCP,
        _pad: 0,
        _pad16: 0,
    }
}

/// A packet from a client to a VIP:port of `svc`.
#[inline(always)]
pub fn forward(p: &mut Packet, svc: Service) -> u32 {
    count_large(p);

    let found = if p.tcp.is_plain_syn() {
        conntrack::lookup(p.key, Side::Client, p.now, p.cfg)
    } else {
        conntrack::lookup_settled(p.key, Side::Client, p.now, p.cfg)
    };
    if let Some(found) = found {
        if forward::ttl_ends_here(p.ip) {
            return xdp_action::XDP_PASS;
        }
        let plain_syn = p.tcp.is_plain_syn();
        if plain_syn && is_closing(found.flow, found.partner) {
            // The client reuses the tuple of a closed connection (TIME_WAIT reuse): the old
            // flow is over; this SYN starts a new one below (its slot, if any, was released
            // when it closed; `maxconn::acquire` takes care of a leftover).
            events::ended(p.key, found.flow, found.partner, p.now, CONN_END_REUSED);
            conntrack::delete(p.key, &found, p.now);
            stats::count(Counter::ClosedTupleReused);
        } else if plain_syn && !found.established && is_reset(found.flow) {
            // A SYN retransmit whose first SYN went to a backend demoted since: the handshake
            // starts over on the current set (the new master), instead of a refusal.
            events::ended(p.key, found.flow, found.partner, p.now, CONN_END_RESET);
            conntrack::delete(p.key, &found, p.now);
            maxconn::release(p.key);
        } else {
            return existing(p, found, svc);
        }
    }

    // No flow: only a plain SYN may start one.
    if !p.tcp.is_plain_syn() {
        return refuse(p, svc.id, Counter::RstNoFlow);
    }
    if forward::ttl_ends_here(p.ip) {
        return xdp_action::XDP_PASS;
    }
    let Some((backend, generation)) = service::pick(&svc, p.key) else {
        // No backend holds the role (e.g. no master). While the agent hands the role over,
        // hold the SYN (the client's retransmit lands on the new master); else refuse fast,
        // never black-hole.
        if crate::maps::syn_held(svc.id, p.now) {
            stats::service_drop(svc.id, Counter::SynHeld);
            return xdp_action::XDP_DROP;
        }
        return refuse(p, svc.id, Counter::RstNoBackend);
    };
    let generic = p.cfg.flags & CONFIG_F_GENERIC != 0;
    let tot_len = if generic {
        0
    } else {
        u16::from_be(p.ip.tot_len)
    };
    let ingress = p.ctx.ingress_ifindex() as u32;
    let src_from = if p.cfg.flags & CONFIG_F_ROUTE_SRC != 0 {
        forward::SrcFrom::RouteSrc
    } else {
        forward::SrcFrom::Fib
    };
    let hop = match forward::next_hop(
        p.ctx,
        ingress,
        backend.id,
        backend.addr,
        backend.port,
        tot_len,
        src_from,
        p.now,
    ) {
        Ok(hop) => hop,
        Err(_) => {
            stats::service_drop(svc.id, Counter::DropFib);
            return xdp_action::XDP_DROP;
        }
    };

    if !crate::maps::is_snat_addr(hop.src) {
        stats::service_drop(svc.id, Counter::DropNoSnatAddr);
        return xdp_action::XDP_DROP;
    }
    // A handshake takes no slot (its ACK does, in `existing`): only the counts are read.
    if !maxconn::admits(svc.id, backend.id, svc.backend_maxconn, p.cfg.maxconn) {
        return over_limit(p, &svc, backend.id);
    }
    // One record for both directions, built in this CPU's scratch record (off the stack): the
    // port claim writes its port into `fwd` and inserts the record under the reply key, then
    // the index tells the client's next segment where it is.
    let Some(hs) = crate::maps::NEW_HANDSHAKE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: this CPU's map value, valid for the program run; nothing else runs on this CPU
    // meanwhile.
    let hs: &mut Handshake = unsafe { &mut *hs };
    hs.rev = Flow {
        created_ns: p.now,
        last_seen_ns: p.now,
        generation: generation as u32,
        seq_end: 0,
        nat_saddr: p.ip.daddr,
        nat_daddr: p.ip.saddr,
        ifindex: ingress,
        backend_id: backend.id,
        service_id: svc.id,
        nat_sport: p.tcp.dport,
        nat_dport: p.tcp.sport,
        smac: p.eth.dst_addr,
        dmac: p.eth.src_addr,
        state: FLOW_SYN_SENT,
        dir: DIR_REPLY,
        close: 0,
        first_fin: 0,
        epoch: reset_epoch(svc.id, backend.id),
        ack: 0,
        bytes: 0,
    };
    hs.fwd = Flow {
        nat_saddr: hop.src,
        nat_daddr: backend.addr,
        ifindex: hop.ifindex,
        nat_sport: 0,
        nat_dport: backend.port,
        smac: hop.smac,
        dmac: hop.dmac,
        dir: DIR_FORWARD,
        bytes: payload_len(p.ip, p.tcp),
        seq_end: u32::from_be_bytes(p.tcp.seq).wrapping_add(1),
        ..hs.rev
    };
    let Some(port) = snat::claim(&backend, hop.src, hs, p.cfg, p.now) else {
        return refuse(p, svc.id, Counter::RstSnatExhausted);
    };
    conntrack::index(p.key, &hs.key(), p.now);
    stats::count(Counter::NewFlows);
    if let Some(s) = stats::service(svc.id) {
        s.new_flows += 1;
    }
    if let Some(b) = stats::backend(backend.id) {
        b.new_flows += 1;
    }
    if p.cfg.flags & CONFIG_F_DEBUG != 0 {
        info!(
            p.ctx,
            "new flow {:i}:{} -> backend {:i}:{} via snat {:i}:{} gen {}",
            u32::from_be(p.ip.saddr),
            u16::from_be(p.tcp.sport),
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            u32::from_be(hop.src),
            u16::from_be(port),
            generation
        );
    }
    send(p, &hs.fwd, false)
}

/// A client segment of an existing flow: forwarded on the flow's mapping (a SYN on an
/// established key too; on an embryonic key it is a retransmit).
#[inline(always)]
fn existing(p: &mut Packet, found: conntrack::Found, svc: Service) -> u32 {
    let flags = p.tcp.flags;
    // Copied before `promote`, which frees the handshake record `found` points into: another
    // CPU's claim may overwrite a freed way while we still read it.
    let flow = *found.flow;
    if is_reset(&flow) {
        events::ended(p.key, &flow, found.partner, p.now, CONN_END_RESET);
        conntrack::delete(p.key, &found, p.now);
        maxconn::release(p.key);
        return refuse(p, flow.service_id, Counter::RstFlowReset);
    }
    if found.established && !conntrack::rst_acceptable(found.flow, found.partner, p.tcp) {
        stats::service_drop(flow.service_id, Counter::DropRstOutOfWindow);
        return xdp_action::XDP_DROP;
    }
    if !found.established && !conntrack::handshake_ack_acceptable(&flow, found.partner, p.tcp) {
        stats::service_drop(flow.service_id, Counter::DropHandshakeStale);
        return xdp_action::XDP_DROP;
    }
    // Before `promote`, which copies the entry: an ACK that establishes may carry a FIN.
    conntrack::track(found.flow, found.partner.close, p.tcp, p.now);
    let payload = payload_len(p.ip, p.tcp);
    conntrack::track_seq(
        found.flow,
        found.partner.ack,
        p.tcp,
        payload as u32,
        found.established,
    );
    found.flow.bytes += payload;
    if flags & TCP_FIN != 0 && fins_both_ways(found.flow, found.partner) {
        maxconn::release(p.key);
    }
    if found.established {
        if flags & TCP_ACK != 0 && conntrack::client_closed_and_acked(found.flow, found.partner) {
            end_at_last_ack(p.cfg, p.key, found, p.now);
        } else {
            conntrack::touch(found.flow, p.now);
        }
    } else if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK && flow.state == FLOW_SYN_RECV {
        if let Some(action) = establish(p.cfg, p.key, &found, &svc, &flow, p.now) {
            return action;
        }
    }
    send(p, &flow, false)
}

/// The client's ACK of the backend's FIN on a flow it closed first: the connection is over at
/// both ends (the backend's socket closes on this ACK, the client holds the TIME_WAIT). The
/// flow is deleted now, not after a close timeout: its SNAT port is free for the next
/// connection at once, and the agent has nothing to expire. Its slot went with the second FIN.
/// The segment itself still goes out (the caller copied the mapping).
#[inline(always)]
fn end_at_last_ack(cfg: &Config, key: &FlowKey, found: conntrack::Found, now: u64) {
    let partner_key = found.flow.partner_key(IPPROTO_TCP);
    let (backend, port) = (found.flow.backend_id, found.flow.nat_sport);
    // The record is sent from the entries before they are deleted, in one straight reserve,
    // write and submit: a reservation held across the delete's branches is one the 6.1
    // verifier cannot always see released. (Another CPU deleting the same flow at the same
    // instant, a SYN reusing the tuple, would log it too: a duplicate line at worst.)
    events::ended(key, found.flow, found.partner, now, CONN_END_CLOSED);
    if conntrack::delete_established(key, &partner_key) {
        stats::count(Counter::EndedAtLastAck);
        hints::release(backend, port, cfg.snat_port_min, cfg.snat_port_max);
    }
}

/// The client's ACK completes the handshake of `flow`: it takes the flow's connection slot
/// (if a limit applies) and moves the flow to the established table. `Some(action)` when the
/// segment may not pass: the limit filled since the SYN (the segment waits, dropped: the
/// backend has not completed its side, and the client's next segment tries again), or a table
/// is full.
#[inline(always)]
fn establish(
    cfg: &Config,
    key: &FlowKey,
    found: &conntrack::Found,
    svc: &Service,
    flow: &Flow,
    now: u64,
) -> Option<u32> {
    let limited = svc.backend_maxconn != 0 || cfg.maxconn != 0;
    if limited {
        if let Err(why) = maxconn::acquire(
            key,
            svc.id,
            flow.backend_id,
            svc.backend_maxconn,
            cfg.maxconn,
            now,
        ) {
            return Some(match why {
                maxconn::Refused::Limit => {
                    if let Some(b) = stats::backend(flow.backend_id) {
                        b.maxconn_refused += 1;
                    }
                    stats::service_drop(svc.id, Counter::DropMaxconn);
                    xdp_action::XDP_DROP
                }
                maxconn::Refused::TableFull => {
                    stats::service_drop(svc.id, Counter::DropSlotsFull);
                    xdp_action::XDP_DROP
                }
            });
        }
    }
    if !conntrack::promote(key, found, cfg, now, cfg.flags & CONFIG_F_SYNC != 0) {
        if limited {
            maxconn::release(key);
        }
        stats::service_drop(svc.id, Counter::DropEstablishedFull);
        return Some(xdp_action::XDP_DROP);
    }
    None
}

/// A packet from backend `backend` (its id) to an SNAT-range port (`old_range`: a port of an
/// earlier range, whose flows may still be alive).
#[inline(always)]
pub fn reply(p: &mut Packet, backend: u32, old_range: bool) -> u32 {
    count_large(p);
    let flags = p.tcp.flags;
    // A clear bit in the port bitmap: no established flow holds the port (`hints`), so the
    // segment belongs to a handshake, if to anything (a backend's SYN-ACK).
    let maybe_established = old_range
        || hints::held(
            backend,
            p.tcp.dport,
            p.cfg.snat_port_min,
            p.cfg.snat_port_max,
        );
    let Some(found) = conntrack::lookup_reply(p.key, p.now, p.cfg, maybe_established) else {
        if old_range {
            // Not lb's port any more unless a flow still holds it: the host's own traffic.
            return xdp_action::XDP_PASS;
        }
        return refuse(p, u32::MAX, Counter::RstNoFlow);
    };
    if forward::ttl_ends_here(p.ip) {
        return xdp_action::XDP_PASS;
    }
    // A demoted master's segment in flight (say a COMMIT's SUCCESS) still reaches the client:
    // the reset happens on the client's next segment (`existing`). Only a handshake that has
    // not reached the client yet is refused here.
    if is_reset(found.flow) && !found.established {
        let service = found.flow.service_id;
        // The forward key (where the flow's slot is recorded), read before the delete.
        let fwd_key = found.flow.partner_key(IPPROTO_TCP);
        events::ended(&fwd_key, found.partner, found.flow, p.now, CONN_END_RESET);
        conntrack::delete(p.key, &found, p.now);
        maxconn::release(&fwd_key);
        return refuse(p, service, Counter::RstFlowReset);
    }
    if found.established && !conntrack::rst_acceptable(found.flow, found.partner, p.tcp) {
        stats::service_drop(found.flow.service_id, Counter::DropRstOutOfWindow);
        return xdp_action::XDP_DROP;
    }
    if !found.established && !conntrack::handshake_reply_acceptable(found.partner, p.tcp) {
        // The RST ends the backend's stale connection on this tuple: the client's SYN
        // retransmit then opens a clean one.
        return refuse(p, found.flow.service_id, Counter::RstHandshakeStale);
    }
    conntrack::track(found.flow, found.partner.close, p.tcp, p.now);
    let payload = payload_len(p.ip, p.tcp);
    conntrack::track_seq(
        found.flow,
        found.partner.ack,
        p.tcp,
        payload as u32,
        found.established,
    );
    found.flow.bytes += payload;
    if flags & TCP_FIN != 0 && fins_both_ways(found.flow, found.partner) {
        maxconn::release(&found.flow.partner_key(IPPROTO_TCP));
    }
    if found.established {
        conntrack::touch(found.flow, p.now);
    } else if p.tcp.flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        conntrack::mark_syn_recv(found.partner, found.flow);
    }
    let flow = *found.flow;
    send(p, &flow, true)
}

/// Whether both directions sent a FIN: the flow's maxconn slot is released at once. A flow
/// closed by a RST keeps its slot until it is deleted (within about 2 s quiet, by the GC or a
/// port takeover): a spoofed RST that the next genuine segment takes back must not free a slot
/// the connection still uses.
#[inline(always)]
fn fins_both_ways(a: &Flow, b: &Flow) -> bool {
    a.close & b.close & lb_common::FLOW_CLOSE_FIN != 0
}

/// TCP payload bytes of a segment (the IP header has no options: `checked_tcp`).
#[inline(always)]
fn payload_len(ip: &Ip, tcp: &Tcp) -> u64 {
    (u16::from_be(ip.tot_len) as u64).saturating_sub(20 + ((tcp.doff >> 4) as u64) * 4)
}

/// A SYN over a `maxconn` limit: dropped (the client retransmits its SYN, which stands in
/// for HAProxy's queue), or refused with a RST when the service says `on_maxconn = "reset"`.
#[inline(always)]
fn over_limit(p: &Packet, svc: &Service, backend: u32) -> u32 {
    if let Some(b) = stats::backend(backend) {
        b.maxconn_refused += 1;
    }
    if svc.flags & SERVICE_F_MAXCONN_RESET != 0 {
        return refuse(p, svc.id, Counter::RstMaxconn);
    }
    stats::service_drop(svc.id, Counter::DropMaxconn);
    xdp_action::XDP_DROP
}

/// Whether the flow's backend was demoted with reset since the flow was created.
#[inline(always)]
fn is_reset(flow: &Flow) -> bool {
    reset_epoch(flow.service_id, flow.backend_id) != flow.epoch
}

/// Answers a segment that may not pass with a RST (a RST itself is dropped, never answered),
/// counting `reason`.
#[inline(always)]
fn refuse(p: &Packet, service: u32, reason: Counter) -> u32 {
    if p.tcp.flags & TCP_RST != 0 {
        stats::service_drop(service, Counter::DropNoFlow);
        return xdp_action::XDP_DROP;
    }
    let action = rst::reply(p.ctx, p.cfg.rst_per_sec, p.now);
    if action == xdp_action::XDP_TX {
        stats::service_drop(service, reason);
    } else if let Some(s) = stats::service(service) {
        // Not answered (rate limit, counted there): a drop, but not one of `reason`.
        s.drops += 1;
    }
    action
}

/// In generic mode, counts frames larger than an Ethernet MTU (GSO super-packets, which the
/// kernel's generic redirect refuses).
#[inline(always)]
fn count_large(p: &Packet) {
    if p.cfg.flags & CONFIG_F_GENERIC != 0 && p.bytes > 1514 {
        stats::count(Counter::GenericLarge);
    }
}

/// Rewrites the packet for `flow`, counts it and transmits it.
#[inline(always)]
fn send(p: &mut Packet, flow: &Flow, is_reply: bool) -> u32 {
    let cap = capture::sampled(flow.service_id);
    if cap.service != 0 {
        capture::emit(
            p.ctx,
            &cap,
            flow.service_id,
            CAPTURE_DIR_IN,
            CAPTURE_NO_ACTION,
            is_reply,
        );
    }
    nat::rewrite(p.eth, p.ip, p.tcp, flow);
    if is_reply {
        stats::count(Counter::ReplyPackets);
        if let Some(s) = stats::service(flow.service_id) {
            s.reply_packets += 1;
            s.reply_bytes += p.bytes;
        }
        if let Some(b) = stats::backend(flow.backend_id) {
            b.reply_packets += 1;
            b.reply_bytes += p.bytes;
        }
    } else {
        stats::count(Counter::FwdPackets);
        if let Some(s) = stats::service(flow.service_id) {
            s.packets += 1;
            s.bytes += p.bytes;
        }
        if let Some(b) = stats::backend(flow.backend_id) {
            b.packets += 1;
            b.bytes += p.bytes;
        }
    }
    let action = forward::transmit(p.ctx, flow.ifindex);
    if cap.service != 0 {
        // The redirect itself happens after the program returns: the frame is still ours.
        capture::emit(
            p.ctx,
            &cap,
            flow.service_id,
            CAPTURE_DIR_OUT,
            action as u8,
            is_reply,
        );
    }
    action
}
