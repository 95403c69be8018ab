//! `lb health`: whether this balancer can serve, as one exit code (keepalived's
//! `track_script`, a monitoring probe). Each finding says what was checked: the agent is
//! alive, the XDP program is attached to every interface of the instance, its configuration
//! map reads back, and every service has a backend in its set. Read only; nothing is changed.
use std::{os::unix::net::UnixStream, path::Path, process::Command};

use aya::maps::{Array, MapData};
use lb_common::names;

use crate::{dataplane, ops, status};

/// One thing checked, and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Self {
            ok: true,
            what: what.into(),
        }
    }

    fn fail(what: impl Into<String>) -> Self {
        Self {
            ok: false,
            what: what.into(),
        }
    }
}

/// Everything `lb health` checks of `instance`, in order.
pub fn assess(instance: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    out.push(if UnixStream::connect(ops::socket_path(instance)).is_ok() {
        Finding::ok("agent running")
    } else {
        Finding::fail(format!(
            "agent not running (no {}): the data path forwards the flows and sets it has, but \
                 no check, failover or expiry happens",
            ops::socket_path(instance).display()
        ))
    });
    let dir = dataplane::pin_dir(instance);
    let snapshot = match status::snapshot(instance) {
        Ok(s) => s,
        Err(e) => {
            out.push(Finding::fail(format!("instance {instance:?}: {e:#}")));
            return out;
        }
    };
    let info: Option<status::InstanceInfo> = std::fs::read(status::info_path(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    match &info {
        Some(info) if !info.ifaces.is_empty() => {
            for iface in &info.ifaces {
                out.push(attached(&dir, iface));
            }
        }
        _ => out.push(Finding::fail(format!(
            "{}: no interfaces recorded (was the instance started by lb run?)",
            status::info_path(instance).display()
        ))),
    }
    out.push(config_reads_back(&dir));
    if let Some(f) = pair_finding(instance) {
        out.push(f);
    }
    let services: Vec<&str> = info
        .as_ref()
        .map(|i| {
            i.services
                .iter()
                .map(String::as_str)
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for s in services {
        let members: Vec<&str> = snapshot
            .health
            .iter()
            .filter(|r| r.service == s && r.in_set)
            .map(|r| r.backend.as_str())
            .collect();
        out.push(if members.is_empty() {
            Finding::fail(format!("service {s}: no backend in its set"))
        } else {
            Finding::ok(format!("service {s}: {}", members.join(", ")))
        });
    }
    out
}

/// In a pair: whether this node may take the VIPs over (it has its peer's flows, or it is
/// alone), from the status its agent writes every half second. `None` when not paired.
fn pair_finding(instance: &str) -> Option<Finding> {
    let (s, age) = crate::pair::read_status(instance)?;
    Some(if age > crate::pair::STATUS_EVERY * 6 {
        Finding::fail(format!(
            "pair: status {} is {:.0?} old (agent stopped?)",
            crate::pair::status_path(instance).display(),
            age
        ))
    } else if s.eligible {
        Finding::ok(format!("pair: {}", s.why))
    } else {
        Finding::fail(format!("pair: {}", s.why))
    })
}

/// The instance's XDP link on `iface` is pinned and the interface has an XDP program.
fn attached(dir: &Path, iface: &str) -> Finding {
    let link = dir.join(format!("link_{iface}"));
    if !link.exists() {
        return Finding::fail(format!("{iface}: no pinned XDP link ({})", link.display()));
    }
    let shown = Command::new("ip")
        .args(["-j", "link", "show", "dev", iface])
        .output();
    let prog = shown
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v[0]["xdp"]["prog"]["id"].as_u64());
    match prog {
        Some(id) => Finding::ok(format!("{iface}: XDP program {id} attached")),
        None => Finding::fail(format!("{iface}: no XDP program attached")),
    }
}

/// The pinned configuration map reads back with an SNAT range.
fn config_reads_back(dir: &Path) -> Finding {
    let read = dataplane::open_pinned(dir, names::CONFIG)
        .and_then(|m| Ok(Array::<MapData, lb_common::Config>::try_from(m)?))
        .and_then(|a| Ok(a.get(&0, 0)?));
    match read {
        Ok(c) if c.snat_port_max != 0 && c.snat_port_min <= c.snat_port_max => {
            Finding::ok(format!(
                "data path configured (SNAT ports {}-{})",
                c.snat_port_min, c.snat_port_max
            ))
        }
        Ok(_) => Finding::fail("data path not configured (no SNAT range in CONFIG)"),
        Err(e) => Finding::fail(format!("CONFIG: {e:#}")),
    }
}
