//! Where the backend sets are decided: from the latest health of every (service, backend)
//! pair to each service's desired set. Pure: the caller installs the result.
//!
//! Exclusive (role) services, e.g. the write service, never have more than one member:
//! - the installed role holder stays while its latest check answered positive, even if
//!   another server claims the role too (logged loudly);
//! - if it fails a check (even one not yet counted to `fall`) or loses the role, and exactly
//!   one other UP server claims the role, that one replaces it at once;
//! - otherwise, with no single claimant, the set is empty: new connections are refused (RST)
//!   rather than sent to the wrong server.
//!
//! Leaving backends' flows are reset (`on_down = "reset"`) after a definitive negative answer
//! or a replacement; removal by failed checks with no replacement drains.
use crate::config::{Backend, OnDown, Service};

pub use crate::health::machine::Health;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Backend indexes, in configuration order.
    pub members: Vec<usize>,
    /// Backends leaving the set whose flows must be reset.
    pub reset: Vec<usize>,
    /// Something an operator must hear about (contested role).
    pub warning: Option<String>,
}

fn names(backends: &[Backend], idx: &[usize]) -> String {
    idx.iter()
        .map(|&i| backends[i].name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The desired set of `svc`, given each backend's health (`health(backend index)`), the set
/// installed now, and the installed set of its fallback service, if any.
pub fn decide(
    svc: &Service,
    backends: &[Backend],
    health: impl Fn(usize) -> Health,
    installed: &[usize],
    fallback: Option<&[usize]>,
) -> Decision {
    if svc.check.is_none() {
        return Decision {
            members: svc.backends.clone(),
            ..Default::default()
        };
    }
    let up: Vec<usize> = svc
        .backends
        .iter()
        .copied()
        .filter(|&b| health(b).up)
        .collect();
    let mut d = if svc.exclusive {
        exclusive(svc, backends, &health, installed, &up)
    } else {
        shared(svc, &health, installed, up)
    };
    if d.members.is_empty() {
        if let Some(f) = fallback {
            d.members = f.to_vec();
        }
    }
    d
}

fn exclusive(
    svc: &Service,
    backends: &[Backend],
    health: &impl Fn(usize) -> Health,
    installed: &[usize],
    up: &[usize],
) -> Decision {
    let claimants: Vec<usize> = up
        .iter()
        .copied()
        .filter(|&b| health(b).latest_positive)
        .collect();
    let reset_if = |cond: bool, b: usize| {
        if cond && svc.on_down == OnDown::Reset {
            vec![b]
        } else {
            vec![]
        }
    };
    let Some(&holder) = installed.first() else {
        return match claimants.len() {
            1 => Decision { members: claimants, ..Default::default() },
            0 => Decision::default(),
            _ => Decision {
                warning: Some(format!(
                    "service {}: {} all claim the role; refusing new connections until exactly one does",
                    svc.name,
                    names(backends, &claimants)
                )),
                ..Default::default()
            },
        };
    };
    let h = health(holder);
    let rivals: Vec<usize> = claimants.iter().copied().filter(|&b| b != holder).collect();
    if h.up && h.latest_positive {
        let warning = (!rivals.is_empty()).then(|| {
            format!(
                "service {}: {} also claim(s) the role; keeping {} whose latest check is positive",
                svc.name,
                names(backends, &rivals),
                backends[holder].name
            )
        });
        return Decision {
            members: vec![holder],
            warning,
            ..Default::default()
        };
    }
    if rivals.len() == 1 {
        // A contested role is not debounced by `fall`: the holder failed, a single rival claims.
        return Decision {
            members: rivals.clone(),
            reset: reset_if(true, holder),
            warning: None,
        };
    }
    let warning = (rivals.len() > 1).then(|| {
        format!(
            "service {}: {} all claim the role; refusing new connections until exactly one does",
            svc.name,
            names(backends, &rivals)
        )
    });
    if h.up {
        // Failed a check, not yet counted down, and no single rival: keep it.
        return Decision {
            members: vec![holder],
            warning,
            ..Default::default()
        };
    }
    Decision {
        members: vec![],
        reset: reset_if(h.latest_negative, holder),
        warning,
    }
}

fn shared(
    svc: &Service,
    health: &impl Fn(usize) -> Health,
    installed: &[usize],
    up: Vec<usize>,
) -> Decision {
    let reset = installed
        .iter()
        .copied()
        .filter(|b| !up.contains(b) && svc.on_down == OnDown::Reset && health(*b).latest_negative)
        .collect();
    Decision {
        members: up,
        reset,
        warning: None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const CFG: &str = r#"
[[backend]]
name = "db01"
address = "10.0.1.10"
[[backend]]
name = "db02"
address = "10.0.1.11"
[[backend]]
name = "db03"
address = "10.0.1.12"
[[service]]
name = "write"
vip = "198.18.0.10:7680"
backend_port = 7687
backends = ["db01", "db02", "db03"]
check = "neo4j-ha-master"
[[service]]
name = "read"
vip = "198.18.0.10:7681"
backend_port = 7687
backends = ["db01", "db02", "db03"]
check = "neo4j-ha-slave"
[[service]]
name = "static"
vip = "198.18.0.10:9000"
backend_port = 9000
backends = ["db02", "db03"]
"#;

    fn cfg() -> Config {
        Config::parse(Path::new("t.toml"), CFG).unwrap()
    }

    const UP: Health = Health {
        up: true,
        latest_positive: true,
        latest_negative: false,
    };
    const NEG: Health = Health {
        up: false,
        latest_positive: false,
        latest_negative: true,
    };
    const FAILING_UP: Health = Health {
        up: true,
        latest_positive: false,
        latest_negative: false,
    };
    const FAILED: Health = Health {
        up: false,
        latest_positive: false,
        latest_negative: false,
    };
    const RISING: Health = Health {
        up: false,
        latest_positive: true,
        latest_negative: false,
    };

    fn run(svc: usize, h: [Health; 3], installed: &[usize]) -> Decision {
        let c = cfg();
        decide(&c.services[svc], &c.backends, |b| h[b], installed, None)
    }

    #[test]
    fn the_single_master_is_installed() {
        assert_eq!(run(0, [UP, NEG, NEG], &[]).members, vec![0]);
    }

    #[test]
    fn a_rising_server_is_not_installed_before_rise() {
        assert_eq!(run(0, [RISING, NEG, NEG], &[]).members, Vec::<usize>::new());
    }

    #[test]
    fn two_claimants_with_none_installed_refuse_writes_loudly() {
        let d = run(0, [UP, UP, NEG], &[]);
        assert!(d.members.is_empty());
        assert!(d.warning.unwrap().contains("db01, db02 all claim"));
    }

    #[test]
    fn the_installed_master_is_kept_while_positive_even_when_another_claims() {
        let d = run(0, [UP, UP, NEG], &[0]);
        assert_eq!(d.members, vec![0]);
        assert!(d.warning.unwrap().contains("keeping db01"));
    }

    #[test]
    fn a_demoted_master_is_replaced_at_once_and_its_flows_reset() {
        let d = run(0, [NEG, UP, NEG], &[0]);
        assert_eq!((d.members, d.reset), (vec![1], vec![0]));
    }

    #[test]
    fn a_master_failing_one_check_while_another_claims_is_replaced_without_fall() {
        let d = run(0, [FAILING_UP, UP, NEG], &[0]);
        assert_eq!((d.members, d.reset), (vec![1], vec![0]));
    }

    #[test]
    fn a_master_failing_one_check_with_no_rival_is_kept() {
        assert_eq!(run(0, [FAILING_UP, NEG, NEG], &[0]).members, vec![0]);
    }

    #[test]
    fn a_hung_master_with_no_rival_drains_instead_of_resetting() {
        let d = run(0, [FAILED, NEG, NEG], &[0]);
        assert!(d.members.is_empty() && d.reset.is_empty());
    }

    #[test]
    fn a_master_that_says_unknown_with_no_rival_is_removed_and_reset() {
        let d = run(0, [NEG, FAILED, FAILED], &[0]);
        assert!(d.members.is_empty());
        assert_eq!(d.reset, vec![0]);
    }

    #[test]
    fn reads_go_to_every_healthy_slave_and_drain_by_default() {
        let d = run(1, [NEG, UP, UP], &[1, 2]);
        assert_eq!(d.members, vec![1, 2]);
        let d = run(1, [NEG, NEG, UP], &[1, 2]);
        assert_eq!((d.members, d.reset), (vec![2], vec![]));
    }

    #[test]
    fn a_service_without_a_check_keeps_its_configured_set() {
        assert_eq!(run(2, [FAILED, FAILED, FAILED], &[]).members, vec![1, 2]);
    }

    #[test]
    fn fallback_set_is_used_when_no_member_is_healthy() {
        let c = cfg();
        let h = [UP, NEG, NEG];
        let d = decide(&c.services[1], &c.backends, |b| h[b], &[], Some(&[0]));
        assert_eq!(d.members, vec![0]);
    }
}
