//! The agent's live view for operators: what each service's set is, how each (service,
//! backend) pair's checks stand, and the operator's overrides. Built from the agent's state
//! ([`crate::state`]) by [`publish`], which the supervisor calls after each change; read by the
//! admin server, and the source of the pinned health mirror. Counters are not here: they are
//! read from the data path's per-CPU maps when asked for.
use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    config::Config,
    state::{AgentState, Pair},
};

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
    /// "UP", "DOWN", "UP (going down, 1 failed)", "DOWN (going up, 1 passed)", or "NO CHECK".
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
    /// The view of `cfg` before the agent decided anything (every set empty, no check yet).
    pub fn new(cfg: &Config, mode: &str, ifaces: &[String]) -> Self {
        let state = AgentState::new(vec![vec![]; cfg.services.len()], cfg.backends.len());
        Self {
            instance: cfg.instance.clone(),
            mode: mode.to_string(),
            ifaces: ifaces.to_vec(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            services: (0..cfg.services.len())
                .map(|s| service_view(cfg, &state, s))
                .collect(),
            admin: admin_view(cfg, &state),
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

/// Shared handle: the supervisor publishes into it, readers take snapshots.
pub type Live = Arc<RwLock<LiveView>>;

/// Publishes service `s` and the operators' overrides of `state` into `view`.
pub fn publish(view: &mut LiveView, cfg: &Config, state: &AgentState, s: usize) {
    if let Some(v) = view.services.get_mut(s) {
        *v = service_view(cfg, state, s);
    }
    view.admin = admin_view(cfg, state);
}

/// Service `s` as `state` has it.
pub fn service_view(cfg: &Config, state: &AgentState, s: usize) -> ServiceView {
    let svc = &cfg.services[s];
    let st = state.services.get(s).cloned().unwrap_or_default();
    ServiceView {
        id: svc.id,
        name: svc.name.clone(),
        vip: svc.vip.to_string(),
        backend_port: svc.backend_port,
        check: svc.check.as_ref().map(|c| c.name.clone()),
        generation: st.generation,
        members: st
            .installed
            .iter()
            .map(|&b| cfg.backends[b].name.clone())
            .collect(),
        pairs: svc
            .backends
            .iter()
            .map(|&b| {
                pair_view(
                    cfg,
                    svc,
                    b,
                    state.pairs.get(&(s, b)),
                    st.installed.contains(&b),
                )
            })
            .collect(),
    }
}

/// One pair: its checks' last word (`pair`: `None` before the first), in the set or not.
fn pair_view(
    cfg: &Config,
    svc: &crate::config::Service,
    b: usize,
    pair: Option<&Pair>,
    in_set: bool,
) -> PairView {
    let checked = svc.check.is_some();
    let up = if checked {
        pair.is_some_and(|p| p.health.up)
    } else {
        true
    };
    let state = match (checked, up, pair.map_or((0, 0), |p| p.progress)) {
        (false, _, _) => "NO CHECK".to_string(),
        (true, true, (_, 0)) => "UP".to_string(),
        (true, true, (_, f)) => format!("UP (going down, {f} failed)"),
        (true, false, (0, _)) => "DOWN".to_string(),
        (true, false, (p, _)) => format!("DOWN (going up, {p} passed)"),
    };
    let last = pair.and_then(|p| p.last.as_ref());
    PairView {
        backend: cfg.backends[b].name.clone(),
        backend_id: cfg.backends[b].id,
        maxconn: (svc.backend_maxconn != 0).then_some(svc.backend_maxconn),
        state,
        up,
        in_set,
        last_check: last.map(|(text, _)| text.clone()),
        last_latency_ms: last.map(|(_, latency)| latency.as_secs_f64() * 1000.0),
        since_change_s: None,
        since: pair.and_then(|p| p.since),
    }
}

/// Every backend's name and override.
fn admin_view(cfg: &Config, state: &AgentState) -> Vec<(String, Admin)> {
    cfg.backends
        .iter()
        .enumerate()
        .map(|(b, x)| {
            (
                x.name.clone(),
                state.admin.get(b).copied().unwrap_or_default(),
            )
        })
        .collect()
}
