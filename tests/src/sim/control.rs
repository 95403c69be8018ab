//! Out-of-band control of a simulated server over a Unix socket (reachable from every network namespace,
//! since the filesystem is shared), and the client tests use.
//!
//! Protocol: one JSON object per line each way. Requests:
//! - `{"cmd":"set_role","role":"master"|"slave"|"unknown"}`
//! - `{"cmd":"stage","steps":[{"role":"unknown","ms":3000},{"role":"slave","ms":0}]}`: the first role is
//!   set at once, each next one after the previous step's `ms`;
//! - `{"cmd":"set_mode","mode":"normal"|"hang"|"status500"|"garbage"}`
//! - `{"cmd":"set_auth","auth":{"user":"neo4j","password":"secret"}}` (or `"auth":null` to clear)
//! - `{"cmd":"stats"}`
//!
//! Every answer is `{"ok":true,"stats":{...}}` (the state after the command, see [`Stats`]) or
//! `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{Auth, Mode, Role, SimState, Stats};

/// One step of a staged transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Role during this step.
    pub role: Role,
    /// How long the step lasts, in milliseconds (ignored for the last step).
    pub ms: u64,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Set the role now (cancels a running stage).
    SetRole {
        /// New role.
        role: Role,
    },
    /// Run a staged transition.
    Stage {
        /// Steps in order.
        steps: Vec<Step>,
    },
    /// Set the HTTP fault mode.
    SetMode {
        /// New mode.
        mode: Mode,
    },
    /// Set or clear the credentials.
    SetAuth {
        /// New credentials, `None` to disable auth.
        auth: Option<Auth>,
    },
    /// Just report the stats.
    Stats,
}

/// A control answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the command was applied.
    pub ok: bool,
    /// State after the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Binds the control socket at `path`, replacing a stale socket file left by a previous run.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale control socket {}", path.display()))?;
        }
    }
    UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))
}

