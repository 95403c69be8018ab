//! The NIC's own XDP counters (what `ethtool -S IFACE` lists with "xdp" in the name) for the
//! interfaces the agent attached to: the driver's view of XDP, next to the program's own
//! counters. They show what lb cannot count itself: packets the driver dropped or failed to
//! transmit after the program returned (`xdp_tx_errors`, `xdp_redirect` failures, full rings).
//!
//! The numbers come from running `ethtool -S` (the agent's network namespace is the one it
//! sees), not from hand-written ioctls. Drivers name counters per queue (veth's
//! `rx_queue_0_xdp_packets`, mlx5's `rx3_xdp_drop`) or per device (`rx_xdp_drop`);
//! [`summarize`] gives one total per counter with the queue index taken out, preferring the
//! driver's own total where it reports one, so per-queue detail stays out of Prometheus.
//! [`Cache`] reads at most once per [`CACHE_FOR`], so scrapes do not fork per request.
use std::{
    collections::BTreeMap,
    future::Future,
    io::ErrorKind,
    pin::Pin,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

/// How long a reading is served before ethtool runs again.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// How long one `ethtool -S` may take.
const ETHTOOL_TIMEOUT: Duration = Duration::from_secs(3);

/// One interface's XDP counters, as `/stats.json` carries them (field names are stable).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NicStats {
    pub iface: String,
    /// One total per counter name, queue index taken out (`rx_xdp_packets`).
    pub counters: BTreeMap<String, u64>,
    /// Every XDP counter as the driver names it (per queue where it counts per queue).
    pub per_queue: BTreeMap<String, u64>,
    /// Why there are no numbers (ethtool missing or failing). `None` with empty `counters`:
    /// the driver reports no XDP counters.
    pub error: Option<String>,
}

impl NicStats {
    /// From the text `ethtool -S` printed.
    pub fn from_ethtool(iface: &str, text: &str) -> Self {
        let per_queue = xdp_counters(text);
        Self {
            iface: iface.to_string(),
            counters: summarize(&per_queue),
            per_queue,
            error: None,
        }
    }

    /// The driver has no statistics at all (`no stats available`): no XDP counters either.
    pub fn none(iface: &str) -> Self {
        Self {
            iface: iface.to_string(),
            ..Self::default()
        }
    }

    pub fn failed(iface: &str, error: impl Into<String>) -> Self {
        Self {
            iface: iface.to_string(),
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

/// Every `name: value` line of `ethtool -S` output whose name contains "xdp" (any case).
/// Everything else (the `NIC statistics:` header, other counters, lines that are not a name and
/// an unsigned number) is ignored. A name listed twice is added up.
pub fn xdp_counters(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.trim().rsplit_once(':') else {
            continue;
        };
        let name = name.trim();
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        if name.is_empty() || !name.to_ascii_lowercase().contains("xdp") {
            continue;
        }
        let v: &mut u64 = out.entry(name.to_string()).or_default();
        *v = v.saturating_add(value);
    }
    out
}

/// The counter name with a queue index taken out, or `None` if the name has none:
/// `rx_queue_0_xdp_tx` -> `rx_xdp_tx` (veth, virtio_net), `queue_3_rx_xdp_drop` ->
/// `rx_xdp_drop` (ena), `rx12_xdp_drop` -> `rx_xdp_drop` and `tx0_xdp_xmit` -> `tx_xdp_xmit`
/// (mlx5 channels).
pub fn strip_queue(name: &str) -> Option<String> {
    let is_index = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = name.split('_').collect();
    // `<dir>_queue_<n>_<rest>` and `queue_<n>_<rest>`.
    for (at, keep_dir) in [(1, true), (0, false)] {
        if parts.len() > at + 2 && parts[at] == "queue" && is_index(parts[at + 1]) {
            let mut out: Vec<&str> = Vec::new();
            if keep_dir {
                out.push(parts[0]);
            }
            out.extend_from_slice(&parts[at + 2..]);
            return Some(out.join("_"));
        }
    }
    // `<rx|tx|ch|sq|rq><n>_<rest>`.
    let first = parts.first()?;
    let prefix = ["rx", "tx", "ch", "sq", "rq"]
        .into_iter()
        .find(|p| first.strip_prefix(p).is_some_and(is_index))?;
    if parts.len() < 2 {
        return None;
    }
    let mut out = vec![prefix];
    out.extend_from_slice(&parts[1..]);
    Some(out.join("_"))
}

/// One total per counter: per-queue counters summed under their name without the queue index;
/// where the driver also reports that name as a device total, its total is taken instead (mlx5
/// lists both `rx_xdp_drop` and `rx0_xdp_drop`, ...), so nothing is counted twice.
pub fn summarize(per_queue: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut device = BTreeMap::new();
    let mut queues: BTreeMap<String, u64> = BTreeMap::new();
    for (name, v) in per_queue {
        match strip_queue(name) {
            Some(base) => {
                let t = queues.entry(base).or_default();
                *t = t.saturating_add(*v);
            }
            None => {
                device.insert(name.clone(), *v);
            }
        }
    }
    for (name, v) in queues {
        device.entry(name).or_insert(v);
    }
    device
}

/// Runs `ethtool -S IFACE` in the agent's network namespace and reads its XDP counters.
pub async fn read_ethtool(iface: String) -> NicStats {
    let mut cmd = tokio::process::Command::new(ethtool_path());
    cmd.arg("-S")
        .arg(&iface)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(ETHTOOL_TIMEOUT, cmd.output()).await {
        Err(_) => {
            return NicStats::failed(
                &iface,
                format!(
                    "`ethtool -S {iface}` did not answer within {}s",
                    ETHTOOL_TIMEOUT.as_secs()
                ),
            )
        }
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => {
            return NicStats::failed(
                &iface,
                "ethtool not found: install the ethtool package (`cargo xtask setup` does)",
            )
        }
        Ok(Err(e)) => return NicStats::failed(&iface, format!("run `ethtool -S {iface}`: {e}")),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("no stats available") || stderr.contains("no stats available") {
        return NicStats::none(&iface);
    }
    if !out.status.success() {
        return NicStats::failed(
            &iface,
            format!("`ethtool -S {iface}`: {}: {}", out.status, stderr.trim()),
        );
    }
    NicStats::from_ethtool(&iface, &stdout)
}

/// `ethtool` from PATH, or from /usr/sbin or /sbin when PATH (e.g. a service manager's or
/// nsenter's) lacks the sbin directories.
fn ethtool_path() -> &'static str {
    let in_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("ethtool").is_file()));
    if in_path {
        return "ethtool";
    }
    ["/usr/sbin/ethtool", "/sbin/ethtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("ethtool")
}

/// Reads one interface's counters (`ethtool -S` in the agent; a stub in tests).
pub type Source =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = NicStats> + Send>> + Send + Sync>;

/// The ethtool-backed [`Source`].
pub fn ethtool_source() -> Source {
    Arc::new(|iface| Box::pin(read_ethtool(iface)))
}

struct Reading {
    at: Instant,
    ifaces: Vec<String>,
    stats: Vec<NicStats>,
}

/// The last reading, served for [`CACHE_FOR`]; concurrent requests wait for one read instead
/// of each running ethtool.
pub struct Cache {
    source: Source,
    ttl: Duration,
    last: tokio::sync::Mutex<Option<Reading>>,
}

impl Cache {
    pub fn new(source: Source) -> Self {
        Self::with_ttl(source, CACHE_FOR)
    }

