//! The agent's live view for operators: what each service's set is, how each (service,
//! backend) pair's checks stand, and the operator's overrides. Written by the supervisor (the
//! map owner's loop), read by the admin server and `lb status`. Counters are not here: they
//! are read from the data path's per-CPU maps when asked for.
use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::config::Config;

/// An operator's override of one backend (all services), like HAProxy's runtime API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// Follows its checks.
    #[default]
    Ready,
    /// Gets no new connections; established ones continue (rolling upgrades).
    Drain,
    /// Out of every set and its flows are reset (maintenance).
    Disable,
}

/// How one (service, backend) pair stands.
#[derive(Debug, Clone, Serialize)]
pub struct PairView {
    pub backend: String,
    /// Stable backend id (index into the per-backend maps).
    pub backend_id: u32,
    /// `backend_maxconn` of the service, if limited.
    pub maxconn: Option<u32>,
    /// "UP", "DOWN", "UP (going down 1/3)", "DOWN (going up 1/2)", or "NO CHECK".
    pub state: String,
    pub up: bool,
    /// In the installed set now.
    pub in_set: bool,
    /// Last check result ("positive", "negative: 404 false", "failed: timeout after 1s"), if any.
    pub last_check: Option<String>,
    pub last_latency_ms: Option<f64>,
    /// Seconds since the last transition.
    pub since_change_s: Option<f64>,
    #[serde(skip)]
    pub since: Option<Instant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// The service's id in the data path.
    pub id: u32,
    pub name: String,
    pub vip: String,
    pub backend_port: u16,
    pub check: Option<String>,
    pub generation: u64,
    pub members: Vec<String>,
    pub pairs: Vec<PairView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LiveView {
    pub instance: String,
    pub mode: String,
    pub ifaces: Vec<String>,
    #[serde(skip)]
    pub started: Instant,
    pub started_at: SystemTime,
    pub services: Vec<ServiceView>,
    /// Per backend (configuration order): name and operator override.
    pub admin: Vec<(String, Admin)>,
    /// The global `maxconn`, if set.
    pub maxconn: Option<u32>,
    /// The connection tables at the GC's last pass (none before the first).
    pub tables: Option<crate::gc::TableFill>,
}

impl LiveView {
    pub fn new(cfg: &Config, mode: &str, ifaces: &[String]) -> Self {
        let services = cfg
            .services
            .iter()
            .map(|s| ServiceView {
                id: s.id,
                name: s.name.clone(),
                vip: s.vip.to_string(),
                backend_port: s.backend_port,
                check: s.check.as_ref().map(|c| c.name.clone()),
                generation: 0,
                members: vec![],
                pairs: s
                    .backends
                    .iter()
                    .map(|&b| PairView {
                        backend: cfg.backends[b].name.clone(),
                        backend_id: cfg.backends[b].id,
                        maxconn: (s.backend_maxconn != 0).then_some(s.backend_maxconn),
                        state: if s.check.is_some() {
                            "DOWN".into()
                        } else {
                            "NO CHECK".into()
                        },
                        up: s.check.is_none(),
                        in_set: false,
                        last_check: None,
                        last_latency_ms: None,
                        since_change_s: None,
                        since: None,
                    })
                    .collect(),
            })
            .collect();
        Self {
            instance: cfg.instance.clone(),
            mode: mode.to_string(),
            ifaces: ifaces.to_vec(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            services,
            admin: cfg
                .backends
                .iter()
                .map(|b| (b.name.clone(), Admin::Ready))
                .collect(),
            maxconn: (cfg.maxconn != 0).then_some(cfg.maxconn),
            tables: None,
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A copy with the time-relative fields filled in for now.
    pub fn snapshot(&self) -> LiveView {
        let mut v = self.clone();
        for s in &mut v.services {
            for p in &mut s.pairs {
                p.since_change_s = p.since.map(|t| t.elapsed().as_secs_f64());
            }
        }
        v
    }
}

/// Shared handle: the supervisor writes, readers take snapshots.
pub type Live = Arc<RwLock<LiveView>>;
