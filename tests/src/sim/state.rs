//! The mutable state of one simulated server: role, fault mode, credentials and counters,
//! shared by the HTTP, Bolt and control tasks.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::SimConfig;

/// The HA role of the simulated member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes; `/ha/master` answers 200.
    Master,
    /// Read-only; `/ha/slave` answers 200.
    Slave,
    /// Role not settled (election, joining); every role check answers 404 `UNKNOWN`.
    Unknown,
}

impl Role {
    /// The lowercase name used on the wire and in Bolt records.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Slave => "slave",
            Role::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "master" => Ok(Role::Master),
            "slave" => Ok(Role::Slave),
            "unknown" => Ok(Role::Unknown),
            other => bail!("unknown role {other:?} (expected master, slave or unknown)"),
        }
    }
}

/// How the HTTP endpoint behaves (a fault injected by a test, or normal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Answer as Neo4j does.
    Normal,
    /// Accept and read requests but never answer them. Requests received while hanging stay
    /// unanswered even after the mode is cleared (until the client closes or the server stops).
    Hang,
    /// Answer 500 to every request.
    Status500,
    /// Write bytes that are not HTTP, then close.
    Garbage,
}

impl Mode {
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Hang => "hang",
            Mode::Status500 => "status500",
            Mode::Garbage => "garbage",
        }
    }
}

impl FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "normal" => Ok(Mode::Normal),
            "hang" => Ok(Mode::Hang),
            "status500" => Ok(Mode::Status500),
            "garbage" => Ok(Mode::Garbage),
            other => bail!("unknown mode {other:?} (expected normal, hang, status500 or garbage)"),
        }
    }
}

/// Credentials required by the server (HTTP Basic and Bolt `basic` scheme).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl FromStr for Auth {
    type Err = anyhow::Error;
    /// Parses `user:password` (the password may contain ':').
    fn from_str(s: &str) -> Result<Self> {
        let (user, password) = s
            .split_once(':')
            .context("credentials must be given as user:password")?;
        Ok(Auth {
            user: user.to_string(),
            password: password.to_string(),
        })
    }
}

/// A snapshot of the server's state and counters, as returned by the control `stats` command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Server name.
    pub name: String,
    /// Current role.
    pub role: Role,
    /// Current HTTP mode.
    pub mode: Mode,
    /// Whether credentials are required.
    pub auth: bool,
    /// HTTP requests received, per request path (query string removed).
    pub checks: BTreeMap<String, u64>,
    /// HTTP connections accepted.
    pub http_accepted: u64,
    /// Bolt connections accepted since start.
    pub bolt_accepted: u64,
    /// Bolt connections currently open.
    pub bolt_open: u64,
    /// Write queries accepted (Bolt RUN in write mode on a master).
    pub writes: u64,
}

#[derive(Debug)]
struct Inner {
    role: Role,
    mode: Mode,
    auth: Option<Auth>,
    checks: BTreeMap<String, u64>,
    writes: u64,
    /// Bumped by every role change from outside a stage; a running stage stops when it differs.
    stage_generation: u64,
}

/// State shared by every task of one simulated server.
#[derive(Debug)]
pub struct SimState {
    name: String,
    advertised: Option<String>,
    inner: Mutex<Inner>,
    http_accepted: AtomicU64,
    bolt_accepted: AtomicU64,
    bolt_open: AtomicU64,
    bookmarks: AtomicU64,
}

