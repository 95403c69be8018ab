//! The agent's event loop between the health checks and the map owner. A check result flows
//! one way: probe -> check machine (the scheduler's [`Update`]) -> the pair's record in the
//! agent's state ([`crate::state`], owned here) -> the affected services' decisions
//! ([`crate::desired`]) -> [`Control`] (the only writer of the maps), which installs a changed
//! set atomically and logs its generation -> publish: the live view and the pinned mirror,
//! both built from the state.
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
    state::{AgentState, Pair},
};

pub struct Supervisor {
    /// The one owner of what the agent knows and decided (see [`crate::state`]).
    state: AgentState,
    commands: Option<Sender<Command>>,
    live: Live,
    /// While set, results are recorded but no set is written (adoption: one full round of
    /// checks first).
    hold: bool,
    mirror: Option<Mirror>,
}

impl Supervisor {
    /// Starts from what `Control::configure` installed: static sets whole, checked ones empty.
    pub fn new(cfg: &Config, commands: Option<Sender<Command>>, live: Live) -> Self {
        let statics = cfg
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
        let mut sup = Self {
            state: AgentState::new(statics, cfg.backends.len()),
            commands,
            live,
            hold: false,
            mirror: None,
        };
        sup.publish_all(cfg);
        sup
    }

    /// Mirrors health into the pinned `HEALTH` map from now on (for `lb status`).
    pub fn mirror_to(&mut self, cfg: &Config, mirror: Mirror) {
        self.mirror = Some(mirror);
        self.publish_all(cfg);
    }

    /// Takes over the sets an earlier agent installed: their members count as UP at full
    /// health, and nothing is written until [`Supervisor::release`].
    pub fn adopt(&mut self, cfg: &Config, installed: Vec<Vec<usize>>) {
        for (s, members) in installed.into_iter().enumerate() {
            if cfg.services[s].check.is_none() {
                continue;
            }
            for &b in &members {
                self.state.pairs.insert(
                    (s, b),
                    Pair {
                        health: Health {
                            up: true,
                            latest_positive: true,
                            latest_negative: false,
                        },
                        ..Default::default()
                    },
                );
            }
            self.state.services[s].installed = members;
            self.publish(cfg, s);
        }
        self.hold = true;
    }

    /// Ends the hold of [`Supervisor::adopt`] and decides every set from what the checks said.
    pub fn release(&mut self, cfg: &Config, control: &mut Control) -> Result<()> {
        self.hold = false;
        for s in 0..cfg.services.len() {
            self.recompute(cfg, control, s)?;
            self.publish(cfg, s);
        }
        Ok(())
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
        let old = std::mem::replace(&mut self.state.admin[b], admin);
        info!(backend = name, "operator: {old:?} -> {admin:?}");
        for s in 0..cfg.services.len() {
            self.recompute(cfg, control, s)?;
            // Maintenance: its connections go too, whether it was still in the set or draining.
            if admin == Admin::Disable && cfg.services[s].backends.contains(&b) {
                control.reset_flows(cfg, s, b)?;
            }
            self.publish(cfg, s);
        }
        Ok(format!("{name}: {admin:?}"))
    }

    pub fn installed(&self, service: usize) -> &[usize] {
        &self.state.services[service].installed
    }

    fn command(&self, c: Command) {
        if let Some(tx) = &self.commands {
            let _ = tx.try_send(c);
        }
    }

    /// Records a check result, re-decides the sets it affects and publishes the service.
    pub fn on_update(&mut self, cfg: &Config, control: &mut Control, u: &Update) -> Result<()> {
        let h = u.health;
        self.state.pairs.insert(
            (u.service, u.backend),
            Pair {
                health: h,
                progress: u.progress,
                last: Some((
                    match &u.probe.outcome {
                        Outcome::Positive => "positive".to_string(),
                        other => other.to_string(),
                    },
                    u.probe.latency,
                )),
                since: Some(u.since),
            },
        );
        let svc = &cfg.services[u.service];
        // A positive claim from a server that is not the holder: re-check the holder now.
        if svc.exclusive && h.latest_positive {
            if let Some(&holder) = self.installed(u.service).first() {
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
                self.publish(cfg, i);
            }
        }
        self.publish(cfg, u.service);
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
        let drained = &mut self.state.services[s].drained;
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

    /// Re-decides service `s` and installs the result if it changed (the caller publishes).
    pub fn recompute(&mut self, cfg: &Config, control: &mut Control, s: usize) -> Result<()> {
        if self.hold {
            return Ok(());
        }
        let svc = &cfg.services[s];
        let fallback = svc.fallback.map(|f| self.installed(f).to_vec());
        let state = &self.state;
        let mut d = decide(
            svc,
            &cfg.backends,
            |b| state.health(s, b),
            &state.services[s].installed,
            fallback.as_deref(),
        );
        // Operator overrides apply to every service, checked or not.
        d.members.retain(|&b| state.admin[b] == Admin::Ready);
        let st = &mut self.state.services[s];
        if d.warning != st.last_warning {
            if let Some(w) = &d.warning {
                warn!("{w}");
            }
            st.last_warning = d.warning.clone();
        }
        if d.members == st.installed {
            return Ok(());
        }
        let old = std::mem::replace(&mut st.installed, d.members.clone());
        // A former holder that left without a reset is in no set: its flows can be reset
        // before the new holder is installed, so that no write reaches it once the new one
        // takes writes.
        let drained = self.drained_to_reset(svc, s, &old, &d.members, &d.reset);
        for &b in &drained {
            control.reset_flows(cfg, s, b)?;
        }
        let mut reset = d.reset.clone();
        reset.extend(drained);
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
        self.state.services[s].generation = generation;
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
            if !std::mem::replace(&mut self.state.services[s].fast, true) {
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
        } else if !d.members.is_empty() && std::mem::take(&mut self.state.services[s].fast) {
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

    /// Publishes service `s` (and the overrides) from the state: the live view, then the
    /// pinned mirror from that view.
    fn publish(&mut self, cfg: &Config, s: usize) {
        let Ok(mut v) = self.live.write() else { return };
        crate::live::publish(&mut v, cfg, &self.state, s);
        if let Some(m) = self.mirror.as_mut() {
            m.write_service(cfg, &v, s);
        }
    }

    fn publish_all(&mut self, cfg: &Config) {
        for s in 0..cfg.services.len() {
            self.publish(cfg, s);
        }
    }
}
