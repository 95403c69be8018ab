//! The health mirror: every (service, backend) pair's state, last check and since-when, in a
//! pinned map (`HEALTH`) that only the agent writes, so that `lb status` shows the last known
//! state while the agent runs and after it stopped.
use std::{
    path::Path,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    epoch_index, names, HealthRecord, HEALTH_F_CHECKED, HEALTH_F_CONFIGURED, HEALTH_F_IN_SET,
    HEALTH_F_UP, MAX_BACKENDS, MAX_SERVICES,
};

use crate::{
    config::Config,
    live::{Admin, LiveView},
};

pub struct Mirror {
    map: Array<MapData, HealthRecord>,
}

/// Opens the pinned mirror of the instance in `dir`.
pub fn open(dir: &Path) -> Result<Array<MapData, HealthRecord>> {
    let data = MapData::from_pin(dir.join(names::HEALTH)).context("open the pinned HEALTH map")?;
    Array::try_from(Map::from_map_data(data)?).context("HEALTH has an unexpected layout")
}

impl Mirror {
    /// Reuses the pinned mirror (an earlier agent's) or creates and pins one.
    pub fn open_or_create(dir: &Path) -> Result<Mirror> {
        if let Ok(map) = open(dir) {
            return Ok(Mirror { map });
        }
        let _ = std::fs::remove_file(dir.join(names::HEALTH));
        let map = Array::<MapData, HealthRecord>::create(MAX_SERVICES * MAX_BACKENDS, 0)
            .context("create HEALTH")?;
        map.pin(dir.join(names::HEALTH)).context("pin HEALTH")?;
        Ok(Mirror { map: open(dir)? })
    }

    /// Writes every pair of service `s` from the live view.
    pub fn write_service(&mut self, cfg: &Config, view: &LiveView, s: usize) {
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        for (i, &b) in cfg.services[s].backends.iter().enumerate() {
            let Some(p) = view.services[s].pairs.get(i) else {
                continue;
            };
            let mut r = HealthRecord {
                flags: HEALTH_F_CONFIGURED,
                ..Default::default()
            };
            if p.up {
                r.flags |= HEALTH_F_UP;
            }
            if p.in_set {
                r.flags |= HEALTH_F_IN_SET;
            }
            if p.last_check.is_some() {
                r.flags |= HEALTH_F_CHECKED;
            }
            r.latency_us = p
                .last_latency_ms
                .map(|ms| (ms * 1000.0) as u32)
                .unwrap_or(0);
            r.since_unix_ms = p
                .since
                .map(|t| {
                    wall.as_millis()
                        .saturating_sub(now.saturating_duration_since(t).as_millis())
                        as u64
                })
                .unwrap_or(0);
            r.admin = match view.admin.get(b).map(|a| a.1) {
                Some(Admin::Drain) => 1,
                Some(Admin::Disable) => 2,
                _ => 0,
            };
            let text = p.last_check.clone().unwrap_or_else(|| p.state.clone());
            let n = text.len().min(r.last.len());
            r.last[..n].copy_from_slice(&text.as_bytes()[..n]);
            let _ = self
                .map
                .set(epoch_index(cfg.services[s].id, cfg.backends[b].id), r, 0);
        }
    }
}
