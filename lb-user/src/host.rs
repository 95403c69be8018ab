//! The balancer host's own settings that lb changes, and restores: per-interface forwarding,
//! the kernel's reserved ports (the SNAT range), and VIP addresses lb added.
use std::{fs, net::Ipv4Addr, process::Command};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

fn forwarding_path(iface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/forwarding")
}

/// The interface index of `name` in this network namespace.
pub fn if_index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| {
        format!("no such interface {name:?} in this network namespace (`ip -br link` lists them)")
    })
}

/// IPv4 addresses configured on `iface`.
pub fn iface_addrs(iface: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if a.interface_name != iface {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            out.push(sin.ip());
        }
    }
    Ok(out)
}

/// The driver name of `iface` as ethtool reports it (e.g. "veth"), if it can be read.
pub fn driver(iface: &str) -> Option<String> {
    let out = Command::new("ethtool").args(["-i", iface]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("driver: ").map(|d| d.trim().to_string()))
}

fn read_trim(path: &str) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("read {path}"))?
        .trim()
        .to_string())
}

fn write(path: &str, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("write {value:?} to {path}"))
}

/// The kernel's ephemeral port range.
pub fn local_port_range() -> Result<(u16, u16)> {
    let s = read_trim(LOCAL_PORT_RANGE)?;
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => bail!("cannot parse {LOCAL_PORT_RANGE}: {s:?}"),
    }
}

/// Refuses an SNAT range that overlaps the kernel's ephemeral ports.
pub fn check_snat_range(snat: (u16, u16)) -> Result<()> {
    let (lo, hi) = local_port_range()?;
    if snat.0 <= hi && lo <= snat.1 {
        bail!(
            "snat_ports {}-{} overlap net.ipv4.ip_local_port_range {lo}-{hi}: the kernel could pick the same \
             ports for the host's own connections. Choose snat_ports outside it (the default is 10000-32767) \
             or narrow the sysctl",
            snat.0,
            snat.1
        );
    }
    Ok(())
}

/// Whether an XDP program is attached to `iface` in generic (SKB) mode.
pub fn has_generic_xdp(iface: &str) -> bool {
    Command::new("ip")
        .args(["-o", "link", "show", "dev", iface])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(" xdpgeneric"))
        .unwrap_or(false)
}

fn state_path(instance: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/lb").join(format!("{instance}.host.json"))
}

/// Everything lb changed on the host, undone by [`HostChanges::restore`] (also on drop, unless
/// [`HostChanges::keep`] handed them over to a later `lb detach`).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct HostChanges {
    #[serde(skip)]
    kept: bool,
    forwarding: Vec<(String, String)>,
    reserved_ports: Option<String>,
    vips: Vec<(Ipv4Addr, String)>,
    neighbors: Vec<(Ipv4Addr, String)>,
    offloads: Vec<(String, String)>,
}

