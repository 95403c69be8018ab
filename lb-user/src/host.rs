//! The balancer host's own settings that lb changes, and restores: per-interface forwarding,
//! the kernel's reserved ports (the SNAT range), and VIP addresses lb added.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

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

/// The MAC address of `iface` (in the calling thread's network namespace).
pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .with_context(|| format!("{iface} has no link-layer (MAC) address"))
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

/// A TCP socket of this host (network namespace), as `/proc/net/tcp` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSocket {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The kernel's TCP state number (1 ESTABLISHED ... 6 TIME_WAIT ... 10 LISTEN).
    pub state: u8,
}

const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "?",
    }
}

/// Parses `/proc/net/tcp` text: `sl local rem st ...` with addresses as `HEXADDR:HEXPORT`
/// (the address in the host's byte order as the kernel stores it: network order read as a
/// native integer).
pub fn parse_proc_net_tcp(text: &str) -> Vec<HostSocket> {
    let addr = |s: &str| -> Option<SocketAddrV4> {
        let (a, p) = s.split_once(':')?;
        let a = u32::from_str_radix(a, 16).ok()?;
        let p = u16::from_str_radix(p, 16).ok()?;
        Some(SocketAddrV4::new(Ipv4Addr::from(a.to_ne_bytes()), p))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some(HostSocket {
                local: addr(w.get(1)?)?,
                remote: addr(w.get(2)?)?,
                state: u8::from_str_radix(w.get(3)?, 16).ok()?,
            })
        })
        .collect()
}

/// What lb takes of the host's ports for its SNAT range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub snat: (u16, u16),
    /// `net.ipv4.ip_local_port_range`.
    pub ephemeral: (u16, u16),
    /// Ports of the SNAT range inside the ephemeral range: reserved, so the kernel stops
    /// handing them to the host's own connections.
    pub shared: u32,
    /// Ephemeral ports the host keeps for its own connections (and lb's health checks).
    pub left: u32,
}

impl std::fmt::Display for PortPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = self.snat;
        let (lo, hi) = self.ephemeral;
        if self.shared == 0 {
            write!(
                f,
                "snat_ports {a}-{b}: outside the ephemeral range {lo}-{hi}, and reserved \
                 (net.ipv4.ip_local_reserved_ports)"
            )
        } else {
            write!(
                f,
                "snat_ports {a}-{b}: {} of them inside the ephemeral range {lo}-{hi} are reserved \
                 (net.ipv4.ip_local_reserved_ports) so the kernel never gives them to the host's own \
                 connections; the host keeps {} ephemeral ports",
                self.shared, self.left
            )
        }
    }
}

/// Fewer ephemeral ports than this left to the host is worth a warning.
const FEW_EPHEMERAL_PORTS: u32 = 1024;

/// Decides whether lb can take `snat` on a host with the ephemeral range `ephemeral` and
/// these sockets: the range is reserved (the kernel then never binds it), so an overlap with
/// the ephemeral range is fine as long as the host keeps ports of its own. Refused: a live
/// connection of the host from a port of the range to a backend's data port (`backends`:
/// address and port), whose packets from the backend the data path would take for an SNAT
/// flow's (and answer with a RST), and a range that leaves the host no ephemeral port. A
/// TIME_WAIT is no such connection: nothing of it is alive to be disturbed.
pub fn plan_snat_ports(
    snat: (u16, u16),
    ephemeral: (u16, u16),
    sockets: &[HostSocket],
    backends: &[SocketAddrV4],
) -> Result<PortPlan> {
    let in_range = |p: u16| (snat.0..=snat.1).contains(&p);
    let clashes: Vec<&HostSocket> = sockets
        .iter()
        .filter(|s| {
            ![TCP_LISTEN, TCP_TIME_WAIT, TCP_CLOSE].contains(&s.state)
                && in_range(s.local.port())
                && backends.contains(&s.remote)
        })
        .collect();
    if let Some(first) = clashes.first() {
        let listed: Vec<String> = clashes
            .iter()
            .take(5)
            .map(|s| format!("{} -> {} ({})", s.local, s.remote, tcp_state_name(s.state)))
            .collect();
        bail!(
            "{} connection(s) of this host already use a port of snat_ports {}-{} towards a backend's \
             data port ({}{}): lb would take the backend's packets to them for its own flows'. Close them, \
             or choose another range with --snat-ports or snat_ports (e.g. one below {})",
            clashes.len(),
            snat.0,
            snat.1,
            listed.join(", "),
            if clashes.len() > 5 { ", ..." } else { "" },
            first.local.port().min(snat.0),
        );
    }
    let (lo, hi) = ephemeral;
    let total = (hi as u32 + 1).saturating_sub(lo as u32);
    let shared = (hi.min(snat.1) as u32 + 1).saturating_sub(lo.max(snat.0) as u32);
    let left = total - shared;
    if left == 0 {
        bail!(
            "snat_ports {}-{} covers the whole ephemeral range net.ipv4.ip_local_port_range {lo}-{hi}: \
             reserved for lb, it would leave the host (and lb's own health checks) no source port. \
             Choose a smaller range with --snat-ports or snat_ports, or widen the sysctl",
            snat.0,
            snat.1
        );
    }
    Ok(PortPlan {
        snat,
        ephemeral,
        shared,
        left,
    })
}

