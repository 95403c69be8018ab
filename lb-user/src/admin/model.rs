//! What every admin view shows, in one document: the live view (sets, check states, operator
//! overrides), the data path's counters (read when asked for) and per-second rates over the
//! last sampling window. `/stats.json` is this document; the dashboard, `;csv` and `/metrics`
//! are renderings of it, so they always agree.
use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    config::{Balance, Config},
    live::{Admin, LiveView},
    nic::NicStats,
    status::Snapshot,
};

/// The shortest window rates are computed over.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
/// How often the background task samples the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Counters of a service or a backend, summed over CPUs. "in" is client to backend, "out" is
/// backend to client (the replies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub new_flows: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets dropped by the data path (services only: drops are not per backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<u64>,
}

/// Per-second rates of [`Counters`] over the last window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub new_flows: f64,
    pub packets_in: f64,
    pub bytes_in: f64,
    pub packets_out: f64,
    pub bytes_out: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<f64>,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.new_flows += o.new_flows;
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        if let Some(d) = o.drops {
            self.drops = Some(self.drops.unwrap_or(0) + d);
        }
    }

    /// Rates from `prev` to `self` over `dt` (counters only grow; a smaller value counts as 0).
    pub fn rates_since(&self, prev: &Counters, dt: Duration) -> Rates {
        let s = dt.as_secs_f64();
        let r = |a: u64, b: u64| {
            if s > 0.0 {
                a.saturating_sub(b) as f64 / s
            } else {
                0.0
            }
        };
        Rates {
            new_flows: r(self.new_flows, prev.new_flows),
            packets_in: r(self.packets_in, prev.packets_in),
            bytes_in: r(self.bytes_in, prev.bytes_in),
            packets_out: r(self.packets_out, prev.packets_out),
            bytes_out: r(self.bytes_out, prev.bytes_out),
            drops: match (self.drops, prev.drops) {
                (Some(a), Some(b)) => Some(r(a, b)),
                (Some(_), None) => Some(0.0),
                _ => None,
            },
        }
    }
}

/// One reading of every counter, keyed by name.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    pub services: HashMap<String, Counters>,
    pub backends: HashMap<String, Counters>,
    /// The data path's global event counters, in their order.
    pub global: Vec<(String, u64)>,
    /// Connections held against `maxconn` limits.
    pub maxconn: crate::status::MaxconnView,
}

impl Sample {
    pub fn from_snapshot(s: &Snapshot, at: Instant) -> Self {
        Self {
            at,
            services: s
                .services
                .iter()
                .map(|(n, c)| {
                    (
                        n.clone(),
                        Counters {
                            new_flows: c.new_flows,
                            packets_in: c.packets,
                            bytes_in: c.bytes,
                            packets_out: c.reply_packets,
                            bytes_out: c.reply_bytes,
                            drops: Some(c.drops),
                        },
                    )
                })
                .collect(),
            backends: s
                .backends
                .iter()
                .map(|(n, c)| {
                    (
                        n.clone(),
                        Counters {
                            new_flows: c.new_flows,
                            packets_in: c.packets,
                            bytes_in: c.bytes,
                            packets_out: c.reply_packets,
                            bytes_out: c.reply_bytes,
                            drops: None,
                        },
                    )
                })
                .collect(),
            global: s.global.clone(),
            maxconn: s.maxconn.clone(),
        }
    }
}

/// The last few samples; rates are taken between the newest one and the newest one at least
/// [`MIN_WINDOW`] older, so they describe the last second or so, not the time since start.
#[derive(Debug, Default)]
pub struct Sampler {
    samples: VecDeque<Sample>,
}

/// Two samples at least [`MIN_WINDOW`] apart.
pub struct Window<'a> {
    pub prev: &'a Sample,
    pub cur: &'a Sample,
}

impl Window<'_> {
    pub fn dt(&self) -> Duration {
        self.cur.at.saturating_duration_since(self.prev.at)
    }

    fn rates(&self, cur: Option<&Counters>, prev: Option<&Counters>) -> Rates {
        match (cur, prev) {
            (Some(c), Some(p)) => c.rates_since(p, self.dt()),
            (Some(c), None) => c.rates_since(
                &Counters {
                    drops: c.drops.map(|_| 0),
                    ..Counters::default()
                },
                self.dt(),
            ),
            _ => Rates::default(),
        }
    }

    pub fn service(&self, name: &str) -> Rates {
        self.rates(self.cur.services.get(name), self.prev.services.get(name))
    }

    pub fn backend(&self, name: &str) -> Rates {
        self.rates(self.cur.backends.get(name), self.prev.backends.get(name))
    }

    pub fn global(&self, name: &str) -> f64 {
        let get = |s: &Sample| s.global.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let s = self.dt().as_secs_f64();
        match (get(self.cur), get(self.prev)) {
            (Some(c), Some(p)) if s > 0.0 => c.saturating_sub(p) as f64 / s,
            _ => 0.0,
        }
    }
}

