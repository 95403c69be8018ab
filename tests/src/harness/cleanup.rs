//! Leftovers of test processes that died without running their destructors (SIGKILL, abort, a
//! crashed runner): namespaces `lbt-<test>-<pid>-<role>` and pin directories
//! `/sys/fs/bpf/lb/test-<test>-<pid>` whose pid is no longer alive.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::ns::run;
use super::Ns;

/// Prefix of every namespace the harness creates.
pub const NS_PREFIX: &str = "lbt-";
/// Prefix of every agent instance name the harness uses.
pub const INSTANCE_PREFIX: &str = "test-";
/// Where the agent pins its maps: `<PIN_ROOT>/<instance>`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb";

/// Whether a process with this pid exists (zombies count as alive).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    !matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// The owner pid of a harness namespace name `lbt-<test>-<pid>-<role>`.
pub fn ns_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let _role = parts.next()?;
    let pid = parts.next()?;
    let _test = parts.next()?;
    pid.parse().ok()
}

/// The owner pid of a harness instance name `test-<test>-<pid>`.
pub fn instance_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(INSTANCE_PREFIX)?;
    let (_, pid) = rest.rsplit_once('-')?;
    pid.parse().ok()
}

/// The pin directory of an agent instance.
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// Removes a pin directory and everything pinned in it (absent is fine).
pub fn remove_pin_dir(instance: &str) -> Result<()> {
    let dir = pin_dir(instance);
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Kills every process inside `ns` (SIGKILL), then deletes it.
pub fn kill_and_delete(ns: &Ns) -> Result<()> {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", &ns.name])) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    ns.delete()
}

/// Removes namespaces and pin directories of harness runs whose process is gone. Returns what it
/// removed, for the log.
pub fn remove_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = ns_owner(&name) else { continue };
            if pid_alive(pid) {
                continue;
            }
            kill_and_delete(&Ns::existing(&name))
                .with_context(|| format!("removing stale namespace {name}"))?;
            removed.push(format!("netns {name}"));
        }
    }
    if let Ok(entries) = fs::read_dir(PIN_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = instance_owner(&name) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            remove_pin_dir(&name)?;
            removed.push(format!("pins {}", pin_dir(&name).display()));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_yield_their_owner_pid() {
        assert_eq!(ns_owner("lbt-routing_works-4242-db01"), Some(4242));
        assert_eq!(ns_owner("lbt-x-1-lb"), Some(1));
        assert_eq!(ns_owner("other-1-lb"), None);
        assert_eq!(ns_owner("lbt-nopid"), None);
    }

    #[test]
    fn instance_names_yield_their_owner_pid() {
        assert_eq!(instance_owner("test-routing_works-4242"), Some(4242));
        assert_eq!(instance_owner("demo"), None);
        assert_eq!(instance_owner("test-x-notapid"), None);
    }

    #[test]
    fn our_own_pid_is_alive_and_an_absurd_one_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