    pub fn with_ttl(source: Source, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The counters of `ifaces`, in that order.
    pub async fn get(&self, ifaces: &[String]) -> Vec<NicStats> {
        let mut last = self.last.lock().await;
        if let Some(r) = last.as_ref() {
            if r.ifaces == ifaces && r.at.elapsed() < self.ttl {
                return r.stats.clone();
            }
        }
        let mut stats = Vec::with_capacity(ifaces.len());
        for iface in ifaces {
            stats.push((self.source)(iface.clone()).await);
        }
        *last = Some(Reading {
            at: Instant::now(),
            ifaces: ifaces.to_vec(),
            stats: stats.clone(),
        });
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// `ethtool -S` of a veth with two queues (kernel 6.x), with lines that are not counters.
    const VETH: &str = "NIC statistics:
     peer_ifindex: 2
     rx_queue_0_xdp_packets: 120
     rx_queue_0_xdp_bytes: 9000
     rx_queue_0_drops: 4
     rx_queue_0_xdp_redirect: 100
     rx_queue_0_xdp_drops: 3
     rx_queue_0_xdp_tx: 15
     rx_queue_0_xdp_tx_errors: 1
     rx_queue_1_xdp_packets: 30
     rx_queue_1_xdp_bytes: 2000
     rx_queue_1_xdp_redirect: 25
     rx_queue_1_xdp_drops: 0
     rx_queue_1_xdp_tx: 5
     rx_queue_1_xdp_tx_errors: 0
     tx_queue_0_xdp_xmit: 7
     tx_queue_0_xdp_xmit_errors: 0

garbage line without a colon
     rx_queue_0_xdp_weird: not-a-number
     rx_queue_0_xdp_negative: -5
     : 12
";

    /// mlx5-like: device totals and per-channel counters of the same names, plus a per-channel
    /// counter without a device total and a device-only one.
    const MLX5: &str = "NIC statistics:
     rx_packets: 5000
     rx_bytes: 700000
     rx_xdp_drop: 7
     rx_xdp_redirect: 3
     rx_xdp_tx_xmit: 100
     rx_xdp_tx_err: 1
     tx_xdp_xmit: 5
     tx_xdp_err: 0
     ch0_events: 10
     rx0_packets: 3000
     rx0_xdp_drop: 4
     rx0_xdp_redirect: 1
     rx0_xdp_tx_xmit: 60
     rx0_xdp_tx_err: 1
     rx0_xdp_tx_full: 2
     rx1_packets: 2000
     rx1_xdp_drop: 3
     rx1_xdp_redirect: 2
     rx1_xdp_tx_xmit: 40
     rx1_xdp_tx_err: 0
     rx1_xdp_tx_full: 6
     tx0_xdp_xmit: 5
     tx0_xdp_err: 0
     rx_xsk_packets: 0
";

    fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn veth_queues_are_summed_and_other_counters_ignored() {
        let s = NicStats::from_ethtool("l0", VETH);
        assert_eq!(s.error, None);
        assert_eq!(
            s.counters,
            map(&[
                ("rx_xdp_bytes", 11000),
                ("rx_xdp_drops", 3),
                ("rx_xdp_packets", 150),
                ("rx_xdp_redirect", 125),
                ("rx_xdp_tx", 20),
                ("rx_xdp_tx_errors", 1),
                ("tx_xdp_xmit", 7),
                ("tx_xdp_xmit_errors", 0),
            ])
        );
        // Per queue: exactly the driver's XDP lines (not `rx_queue_0_drops`, not the garbage).
        assert_eq!(s.per_queue.len(), 14);
        assert_eq!(s.per_queue["rx_queue_1_xdp_packets"], 30);
        assert!(!s.per_queue.contains_key("rx_queue_0_drops"));
        assert!(!s
            .per_queue
            .keys()
            .any(|k| k.contains("weird") || k.contains("negative") || k.is_empty()));
    }

    #[test]
    fn a_driver_total_wins_over_the_sum_of_its_channels() {
        let s = NicStats::from_ethtool("eth0", MLX5);
        assert_eq!(
            s.counters,
            map(&[
                ("rx_xdp_drop", 7),
                ("rx_xdp_redirect", 3),
                ("rx_xdp_tx_err", 1),
                // Per channel only: summed.
                ("rx_xdp_tx_full", 8),
                ("rx_xdp_tx_xmit", 100),
                ("tx_xdp_err", 0),
                ("tx_xdp_xmit", 5),
            ])
        );
        assert!(!s.per_queue.contains_key("rx0_packets"));
        assert_eq!(s.per_queue["rx1_xdp_tx_full"], 6);
    }

    #[test]
    fn queue_indexes_come_out_of_known_shapes_only() {
        for (name, want) in [
            ("rx_queue_0_xdp_packets", Some("rx_xdp_packets")),
            ("tx_queue_15_xdp_xmit", Some("tx_xdp_xmit")),
            ("queue_3_rx_xdp_drop", Some("rx_xdp_drop")),
            ("rx12_xdp_drop", Some("rx_xdp_drop")),
            ("tx0_xdp_xmit", Some("tx_xdp_xmit")),
            ("rx_xdp_drop", None),
            ("xdp_redirect", None),
            ("rx_queue_x_xdp", None),
            ("rxq_xdp", None),
            ("rx0", None),
        ] {
            assert_eq!(strip_queue(name).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn no_xdp_lines_give_no_counters_and_no_error() {
        let s = NicStats::from_ethtool("lo", "NIC statistics:\n     rx_packets: 3\n");
        assert!(s.counters.is_empty() && s.per_queue.is_empty());
        assert_eq!(s.error, None);
        assert!(xdp_counters("no stats available\n").is_empty());
    }

    #[tokio::test]
    async fn the_cache_reads_once_per_window_and_again_for_other_ifaces() {
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        let source: Source = Arc::new(move |iface| {
            let n = r.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                NicStats::from_ethtool(&iface, &format!("rx_queue_0_xdp_packets: {n}\n"))
            })
        });
        let cache = Cache::with_ttl(source.clone(), Duration::from_secs(3600));
        let l0 = vec!["l0".to_string()];
        let a = cache.get(&l0).await;
        let b = cache.get(&l0).await;
        assert_eq!(a, b);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(a[0].counters["rx_xdp_packets"], 1);
        let both = vec!["l0".to_string(), "l1".to_string()];
        let c = cache.get(&both).await;
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        assert_eq!(
            c.iter().map(|s| s.iface.as_str()).collect::<Vec<_>>(),
            ["l0", "l1"]
        );
        let expired = Cache::with_ttl(source, Duration::ZERO);
        expired.get(&l0).await;
        expired.get(&l0).await;
        assert_eq!(reads.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn real_ethtool_answers_become_entries_not_panics() {
        // Queries only (no traffic): a missing interface is an error entry; loopback has no
        // driver statistics, which is "no XDP counters", not an error.
        let s = read_ethtool("lb-no-such-if0".into()).await;
        assert_eq!(s.iface, "lb-no-such-if0");
        assert!(s.counters.is_empty());
        assert!(s.error.is_some(), "{s:?}");
        let lo = read_ethtool("lo".into()).await;
        if s.error
            .as_deref()
            .is_some_and(|e| e.starts_with("ethtool not found"))
        {
            assert_eq!(lo.error, s.error, "no ethtool: both say so");
        } else {
            assert_eq!(lo, NicStats::none("lo"));
        }
    }
}
