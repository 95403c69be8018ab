//! `/metrics`: the stats document in Prometheus text format, through `prometheus-client`.
//!
//! Names and labels are stable (dashboards and alerts depend on them):
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `lb_backend_up` | gauge (0/1) | service, backend |
//! | `lb_backend_in_set` | gauge (0/1) | service, backend |
//! | `lb_backend_admin` | gauge (1 for the current override) | backend, state=ready\|drain\|disable |
//! | `lb_check_latency_seconds` | gauge (last check) | service, backend |
//! | `lb_service_new_flows_total` | counter | service |
//! | `lb_service_packets_total` | counter | service, direction=in\|out |
//! | `lb_service_bytes_total` | counter | service, direction |
//! | `lb_service_drops_total` | counter | service |
//! | `lb_backend_new_flows_total` | counter | backend |
//! | `lb_backend_packets_total` | counter | backend, direction |
//! | `lb_backend_bytes_total` | counter | backend, direction |
//! | `lb_datapath_events_total` | counter | event (the data path's global counter name) |
//! | `lb_nic_xdp_total` | counter | iface, counter (the driver's XDP counter, queues summed) |
//! | `lb_set_generation` | gauge | service |
//! | `lb_uptime_seconds` | gauge | |
//!
//! "in" is client to backend, "out" is backend to client. Backend counters cover all services.
//! `lb_nic_xdp_total` is what `ethtool -S` reports with "xdp" in the name, one series per
//! counter with the queue index taken out (`rx_queue_0_xdp_packets` and `rx_queue_1_...` are
//! `counter="rx_xdp_packets"`); per-queue values are only in `/stats.json`.
//! A fresh registry is filled from the document on every scrape, so `/metrics` always equals
//! `/stats.json` read at the same moment.
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::model::{Counters, StatsDoc};
use crate::live::Admin;

type Labels = Vec<(&'static str, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    // prometheus-client appends `_total` to counters.
    reg.register(name, help, f.clone());
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, GaugeF> {
    let f = Family::<Labels, GaugeF>::default();
    reg.register(name, help, f.clone());
    f
}

fn flows_packets_bytes(
    flows: &Family<Labels, Counter>,
    packets: &Family<Labels, Counter>,
    bytes: &Family<Labels, Counter>,
    key: &'static str,
    name: &str,
    c: &Counters,
) {
    let l = |extra: Option<&'static str>| {
        let mut v: Labels = vec![(key, name.to_string())];
        if let Some(d) = extra {
            v.push(("direction", d.to_string()));
        }
        v
    };
    flows.get_or_create(&l(None)).inc_by(c.new_flows);
    packets.get_or_create(&l(Some("in"))).inc_by(c.packets_in);
    packets.get_or_create(&l(Some("out"))).inc_by(c.packets_out);
    bytes.get_or_create(&l(Some("in"))).inc_by(c.bytes_in);
    bytes.get_or_create(&l(Some("out"))).inc_by(c.bytes_out);
}

