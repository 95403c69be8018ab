//! The agent's state, owned by the supervisor (its only writer): one record per (service,
//! backend) pair (what its checks last said) and per service (the set installed, its
//! generation), and the operator's override of each backend. Every view of it (the live view
//! behind `/stats.json`, the dashboard, `;csv` and `/metrics`, and the pinned health mirror
//! behind `lb status`) is built from a published snapshot by the functions of
//! [`crate::live`] and [`crate::mirror`].
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{desired::Health, live::Admin};

/// One (service, backend) pair, as its check machine left it after the last probe.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pair {
    /// What the decision reads: UP, and whether the last probe claimed or denied the role.
    pub health: Health,
    /// (consecutive positives, consecutive failures) after the last probe.
    pub progress: (u32, u32),
    /// The last probe: its outcome in words and how long it took (`None` before the first).
    pub last: Option<(String, Duration)>,
    /// The last transition.
    pub since: Option<Instant>,
}

/// One service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceState {
    /// The set installed now (backend indexes, configuration order).
    pub installed: Vec<usize>,
    /// The generation of the installed set (0 until the agent installs one).
    pub generation: u64,
    /// The decision's last warning, logged once.
    pub last_warning: Option<String>,
    /// Exclusive roles with `on_down = "reset"`: former holders that left the set without a
    /// reset (checks timed out, or an operator's drain); their connections are reset once
    /// another server holds the role, so that at most one carries writes.
    pub drained: Vec<usize>,
    /// Lost every backend: its candidates are checked at `fastinter`.
    pub fast: bool,
}

/// Everything the agent decides from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentState {
    pub pairs: HashMap<(usize, usize), Pair>,
    pub services: Vec<ServiceState>,
    /// Operator overrides per backend (configuration order).
    pub admin: Vec<Admin>,
}

impl AgentState {
    /// Before any check: unchecked services serve their whole set (`statics[s]`), checked
    /// ones nothing; no override.
    pub fn new(statics: Vec<Vec<usize>>, backends: usize) -> Self {
        Self {
            pairs: HashMap::new(),
            services: statics
                .into_iter()
                .map(|installed| ServiceState {
                    installed,
                    ..Default::default()
                })
                .collect(),
            admin: vec![Admin::Ready; backends],
        }
    }

    /// The pair's health as the decision sees it: an override other than `Ready` counts as
    /// down.
    pub fn health(&self, s: usize, b: usize) -> Health {
        match self.admin.get(b) {
            Some(Admin::Ready) => self
                .pairs
                .get(&(s, b))
                .map(|p| p.health)
                .unwrap_or_default(),
            _ => Health::default(),
        }
    }
}
