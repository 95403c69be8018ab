//! The client side of the failover benchmark: Bolt writes through the balancer and what came of them.
//!
//! - [`new_write`]: one fresh connection, one `RETURN 1` write (the driver-less client of the
//!   scenario's "new connection every 10 ms");
//! - [`Load`]: that stream of new writes plus a few pooled connections writing at their own pace,
//!   all on threads of the namespace that started them, stopped by a flag or a hard deadline.
//!
//! A write refused by a server (`Neo.ClientError.Cluster.NotALeader`) does not say which server
//! refused it; the client then resets the session and runs a read on the same connection, whose
//! record names the server. The only network traffic is to the balancer's address.

use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sim::bolt_client::{Access, BoltClient, BoltFailure, Negotiation};

/// What one write attempt came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The write succeeded on `server`.
    Answered { server: String },
    /// A server refused the write as not the leader (`server`: which one, if the follow-up read
    /// could tell).
    NotALeader { server: Option<String> },
    /// The connection attempt was refused (RST to the SYN).
    Refused,
    /// The connection was reset (after it was established).
    Reset,
    /// The peer closed the connection before answering (a proxy with no server to offer).
    Closed,
    /// No answer within the client's timeouts.
    Timeout,
    /// Anything else.
    Failed { error: String },
}

impl Outcome {
    /// The server this write reached (answered or refused as not the leader), if known.
    pub fn reached(&self) -> Option<&str> {
        match self {
            Outcome::Answered { server } => Some(server),
            Outcome::NotALeader { server } => server.as_deref(),
            _ => None,
        }
    }

    /// Whether the attempt failed at the transport or proxy level (no server answered it).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Outcome::Answered { .. } | Outcome::NotALeader { .. })
    }

    /// A short label (`db01`, `NotALeader db01`, `refused`, ...).
    pub fn label(&self) -> String {
        match self {
            Outcome::Answered { server } => server.clone(),
            Outcome::NotALeader { server } => {
                format!("NotALeader {}", server.as_deref().unwrap_or("?"))
            }
            Outcome::Refused => "refused".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Closed => "closed".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Failed { .. } => "failed".into(),
        }
    }
}

/// Classifies a client error by the first I/O error in its chain.
pub fn classify(e: &anyhow::Error) -> Outcome {
    for cause in e.chain() {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionRefused => Outcome::Refused,
                ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe => Outcome::Reset,
                ErrorKind::UnexpectedEof => Outcome::Closed,
                ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::Timeout,
                _ => Outcome::Failed {
                    error: format!("{e:#}"),
                },
            };
        }
    }
    Outcome::Failed {
        error: format!("{e:#}"),
    }
}

fn is_not_a_leader(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<BoltFailure>()
            .is_some_and(|f| f.code == "Neo.ClientError.Cluster.NotALeader")
    })
}

/// One write on an open session and whether the session survived it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub outcome: Outcome,
    /// Why the session is unusable now (`None`: still usable). Differs from `outcome` when a
    /// server refused the write and the connection then failed during the follow-up read (a
    /// balancer resetting the demoted master's flows does exactly that).
    pub lost: Option<Outcome>,
}

/// One `RETURN 1` write on an open session.
pub fn write_on(client: &mut BoltClient) -> Written {
    match client.run("RETURN 1", Access::Write) {
        Ok(record) => Written {
            outcome: Outcome::Answered {
                server: record.server,
            },
            lost: None,
        },
        Err(e) if is_not_a_leader(&e) => {
            match client
                .reset()
                .and_then(|()| client.run("RETURN 1", Access::Read))
            {
                Ok(r) => Written {
                    outcome: Outcome::NotALeader {
                        server: Some(r.server),
                    },
                    lost: None,
                },
                Err(e) => Written {
                    outcome: Outcome::NotALeader { server: None },
                    lost: Some(classify(&e)),
                },
            }
        }
        Err(e) => {
            let outcome = classify(&e);
            Written {
                lost: Some(outcome.clone()),
                outcome,
            }
        }
    }
}

/// A fresh connection to `addr`, one write, GOODBYE.
pub fn new_write(addr: SocketAddrV4) -> Outcome {
    match BoltClient::connect(SocketAddr::V4(addr), Negotiation::Classic, None) {
        Ok(mut client) => {
            let w = write_on(&mut client);
            if w.lost.is_none() {
                let _ = client.goodbye();
            }
            w.outcome
        }
        Err(e) => classify(&e),
    }
}

