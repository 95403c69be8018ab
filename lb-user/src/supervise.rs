//! The agent's event loop between the health checks and the map owner: every check result
//! updates the health of its (service, backend) pair, the affected services' desired sets are
//! recomputed ([`crate::desired`]) and, when they change, installed atomically by
//! [`Control`] (the only writer), which logs the generation.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
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
    live::{Admin, Live},
    mirror::Mirror,
};

pub struct Supervisor {
    health: HashMap<(usize, usize), Health>,
    /// The set installed now, per service (backend indexes).
    installed: Vec<Vec<usize>>,
    /// Services that lost every backend and check their candidates at `fastinter`.
    fast: HashSet<usize>,
    last_warning: Vec<Option<String>>,
    commands: Option<Sender<Command>>,
    /// Operator overrides per backend (configuration order).
    admin: Vec<Admin>,
    live: Live,
    /// While set, results are recorded but no set is written (adoption: one full round of
    /// checks first).
    hold: bool,
    mirror: Option<Mirror>,
    /// Per exclusive service with `on_down = "reset"`: former holders that left the set
    /// without a reset (checks timed out, or an operator's drain); their connections are
    /// reset once another server holds the role, so that at most one carries writes.
    drained: Vec<Vec<usize>>,
}

impl Supervisor {
    /// `installed`: what `Control::configure` installed (static sets, empty checked ones).
    pub fn new(cfg: &Config, commands: Option<Sender<Command>>, live: Live) -> Self {
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
        let sup = Self {
            health: HashMap::new(),
            installed,
            fast: HashSet::new(),
            last_warning: vec![None; cfg.services.len()],
            commands,
            admin: vec![Admin::Ready; cfg.backends.len()],
            live,
            hold: false,
            mirror: None,
            drained: vec![vec![]; cfg.services.len()],
        };
        for s in 0..cfg.services.len() {
            sup.publish_set(cfg, s);
        }
        sup
    }

    /// Mirrors health into the pinned `HEALTH` map from now on (for `lb status`).
    pub fn mirror_to(&mut self, cfg: &Config, mirror: Mirror) {
        self.mirror = Some(mirror);
        for s in 0..cfg.services.len() {
            self.mirror_service(cfg, s);
        }
    }

    fn mirror_service(&mut self, cfg: &Config, s: usize) {
        let Some(m) = self.mirror.as_mut() else {
            return;
        };
        if let Ok(v) = self.live.read() {
            m.write_service(cfg, &v, s);
        }
    }

    /// Takes over the sets an earlier agent installed: their members count as UP at full
    /// health, and nothing is written until [`Supervisor::release`].
    pub fn adopt(&mut self, cfg: &Config, installed: Vec<Vec<usize>>) {
        for (s, members) in installed.iter().enumerate() {
            if cfg.services[s].check.is_none() {
                continue;
            }
            for &b in members {
                self.health.insert(
                    (s, b),
                    Health {
                        up: true,
                        latest_positive: true,
                        latest_negative: false,
                    },
                );
            }
            self.installed[s] = members.clone();
            self.publish_set(cfg, s);
        }
        self.hold = true;
    }

    /// Ends the hold of [`Supervisor::adopt`] and decides every set from what the checks said.
    pub fn release(&mut self, cfg: &Config, control: &mut Control) -> Result<()> {
        self.hold = false;
        for s in 0..cfg.services.len() {
            self.recompute(cfg, control, s)?;
        }
        Ok(())
    }

    /// Whether the pair was in an adopted set (its check starts UP).
    pub fn adopted_up(&self, service: usize, backend: usize) -> bool {
        self.installed[service].contains(&backend)
            && self.health.get(&(service, backend)).is_some_and(|h| h.up)
    }

