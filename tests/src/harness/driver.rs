//! The official Python driver (`tests/py/pooled_writes.py`): one session pool kept open in a
//! namespace, writing on demand, for tests that watch what a balancer failover does to a
//! driver's pooled connections.
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use anyhow::{Context, Result};

use super::Ns;

/// A running `pooled_writes.py`; killed when dropped.
pub struct PooledWriter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PooledWriter {
    /// Starts the script in `ns` against `uri` (`bolt://VIP:PORT`); `None` (after saying so)
    /// when no Python venv with the driver exists (`cargo xtask setup` creates it).
    pub fn start(ns: &Ns, uri: &str) -> Result<Option<PooledWriter>> {
        let python = super::python();
        if !python.exists() {
            eprintln!(
                "skipped: no Python venv with the neo4j driver at {} (cargo xtask setup creates it)",
                python.display()
            );
            return Ok(None);
        }
        let script = super::repo_root().join("tests/py/pooled_writes.py");
        let mut child = ns
            .command(&python)
            .arg(&script)
            .arg(uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start pooled_writes.py")?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Some(PooledWriter {
            child,
            stdin,
            stdout,
        }))
    }

    /// One managed write transaction: `{"ok": true, "server", "writes", "connection"}` or
    /// `{"ok": false, "error", "message"}`.
    pub fn write(&mut self) -> Result<serde_json::Value> {
        writeln!(self.stdin, "go")?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("bad line {line:?}"))
    }
}

impl Drop for PooledWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
