//! What `lb-bench all` reads around each measurement: whole-machine CPU time (`/proc/stat`), the
//! XDP program's `bpf_stats` (run time and count, `bpftool prog show`), a process's CPU time and
//! RSS (`/proc/PID`), lb's counters (`lb status --json`) and a namespace's `Ip: ForwDatagrams`
//! (`/proc/net/snmp` seen from inside it), and BPF map memory (`bpftool map show`).

use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::contestants::Cell;
use crate::harness::{self, ns::run, Ns};

/// Clock ticks per second of `/proc/stat` and `/proc/PID/stat` (USER_HZ).
fn user_hz() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Busy and total CPU seconds of the whole machine (all CPUs) since boot.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MachineCpu {
    pub busy_s: f64,
    pub total_s: f64,
}

/// `/proc/stat`'s `cpu` line: busy = user + nice + system + irq + softirq + steal.
pub fn machine_cpu() -> Result<MachineCpu> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<f64>().unwrap_or(0.0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let total = busy + get(3) + get(4);
    let hz = user_hz();
    Ok(MachineCpu {
        busy_s: busy / hz,
        total_s: total / hz,
    })
}

/// utime + stime of a process, seconds.
pub fn process_cpu_s(pid: u32) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime is field 14 of the line, index 11 here.
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((ticks(11) + ticks(12)) / user_hz())
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// The process's peak resident set (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// `Ip: ForwDatagrams` of the namespace `ns`.
pub fn forw_datagrams(ns: &Ns) -> Result<u64> {
    let text = ns
        .run_in(|| fs::read_to_string("/proc/thread-self/net/snmp"))?
        .context("reading /proc/net/snmp")?;
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next(), ip.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Ip: lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ForwDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .context("no ForwDatagrams in /proc/net/snmp")
}

/// lb's global counter `name` (`lb status --instance I --json`, run in the lb namespace).
pub fn lb_counter(cell: &Cell, name: &str) -> Result<u64> {
    let status = cell.topo.lb_status()?;
    harness::Topology::find_global_counter(&status, name)
        .with_context(|| format!("lb status has no global counter {name}"))
}

/// `bpftool -j ARGS` (in namespace `ns` when given).
fn bpftool(ns: Option<&Ns>, args: &[&str]) -> Result<Value> {
    let out = match ns {
        Some(ns) => {
            let mut a = vec!["bpftool", "-j"];
            a.extend_from_slice(args);
            ns.exec(&a)?
        }
        None => run(Command::new("bpftool").arg("-j").args(args))?,
    };
    serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")
}

/// All of lb's global counters (`lb status --json` of `topo`'s instance).
pub fn lb_counters(topo: &harness::Topology) -> Result<std::collections::BTreeMap<String, u64>> {
    let status = topo.lb_status()?;
    Ok(status["global"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e[0].as_str()?.to_string(), e[1].as_u64()?)))
        .collect())
}

/// The counters that rose between two [`lb_counters`] readings and say what happened to
/// connections: refusals and drops by reason, and the flow-lifecycle events.
pub fn lifecycle_moves(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, u64)> {
    const EVENTS: [&str; 7] = [
        "established",
        "ended_at_last_ack",
        "closed_tuple_reused",
        "half_open_reclaimed",
        "unanswered_reclaimed",
        "closed_port_taken_over",
        "syn_held",
    ];
    after
        .iter()
        .filter(|(n, _)| {
            n.starts_with("rst_") || n.starts_with("drop_") || EVENTS.contains(&n.as_str())
        })
        .filter(|(n, _)| *n != "rst_sent")
        .filter_map(|(n, a)| {
            let d = a.saturating_sub(before.get(n).copied().unwrap_or(0));
            (d > 0).then(|| (n.clone(), d))
        })
        .collect()
}

/// The id of the XDP program attached to `iface` in `ns`.
pub fn xdp_prog_id(ns: &Ns, iface: &str) -> Result<u64> {
    let v = bpftool(Some(ns), &["net", "show", "dev", iface])?;
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["xdp"].as_array().cloned().unwrap_or_default())
        .find(|x| x["devname"] == iface)
        .and_then(|x| x["id"].as_u64())
        .with_context(|| format!("no XDP program on {iface} in {}", ns.name))
}

