//! `lb status`: reads an instance's pinned counter maps (works while the agent runs and after
//! it stopped, as long as the pins exist) and prints them.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{names, BackendStats, ServiceStats, COUNTER_MAX, COUNTER_NAMES};
use serde::{Deserialize, Serialize};

use crate::dataplane::pin_dir;

/// Names of an instance's services and backends by id, written by the agent at start
/// (the pinned maps only know ids).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub instance: String,
    pub services: Vec<String>,
    pub backends: Vec<String>,
    pub ifaces: Vec<String>,
    pub mode: String,
}

pub fn info_path(instance: &str) -> PathBuf {
    Path::new("/run/lb").join(format!("{instance}.json"))
}

pub fn write_info(info: &InstanceInfo) -> Result<()> {
    let p = info_path(&info.instance);
    fs::create_dir_all("/run/lb").context("create /run/lb")?;
    fs::write(&p, serde_json::to_vec_pretty(info)?)
        .with_context(|| format!("write {}", p.display()))
}

fn open<T: aya::Pod>(dir: &Path, name: &str) -> Result<PerCpuArray<MapData, T>> {
    let data = MapData::from_pin(dir.join(name))
        .with_context(|| format!("open pinned map {name} in {}", dir.display()))?;
    let map = Map::from_map_data(data)?;
    PerCpuArray::try_from(map).with_context(|| format!("{name}: unexpected map type or layout"))
}

fn sum<T: aya::Pod + Default + Copy>(
    m: &PerCpuArray<MapData, T>,
    i: u32,
    add: impl Fn(&mut T, &T),
) -> Result<T> {
    let mut total = T::default();
    for v in m.get(&i, 0)?.iter() {
        add(&mut total, v);
    }
    Ok(total)
}

/// Counters of an instance, summed over CPUs.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub instance: String,
    pub global: Vec<(String, u64)>,
    pub services: Vec<(String, ServiceCounters)>,
    pub backends: Vec<(String, BackendCounters)>,
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
    pub drops: u64,
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct BackendCounters {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
}

pub fn snapshot(instance: &str) -> Result<Snapshot> {
    let dir = pin_dir(instance);
    if !dir.exists() {
        anyhow::bail!("no instance {instance:?}: {} does not exist (is `lb run` running with --instance {instance}?)", dir.display());
    }
    let info: Option<InstanceInfo> = fs::read(info_path(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let g = open::<u64>(&dir, names::STATS_GLOBAL)?;
    let mut global = Vec::new();
    for i in 0..COUNTER_MAX {
        global.push((
            COUNTER_NAMES[i as usize].to_string(),
            sum(&g, i, |t, v| *t += *v)?,
        ));
    }
    let s = open::<ServiceStats>(&dir, names::STATS_SERVICE)?;
    let b = open::<BackendStats>(&dir, names::STATS_BACKEND)?;
    let (snames, bnames) = match &info {
        Some(i) => (i.services.clone(), i.backends.clone()),
        None => (vec![], vec![]),
    };
    let mut services = Vec::new();
    for (i, name) in snames.iter().enumerate() {
        let t = sum(&s, i as u32, |t, v| {
            t.packets += v.packets;
            t.bytes += v.bytes;
            t.reply_packets += v.reply_packets;
            t.reply_bytes += v.reply_bytes;
            t.new_flows += v.new_flows;
            t.drops += v.drops;
        })?;
        services.push((
            name.clone(),
            ServiceCounters {
                packets: t.packets,
                bytes: t.bytes,
                reply_packets: t.reply_packets,
                reply_bytes: t.reply_bytes,
                new_flows: t.new_flows,
                drops: t.drops,
            },
        ));
    }
    let mut backends = Vec::new();
    for (i, name) in bnames.iter().enumerate() {
        let t = sum(&b, i as u32, |t, v| {
            t.packets += v.packets;
            t.bytes += v.bytes;
            t.reply_packets += v.reply_packets;
            t.reply_bytes += v.reply_bytes;
            t.new_flows += v.new_flows;
        })?;
        backends.push((
            name.clone(),
            BackendCounters {
                packets: t.packets,
                bytes: t.bytes,
                reply_packets: t.reply_packets,
                reply_bytes: t.reply_bytes,
                new_flows: t.new_flows,
            },
        ));
    }
    Ok(Snapshot {
        instance: instance.to_string(),
        global,
        services,
        backends,
    })
}

pub fn print(s: &Snapshot) {
    println!("instance {}", s.instance);
    println!();
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10} {:>8}",
        "service", "new flows", "pkts in", "bytes in", "pkts out", "bytes out", "drops"
    );
    for (n, c) in &s.services {
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10} {:>8}",
            n, c.new_flows, c.packets, c.bytes, c.reply_packets, c.reply_bytes, c.drops
        );
    }
    println!();
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10}",
        "backend", "new flows", "pkts in", "bytes in", "pkts out", "bytes out"
    );
    for (n, c) in &s.backends {
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>12} {:>10}",
            n, c.new_flows, c.packets, c.bytes, c.reply_packets, c.reply_bytes
        );
    }
    println!();
    println!("data path counters (non-zero):");
    for (n, v) in &s.global {
        if *v != 0 {
            println!("  {n:<24} {v}");
        }
    }
}