    /// Applies an operator's override of backend `name` to every service it is in.
    pub fn set_admin(
        &mut self,
        cfg: &Config,
        control: &mut Control,
        name: &str,
        admin: Admin,
    ) -> Result<String> {
        let b = cfg
            .backends
            .iter()
            .position(|x| x.name == name)
            .with_context(|| {
                let known: Vec<&str> = cfg.backends.iter().map(|b| b.name.as_str()).collect();
                format!("no backend {name:?} (configured: {})", known.join(", "))
            })?;
        let old = std::mem::replace(&mut self.admin[b], admin);
        info!(backend = name, "operator: {old:?} -> {admin:?}");
        if let Ok(mut v) = self.live.write() {
            v.admin[b].1 = admin;
        }
        for s in 0..cfg.services.len() {
            self.recompute(cfg, control, s)?;
            // Maintenance: its connections go too, whether it was still in the set or draining.
            if admin == Admin::Disable && cfg.services[s].backends.contains(&b) {
                control.reset_flows(cfg, s, b)?;
            }
            self.mirror_service(cfg, s);
        }
        Ok(format!("{name}: {admin:?}"))
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
        self.record(cfg, u);
        self.mirror_service(cfg, u.service);
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

    /// For an exclusive role with `on_down = "reset"`: the former holders that left service
    /// `s`'s set without a reset (checks timed out, an operator's drain) and are to be reset
    /// now that the set goes from `old` to a non-empty `new` without them (a holder that comes
    /// back is forgotten). `decided`: the decision's own resets.
    fn drained_to_reset(
        &mut self,
        svc: &crate::config::Service,
        s: usize,
        old: &[usize],
        new: &[usize],
        decided: &[usize],
    ) -> Vec<usize> {
        if !svc.exclusive || svc.on_down != crate::config::OnDown::Reset {
            return vec![];
        }
        let drained = &mut self.drained[s];
        for &b in old {
            if !new.contains(&b) && !decided.contains(&b) && !drained.contains(&b) {
                drained.push(b);
            }
        }
        drained.retain(|b| !new.contains(b));
        if new.is_empty() {
            return vec![];
        }
        drained.drain(..).filter(|b| !decided.contains(b)).collect()
    }

    /// Re-decides service `s` and installs the result if it changed.
    pub fn recompute(&mut self, cfg: &Config, control: &mut Control, s: usize) -> Result<()> {
        if self.hold {
            return Ok(());
        }
        let svc = &cfg.services[s];
        let fallback = svc.fallback.map(|f| self.installed[f].clone());
        let admin = &self.admin;
        let health = |b: usize| match admin[b] {
            Admin::Ready => self.health.get(&(s, b)).copied().unwrap_or_default(),
            _ => Health::default(),
        };
        let mut d = decide(
            svc,
            &cfg.backends,
            health,
            &self.installed[s],
            fallback.as_deref(),
        );
        // Operator overrides apply to every service, checked or not.
        d.members.retain(|&b| admin[b] == Admin::Ready);
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
        // A former holder that left without a reset is in no set: its flows can be reset
        // before the new holder is installed, so that no write reaches it once the new one
        // takes writes.
        let drained = self.drained_to_reset(svc, s, &old, &d.members, &d.reset);
        for &b in &drained {
            control.reset_flows(cfg, s, b)?;
        }
        let mut reset = d.reset.clone();
        reset.extend(drained);
        self.publish_set(cfg, s);
        self.mirror_service(cfg, s);
        if d.members.is_empty() && !old.is_empty() && !svc.syn_hold.is_zero() {
            // The role is being handed over: new SYNs wait for the next holder (their
            // retransmit lands on it) rather than fail, for at most `syn_hold`. Set before the
            // empty set is installed, so that no SYN in between is refused.
            let until = crate::gc::monotonic_now()? + svc.syn_hold.as_nanos() as u64;
            control.hold_syns(cfg, s, until)?;
        }
        // Install first, then reset: a flow created from the old set after the reset would
        // otherwise survive.
        let generation = control.install_backends(cfg, s, &d.members)?;
        if let Ok(mut v) = self.live.write() {
            v.services[s].generation = generation;
        }
        for &b in &d.reset {
            control.reset_flows(cfg, s, b)?;
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
            if reset.is_empty() { String::new() } else { format!("; resetting the flows of {}", names(&reset)) }
        );
        if d.members.is_empty() && svc.check.is_some() {
            if !old.is_empty() && !svc.syn_hold.is_zero() {
                warn!(service = %svc.name, "no backend left: new connections are held up to {:?} (their SYN retransmit reaches the next holder), then refused (RST); re-checking every candidate now, then at fastinter", svc.syn_hold);
            } else if !old.is_empty() {
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
            if !svc.syn_hold.is_zero() {
                control.hold_syns(cfg, s, 0)?;
            }
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

    /// Mirrors a check result into the live view.
    fn record(&self, cfg: &Config, u: &Update) {
        let Some(i) = cfg.services[u.service]
            .backends
            .iter()
            .position(|&b| b == u.backend)
        else {
            return;
        };
        let Ok(mut v) = self.live.write() else { return };
        let p = &mut v.services[u.service].pairs[i];
        let (pos, fail) = u.progress;
        p.up = u.up;
        p.state = match (u.up, pos, fail) {
            (true, _, 0) => "UP".into(),
            (true, _, f) => format!("UP (going down, {f} failed)"),
            (false, 0, _) => "DOWN".into(),
            (false, p, _) => format!("DOWN (going up, {p} passed)"),
        };
        p.last_check = Some(match &u.probe.outcome {
            Outcome::Positive => "positive".to_string(),
            other => other.to_string(),
        });
        p.last_latency_ms = Some(u.probe.latency.as_secs_f64() * 1000.0);
        p.since = Some(u.since);
    }

    fn publish_set(&self, cfg: &Config, s: usize) {
        let Ok(mut v) = self.live.write() else { return };
        let members: Vec<String> = self.installed[s]
            .iter()
            .map(|&b| cfg.backends[b].name.clone())
            .collect();
        for p in &mut v.services[s].pairs {
            p.in_set = members.contains(&p.backend);
        }
        v.services[s].members = members;
    }
}