/// The next hop (gateway or the address itself) and device the kernel routes `addr` through.
pub fn next_hop(addr: Ipv4Addr) -> Result<(Ipv4Addr, String)> {
    let out = Command::new("ip")
        .args(["-o", "route", "get", &addr.to_string()])
        .output()
        .context("run `ip route get`")?;
    if !out.status.success() {
        bail!(
            "no route to backend {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    let dev =
        after("dev").with_context(|| format!("`ip route get {addr}` names no device: {text}"))?;
    let via = after("via").and_then(|v| v.parse().ok()).unwrap_or(addr);
    Ok((via, dev))
}

impl HostChanges {
    /// Turns on IPv4 forwarding on `iface` only (bpf_fib_lookup needs it on the ingress device).
    pub fn enable_forwarding(&mut self, iface: &str) -> Result<()> {
        let path = forwarding_path(iface);
        let old = read_trim(&path)?;
        if old != "1" {
            write(&path, "1")?;
            info!(
                iface,
                "net.ipv4.conf.{iface}.forwarding = 1 (was {old}; restored on exit)"
            );
            self.forwarding.push((iface.to_string(), old));
        }
        Ok(())
    }

    /// Adds the SNAT range to `ip_local_reserved_ports` so the kernel never binds it.
    pub fn reserve_ports(&mut self, snat: (u16, u16)) -> Result<()> {
        let old = read_trim(RESERVED_PORTS)?;
        let range = format!("{}-{}", snat.0, snat.1);
        if old.split(',').any(|r| r == range) {
            // Reserved by an earlier agent of this instance, which recorded the original value.
            return Ok(());
        }
        let new = if old.is_empty() {
            range.clone()
        } else {
            format!("{old},{range}")
        };
        write(RESERVED_PORTS, &new)?;
        info!("net.ipv4.ip_local_reserved_ports += {range} (restored on exit)");
        self.reserved_ports = Some(old);
        Ok(())
    }

    /// Adds `vip/32` to `iface` unless some interface already has it.
    pub fn ensure_vip(&mut self, vip: Ipv4Addr, iface: &str, all_ifaces: &[String]) -> Result<()> {
        for i in all_ifaces {
            if iface_addrs(i)?.contains(&vip) {
                info!(%vip, iface = %i, "VIP is already a local address");
                return Ok(());
            }
        }
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{vip}/32"), "dev", iface])
            .output()
            .context("run `ip addr add` (is iproute2 installed?)")?;
        if !out.status.success() {
            bail!(
                "ip addr add {vip}/32 dev {iface}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        info!(%vip, iface, "VIP added as a local address (removed on exit)");
        self.vips.push((vip, iface.to_string()));
        Ok(())
    }

    /// Asks the kernel to keep the neighbor entry of `addr`'s next hop resolved at all times
    /// (a "managed" entry, kernel 5.16+): the XDP program's `bpf_fib_lookup` needs a resolved
    /// neighbor and cannot trigger resolution itself.
    pub fn manage_neighbor(&mut self, addr: Ipv4Addr) -> Result<()> {
        let (nh, dev) = next_hop(addr)?;
        // Always (re)made: `ip neigh replace` is idempotent, and a record inherited from an
        // earlier agent says nothing about the entry being there now.
        let known = self.neighbors.iter().any(|(a, d)| *a == nh && *d == dev);
        let out = Command::new("ip")
            .args([
                "neigh",
                "replace",
                &nh.to_string(),
                "dev",
                &dev,
                "managed",
                "extern_learn",
            ])
            .output()
            .context("run `ip neigh replace`")?;
        if !out.status.success() {
            bail!(
                "ip neigh replace {nh} dev {dev} managed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        info!(backend = %addr, next_hop = %nh, dev, "neighbor kept resolved by the kernel (managed entry, removed on exit)");
        if !known {
            self.neighbors.push((nh, dev));
        }
        Ok(())
    }

    /// Waits up to `timeout` for every managed neighbor to be resolved, so that the first
    /// connections are not dropped for want of a MAC address. Unresolved ones are logged.
    pub fn wait_neighbors(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        for (nh, dev) in &self.neighbors {
            loop {
                let resolved = Command::new("ip")
                    .args(["neigh", "show", &nh.to_string(), "dev", dev])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("lladdr"))
                    .unwrap_or(false);
                if resolved {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    warn!(next_hop = %nh, dev, "neighbor not resolved yet: new flows to backends behind it are dropped (fib_no_neigh) until it answers ARP");
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// Turns receive offloads that merge frames (GRO, LRO) off on `iface`: in generic mode the
    /// program would see the merged super-packets, which the kernel's generic XDP redirect
    /// refuses as larger than the MTU.
    pub fn disable_receive_offloads(&mut self, iface: &str) -> Result<()> {
        let out = Command::new("ethtool")
            .args(["-k", iface])
            .output()
            .context("run `ethtool -k` (is ethtool installed?)")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for (feature, line) in [
            ("gro", "generic-receive-offload: on"),
            ("lro", "large-receive-offload: on"),
        ] {
            if !text.lines().any(|l| l.trim() == line) {
                continue;
            }
            let ok = Command::new("ethtool")
                .args(["-K", iface, feature, "off"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                info!(
                    iface,
                    "{feature} turned off for generic XDP (restored on exit)"
                );
                self.offloads.push((iface.to_string(), feature.to_string()));
            } else {
                warn!(iface, "could not turn {feature} off; merged frames larger than the MTU will be dropped");
            }
        }
        Ok(())
    }

    pub fn restore(&mut self) {
        for (iface, feature) in self.offloads.drain(..) {
            let _ = Command::new("ethtool")
                .args(["-K", &iface, &feature, "on"])
                .status();
        }
        for (nh, dev) in self.neighbors.drain(..) {
            let _ = Command::new("ip")
                .args(["neigh", "del", &nh.to_string(), "dev", &dev])
                .status();
        }
        for (vip, iface) in self.vips.drain(..) {
            let ok = Command::new("ip")
                .args(["addr", "del", &format!("{vip}/32"), "dev", &iface])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                warn!(%vip, iface, "could not remove the VIP lb added");
            }
        }
        for (iface, old) in self.forwarding.drain(..) {
            if let Err(e) = write(&forwarding_path(&iface), &old) {
                warn!("restore forwarding on {iface}: {e:#}");
            }
        }
        if let Some(old) = self.reserved_ports.take() {
            if let Err(e) = write(RESERVED_PORTS, &old) {
                warn!("restore ip_local_reserved_ports: {e:#}");
            }
        }
    }
}

impl HostChanges {
    /// The changes an earlier agent of `instance` left in place for the data path (so that a
    /// later `lb detach` restores the values from before the first agent).
    pub fn load(instance: &str) -> HostChanges {
        std::fs::read(state_path(instance))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// No record: a fresh instance (a stale record of a vanished one is removed).
    pub fn forget(instance: &str) -> HostChanges {
        let _ = std::fs::remove_file(state_path(instance));
        HostChanges::default()
    }

    /// Leaves the changes in place for the pinned data path and records them for `lb detach`.
    pub fn keep(&mut self, instance: &str) -> Result<()> {
        std::fs::create_dir_all("/run/lb").context("create /run/lb")?;
        std::fs::write(state_path(instance), serde_json::to_vec_pretty(self)?)
            .context("record host changes")?;
        self.kept = true;
        Ok(())
    }

    /// Restores what the agents of `instance` changed (for `lb detach`).
    pub fn restore_recorded(instance: &str) {
        let mut h = HostChanges::load(instance);
        h.restore();
        let _ = std::fs::remove_file(state_path(instance));
    }
}

impl Drop for HostChanges {
    fn drop(&mut self) {
        if !self.kept {
            self.restore();
        }
    }
}