impl SimState {
    /// Initial state from a config.
    pub fn new(cfg: &SimConfig) -> Self {
        SimState {
            name: cfg.name.clone(),
            advertised: cfg.advertised.clone(),
            inner: Mutex::new(Inner {
                role: cfg.role,
                mode: Mode::Normal,
                auth: cfg.auth.clone(),
                checks: BTreeMap::new(),
                writes: 0,
                stage_generation: 0,
            }),
            http_accepted: AtomicU64::new(0),
            bolt_accepted: AtomicU64::new(0),
            bolt_open: AtomicU64::new(0),
            bookmarks: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the plain data inconsistent; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Server name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address to advertise in ROUTE answers, if configured.
    pub fn advertised(&self) -> Option<&str> {
        self.advertised.as_deref()
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// Sets the role and cancels any staged transition in progress.
    pub fn set_role(&self, role: Role) {
        let mut inner = self.lock();
        inner.stage_generation += 1;
        inner.role = role;
        tracing::info!(server = %self.name, %role, "role set");
    }

    /// Current HTTP mode.
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// Sets the HTTP mode.
    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
        tracing::info!(server = %self.name, mode = mode.as_str(), "mode set");
    }

    /// Current credentials, if required.
    pub fn auth(&self) -> Option<Auth> {
        self.lock().auth.clone()
    }

    /// Sets or clears the required credentials.
    pub fn set_auth(&self, auth: Option<Auth>) {
        self.lock().auth = auth;
    }

    /// Counts one HTTP request for `path`.
    pub fn count_check(&self, path: &str) {
        *self.lock().checks.entry(path.to_string()).or_insert(0) += 1;
    }

    /// Counts one accepted HTTP connection.
    pub fn count_http_accept(&self) {
        self.http_accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an accepted Bolt connection; the returned guard counts it closed when dropped.
    pub fn bolt_connection(&self) -> BoltConnGuard<'_> {
        let id = self.bolt_accepted.fetch_add(1, Ordering::Relaxed) + 1;
        self.bolt_open.fetch_add(1, Ordering::Relaxed);
        BoltConnGuard { state: self, id }
    }

    /// Accepts a write if the role is master: returns the new write count, or the role that refused it.
    pub fn try_write(&self) -> std::result::Result<u64, Role> {
        let mut inner = self.lock();
        if inner.role == Role::Master {
            inner.writes += 1;
            Ok(inner.writes)
        } else {
            Err(inner.role)
        }
    }

    /// Role and write count read together (for a read query's record).
    pub fn role_and_writes(&self) -> (Role, u64) {
        let inner = self.lock();
        (inner.role, inner.writes)
    }

    /// A fresh bookmark string.
    pub fn next_bookmark(&self) -> String {
        let n = self.bookmarks.fetch_add(1, Ordering::Relaxed) + 1;
        format!("FB:sim-{}:{n}", self.name)
    }

    /// Snapshot of the state and counters.
    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            name: self.name.clone(),
            role: inner.role,
            mode: inner.mode,
            auth: inner.auth.is_some(),
            checks: inner.checks.clone(),
            http_accepted: self.http_accepted.load(Ordering::Relaxed),
            bolt_accepted: self.bolt_accepted.load(Ordering::Relaxed),
            bolt_open: self.bolt_open.load(Ordering::Relaxed),
            writes: inner.writes,
        }
    }

    /// Starts a staged transition: the first step's role is set before this returns, then a background
    /// task waits each step's duration and sets the next role. A later `set_role` or stage cancels it.
    pub fn start_stage(self: &Arc<Self>, steps: Vec<(Role, Duration)>) {
        let generation = {
            let mut inner = self.lock();
            inner.stage_generation += 1;
            if let Some((role, _)) = steps.first() {
                inner.role = *role;
            }
            inner.stage_generation
        };
        tracing::info!(server = %self.name, ?steps, "stage started");
        let state = self.clone();
        tokio::spawn(async move {
            let mut steps = steps.into_iter();
            let Some((_, mut wait)) = steps.next() else {
                return;
            };
            for (role, next_wait) in steps {
                tokio::time::sleep(wait).await;
                let mut inner = state.lock();
                if inner.stage_generation != generation {
                    return;
                }
                inner.role = role;
                drop(inner);
                tracing::info!(server = %state.name, %role, "stage step");
                wait = next_wait;
            }
        });
    }
}

/// Keeps a Bolt connection counted as open while alive.
pub struct BoltConnGuard<'a> {
    state: &'a SimState,
    /// 1-based connection number, used for `connection_id`.
    pub id: u64,
}

impl Drop for BoltConnGuard<'_> {
    fn drop(&mut self) {
        self.state.bolt_open.fetch_sub(1, Ordering::Relaxed);
    }
}