impl Sampler {
    /// Adds a sample (they come in time order) and forgets the ones no window needs.
    pub fn push(&mut self, s: Sample) {
        self.samples.push_back(s);
        // Keep the newest sample that is at least MIN_WINDOW older than the newest, and
        // everything after it.
        while self.samples.len() > 2 {
            let newest = self.samples.back().map(|s| s.at);
            let second = self.samples.get(1).map(|s| s.at);
            match (newest, second) {
                (Some(n), Some(s)) if n.saturating_duration_since(s) >= MIN_WINDOW => {
                    self.samples.pop_front();
                }
                _ => break,
            }
        }
    }

    /// The most recent window of at least [`MIN_WINDOW`], if there is one yet.
    pub fn window(&self) -> Option<Window<'_>> {
        let cur = self.samples.back()?;
        let prev = self
            .samples
            .iter()
            .rev()
            .find(|s| cur.at.saturating_duration_since(s.at) >= MIN_WINDOW)?;
        Some(Window { prev, cur })
    }
}

/// What the configuration says about a service that the live view does not carry.
#[derive(Debug, Clone)]
pub struct ServiceStatic {
    pub balance: &'static str,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

/// The parts of the configuration the admin views show.
#[derive(Debug, Clone)]
pub struct Static {
    pub services: Vec<ServiceStatic>,
    /// Backend name and address, in configuration order.
    pub backends: Vec<(String, String)>,
    pub refresh: Duration,
}

impl Static {
    pub fn new(cfg: &Config) -> Self {
        Self {
            services: cfg
                .services
                .iter()
                .map(|s| ServiceStatic {
                    balance: match s.balance {
                        Balance::First => "first",
                        Balance::RoundRobin => "roundrobin",
                        Balance::Maglev => "maglev",
                    },
                    rise: s.check.as_ref().map(|c| c.rise),
                    fall: s.check.as_ref().map(|c| c.fall),
                })
                .collect(),
            backends: cfg
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.address.to_string()))
                .collect(),
            refresh: cfg.admin.refresh,
        }
    }
}

