//! A simulated Neo4j cluster member for the integration tests, the demo and the benchmarks.
//!
//! One [`SimServer`] plays one Neo4j 3.x HA instance:
//! - HTTP role checks on the management port ([`http`]), with runtime fault modes and optional Basic auth;
//! - a Bolt server good enough for the official drivers ([`bolt`], [`packstream`]); every query answers
//!   one record `{server, writes, role}` so a test sees which member served it;
//! - an out-of-band control socket ([`control`]) through which tests change the role, the fault mode or the
//!   credentials without going through the balancer.
//!
//! The simulator only listens; it never opens a connection anywhere.

pub mod bolt;
pub mod bolt_client;
pub mod control;
pub mod http;
pub mod packstream;
mod state;

pub use state::{Auth, Mode, Role, SimState, Stats};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Everything one simulated server needs to start.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Server name, reported in every Bolt record (e.g. `db01`).
    pub name: String,
    /// HTTP listen address; port 0 picks an ephemeral port.
    pub http: SocketAddr,
    /// Bolt listen address; port 0 picks an ephemeral port.
    pub bolt: SocketAddr,
    /// Role at start.
    pub role: Role,
    /// Credentials required on HTTP and Bolt, if any.
    pub auth: Option<Auth>,
    /// Path of the control Unix socket, if any (an existing stale socket file there is replaced).
    pub control: Option<PathBuf>,
    /// Address put in ROUTE answers; `None` means the local address the client connected to.
    pub advertised: Option<String>,
}

impl SimConfig {
    /// A config listening on ephemeral loopback ports, no auth, no control socket.
    pub fn loopback(name: &str, role: Role) -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        SimConfig {
            name: name.to_string(),
            http: any,
            bolt: any,
            role,
            auth: None,
            control: None,
            advertised: None,
        }
    }
}

/// A simulated server whose listeners are bound but not yet serving.
pub struct SimServer {
    state: Arc<SimState>,
    http: TcpListener,
    bolt: TcpListener,
    control: Option<(UnixListener, PathBuf)>,
    http_addr: SocketAddr,
    bolt_addr: SocketAddr,
}

impl SimServer {
    /// Binds the HTTP, Bolt and control listeners of `cfg`.
    pub async fn bind(cfg: SimConfig) -> Result<SimServer> {
        let http = TcpListener::bind(cfg.http)
            .await
            .with_context(|| format!("binding HTTP listener on {}", cfg.http))?;
        let bolt = TcpListener::bind(cfg.bolt)
            .await
            .with_context(|| format!("binding Bolt listener on {}", cfg.bolt))?;
        let http_addr = http.local_addr().context("HTTP local address")?;
        let bolt_addr = bolt.local_addr().context("Bolt local address")?;
        let control = match &cfg.control {
            Some(path) => Some((control::bind(path)?, path.clone())),
            None => None,
        };
        let state = Arc::new(SimState::new(&cfg));
        Ok(SimServer {
            state,
            http,
            bolt,
            control,
            http_addr,
            bolt_addr,
        })
    }

    /// The bound HTTP address (with the real port when port 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound Bolt address.
    pub fn bolt_addr(&self) -> SocketAddr {
        self.bolt_addr
    }

    /// The shared state (role, mode, counters), for in-process use.
    pub fn state(&self) -> Arc<SimState> {
        self.state.clone()
    }

    /// Serves until `shutdown` turns true, then closes every connection (hung ones included).
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut tasks = JoinSet::new();
        tasks.spawn(http::serve(self.http, self.state.clone(), shutdown.clone()));
        tasks.spawn(bolt::serve(self.bolt, self.state.clone(), shutdown.clone()));
        let control_path = self.control.as_ref().map(|(_, p)| p.clone());
        if let Some((listener, _)) = self.control {
            tasks.spawn(control::serve(
                listener,
                self.state.clone(),
                shutdown.clone(),
            ));
        }
        let result = loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                joined = tasks.join_next() => match joined {
                    Some(Ok(Ok(()))) => continue,
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(anyhow::anyhow!("server task panicked: {e}")),
                    None => break Ok(()),
                },
            }
        };
        tasks.shutdown().await;
        if let Some(path) = control_path {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// A server running in-process on a background task; dropping the handle stops it.
pub struct SimHandle {
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound Bolt address.
    pub bolt_addr: SocketAddr,
    /// Shared state, for direct inspection in tests.
    pub state: Arc<SimState>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl SimHandle {
    /// Stops the server and waits for it to finish.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(task) => task.await.context("joining simulator task")?,
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Binds `cfg` and serves it on a background tokio task (for tests and the demo).
pub async fn spawn_server(cfg: SimConfig) -> Result<SimHandle> {
    let server = SimServer::bind(cfg).await?;
    let (stop, rx) = watch::channel(false);
    let http_addr = server.http_addr();
    let bolt_addr = server.bolt_addr();
    let state = server.state();
    let task = tokio::spawn(server.serve(rx));
    Ok(SimHandle {
        http_addr,
        bolt_addr,
        state,
        stop,
        task: Some(task),
    })
}

/// Runs one simulated server until SIGTERM or SIGINT: binds, prints the ready line
/// `neo4j-sim <name> ready http=<addr> bolt=<addr>` on stdout, serves, then exits cleanly.
pub async fn run_server(cfg: SimConfig) -> Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};

    let name = cfg.name.clone();
    let server = SimServer::bind(cfg).await?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "neo4j-sim {name} ready http={} bolt={}",
            server.http_addr(),
            server.bolt_addr()
        )
        .context("writing ready line")?;
        out.flush().context("flushing ready line")?;
    }
    let (stop, rx) = watch::channel(false);
    let serving = tokio::spawn(server.serve(rx));
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("SIGINT, stopping"),
    }
    let _ = stop.send(true);
    serving.await.context("joining simulator")?
}