/// `bpf_stats` of a program: run time (ns) and run count; zero while stats are off.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub fn prog_stats(id: u64) -> Result<ProgStats> {
    let v = bpftool(None, &["prog", "show", "id", &id.to_string()])?;
    Ok(ProgStats {
        run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
    })
}

/// One map of a program and the memory the kernel charges for it.
#[derive(Debug, Clone, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub bytes_memlock: u64,
}

/// The maps program `id` uses.
pub fn prog_maps(id: u64) -> Result<Vec<MapMemory>> {
    let v = bpftool(None, &["prog", "show", "id", &id.to_string()])?;
    let ids: Vec<u64> = v["map_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    ids.into_iter()
        .map(|m| {
            let v = bpftool(None, &["map", "show", "id", &m.to_string()])?;
            Ok(MapMemory {
                name: v["name"].as_str().unwrap_or("?").to_string(),
                kind: v["type"].as_str().unwrap_or("?").to_string(),
                max_entries: v["max_entries"].as_u64().unwrap_or(0),
                bytes_memlock: v["bytes_memlock"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// `kernel.bpf_stats_enabled` switched on for the benchmark and back to its value when dropped.
pub struct BpfStats {
    previous: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> BpfStats {
        let previous = fs::read_to_string(BPF_STATS)
            .ok()
            .map(|s| s.trim().to_string());
        if let Err(e) = fs::write(BPF_STATS, "1") {
            eprintln!("lb-bench: cannot enable bpf_stats ({e}); XDP run times will read 0");
        }
        BpfStats { previous }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(p) = &self.previous {
            let _ = fs::write(BPF_STATS, p);
        }
    }
}

/// Everything read before and after a measurement.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Snapshot {
    pub cpu: MachineCpu,
    pub xdp: Option<ProgStats>,
    /// CPU seconds of the balancer process (HAProxy, or lb's agent).
    pub balancer_cpu_s: Option<f64>,
    pub new_flows: Option<u64>,
    pub lb_ns_forw_datagrams: u64,
}

/// What a measurement cost, from two snapshots.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub wall_s: f64,
    /// Busy CPU seconds of the whole machine (all CPUs), less the background measured before.
    pub busy_cpu_s: f64,
    /// The same before subtracting the background.
    pub raw_busy_cpu_s: f64,
    pub xdp_run_time_ns: Option<u64>,
    pub xdp_run_cnt: Option<u64>,
    pub balancer_cpu_s: Option<f64>,
    pub new_flows: Option<u64>,
    pub lb_ns_forw_datagrams: u64,
}

impl Snapshot {
    /// Reads everything; `before` reads the machine's CPU time last and the balancer's counters
    /// first (and the opposite after), so the probes' own work stays outside the window.
    pub fn take(cell: &Cell, xdp_id: Option<u64>, before: bool) -> Result<Snapshot> {
        let cpu_first = if before { None } else { Some(machine_cpu()?) };
        let balancer_cpu_s = cell.balancer_pid().map(process_cpu_s).transpose()?;
        let xdp = xdp_id.map(prog_stats).transpose()?;
        let mut s = Snapshot {
            cpu: MachineCpu::default(),
            xdp,
            balancer_cpu_s,
            new_flows: if cell.contestant.is_lb() {
                Some(lb_counter(cell, "new_flows")?)
            } else {
                None
            },
            lb_ns_forw_datagrams: forw_datagrams(&cell.topo.lb.ns)?,
        };
        s.cpu = match cpu_first {
            Some(c) => c,
            None => machine_cpu()?,
        };
        Ok(s)
    }

    pub fn usage(&self, after: &Snapshot, wall_s: f64) -> Usage {
        let sub = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        Usage {
            wall_s,
            busy_cpu_s: after.cpu.busy_s - self.cpu.busy_s,
            raw_busy_cpu_s: after.cpu.busy_s - self.cpu.busy_s,
            xdp_run_time_ns: sub(
                self.xdp.map(|x| x.run_time_ns),
                after.xdp.map(|x| x.run_time_ns),
            ),
            xdp_run_cnt: sub(self.xdp.map(|x| x.run_cnt), after.xdp.map(|x| x.run_cnt)),
            balancer_cpu_s: match (self.balancer_cpu_s, after.balancer_cpu_s) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            new_flows: sub(self.new_flows, after.new_flows),
            lb_ns_forw_datagrams: after
                .lb_ns_forw_datagrams
                .saturating_sub(self.lb_ns_forw_datagrams),
        }
    }
}