/// Checks the SNAT range against this host (see [`plan_snat_ports`]) and says what lb takes.
pub fn check_snat_ports(snat: (u16, u16), backends: &[SocketAddrV4]) -> Result<PortPlan> {
    let sockets =
        parse_proc_net_tcp(&fs::read_to_string("/proc/net/tcp").context("read /proc/net/tcp")?);
    let plan = plan_snat_ports(snat, local_port_range()?, &sockets, backends)?;
    info!("{plan}");
    if plan.shared > 0 && plan.left < FEW_EPHEMERAL_PORTS {
        warn!(
            left = plan.left,
            "few ephemeral ports are left to the host's own connections: consider a smaller snat_ports"
        );
    }
    Ok(plan)
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

/// The source address the kernel would give a connection of this host to `addr` (`ip route
/// get`'s `src`): the SNAT address of new flows to that backend where the data path cannot
/// ask the FIB for it.
pub fn route_src(addr: Ipv4Addr) -> Result<Ipv4Addr> {
    let out = Command::new("ip")
        .args(["-o", "route", "get", &addr.to_string()])
        .output()
        .context("run `ip route get`")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "src")
        .and_then(|i| words.get(i + 1))
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "no source address for backend {addr}: `ip route get {addr}` says {:?}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
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
        info!("net.ipv4.ip_local_reserved_ports += {range} (restored by lb detach)");
        // The value from before any agent of this instance, which `lb detach` restores.
        if self.reserved_ports.is_none() {
            self.reserved_ports = Some(old);
        }
        Ok(())
    }

    /// Gives a range [`HostChanges::reserve_ports`] took back to the kernel (an earlier SNAT
    /// range once its last flow ended).
    pub fn release_ports(&mut self, snat: (u16, u16)) -> Result<()> {
        let cur = read_trim(RESERVED_PORTS)?;
        let range = format!("{}-{}", snat.0, snat.1);
        let rest: Vec<&str> = cur
            .split(',')
            .filter(|r| !r.is_empty() && *r != range)
            .collect();
        // An empty write is ignored by the kernel: a newline clears the list.
        let value = if rest.is_empty() {
            "\n".to_string()
        } else {
            rest.join(",")
        };
        write(RESERVED_PORTS, &value)?;
        info!("net.ipv4.ip_local_reserved_ports -= {range}");
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
            // An empty write is ignored by the kernel: a newline clears the list.
            let value = if old.is_empty() { "\n" } else { old.as_str() };
            if let Err(e) = write(RESERVED_PORTS, value) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(local: &str, remote: &str, state: u8) -> HostSocket {
        HostSocket {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
        }
    }

    const DB01_BOLT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 10), 7687);

    #[test]
    fn proc_net_tcp_lines_are_read_in_the_kernels_byte_order() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                    \x20  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
                    \x20  1: 0101000A:4E20 0A01000A:1D52 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(
            parse_proc_net_tcp(text),
            vec![
                sock("127.0.0.1:8080", "0.0.0.0:0", 10),
                sock("10.0.1.1:20000", "10.0.1.10:7506", 1),
            ]
        );
    }

    #[test]
    fn a_range_inside_a_wide_ephemeral_range_is_reserved_and_the_rest_left_to_the_host() {
        // The HAProxy host's tuning: 10000-65535; lb's default range is inside it.
        let p = plan_snat_ports((10000, 32767), (10000, 65535), &[], &[DB01_BOLT]).unwrap();
        assert_eq!((p.shared, p.left), (22768, 32768));
        assert!(
            p.to_string()
                .contains("the host keeps 32768 ephemeral ports"),
            "{p}"
        );
        // The kernel's default range: no overlap at all.
        let p = plan_snat_ports((10000, 32767), (32768, 60999), &[], &[DB01_BOLT]).unwrap();
        assert_eq!((p.shared, p.left), (0, 28232));
        assert!(p.to_string().contains("outside the ephemeral range"), "{p}");
    }

    #[test]
    fn a_range_that_leaves_the_host_no_ephemeral_port_is_refused() {
        let e = plan_snat_ports((10000, 65535), (10000, 65535), &[], &[DB01_BOLT]).unwrap_err();
        assert!(
            e.to_string().contains("covers the whole ephemeral range"),
            "{e}"
        );
        assert!(plan_snat_ports((10000, 65534), (10000, 65535), &[], &[DB01_BOLT]).is_ok());
    }

    #[test]
    fn only_a_live_host_connection_in_the_range_to_a_backends_data_port_is_refused() {
        let listening = sock("0.0.0.0:20000", "0.0.0.0:0", TCP_LISTEN);
        let elsewhere = sock("10.0.1.1:20000", "192.0.2.99:443", 1);
        let below = sock("10.0.1.1:9999", "10.0.1.10:7687", 1);
        let check_port = sock("10.0.1.1:20001", "10.0.1.10:7474", 1);
        let time_wait = sock("10.0.1.1:20002", "10.0.1.10:7687", TCP_TIME_WAIT);
        let ok = [listening, elsewhere, below, check_port, time_wait];
        assert!(plan_snat_ports((10000, 32767), (10000, 65535), &ok, &[DB01_BOLT]).is_ok());
        let clash = sock("10.0.1.1:20000", "10.0.1.10:7687", 1);
        let e = plan_snat_ports(
            (10000, 32767),
            (10000, 65535),
            &[listening, clash],
            &[DB01_BOLT],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("10.0.1.1:20000 -> 10.0.1.10:7687 (ESTABLISHED)")
                && e.contains("--snat-ports"),
            "{e}"
        );
    }
}
