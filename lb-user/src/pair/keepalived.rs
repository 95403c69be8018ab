//! `lb pair keepalived-config`: the keepalived configuration a node of a pair needs, from its
//! lb configuration. One VRRP instance holds every VIP (on the client-facing interface) and
//! the floating `snat_address` (on the backend-facing one: the same when lb is one-armed); `lb health` lowers the node's priority while it cannot serve or has
//! not received its peer's flows (so a returning node stays backup until it is synced); both
//! nodes start as backup and the higher priority takes the addresses, a returning one after
//! [`PREEMPT_DELAY`].
use std::{fmt::Write, net::Ipv4Addr, path::Path};

use anyhow::{bail, Result};

use crate::config::Config;

/// Seconds a returning node (higher priority) waits before it takes the VIPs back: its peer's
/// flows arrive within a second or two of its return, and `lb health` holds its priority down
/// until they have.
pub const PREEMPT_DELAY: u32 = 5;

/// What the configuration file does not say.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// `lb run`'s interfaces in its order: VRRP runs on the first and the VIPs go there; the
    /// `snat_address` goes on the last (the backends' side of a two-armed host).
    pub ifaces: &'a [String],
    /// This node's priority (the other node's should differ by less than 20).
    pub priority: u8,
    pub router_id: u8,
    /// Seconds between adverts (keepalived accepts fractions: 0.2 for a sub-second takeover).
    pub advert_int: f64,
    /// The `lb` binary keepalived runs for its track script.
    pub lb: &'a Path,
}

/// The keepalived.conf text for `cfg`'s instance.
pub fn config(cfg: &Config, o: &Options) -> Result<String> {
    let Some(snat) = cfg.snat_address else {
        bail!(
            "{}: a pair needs snat_address (a floating address keepalived moves with the VIPs)",
            cfg.path.display()
        );
    };
    if cfg.pair.is_none() {
        bail!(
            "{}: no [pair] section: this node would not sync its flows",
            cfg.path.display()
        );
    }
    let (Some(vip_iface), Some(snat_iface)) = (o.ifaces.first(), o.ifaces.last()) else {
        bail!("no interface: give lb run's, in its order (--iface)");
    };
    let mut addrs: Vec<(Ipv4Addr, &str)> = cfg
        .vip_addrs()
        .into_iter()
        .map(|a| (a, vip_iface.as_str()))
        .collect();
    if !addrs.iter().any(|(a, _)| *a == snat) {
        addrs.push((snat, snat_iface));
    } else if vip_iface != snat_iface {
        bail!(
            "{}: snat_address {snat} is also a VIP, which goes on {vip_iface}; the backends reach it on {snat_iface}",
            cfg.path.display()
        );
    }
    let name = &cfg.instance;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# keepalived.conf for lb instance {name:?} (lb pair keepalived-config)"
    );
    // Adverts more often than once a second need VRRP version 3.
    let version = if o.advert_int < 1.0 {
        "\n    vrrp_version 3"
    } else {
        ""
    };
    let _ = writeln!(
        s,
        "global_defs {{\n    enable_script_security\n    script_user root{version}\n}}"
    );
    let _ = writeln!(
        s,
        "vrrp_script chk_lb_{name} {{\n    script \"{} health --instance {name} --quiet\"\n    interval 1\n    fall 2\n    rise 2\n    weight -20\n}}",
        o.lb.display()
    );
    let _ = writeln!(
        s,
        "vrrp_instance lb_{name} {{\n    state BACKUP\n    interface {}\n    virtual_router_id {}\n    priority {}\n    advert_int {}\n    preempt_delay {PREEMPT_DELAY}\n    virtual_ipaddress {{",
        vip_iface, o.router_id, o.priority, o.advert_int
    );
    for (a, dev) in addrs {
        let _ = writeln!(s, "        {a}/32 dev {dev}");
    }
    let _ = writeln!(
        s,
        "    }}\n    track_script {{\n        chk_lb_{name}\n    }}\n    notify \"{} pair notify --instance {name}\"\n}}",
        o.lb.display()
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vips_and_the_floating_address_move_together_under_lb_health() {
        let text = "instance = \"neo4j\"\nvip_mode = \"routed\"\nsnat_address = \"10.0.1.60\"\n\
            [[backend]]\nname = \"db01\"\naddress = \"10.0.1.10\"\n\
            [[service]]\nname = \"write\"\nvip = \"192.0.2.10:7680\"\nbackend_port = 7687\nbackends = [\"db01\"]\n\
            [[service]]\nname = \"read\"\nvip = \"192.0.2.10:7681\"\nbackend_port = 7687\nbackends = [\"db01\"]\n\
            [pair]\npeer = \"10.0.1.2:7690\"\n";
        let cfg = Config::parse(Path::new("lb.toml"), text).unwrap();
        let one = ["eth0".to_string()];
        let o = Options {
            ifaces: &one,
            priority: 100,
            router_id: 51,
            advert_int: 1.0,
            lb: Path::new("/usr/bin/lb"),
        };
        let out = config(&cfg, &o).unwrap();
        assert!(
            out.contains("script \"/usr/bin/lb health --instance neo4j --quiet\""),
            "{out}"
        );
        assert!(
            out.contains("weight -20") && out.contains("state BACKUP"),
            "{out}"
        );
        assert_eq!(out.matches("192.0.2.10/32 dev eth0").count(), 1, "{out}");
        assert!(out.contains("10.0.1.60/32 dev eth0"), "{out}");
        assert!(
            out.contains("priority 100") && out.contains("virtual_router_id 51"),
            "{out}"
        );

        // Two-armed: the VIPs on the clients' side, the floating source on the backends'.
        let two = ["eth0".to_string(), "eth1".to_string()];
        let out = config(
            &cfg,
            &Options {
                ifaces: &two,
                ..o.clone()
            },
        )
        .unwrap();
        assert!(
            out.contains("interface eth0") && out.contains("192.0.2.10/32 dev eth0"),
            "{out}"
        );
        assert!(out.contains("10.0.1.60/32 dev eth1"), "{out}");

        let unpaired = Config::parse(
            Path::new("lb.toml"),
            &text.replace("snat_address = \"10.0.1.60\"\n", ""),
        )
        .unwrap();
        let e = config(&unpaired, &o).unwrap_err().to_string();
        assert!(e.contains("needs snat_address"), "{e}");
    }
}
