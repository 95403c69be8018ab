//! The agent's event loop between the health checks and the map owner: every check result
//! updates the health of its (service, backend) pair, the affected services' desired sets are
//! recomputed ([`crate::desired`]) and, when they change, installed atomically by
//! [`Control`] (the only writer), which logs the generation.
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use tokio::sync::mpsc::Sender;
use tracing::{info, warn};

use crate::{
    config::Config,
    control::Control,
    desired::{decide, Health},
    health::{
        probe::Outcome,
        scheduler::{Command, Update},
    },
};

pub struct Supervisor {
    health: HashMap<(usize, usize), Health>,
    /// The set installed now, per service (backend indexes).
    installed: Vec<Vec<usize>>,
    /// Services that lost every backend and check their candidates at `fastinter`.
    fast: HashSet<usize>,
    last_warning: Vec<Option<String>>,
    commands: Option<Sender<Command>>,
}

impl Supervisor {
    /// `installed`: what `Control::configure` installed (static sets, empty checked ones).
    pub fn new(cfg: &Config, commands: Option<Sender<Command>>) -> Self {
        let installed = cfg
            .services
            .iter()
            .map(|s| {
                if s.check.is_some() {
                    vec![]
                } else {
                    s.backends.clone()
                }
            })
            .collect();
        Self {
            health: HashMap::new(),
            installed,
            fast: HashSet::new(),
            last_warning: vec![None; cfg.services.len()],
            commands,
        }
    }

    pub fn installed(&self, service: usize) -> &[usize] {
        &self.installed[service]
    }

    fn command(&self, c: Command) {
        if let Some(tx) = &self.commands {
            let _ = tx.try_send(c);
        }
    }

    /// Records a check result and re-decides the sets it affects.
    pub fn on_update(&mut self, cfg: &Config, control: &mut Control, u: &Update) -> Result<()> {
        let h = Health {
            up: u.up,
            latest_positive: u.latest_positive,
            latest_negative: matches!(u.probe.outcome, Outcome::Negative { .. }),
        };
        self.health.insert((u.service, u.backend), h);
        let svc = &cfg.services[u.service];
        // A positive claim from a server that is not the holder: re-check the holder now.
        if svc.exclusive && h.latest_positive {
            if let Some(&holder) = self.installed[u.service].first() {
                if holder != u.backend {
                    self.command(Command::CheckNow {
                        service: u.service,
                        backend: holder,
                    });
                }
            }
        }
        self.recompute(cfg, control, u.service)?;
        for (i, s) in cfg.services.iter().enumerate() {
            if s.fallback == Some(u.service) {
                self.recompute(cfg, control, i)?;
            }
        }
        Ok(())
    }

    /// Re-decides service `s` and installs the result if it changed.
    pub fn recompute(&mut self, cfg: &Config, control: &mut Control, s: usize) -> Result<()> {
        let svc = &cfg.services[s];
        let fallback = svc.fallback.map(|f| self.installed[f].clone());
        let health = |b: usize| self.health.get(&(s, b)).copied().unwrap_or_default();
        let d = decide(
            svc,
            &cfg.backends,
            health,
            &self.installed[s],
            fallback.as_deref(),
        );
        if d.warning != self.last_warning[s] {
            if let Some(w) = &d.warning {
                warn!("{w}");
            }
            self.last_warning[s] = d.warning.clone();
        }
        if d.members == self.installed[s] {
            return Ok(());
        }
        let old = std::mem::replace(&mut self.installed[s], d.members.clone());
        // Install first, then reset: a flow created from the old set after the reset would
        // otherwise survive.
        let generation = control.install_backends(cfg, s, &d.members)?;
        for &b in &d.reset {
            control.reset_flows(s as u32, b as u32)?;
        }
        let names = |v: &[usize]| {
            v.iter()
                .map(|&b| cfg.backends[b].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        info!(
            service = %svc.name,
            generation,
            "backend set [{}] -> [{}]{}",
            names(&old),
            names(&d.members),
            if d.reset.is_empty() { String::new() } else { format!("; resetting the flows of {}", names(&d.reset)) }
        );
        if d.members.is_empty() && svc.check.is_some() {
            if !old.is_empty() {
                warn!(service = %svc.name, "no backend left: new connections are refused (RST); re-checking every candidate now, then at fastinter");
            }
            if self.fast.insert(s) {
                for &b in &svc.backends {
                    self.command(Command::CheckNow {
                        service: s,
                        backend: b,
                    });
                    self.command(Command::Fast {
                        service: s,
                        backend: b,
                        on: true,
                    });
                }
            }
        } else if !d.members.is_empty() && self.fast.remove(&s) {
            for &b in &svc.backends {
                self.command(Command::Fast {
                    service: s,
                    backend: b,
                    on: false,
                });
            }
        }
        Ok(())
    }
}
