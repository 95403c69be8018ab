//! Child processes started inside namespaces: output captured to files in the topology's log
//! directory, readiness detected by a line in that output, SIGTERM then SIGKILL (after 3 s) on drop.

use std::fs;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::ns::describe;

/// How long a stopped child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Which captured stream to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A child process whose stdout and stderr go to `<log dir>/<name>.stdout` / `.stderr`.
pub struct Process {
    name: String,
    command: String,
    child: Arc<Mutex<Child>>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    /// Spawns `cmd` (stdin closed) with its output captured under `log_dir`.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Process> {
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let out =
            fs::File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let err =
            fs::File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let command = describe(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {command}"))?;
        Ok(Process {
            name: name.to_string(),
            command,
            child: Arc::new(Mutex::new(child)),
            stdout,
            stderr,
        })
    }

    /// The name given at spawn (also the log file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Paths of the captured stdout and stderr.
    pub fn log_paths(&self) -> (&Path, &Path) {
        (&self.stdout, &self.stderr)
    }

    /// Both captured streams, labelled, for error messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout ---\n{}--- {} stderr ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))
    }

    /// Sends `sig` (no-op if the process already exited).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut child = lock(&self.child);
        if child.try_wait()?.is_none() {
            kill(pid_of(&child), sig).with_context(|| format!("kill -{sig} {}", self.name))?;
        }
        Ok(())
    }

    /// Waits (up to `timeout`) for a line containing `needle` on `stream`; returns that line.
    /// Fails with the captured output if the process exits first or time runs out.
    pub fn wait_for_line(&self, stream: Stream, needle: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let text = match stream {
                Stream::Stdout => self.stdout(),
                Stream::Stderr => self.stderr(),
            };
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing {needle:?}\ncommand: {}\n{}",
                    self.name,
                    self.command,
                    self.logs()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}\ncommand: {}\n{}",
                    self.name,
                    self.command,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns the exit status.
    pub fn stop(&self) -> Result<ExitStatus> {
        terminate(&self.child, STOP_GRACE).with_context(|| format!("stopping {}", self.name))
    }

    /// The shared child, so that the topology can kill what tests forgot.
    pub(crate) fn shared(&self) -> Arc<Mutex<Child>> {
        self.child.clone()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = terminate(&self.child, STOP_GRACE);
    }
}

/// The `lb` agent running in the lb namespace (see [`Topology::start_lb`](super::Topology::start_lb)).
pub struct LbProcess {
    /// The process (stderr carries the agent's log).
    pub process: Process,
    /// The config file it was started with.
    pub config: PathBuf,
    /// The line that said it was ready.
    pub ready_line: String,
}

impl Deref for LbProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

/// One `neo4j-sim` in a backend namespace.
pub struct SimProcess {
    /// The process.
    pub process: Process,
    /// Server name (db01...).
    pub name: String,
    /// Its control socket (role changes out of band).
    pub control: PathBuf,
}

impl Deref for SimProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    child
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// Stops `child` if it still runs: SIGTERM, up to `grace`, then SIGKILL. Reaps it either way.
pub fn terminate(child: &Mutex<Child>, grace: Duration) -> Result<ExitStatus> {
    let mut child = lock(child);
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let _ = kill(pid_of(&child), Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    Ok(child.wait()?)
}