/// `/stats.json`. Field names are stable: add, never rename.
#[derive(Debug, Clone, Serialize)]
pub struct StatsDoc {
    pub instance: String,
    /// XDP program mode: "native" or "generic".
    pub mode: String,
    pub ifaces: Vec<String>,
    pub uptime_s: f64,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
    /// The dashboard's refresh interval.
    pub refresh_ms: u64,
    /// The window the rates were computed over (none yet right after the start).
    pub rate_window_s: Option<f64>,
    /// Why counters are missing, if they are (e.g. the maps are not pinned yet).
    pub counters_error: Option<String>,
    /// Sum over services.
    pub totals: Totals,
    pub services: Vec<ServiceDoc>,
    pub backends: Vec<BackendDoc>,
    /// The data path's global event counters.
    pub datapath: Vec<EventDoc>,
    /// The NIC's own XDP counters (`ethtool -S`), one entry per attached interface.
    pub nic: Vec<NicStats>,
    /// The connection tables at the agent's last GC pass (none before the first): entries
    /// against capacity, slots held, live connections per (service id, backend id).
    pub tables: Option<crate::gc::TableFill>,
    /// The global `maxconn` (none: no limit) and the connections counted against it.
    pub maxconn: Option<u32>,
    pub maxconn_active: u64,
    /// In a pair: its streams, as the agent last wrote them (`pair::read_status`).
    pub pair: Option<crate::pair::stream::PairStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub counters: Counters,
    pub rates: Rates,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceDoc {
    pub name: String,
    pub vip: String,
    pub backend_port: u16,
    pub check: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub balance: String,
    /// Generation of the installed set (counts every swap).
    pub generation: u64,
    /// The installed set.
    pub members: Vec<String>,
    /// This service's traffic.
    pub counters: Counters,
    pub rates: Rates,
    /// One entry per configured backend of the service.
    pub backends: Vec<PairDoc>,
}

/// A (service, backend) pair: check state from the live view; counters are the backend's over
/// all services (the data path counts per backend, not per pair).
#[derive(Debug, Clone, Serialize)]
pub struct PairDoc {
    pub backend: String,
    /// Live connections of this pair (established + in handshake) at the last GC pass.
    pub active_flows: Option<u64>,
    /// `backend_maxconn` of the service (none: no limit) and the slots this pair holds.
    pub maxconn: Option<u32>,
    pub maxconn_active: Option<u64>,
    pub state: String,
    pub up: bool,
    pub in_set: bool,
    pub admin: Admin,
    pub last_check: Option<String>,
    pub last_latency_ms: Option<f64>,
    pub since_change_s: Option<f64>,
    pub counters: Counters,
    pub rates: Rates,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendDoc {
    pub name: String,
    pub address: String,
    pub admin: Admin,
    pub counters: Counters,
    pub rates: Rates,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventDoc {
    pub name: String,
    pub value: u64,
    pub rate: f64,
}

/// Puts the document together. `now`: counters read for this request (`Err`: why not);
/// `nic`: the attached interfaces' XDP counters.
pub fn build(
    live: &LiveView,
    st: &Static,
    now: Result<&Sample, String>,
    window: Option<Window<'_>>,
    nic: Vec<NicStats>,
) -> StatsDoc {
    let (sample, counters_error) = match now {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e)),
    };
    let svc_counters = |name: &str| {
        sample
            .and_then(|s| s.services.get(name).copied())
            .unwrap_or(Counters {
                drops: Some(0),
                ..Counters::default()
            })
    };
    let be_counters = |name: &str| {
        sample
            .and_then(|s| s.backends.get(name).copied())
            .unwrap_or_default()
    };
    let svc_rates = |name: &str| {
        window.as_ref().map(|w| w.service(name)).unwrap_or(Rates {
            drops: Some(0.0),
            ..Rates::default()
        })
    };
    let be_rates = |name: &str| window.as_ref().map(|w| w.backend(name)).unwrap_or_default();
    let admin_of = |name: &str| {
        live.admin
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_default()
    };
    let mut totals = Totals {
        counters: Counters {
            drops: Some(0),
            ..Counters::default()
        },
        rates: Rates {
            drops: Some(0.0),
            ..Rates::default()
        },
    };
    let services: Vec<ServiceDoc> = live
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let counters = svc_counters(&s.name);
            let rates = svc_rates(&s.name);
            totals.counters.add(&counters);
            add_rates(&mut totals.rates, &rates);
            let ss = st.services.get(i);
            ServiceDoc {
                name: s.name.clone(),
                vip: s.vip.clone(),
                backend_port: s.backend_port,
                check: s.check.clone(),
                rise: ss.and_then(|x| x.rise),
                fall: ss.and_then(|x| x.fall),
                balance: ss.map(|x| x.balance).unwrap_or("").to_string(),
                generation: s.generation,
                members: s.members.clone(),
                counters,
                rates,
                backends: s
                    .pairs
                    .iter()
                    .map(|p| PairDoc {
                        backend: p.backend.clone(),
                        active_flows: live.tables.as_ref().map(|t| t.flows_of(s.id, p.backend_id)),
                        maxconn: p.maxconn,
                        maxconn_active: p.maxconn.map(|_| {
                            sample
                                .and_then(|x| {
                                    x.maxconn
                                        .pairs
                                        .iter()
                                        .find(|r| r.service == s.name && r.backend == p.backend)
                                })
                                .map(|r| r.active)
                                .unwrap_or(0)
                        }),
                        state: p.state.clone(),
                        up: p.up,
                        in_set: p.in_set,
                        admin: admin_of(&p.backend),
                        last_check: p.last_check.clone(),
                        last_latency_ms: p.last_latency_ms,
                        since_change_s: p.since_change_s,
                        counters: be_counters(&p.backend),
                        rates: be_rates(&p.backend),
                    })
                    .collect(),
            }
        })
        .collect();
    let backends = live
        .admin
        .iter()
        .map(|(name, admin)| BackendDoc {
            name: name.clone(),
            address: st
                .backends
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| a.clone())
                .unwrap_or_default(),
            admin: *admin,
            counters: be_counters(name),
            rates: be_rates(name),
        })
        .collect();
    let datapath = sample
        .map(|s| {
            s.global
                .iter()
                .map(|(n, v)| EventDoc {
                    name: n.clone(),
                    value: *v,
                    rate: window.as_ref().map(|w| w.global(n)).unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default();
    StatsDoc {
        instance: live.instance.clone(),
        mode: live.mode.clone(),
        ifaces: live.ifaces.clone(),
        uptime_s: live.uptime().as_secs_f64(),
        started_at: live
            .started_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        refresh_ms: st.refresh.as_millis() as u64,
        rate_window_s: window.as_ref().map(|w| w.dt().as_secs_f64()),
        counters_error,
        totals,
        services,
        backends,
        datapath,
        nic,
        tables: live.tables.clone(),
        maxconn: live.maxconn,
        maxconn_active: sample.map(|x| x.maxconn.active).unwrap_or(0),
        pair: None,
    }
}

fn add_rates(t: &mut Rates, r: &Rates) {
    t.new_flows += r.new_flows;
    t.packets_in += r.packets_in;
    t.bytes_in += r.bytes_in;
    t.packets_out += r.packets_out;
    t.bytes_out += r.bytes_out;
    if let Some(d) = r.drops {
        t.drops = Some(t.drops.unwrap_or(0.0) + d);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::live::PairView;

    pub fn counters(n: u64) -> Counters {
        Counters {
            new_flows: n,
            packets_in: 10 * n,
            bytes_in: 1000 * n,
            packets_out: 8 * n,
            bytes_out: 2000 * n,
            drops: None,
        }
    }

    pub fn sample(at: Instant, n: u64) -> Sample {
        Sample {
            at,
            services: [(
                "write".to_string(),
                Counters {
                    drops: Some(n / 10),
                    ..counters(n)
                },
            )]
            .into(),
            backends: [("db01".to_string(), counters(n))].into(),
            global: vec![("pass_not_ipv4".into(), 3 * n)],
            maxconn: crate::status::MaxconnView {
                limit: 0,
                active: 4,
                pairs: vec![crate::status::MaxconnRow {
                    service: "write".into(),
                    backend: "db01".into(),
                    limit: 4,
                    active: 4,
                }],
            },
        }
    }

    #[test]
    fn rates_are_over_the_last_window_not_since_start() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        assert!(s.window().is_none());
        // 1000 flows in the first second, then 10 per second.
        s.push(sample(t0, 0));
        assert!(s.window().is_none(), "one sample is no window");
        s.push(sample(t0 + Duration::from_millis(500), 900));
        assert!(s.window().is_none(), "half a second is too short");
        s.push(sample(t0 + Duration::from_secs(1), 1000));
        s.push(sample(t0 + Duration::from_secs(2), 1010));
        s.push(sample(t0 + Duration::from_secs(3), 1020));
        let w = s.window().unwrap();
        assert_eq!(w.dt(), Duration::from_secs(1));
        let r = w.service("write");
        assert_eq!(r.new_flows, 10.0);
        assert_eq!(r.bytes_in, 10_000.0);
        assert_eq!(r.bytes_out, 20_000.0);
        assert_eq!(r.drops, Some(1.0));
        assert_eq!(w.backend("db01").packets_in, 100.0);
        assert_eq!(w.backend("db01").drops, None);
        assert_eq!(w.global("pass_not_ipv4"), 30.0);
        assert_eq!(w.backend("nope"), Rates::default());
        // Old samples are forgotten.
        assert!(s.samples.len() <= 3, "{}", s.samples.len());
        // A window of 1.5 s when sampling is late: per second over that window.
        s.push(sample(t0 + Duration::from_millis(4500), 1035));
        let w = s.window().unwrap();
        assert_eq!(w.dt(), Duration::from_millis(1500));
        assert_eq!(w.service("write").new_flows, 10.0);
    }

    #[test]
    fn counters_that_went_backwards_give_zero_not_a_wrap() {
        let a = counters(5);
        let b = counters(7);
        assert_eq!(a.rates_since(&b, Duration::from_secs(1)).new_flows, 0.0);
    }

    /// A live view with services write (db01, db02) and read (db02).
    pub fn live() -> LiveView {
        let text = r#"
instance = "t"
[[backend]]
name = "db01"
address = "10.0.1.10"
[[backend]]
name = "db02"
address = "10.0.1.11"
[[service]]
name = "write"
vip = "198.18.0.10:7680"
backend_port = 7687
backends = ["db01", "db02"]
check = "neo4j-ha-master"
backend_maxconn = 4
[[service]]
name = "read"
vip = "198.18.0.10:7681"
backend_port = 7687
backends = ["db02"]
"#;
        let cfg = Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let mut v = LiveView::new(&cfg, "native", &["veth0".into()]);
        v.services[0].generation = 3;
        v.services[0].members = vec!["db01".into()];
        v.services[0].pairs[0] = PairView {
            backend: "db01".into(),
            backend_id: 0,
            maxconn: Some(4),
            state: "UP".into(),
            up: true,
            in_set: true,
            last_check: Some("positive".into()),
            last_latency_ms: Some(1.5),
            since_change_s: Some(12.0),
            since: None,
        };
        v.services[0].pairs[1].state = "DOWN (going up, 1 passed)".into();
        v.services[0].pairs[1].last_check = Some("negative: HTTP 404 \"false\"".into());
        v.admin[1].1 = Admin::Drain;
        v.tables = Some(crate::gc::TableFill {
            embryonic: crate::gc::Fill {
                entries: 2,
                capacity: 100,
            },
            established: crate::gc::Fill {
                entries: 6,
                capacity: 1000,
            },
            slots: 4,
            pairs: vec![crate::gc::PairFlows {
                service: 0,
                backend: 0,
                established: 3,
                embryonic: 1,
            }],
        });
        v
    }

    pub fn statics() -> Static {
        Static {
            services: vec![
                ServiceStatic {
                    balance: "first",
                    rise: Some(2),
                    fall: Some(3),
                },
                ServiceStatic {
                    balance: "roundrobin",
                    rise: None,
                    fall: None,
                },
            ],
            backends: vec![
                ("db01".into(), "10.0.1.10".into()),
                ("db02".into(), "10.0.1.11".into()),
            ],
            refresh: Duration::from_secs(2),
        }
    }

    pub fn doc() -> StatsDoc {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        s.push(sample(t0, 10));
        s.push(sample(t0 + Duration::from_secs(1), 15));
        let now = sample(t0 + Duration::from_millis(1200), 16);
        build(&live(), &statics(), Ok(&now), s.window(), vec![nic()])
    }

    /// veth0's counters: two queues of xdp_packets and a driver total.
    pub fn nic() -> NicStats {
        NicStats::from_ethtool(
            "veth0",
            "NIC statistics:\n     rx_queue_0_xdp_packets: 40\n     rx_queue_1_xdp_packets: 2\n     \
             rx_queue_0_xdp_tx_errors: 1\n     rx_queue_0_drops: 9\n",
        )
    }

    #[test]
    fn the_document_joins_live_view_counters_and_rates() {
        let d = doc();
        assert_eq!(d.services.len(), 2);
        let w = &d.services[0];
        assert_eq!((w.name.as_str(), w.generation), ("write", 3));
        assert_eq!(w.counters.new_flows, 16);
        assert_eq!(w.rates.new_flows, 5.0);
        assert_eq!(w.backends[0].counters.bytes_in, 16_000);
        assert_eq!(w.backends[1].admin, Admin::Drain);
        assert_eq!(w.backends[1].counters, Counters::default());
        // Live connections from the GC's last pass, maxconn slots from the data path.
        let (a, b) = (&w.backends[0], &w.backends[1]);
        assert_eq!(
            (a.active_flows, a.maxconn, a.maxconn_active),
            (Some(4), Some(4), Some(4))
        );
        assert_eq!(
            (b.active_flows, b.maxconn, b.maxconn_active),
            (Some(0), Some(4), Some(0))
        );
        let r = &d.services[1].backends[0];
        assert_eq!(
            (r.active_flows, r.maxconn, r.maxconn_active),
            (Some(0), None, None)
        );
        let t = d.tables.as_ref().unwrap();
        assert_eq!(
            (t.established.entries, t.established.capacity, t.slots),
            (6, 1000, 4)
        );
        assert_eq!((d.maxconn, d.maxconn_active), (None, 4));
        assert_eq!(d.totals.counters.new_flows, 16);
        assert_eq!(d.totals.counters.drops, Some(1));
        assert_eq!(d.backends[1].address, "10.0.1.11");
        assert_eq!(d.datapath[0].value, 48);
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j["services"][0]["backends"][0]["state"], "UP");
        assert_eq!(j["services"][0]["backends"][1]["admin"], "drain");
        assert_eq!(j["rate_window_s"], 1.0);
        assert_eq!(j["nic"][0]["iface"], "veth0");
        assert_eq!(j["nic"][0]["counters"]["rx_xdp_packets"], 42);
        assert_eq!(j["nic"][0]["per_queue"]["rx_queue_1_xdp_packets"], 2);
        assert!(j["nic"][0]["error"].is_null());
    }

    #[test]
    fn without_counters_the_document_says_why() {
        let d = build(
            &live(),
            &statics(),
            Err("no pins".into()),
            None,
            vec![NicStats::failed("veth0", "ethtool not found")],
        );
        assert_eq!(d.counters_error.as_deref(), Some("no pins"));
        assert_eq!(d.services[0].counters.new_flows, 0);
        assert!(d.rate_window_s.is_none());
        assert_eq!(d.nic[0].error.as_deref(), Some("ethtool not found"));
    }
}
