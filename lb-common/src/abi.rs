//! The layout of every map, as a hash: the agent stores these in the pinned `META` map when it
//! creates an instance's maps and refuses to reuse pinned maps whose hashes differ (aya reuses
//! a pinned map by name without checking its type, sizes or flags).
use core::mem::{offset_of, size_of};

use crate::{
    names, Backend, BackendKey, BackendSet, BackendStats, CaptureConfig, CaptureHeader, Config,
    Flow, FlowKey, Handshake, HandshakeSlot, IndexSet, IndexWay, PortRange, RstBucket, Service,
    ServiceKey, ServiceStats, Slot, INDEX_SETS, MAXCONN_ENTRIES,
};

/// Bump when a map's meaning changes without its layout changing.
pub const ABI_VERSION: u64 = 1;

/// Index of the slot in `META` that holds the instance's ABI version.
pub const META_VERSION_SLOT: u32 = 63;
/// Size of the `META` array.
pub const META_ENTRIES: u32 = 64;

const fn mix(h: u64, v: u64) -> u64 {
    let mut h = h ^ v;
    h = h.wrapping_mul(0x0100_0000_01b3);
    h ^ (h >> 29)
}

const fn fold(values: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < values.len() {
        h = mix(h, values[i]);
        i += 1;
    }
    h
}

/// BPF map type numbers (uapi `enum bpf_map_type`).
const HASH: u64 = 1;
const ARRAY: u64 = 2;
const PERF_EVENT_ARRAY: u64 = 4;
const PERCPU_ARRAY: u64 = 6;
const ARRAY_OF_MAPS: u64 = 12;
const DEVMAP_HASH: u64 = 25;

const FLOW_KEY: u64 = fold(&[
    size_of::<FlowKey>() as u64,
    offset_of!(FlowKey, saddr) as u64,
    offset_of!(FlowKey, daddr) as u64,
    offset_of!(FlowKey, sport) as u64,
    offset_of!(FlowKey, dport) as u64,
    offset_of!(FlowKey, proto) as u64,
]);

const FLOW: u64 = fold(&[
    size_of::<Flow>() as u64,
    offset_of!(Flow, created_ns) as u64,
    offset_of!(Flow, last_seen_ns) as u64,
    offset_of!(Flow, generation) as u64,
    offset_of!(Flow, seq_end) as u64,
    offset_of!(Flow, nat_saddr) as u64,
    offset_of!(Flow, nat_daddr) as u64,
    offset_of!(Flow, ifindex) as u64,
    offset_of!(Flow, backend_id) as u64,
    offset_of!(Flow, service_id) as u64,
    offset_of!(Flow, nat_sport) as u64,
    offset_of!(Flow, nat_dport) as u64,
    offset_of!(Flow, smac) as u64,
    offset_of!(Flow, dmac) as u64,
    offset_of!(Flow, state) as u64,
    offset_of!(Flow, dir) as u64,
    offset_of!(Flow, close) as u64,
    offset_of!(Flow, first_fin) as u64,
    offset_of!(Flow, epoch) as u64,
    offset_of!(Flow, ack) as u64,
    offset_of!(Flow, bytes) as u64,
]);

const BACKEND_SET: u64 = fold(&[
    size_of::<BackendSet>() as u64,
    size_of::<Backend>() as u64,
    offset_of!(BackendSet, generation) as u64,
    offset_of!(BackendSet, count) as u64,
    offset_of!(BackendSet, members) as u64,
    offset_of!(BackendSet, maglev) as u64,
    offset_of!(Backend, addr) as u64,
    offset_of!(Backend, port) as u64,
    offset_of!(Backend, id) as u64,
]);