/// Serves control connections until the task is aborted.
pub async fn serve(
    listener: UnixListener,
    state: Arc<SimState>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                res = connection(stream, &state) => {
                    if let Err(e) = res {
                        tracing::debug!("control connection ended: {e:#}");
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

async fn connection(stream: UnixStream, state: &Arc<SimState>) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await.context("reading control request")? {
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                apply(state, req);
                Response {
                    ok: true,
                    stats: Some(state.stats()),
                    error: None,
                }
            }
            Err(e) => Response {
                ok: false,
                stats: None,
                error: Some(format!("bad request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&response).context("encoding control response")?;
        out.push(b'\n');
        wr.write_all(&out)
            .await
            .context("writing control response")?;
    }
    Ok(())
}

/// Applies one request to the state.
fn apply(state: &Arc<SimState>, req: Request) {
    match req {
        Request::SetRole { role } => state.set_role(role),
        Request::Stage { steps } => state.start_stage(
            steps
                .into_iter()
                .map(|s| (s.role, Duration::from_millis(s.ms)))
                .collect(),
        ),
        Request::SetMode { mode } => state.set_mode(mode),
        Request::SetAuth { auth } => state.set_auth(auth),
        Request::Stats => {}
    }
}

/// Client of a simulator's control socket. Each call opens a connection, sends one request and
/// waits (at most 5 s) for the answer. The plain methods block; the `_async` ones use tokio.
#[derive(Debug, Clone)]
pub struct SimControl {
    /// Path of the control socket.
    pub path: PathBuf,
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

impl SimControl {
    /// A client for the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SimControl { path: path.into() }
    }

    /// Sends one request and returns the state after it (blocking).
    pub fn request(&self, req: &Request) -> Result<Stats> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.path)
            .with_context(|| format!("connecting to control socket {}", self.path.display()))?;
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .context("setting control read timeout")?;
        stream
            .set_write_timeout(Some(CLIENT_TIMEOUT))
            .context("setting control write timeout")?;
        let mut line = serde_json::to_vec(req).context("encoding control request")?;
        line.push(b'\n');
        stream.write_all(&line).context("sending control request")?;
        let mut answer = String::new();
        StdBufReader::new(&stream)
            .read_line(&mut answer)
            .context("reading control response")?;
        decode(&answer)
    }

    /// Sends one request and returns the state after it (async).
    pub async fn request_async(&self, req: &Request) -> Result<Stats> {
        let exchange = async {
            let stream = UnixStream::connect(&self.path)
                .await
                .with_context(|| format!("connecting to control socket {}", self.path.display()))?;
            let (rd, mut wr) = stream.into_split();
            let mut line = serde_json::to_vec(req).context("encoding control request")?;
            line.push(b'\n');
            wr.write_all(&line)
                .await
                .context("sending control request")?;
            let mut answer = String::new();
            BufReader::new(rd)
                .read_line(&mut answer)
                .await
                .context("reading control response")?;
            decode(&answer)
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .context("control request timed out")?
    }

    /// Sets the role (cancels a running stage).
    pub fn set_role(&self, role: Role) -> Result<Stats> {
        self.request(&Request::SetRole { role })
    }

    /// Starts a staged transition: `steps` are (role, how long it lasts); the first applies at once.
    pub fn stage(&self, steps: &[(Role, Duration)]) -> Result<Stats> {
        self.request(&stage_request(steps))
    }

    /// Sets the HTTP fault mode.
    pub fn set_mode(&self, mode: Mode) -> Result<Stats> {
        self.request(&Request::SetMode { mode })
    }

    /// Sets (`Some`) or clears (`None`) the required credentials.
    pub fn set_auth(&self, auth: Option<Auth>) -> Result<Stats> {
        self.request(&Request::SetAuth { auth })
    }

    /// Current state and counters.
    pub fn stats(&self) -> Result<Stats> {
        self.request(&Request::Stats)
    }

    /// Async [`SimControl::set_role`].
    pub async fn set_role_async(&self, role: Role) -> Result<Stats> {
        self.request_async(&Request::SetRole { role }).await
    }

    /// Async [`SimControl::stage`].
    pub async fn stage_async(&self, steps: &[(Role, Duration)]) -> Result<Stats> {
        self.request_async(&stage_request(steps)).await
    }

    /// Async [`SimControl::set_mode`].
    pub async fn set_mode_async(&self, mode: Mode) -> Result<Stats> {
        self.request_async(&Request::SetMode { mode }).await
    }

    /// Async [`SimControl::set_auth`].
    pub async fn set_auth_async(&self, auth: Option<Auth>) -> Result<Stats> {
        self.request_async(&Request::SetAuth { auth }).await
    }

    /// Async [`SimControl::stats`].
    pub async fn stats_async(&self) -> Result<Stats> {
        self.request_async(&Request::Stats).await
    }
}

fn stage_request(steps: &[(Role, Duration)]) -> Request {
    Request::Stage {
        steps: steps
            .iter()
            .map(|(role, d)| Step {
                role: *role,
                ms: u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            })
            .collect(),
    }
}

fn decode(answer: &str) -> Result<Stats> {
    if answer.is_empty() {
        bail!("control socket closed without answering");
    }
    let resp: Response = serde_json::from_str(answer.trim_end())
        .with_context(|| format!("decoding control response {answer:?}"))?;
    match (resp.ok, resp.stats, resp.error) {
        (true, Some(stats), _) => Ok(stats),
        (_, _, Some(error)) => bail!("simulator refused the command: {error}"),
        _ => bail!("malformed control response {answer:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let json = serde_json::to_string(&stage_request(&[
            (Role::Unknown, Duration::from_millis(3000)),
            (Role::Slave, Duration::ZERO),
        ]))
        .unwrap();
        assert_eq!(
            json,
            r#"{"cmd":"stage","steps":[{"role":"unknown","ms":3000},{"role":"slave","ms":0}]}"#
        );
        let req: Request =
            serde_json::from_str(r#"{"cmd":"set_mode","mode":"status500"}"#).unwrap();
        assert_eq!(
            req,
            Request::SetMode {
                mode: Mode::Status500
            }
        );
    }
}
