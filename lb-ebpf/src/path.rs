//! The two TCP paths: client -> VIP (forward: new flows are created here) and
//! backend -> SNAT address (reply).
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use aya_log_ebpf::info;
use lb_common::{
    is_closing, Config, Counter, Flow, FlowKey, Service, CAPTURE_DIR_IN, CAPTURE_DIR_OUT,
    CAPTURE_NO_ACTION, CONFIG_F_DEBUG, CONFIG_F_GENERIC, CONFIG_F_ROUTE_SRC, CONN_END_CLOSED,
    CONN_END_RESET, CONN_END_REUSED, DIR_FORWARD, DIR_REPLY, FLOW_SYN_RECV, FLOW_SYN_SENT,
    IPPROTO_TCP, SERVICE_F_MAXCONN_RESET,
};
use network_types::eth::EthHdr;

use crate::{
    capture, conntrack, events, forward,
    maps::reset_epoch,
    maxconn, nat,
    parse::{Frame, Ip, Tcp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rst, service, snat, stats,
};

#[inline(always)]
fn key_of(ip: &Ip, tcp: &Tcp) -> FlowKey {
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
#[allow(clippy::too_many_arguments)]
pub fn forward(
    ctx: &XdpContext,
    f: Frame,
    eth: &mut EthHdr,
    ip: &mut Ip,
    tcp: &mut Tcp,
    svc: Service,
    cfg: &Config,
    now: u64,
) -> u32 {
    let key = key_of(ip, tcp);
    let flags = tcp.flags;
    let bytes = f.len() as u64;
    count_large(cfg, f);

    if let Some(found) = conntrack::lookup(&key, now, cfg.embryonic_timeout_ns) {
        if ip.ttl <= 1 {
            stats::count(Counter::PassTtl);
            return xdp_action::XDP_PASS;
        }
        let plain_syn = flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN;
        if plain_syn && is_closing(found.flow, found.partner) {
            // The client reuses the tuple of a closed connection (TIME_WAIT reuse): the old
            // flow is over; this SYN starts a new one below (its slot, if any, was released
            // when it closed; `maxconn::acquire` takes care of a leftover).
            events::ended(&key, found.flow, found.partner, now, CONN_END_REUSED);
            conntrack::delete(&key, &found);
            stats::count(Counter::ClosedTupleReused);
        } else if plain_syn && !found.established && is_reset(found.flow) {
            // A SYN retransmit whose first SYN went to a backend demoted since: the handshake
            // starts over on the current set (the new master), instead of a refusal.
            events::ended(&key, found.flow, found.partner, now, CONN_END_RESET);
            conntrack::delete(&key, &found);
            maxconn::release(&key);
        } else {
            return existing(ctx, eth, ip, tcp, &key, found, svc, cfg, now, bytes);
        }
    }

    // No flow: only a plain SYN may start one.
    if flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return refuse(ctx, cfg, svc.id, flags, Counter::RstNoFlow);
    }
    if ip.ttl <= 1 {
        stats::count(Counter::PassTtl);
        return xdp_action::XDP_PASS;
    }
    let Some((backend, generation)) = service::pick(&svc, &key) else {
        // No backend holds the role (e.g. no master). While the agent hands the role over,
        // hold the SYN (the client's retransmit lands on the new master); else refuse fast,
        // never black-hole.
        if crate::maps::syn_held(svc.id, now) {
            stats::service_drop(svc.id, Counter::SynHeld);
            return xdp_action::XDP_DROP;
        }
        return refuse(ctx, cfg, svc.id, flags, Counter::RstNoBackend);
    };
    let generic = cfg.flags & CONFIG_F_GENERIC != 0;
    let tot_len = if generic { 0 } else { u16::from_be(ip.tot_len) };
    let ingress = ctx.ingress_ifindex() as u32;
    let src_from = if cfg.flags & CONFIG_F_ROUTE_SRC != 0 {
        forward::SrcFrom::RouteSrc
    } else {
        forward::SrcFrom::Fib
    };
    let hop = match forward::lookup(ctx, ingress, backend.addr, backend.port, tot_len, src_from) {
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
    if !maxconn::admits(svc.id, backend.id, svc.backend_maxconn, cfg.maxconn) {
        return over_limit(ctx, cfg, &svc, backend.id, flags);
    }
    let reply = Flow {
        created_ns: now,
        last_seen_ns: now,
        generation: generation as u32,
        seq_end: 0,
        nat_saddr: ip.daddr,
        nat_daddr: ip.saddr,
        ifindex: ingress,
        backend_id: backend.id,
        service_id: svc.id,
        nat_sport: tcp.dport,
        nat_dport: tcp.sport,
        smac: eth.dst_addr,
        dmac: eth.src_addr,
        state: FLOW_SYN_SENT,
        dir: DIR_REPLY,
        close: 0,
        first_fin: 0,
        epoch: reset_epoch(svc.id, backend.id),
        ack: 0,
        bytes: 0,
    };
    let Some(port) = snat::claim(
        backend.id,
        backend.addr,
        backend.port,
        hop.src,
        cfg.snat_port_min,
        cfg.snat_port_max,
        &reply,
        now,
        cfg.embryonic_timeout_ns,
    ) else {
        return refuse(ctx, cfg, svc.id, flags, Counter::RstSnatExhausted);
    };
    let fwd = Flow {
        nat_saddr: hop.src,
        nat_daddr: backend.addr,
        ifindex: hop.ifindex,
        nat_sport: port,
        nat_dport: backend.port,
        smac: hop.smac,
        dmac: hop.dmac,
        dir: DIR_FORWARD,
        bytes: payload_len(ip, tcp),
        seq_end: u32::from_be_bytes(tcp.seq).wrapping_add(1),
        ..reply
    };
    if !conntrack::insert_embryonic(&key, &fwd) {
        conntrack::remove_embryonic(&fwd.partner_key(IPPROTO_TCP));
        stats::service_drop(svc.id, Counter::DropEmbryonicFull);
        return xdp_action::XDP_DROP;
    }
    stats::count(Counter::NewFlows);
    if let Some(s) = stats::service(svc.id) {
        s.new_flows += 1;
    }
    if let Some(b) = stats::backend(backend.id) {
        b.new_flows += 1;
    }
    if cfg.flags & CONFIG_F_DEBUG != 0 {
        info!(
            ctx,
            "new flow {:i}:{} -> backend {:i}:{} via snat {:i}:{} gen {}",
            u32::from_be(ip.saddr),
            u16::from_be(tcp.sport),
            u32::from_be(backend.addr),
            u16::from_be(backend.port),
            u32::from_be(hop.src),
            u16::from_be(port),
            generation
        );
    }
    send(ctx, eth, ip, tcp, &fwd, bytes, false)
}

/// A client segment of an existing flow: forwarded on the flow's mapping (a SYN on an
/// established key too; on an embryonic key it is a retransmit).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn existing(
    ctx: &XdpContext,
    eth: &mut EthHdr,
    ip: &mut Ip,
    tcp: &mut Tcp,
    key: &FlowKey,
    found: conntrack::Found,
    svc: Service,
    cfg: &Config,
    now: u64,
    bytes: u64,
) -> u32 {
    let flags = tcp.flags;
    // Copied before `promote`, which deletes the embryonic entries `found` points into: a
    // deleted element of a preallocated (LRU) hash map goes back to the free list at once
    // and another CPU's insert may overwrite it while we still read it.
    let flow = *found.flow;
    if is_reset(&flow) {
        events::ended(key, &flow, found.partner, now, CONN_END_RESET);
        conntrack::delete(key, &found);
        maxconn::release(key);
        return refuse(ctx, cfg, flow.service_id, flags, Counter::RstFlowReset);
    }
    if found.established && !conntrack::rst_acceptable(found.flow, found.partner, tcp) {
        stats::service_drop(flow.service_id, Counter::DropRstOutOfWindow);
        return xdp_action::XDP_DROP;
    }
    if !found.established && !conntrack::handshake_ack_acceptable(&flow, found.partner, tcp) {
        stats::service_drop(flow.service_id, Counter::DropHandshakeStale);
        return xdp_action::XDP_DROP;
    }
    // Before `promote`, which copies the entry: an ACK that establishes may carry a FIN.
    conntrack::track(found.flow, found.partner.close, tcp, now);
    let payload = payload_len(ip, tcp);
    conntrack::track_seq(
        found.flow,
        found.partner.ack,
        tcp,
        payload as u32,
        found.established,
    );
    found.flow.bytes += payload;
    if flags & TCP_FIN != 0 && fins_both_ways(found.flow, found.partner) {
        maxconn::release(key);
    }
    if found.established {
        if flags & TCP_ACK != 0 && conntrack::client_closed_and_acked(found.flow, found.partner) {
            end_at_last_ack(cfg, key, found, now);
        } else {
            conntrack::touch(found.flow, now);
        }
    } else if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK && flow.state == FLOW_SYN_RECV {
        if let Some(action) = establish(cfg, key, &found, &svc, &flow, now) {
            return action;
        }
    }
    send(ctx, eth, ip, tcp, &flow, bytes, false)
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
        snat::release_hint(backend, port, cfg.snat_port_min, cfg.snat_port_max);
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
    if !conntrack::promote(key, found, now) {
        if limited {
            maxconn::release(key);
        }
        stats::service_drop(svc.id, Counter::DropEstablishedFull);
        return Some(xdp_action::XDP_DROP);
    }
    None
}

/// A packet from a configured backend to an SNAT-range port (`old_range`: a port of an
/// earlier range, whose flows may still be alive).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn reply(
    ctx: &XdpContext,
    f: Frame,
    eth: &mut EthHdr,
    ip: &mut Ip,
    tcp: &mut Tcp,
    cfg: &Config,
    now: u64,
    old_range: bool,
) -> u32 {
    count_large(cfg, f);
    let key = key_of(ip, tcp);
    let flags = tcp.flags;
    let Some(found) = conntrack::lookup(&key, now, cfg.embryonic_timeout_ns) else {
        if old_range {
            // Not lb's port any more unless a flow still holds it: the host's own traffic.
            return xdp_action::XDP_PASS;
        }
        return refuse(ctx, cfg, u32::MAX, flags, Counter::RstNoFlow);
    };
    if ip.ttl <= 1 {
        stats::count(Counter::PassTtl);
        return xdp_action::XDP_PASS;
    }
    // A demoted master's segment in flight (say a COMMIT's SUCCESS) still reaches the client:
    // the reset happens on the client's next segment (`existing`). Only a handshake that has
    // not reached the client yet is refused here.
    if is_reset(found.flow) && !found.established {
        let service = found.flow.service_id;
        // The forward key (where the flow's slot is recorded), read before the delete.
        let fwd_key = found.flow.partner_key(IPPROTO_TCP);
        events::ended(&fwd_key, found.partner, found.flow, now, CONN_END_RESET);
        conntrack::delete(&key, &found);
        maxconn::release(&fwd_key);
        return refuse(ctx, cfg, service, flags, Counter::RstFlowReset);
    }
    if found.established && !conntrack::rst_acceptable(found.flow, found.partner, tcp) {
        stats::service_drop(found.flow.service_id, Counter::DropRstOutOfWindow);
        return xdp_action::XDP_DROP;
    }
    if !found.established && !conntrack::handshake_reply_acceptable(found.partner, tcp) {
        // The RST ends the backend's stale connection on this tuple: the client's SYN
        // retransmit then opens a clean one.
        return refuse(
            ctx,
            cfg,
            found.flow.service_id,
            flags,
            Counter::RstHandshakeStale,
        );
    }
    conntrack::track(found.flow, found.partner.close, tcp, now);
    let payload = payload_len(ip, tcp);
    conntrack::track_seq(
        found.flow,
        found.partner.ack,
        tcp,
        payload as u32,
        found.established,
    );
    found.flow.bytes += payload;
    if flags & TCP_FIN != 0 && fins_both_ways(found.flow, found.partner) {
        maxconn::release(&found.flow.partner_key(IPPROTO_TCP));
    }
    if found.established {
        conntrack::touch(found.flow, now);
    } else if tcp.flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        conntrack::mark_syn_recv(found.partner, found.flow);
    }
    let flow = *found.flow;
    send(ctx, eth, ip, tcp, &flow, f.len() as u64, true)
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
fn over_limit(ctx: &XdpContext, cfg: &Config, svc: &Service, backend: u32, flags: u8) -> u32 {
    if let Some(b) = stats::backend(backend) {
        b.maxconn_refused += 1;
    }
    if svc.flags & SERVICE_F_MAXCONN_RESET != 0 {
        return refuse(ctx, cfg, svc.id, flags, Counter::RstMaxconn);
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
fn refuse(ctx: &XdpContext, cfg: &Config, service: u32, flags: u8, reason: Counter) -> u32 {
    if flags & TCP_RST != 0 {
        stats::service_drop(service, Counter::DropNoFlow);
        return xdp_action::XDP_DROP;
    }
    let action = rst::reply(ctx, cfg.rst_per_sec);
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
fn count_large(cfg: &Config, f: Frame) {
    if cfg.flags & CONFIG_F_GENERIC != 0 && f.len() > 1514 {
        stats::count(Counter::GenericLarge);
    }
}

/// Rewrites the packet for `flow`, counts it and transmits it.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    eth: &mut EthHdr,
    ip: &mut Ip,
    tcp: &mut Tcp,
    flow: &Flow,
    bytes: u64,
    is_reply: bool,
) -> u32 {
    let cap = capture::sampled(flow.service_id);
    if cap.service != 0 {
        capture::emit(
            ctx,
            &cap,
            flow.service_id,
            CAPTURE_DIR_IN,
            CAPTURE_NO_ACTION,
            is_reply,
        );
    }
    nat::rewrite(eth, ip, tcp, flow);
    if is_reply {
        stats::count(Counter::ReplyPackets);
        if let Some(s) = stats::service(flow.service_id) {
            s.reply_packets += 1;
            s.reply_bytes += bytes;
        }
        if let Some(b) = stats::backend(flow.backend_id) {
            b.reply_packets += 1;
            b.reply_bytes += bytes;
        }
    } else {
        stats::count(Counter::FwdPackets);
        if let Some(s) = stats::service(flow.service_id) {
            s.packets += 1;
            s.bytes += bytes;
        }
        if let Some(b) = stats::backend(flow.backend_id) {
            b.packets += 1;
            b.bytes += bytes;
        }
    }
    let action = forward::transmit(ctx, flow.ifindex);
    if cap.service != 0 {
        // The redirect itself happens after the program returns: the frame is still ours.
        capture::emit(
            ctx,
            &cap,
            flow.service_id,
            CAPTURE_DIR_OUT,
            action as u8,
            is_reply,
        );
    }
    action
}