/// One attempt as recorded by a client thread (times are made relative to T0 later).
#[derive(Debug, Clone)]
pub struct RawAttempt {
    /// When the client started it (before `connect` for a new connection, before the write on a
    /// pooled one).
    pub sent: Instant,
    /// How long it took.
    pub took: Duration,
    pub outcome: Outcome,
}

/// One write of a pooled connection.
#[derive(Debug, Clone)]
pub struct RawPooled {
    /// Which pooled connection (0-based).
    pub conn: usize,
    /// Whether this write went over a connection opened for it (after the previous one failed).
    pub reconnect: bool,
    pub attempt: RawAttempt,
    /// Why the connection was dropped after this write, if it was.
    pub lost: Option<Outcome>,
}

/// Knobs of the client load.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    /// The balancer's write address.
    pub addr: SocketAddrV4,
    /// A new connection every ...
    pub new_every: Duration,
    /// Each pooled connection writes every ...
    pub pooled_every: Duration,
    /// Nothing is started after this instant, whatever happens to the stop flag.
    pub deadline: Instant,
}

enum Event {
    New(RawAttempt),
    Pooled(RawPooled),
    PooledDone,
}

/// The running client load: the new-connection stream and the pooled connections.
pub struct Load {
    stop: Arc<AtomicBool>,
    issued: Arc<AtomicU64>,
    pooled: usize,
    rx: mpsc::Receiver<Event>,
    threads: Vec<JoinHandle<()>>,
}

/// What the load recorded.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    pub new: Vec<RawAttempt>,
    pub pooled: Vec<RawPooled>,
    /// New connections still in flight when collection gave up.
    pub new_pending: u64,
    /// Pooled connections whose thread had not finished when collection gave up.
    pub pooled_pending: usize,
}