/// The static layout hash of map `name` (type, key and value layout), or `None` if unknown.
pub const fn layout(name: &str) -> Option<u64> {
    let v = match name.as_bytes() {
        b if eq(b, names::CONFIG) => fold(&[ARRAY, 4, size_of::<Config>() as u64]),
        b if eq(b, names::SERVICES) => fold(&[
            HASH,
            size_of::<ServiceKey>() as u64,
            size_of::<Service>() as u64,
            offset_of!(Service, flags) as u64,
            offset_of!(Service, backend_maxconn) as u64,
        ]),
        b if eq(b, names::BACKEND_SETS) => fold(&[ARRAY_OF_MAPS, 4, 4, BACKEND_SET]),
        b if eq(b, names::BACKENDS) => fold(&[HASH, size_of::<BackendKey>() as u64, 4]),
        b if eq(b, names::CT_EMBRYONIC) => fold(&[
            ARRAY,
            crate::BPF_F_MMAPABLE as u64,
            4,
            size_of::<HandshakeSlot>() as u64,
            offset_of!(HandshakeSlot, ctrl) as u64,
            offset_of!(HandshakeSlot, hs) as u64,
            size_of::<Handshake>() as u64,
            FLOW,
            offset_of!(Handshake, fwd) as u64,
            offset_of!(Handshake, rev) as u64,
            crate::HANDSHAKE_SLOT_MAP,
        ]),
        b if eq(b, names::CT_INDEX) => fold(&[
            ARRAY,
            4,
            size_of::<IndexSet>() as u64,
            INDEX_SETS as u64,
            offset_of!(IndexWay, client) as u64,
            offset_of!(IndexWay, backend) as u64,
            offset_of!(IndexWay, stamp) as u64,
        ]),
        b if eq(b, names::CT_ESTABLISHED) => fold(&[HASH, FLOW_KEY, FLOW]),
        b if eq(b, names::RR_CURSOR) => fold(&[ARRAY, 4, 4]),
        b if eq(b, names::TX_PORTS) => fold(&[DEVMAP_HASH, 4, 8]),
        b if eq(b, names::STATS_GLOBAL) => fold(&[PERCPU_ARRAY, 4, 8, crate::COUNTER_MAX as u64]),
        b if eq(b, names::STATS_SERVICE) => {
            fold(&[PERCPU_ARRAY, 4, size_of::<ServiceStats>() as u64])
        }
        b if eq(b, names::STATS_BACKEND) => {
            fold(&[PERCPU_ARRAY, 4, size_of::<BackendStats>() as u64])
        }
        b if eq(b, names::SNAT_ADDRS) => fold(&[HASH, 4, 4]),
        b if eq(b, names::ROUTE_SRC) => fold(&[HASH, 4, 4]),
        b if eq(b, names::OLD_PORTS) => fold(&[
            ARRAY,
            4,
            size_of::<PortRange>() as u64,
            offset_of!(PortRange, min) as u64,
            offset_of!(PortRange, max) as u64,
        ]),
        b if eq(b, names::RESET_EPOCH) => fold(&[ARRAY, 4, 4]),
        b if eq(b, names::SYN_HOLD) => fold(&[ARRAY, 4, 8]),
        b if eq(b, names::SLOTS) => fold(&[
            HASH,
            FLOW_KEY,
            size_of::<Slot>() as u64,
            offset_of!(Slot, created_ns) as u64,
            offset_of!(Slot, index) as u64,
        ]),
        b if eq(b, names::MAXCONN_ACTIVE) => fold(&[ARRAY, 4, 8, MAXCONN_ENTRIES as u64]),
        b if eq(b, names::RST_BUCKET) => fold(&[PERCPU_ARRAY, 4, size_of::<RstBucket>() as u64]),
        b if eq(b, names::CAPTURE) => fold(&[
            ARRAY,
            4,
            size_of::<CaptureConfig>() as u64,
            offset_of!(CaptureConfig, service) as u64,
            offset_of!(CaptureConfig, sample) as u64,
            offset_of!(CaptureConfig, snaplen) as u64,
        ]),
        // The events' header is part of what the program and `lb capture` agree on.
        b if eq(b, names::CAPTURE_EVENTS) => fold(&[
            PERF_EVENT_ARRAY,
            4,
            4,
            size_of::<CaptureHeader>() as u64,
            offset_of!(CaptureHeader, ts_ns) as u64,
            offset_of!(CaptureHeader, service) as u64,
            offset_of!(CaptureHeader, len) as u64,
            offset_of!(CaptureHeader, caplen) as u64,
            offset_of!(CaptureHeader, dir) as u64,
            offset_of!(CaptureHeader, action) as u64,
            offset_of!(CaptureHeader, reply) as u64,
        ]),
        _ => return None,
    };
    Some(mix(mix(v, name_hash(name)), ABI_VERSION))
}

/// Two maps may share a layout (the per-service and per-backend counters do); the name keeps
/// their hashes apart, so a swapped pin would be caught too.
const fn name_hash(name: &str) -> u64 {
    let b = name.as_bytes();
    let mut h = 0u64;
    let mut i = 0;
    while i < b.len() {
        h = mix(h, b[i] as u64);
        i += 1;
    }
    h
}

const fn eq(a: &[u8], b: &str) -> bool {
    let b = b.as_bytes();
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pinned_map_has_a_layout_and_they_differ() {
        let mut seen = std::vec::Vec::new();
        for n in names::ALL {
            let h = layout(n).unwrap_or_else(|| panic!("no layout for {n}"));
            assert!(!seen.contains(&h), "{n} collides");
            seen.push(h);
        }
    }
}