/// The document in Prometheus text format (ends with `# EOF`).
pub fn encode_doc(doc: &StatsDoc) -> Result<String> {
    let mut reg = Registry::default();
    let up = gauge_family(
        &mut reg,
        "lb_backend_up",
        "1 if the backend's check for this service is UP (or the service has no check)",
    );
    let in_set = gauge_family(
        &mut reg,
        "lb_backend_in_set",
        "1 if the backend is in the service's installed set",
    );
    let admin = gauge_family(
        &mut reg,
        "lb_backend_admin",
        "Operator override of the backend: 1 for the current state (ready, drain, disable)",
    );
    let latency = gauge_family(
        &mut reg,
        "lb_check_latency_seconds",
        "Duration of the last health check",
    );
    let s_flows = counter_family(
        &mut reg,
        "lb_service_new_flows",
        "New connections balanced by the service",
    );
    let s_packets = counter_family(
        &mut reg,
        "lb_service_packets",
        "Packets of the service (in: client to backend, out: backend to client)",
    );
    let s_bytes = counter_family(
        &mut reg,
        "lb_service_bytes",
        "Bytes of the service (in: client to backend, out: backend to client)",
    );
    let s_drops = counter_family(
        &mut reg,
        "lb_service_drops",
        "Packets for the service that the data path dropped",
    );
    let b_flows = counter_family(
        &mut reg,
        "lb_backend_new_flows",
        "New connections sent to the backend (all services)",
    );
    let b_packets = counter_family(
        &mut reg,
        "lb_backend_packets",
        "Packets to (in) and from (out) the backend, all services",
    );
    let b_bytes = counter_family(
        &mut reg,
        "lb_backend_bytes",
        "Bytes to (in) and from (out) the backend, all services",
    );
    let events = counter_family(
        &mut reg,
        "lb_datapath_events",
        "The data path's global event counters",
    );
    let nic = counter_family(
        &mut reg,
        "lb_nic_xdp",
        "The NIC driver's XDP counters (ethtool -S), summed over queues",
    );
    let generation = gauge_family(
        &mut reg,
        "lb_set_generation",
        "Generation of the service's installed backend set (counts swaps)",
    );
    let active = gauge_family(
        &mut reg,
        "lb_active_flows",
        "Live connections of the pair (established + in handshake) at the last table GC pass",
    );
    let mc_active = gauge_family(
        &mut reg,
        "lb_maxconn_active",
        "Connections counted against maxconn: per limited (service, backend) pair, and without labels the global count",
    );
    let mc_limit = gauge_family(
        &mut reg,
        "lb_maxconn_limit",
        "The maxconn limit: per limited (service, backend) pair, and without labels the global one",
    );
    let t_entries = gauge_family(
        &mut reg,
        "lb_table_entries",
        "Entries in a connection table (two per connection) at the last GC pass",
    );
    let t_capacity = gauge_family(&mut reg, "lb_table_capacity", "Size of a connection table");
    let uptime = GaugeF::default();
    reg.register(
        "lb_uptime_seconds",
        "Time since the agent started",
        uptime.clone(),
    );

    for s in &doc.services {
        let sl: Labels = vec![("service", s.name.clone())];
        flows_packets_bytes(
            &s_flows,
            &s_packets,
            &s_bytes,
            "service",
            &s.name,
            &s.counters,
        );
        s_drops
            .get_or_create(&sl)
            .inc_by(s.counters.drops.unwrap_or(0));
        generation.get_or_create(&sl).set(s.generation as f64);
        for p in &s.backends {
            let pl: Labels = vec![("service", s.name.clone()), ("backend", p.backend.clone())];
            up.get_or_create(&pl).set(if p.up { 1.0 } else { 0.0 });
            in_set
                .get_or_create(&pl)
                .set(if p.in_set { 1.0 } else { 0.0 });
            if let Some(ms) = p.last_latency_ms {
                latency.get_or_create(&pl).set(ms / 1000.0);
            }
            if let Some(a) = p.active_flows {
                active.get_or_create(&pl).set(a as f64);
            }
            if let (Some(m), Some(a)) = (p.maxconn, p.maxconn_active) {
                mc_limit.get_or_create(&pl).set(m as f64);
                mc_active.get_or_create(&pl).set(a as f64);
            }
        }
    }
    for b in &doc.backends {
        flows_packets_bytes(
            &b_flows,
            &b_packets,
            &b_bytes,
            "backend",
            &b.name,
            &b.counters,
        );
        for (a, word) in [
            (Admin::Ready, "ready"),
            (Admin::Drain, "drain"),
            (Admin::Disable, "disable"),
        ] {
            admin
                .get_or_create(&vec![
                    ("backend", b.name.clone()),
                    ("state", word.to_string()),
                ])
                .set(if b.admin == a { 1.0 } else { 0.0 });
        }
    }
    for e in &doc.datapath {
        events
            .get_or_create(&vec![("event", e.name.clone())])
            .inc_by(e.value);
    }
    for n in &doc.nic {
        for (name, v) in &n.counters {
            nic.get_or_create(&vec![("iface", n.iface.clone()), ("counter", name.clone())])
                .inc_by(*v);
        }
    }
    if let Some(m) = doc.maxconn {
        mc_limit.get_or_create(&vec![]).set(m as f64);
        mc_active
            .get_or_create(&vec![])
            .set(doc.maxconn_active as f64);
    }
    if let Some(t) = &doc.tables {
        for (name, f) in [("established", t.established), ("embryonic", t.embryonic)] {
            let l: Labels = vec![("table", name.to_string())];
            t_entries.get_or_create(&l).set(f.entries as f64);
            t_capacity.get_or_create(&l).set(f.capacity as f64);
        }
        t_entries
            .get_or_create(&vec![("table", "slots".to_string())])
            .set(t.slots as f64);
    }
    uptime.set(doc.uptime_s);

    let mut out = String::new();
    encode(&mut out, &reg).context("encode metrics")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::tests::doc;
    use std::collections::HashMap;

    /// One sample line: name, labels, value.
    type Series = (String, Vec<(String, String)>, f64);

    /// Parses the text format: `name{k="v",...} value` lines; checks the `# TYPE` of each.
    fn parse(text: &str) -> (HashMap<String, String>, Vec<Series>) {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        let mut eof = false;
        for line in text.lines() {
            assert!(!eof, "content after # EOF");
            if line == "# EOF" {
                eof = true;
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (n, t) = rest.split_once(' ').unwrap();
                types.insert(n.to_string(), t.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), vec![]),
                Some((n, l)) => {
                    let l = l.strip_suffix('}').unwrap();
                    let labels = l
                        .split(',')
                        .filter(|x| !x.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            let v = v.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
            };
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            samples.push((name, labels, value));
        }
        assert!(eof, "no # EOF");
        (types, samples)
    }

    fn value(s: &[Series], name: &str, labels: &[(&str, &str)]) -> f64 {
        s.iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
            .2
    }

    #[test]
    fn metrics_parse_with_stable_names_and_labels() {
        let text = encode_doc(&doc()).unwrap();
        let (types, s) = parse(&text);
        let wd = [("service", "write"), ("backend", "db01")];
        assert_eq!(value(&s, "lb_active_flows", &wd), 4.0);
        assert_eq!(value(&s, "lb_maxconn_active", &wd), 4.0);
        assert_eq!(value(&s, "lb_maxconn_limit", &wd), 4.0);
        assert_eq!(
            value(&s, "lb_table_entries", &[("table", "established")]),
            6.0
        );
        assert_eq!(
            value(&s, "lb_table_capacity", &[("table", "embryonic")]),
            100.0
        );
        assert_eq!(value(&s, "lb_table_entries", &[("table", "slots")]), 4.0);
        for (name, t) in [
            ("lb_backend_up", "gauge"),
            ("lb_backend_in_set", "gauge"),
            ("lb_check_latency_seconds", "gauge"),
            ("lb_service_new_flows", "counter"),
            ("lb_service_packets", "counter"),
            ("lb_service_bytes", "counter"),
            ("lb_service_drops", "counter"),
            ("lb_backend_new_flows", "counter"),
            ("lb_backend_packets", "counter"),
            ("lb_backend_bytes", "counter"),
            ("lb_datapath_events", "counter"),
            ("lb_nic_xdp", "counter"),
            ("lb_set_generation", "gauge"),
            ("lb_uptime_seconds", "gauge"),
            ("lb_active_flows", "gauge"),
            ("lb_maxconn_active", "gauge"),
            ("lb_maxconn_limit", "gauge"),
            ("lb_table_entries", "gauge"),
            ("lb_table_capacity", "gauge"),
        ] {
            assert_eq!(
                types.get(name).map(String::as_str),
                Some(t),
                "{name}\n{text}"
            );
        }
        let up = [("service", "write"), ("backend", "db01")];
        assert_eq!(value(&s, "lb_backend_up", &up), 1.0);
        assert_eq!(value(&s, "lb_backend_in_set", &up), 1.0);
        assert_eq!(value(&s, "lb_check_latency_seconds", &up), 0.0015);
        let down = [("service", "write"), ("backend", "db02")];
        assert_eq!(value(&s, "lb_backend_up", &down), 0.0);
        assert_eq!(value(&s, "lb_backend_in_set", &down), 0.0);
        assert_eq!(
            value(&s, "lb_service_new_flows_total", &[("service", "write")]),
            16.0
        );
        assert_eq!(
            value(&s, "lb_service_new_flows_total", &[("service", "read")]),
            0.0
        );
        assert_eq!(
            value(
                &s,
                "lb_service_packets_total",
                &[("service", "write"), ("direction", "in")]
            ),
            160.0
        );
        assert_eq!(
            value(
                &s,
                "lb_service_bytes_total",
                &[("service", "write"), ("direction", "out")]
            ),
            32000.0
        );
        assert_eq!(
            value(&s, "lb_service_drops_total", &[("service", "write")]),
            1.0
        );
        assert_eq!(
            value(&s, "lb_backend_new_flows_total", &[("backend", "db01")]),
            16.0
        );
        assert_eq!(
            value(
                &s,
                "lb_backend_bytes_total",
                &[("backend", "db01"), ("direction", "in")]
            ),
            16000.0
        );
        assert_eq!(
            value(
                &s,
                "lb_datapath_events_total",
                &[("event", "pass_not_ipv4")]
            ),
            48.0
        );
        assert_eq!(
            value(
                &s,
                "lb_nic_xdp_total",
                &[("iface", "veth0"), ("counter", "rx_xdp_packets")]
            ),
            42.0
        );
        assert_eq!(
            value(
                &s,
                "lb_nic_xdp_total",
                &[("iface", "veth0"), ("counter", "rx_xdp_tx_errors")]
            ),
            1.0
        );
        assert!(
            !s.iter()
                .any(|(_, l, _)| l.iter().any(|(_, v)| v.contains("queue"))),
            "per-queue names in /metrics"
        );
        assert_eq!(value(&s, "lb_set_generation", &[("service", "write")]), 3.0);
        assert_eq!(
            value(
                &s,
                "lb_backend_admin",
                &[("backend", "db02"), ("state", "drain")]
            ),
            1.0
        );
        assert!(value(&s, "lb_uptime_seconds", &[]) >= 0.0);
    }
}