impl Load {
    /// Starts the load on threads of the calling thread's network namespace (call it inside
    /// [`Ns::run_in`](crate::harness::Ns::run_in)); `pooled` are already open connections.
    pub fn start(spec: LoadSpec, pooled: Vec<BoltClient>) -> std::io::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let mut load = Load {
            stop: stop.clone(),
            issued: issued.clone(),
            pooled: pooled.len(),
            rx,
            threads: Vec::new(),
        };
        for (conn, client) in pooled.into_iter().enumerate() {
            let (tx, stop) = (tx.clone(), stop.clone());
            load.threads.push(
                thread::Builder::new()
                    .name(format!("pooled-{conn}"))
                    .spawn(move || pooled_loop(conn, client, spec, &stop, &tx))?,
            );
        }
        load.threads.push(
            thread::Builder::new()
                .name("new-writes".into())
                .spawn(move || new_write_loop(spec, &stop, &issued, &tx))?,
        );
        Ok(load)
    }

    /// Stops starting new attempts and collects everything recorded, waiting at most `grace` for
    /// attempts still in flight (their threads are left to finish on their own: every socket has
    /// the Bolt client's timeouts).
    pub fn finish(mut self, grace: Duration) -> Recorded {
        self.stop.store(true, Ordering::SeqCst);
        let end = Instant::now() + grace;
        let mut rec = Recorded::default();
        let mut pooled_done = 0;
        loop {
            let new_done = rec.new.len() as u64 >= self.issued.load(Ordering::SeqCst);
            if new_done && pooled_done == self.pooled && self.all_threads_done() {
                break;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(Event::New(a)) => rec.new.push(a),
                Ok(Event::Pooled(p)) => rec.pooled.push(p),
                Ok(Event::PooledDone) => pooled_done += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(e) = self.rx.try_recv() {
            match e {
                Event::New(a) => rec.new.push(a),
                Event::Pooled(p) => rec.pooled.push(p),
                Event::PooledDone => pooled_done += 1,
            }
        }
        rec.new_pending = self
            .issued
            .load(Ordering::SeqCst)
            .saturating_sub(rec.new.len() as u64);
        rec.pooled_pending = self.pooled.saturating_sub(pooled_done);
        for t in std::mem::take(&mut self.threads) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        rec
    }

    fn all_threads_done(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn running(stop: &AtomicBool, spec: &LoadSpec) -> bool {
    !stop.load(Ordering::SeqCst) && Instant::now() < spec.deadline
}

/// Sleeps until `next` (or not at all if late); returns the following tick, skipping ticks that
/// were missed entirely instead of bursting to catch up.
fn pace(next: Instant, every: Duration) -> Instant {
    let now = Instant::now();
    if next > now {
        thread::sleep(next - now);
        next + every
    } else if now - next > every {
        now + every
    } else {
        next + every
    }
}

fn new_write_loop(spec: LoadSpec, stop: &AtomicBool, issued: &AtomicU64, tx: &mpsc::Sender<Event>) {
    let mut next = Instant::now();
    while running(stop, &spec) {
        let thread_tx = tx.clone();
        let addr = spec.addr;
        let sent = Instant::now();
        issued.fetch_add(1, Ordering::SeqCst);
        let spawned = thread::Builder::new()
            .name("new-write".into())
            .spawn(move || {
                let outcome = new_write(addr);
                let _ = thread_tx.send(Event::New(RawAttempt {
                    sent,
                    took: sent.elapsed(),
                    outcome,
                }));
            });
        if let Err(e) = spawned {
            let _ = tx.send(Event::New(RawAttempt {
                sent,
                took: sent.elapsed(),
                outcome: Outcome::Failed {
                    error: format!("client could not start a thread: {e}"),
                },
            }));
        }
        next = pace(next, spec.new_every);
    }
}

fn pooled_loop(
    conn: usize,
    client: BoltClient,
    spec: LoadSpec,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Event>,
) {
    // A TCP connection through a balancer is pinned to one server: the server that answered on it
    // before is the one that refused a write whose follow-up read did not get through.
    let mut open: Option<(BoltClient, Option<String>)> = Some((client, None));
    let mut next = Instant::now();
    while running(stop, &spec) {
        let sent = Instant::now();
        let reconnect = open.is_none();
        let connected = match open.take() {
            Some(c) => Ok(c),
            None => BoltClient::connect(SocketAddr::V4(spec.addr), Negotiation::Classic, None)
                .map(|c| (c, None)),
        };
        let mut w = match connected {
            Ok((mut client, server)) => {
                let mut w = write_on(&mut client);
                let server = w.outcome.reached().map(str::to_string).or(server);
                if let Outcome::NotALeader { server: s @ None } = &mut w.outcome {
                    s.clone_from(&server);
                }
                if w.lost.is_none() {
                    open = Some((client, server));
                }
                w
            }
            Err(e) => {
                let outcome = classify(&e);
                Written {
                    lost: Some(outcome.clone()),
                    outcome,
                }
            }
        };
        let _ = tx.send(Event::Pooled(RawPooled {
            conn,
            reconnect,
            lost: w.lost.take(),
            attempt: RawAttempt {
                sent,
                took: sent.elapsed(),
                outcome: w.outcome,
            },
        }));
        next = pace(next, spec.pooled_every);
    }
    if let Some((client, _)) = open {
        let _ = client.goodbye();
    }
    let _ = tx.send(Event::PooledDone);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_their_io_cause() {
        let io = |k: ErrorKind| {
            anyhow::Error::from(std::io::Error::from(k)).context("connecting to Bolt 1.2.3.4:7680")
        };
        assert_eq!(
            classify(&io(ErrorKind::ConnectionRefused)),
            Outcome::Refused
        );
        assert_eq!(classify(&io(ErrorKind::ConnectionReset)), Outcome::Reset);
        assert_eq!(classify(&io(ErrorKind::UnexpectedEof)), Outcome::Closed);
        assert_eq!(classify(&io(ErrorKind::WouldBlock)), Outcome::Timeout);
        assert!(matches!(
            classify(&anyhow::anyhow!("garbage")),
            Outcome::Failed { .. }
        ));
        let nal = anyhow::Error::from(BoltFailure {
            code: "Neo.ClientError.Cluster.NotALeader".into(),
            message: "read only".into(),
        });
        assert!(is_not_a_leader(&nal));
        assert!(!is_not_a_leader(&io(ErrorKind::ConnectionReset)));
    }

    #[test]
    fn pacing_skips_missed_ticks_instead_of_bursting() {
        let every = Duration::from_millis(10);
        let long_ago = Instant::now() - Duration::from_secs(1);
        let next = pace(long_ago, every);
        assert!(next > Instant::now());
    }
}
