//! One network namespace (`/run/netns/NAME`) and the ways to run something inside it:
//! - [`Ns::exec`]: a short command under `ip netns exec` (waits, fails with its stderr);
//! - [`Ns::command`] / [`Ns::spawn`]: a long-running process under `nsenter --net=...`, which keeps the
//!   host's mount namespace, so bpffs pins stay visible (they are not under `ip netns exec`);
//! - [`Ns::run_in`]: a Rust closure on a thread that `setns`'ed into the namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// A handle to a named network namespace. Cloning it does not copy the namespace; whoever created it
/// (normally the [`Topology`](super::Topology)) deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ns {
    /// The name under `/run/netns`.
    pub name: String,
}

impl Ns {
    /// Creates the namespace, brings `lo` up and turns IPv6 off (no router solicitations or MLD
    /// reports in packet captures).
    pub fn create(name: &str) -> Result<Ns> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Ns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        Ok(ns)
    }

    /// A handle to an existing namespace (not checked).
    pub fn existing(name: &str) -> Ns {
        Ns {
            name: name.to_string(),
        }
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Whether `/run/netns/NAME` exists.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// Deletes the namespace (`ip netns del`). Processes still inside keep it alive; kill them first.
    pub fn delete(&self) -> Result<()> {
        run(Command::new("ip").args(["netns", "del", &self.name]))?;
        Ok(())
    }

    /// Runs `ip -n NAME ARGS...` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `ip netns exec NAME ARGS...` to completion and fails with its stderr if it exits non-zero.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        if args.is_empty() {
            bail!("exec in {}: empty command", self.name);
        }
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Like [`Ns::exec`] but returns the output whatever the exit status (for commands whose failure
    /// a test wants to look at).
    pub fn exec_unchecked<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd.output()
            .with_context(|| format!("running {}", describe(&cmd)))
    }

    /// A `Command` that runs `program` under `nsenter --net=/run/netns/NAME` (the process is `program`
    /// itself: nsenter execs it). Use this for anything that pins to bpffs or runs for long.
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Spawns `args[0] args[1..]` in the namespace via [`Ns::command`], stdin closed, output inherited.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Child> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("spawn in {}: empty command", self.name))?;
        let mut cmd = self.command(program);
        cmd.args(rest).stdin(Stdio::null());
        cmd.spawn()
            .with_context(|| format!("spawning {}", describe(&cmd)))
    }

    /// Runs `f` on a fresh thread whose network namespace is this one (sockets it opens live here).
    /// A panic in `f` is propagated to the caller. Tokio users create a runtime inside `f`.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let name = self.name.clone();
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<R> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {name}"))?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// Runs `cmd` to completion; a non-zero exit becomes an error carrying the command line and stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        bail!(
            "{} failed ({}): {}{}{}",
            describe(cmd),
            out.status,
            stderr.trim(),
            if stdout.trim().is_empty() {
                ""
            } else {
                "\nstdout: "
            },
            stdout.trim()
        );
    }
    Ok(out)
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
