//! Running the checks: one tokio task per (service, backend) target, each with its own
//! [`Machine`], so that a hung backend only occupies its own task (bounded by `timeout`) and
//! never delays another backend's checks.
//!
//! Each task loops: probe; feed the machine; send an [`Update`] (after every check, not only on
//! transitions); sleep [`Machine::next_interval`] (or `fastinter` while a `Fast { on: true }`
//! is active for it), waking at once on [`Command::CheckNow`]. The interval is counted from the
//! end of the previous check, as HAProxy does. Tasks end when the `updates` receiver is dropped.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Instant};

use tokio::sync::mpsc;

use super::{
    machine::{Health, Machine, Transition},
    probe::{probe, Outcome, Probe},
    spec::CheckSpec,
};

/// One (service, backend) check to run.
#[derive(Debug, Clone)]
pub struct Target {
    /// Index of the service in the configuration.
    pub service: usize,
    /// Index of the backend in the configuration.
    pub backend: usize,
    /// The backend's address and check port.
    pub addr: SocketAddr,
    pub spec: Arc<CheckSpec>,
    /// Start UP at full health (the pair was in an installed set an earlier agent left).
    pub initially_up: bool,
}

/// The result of one check, sent after every check.
#[derive(Debug, Clone)]
pub struct Update {
    pub service: usize,
    pub backend: usize,
    pub probe: Probe,
    /// The transition this check caused, if any.
    pub transition: Option<Transition>,
    /// The machine after this check, as the decision reads it.
    pub health: Health,
    /// (consecutive positives, consecutive failures).
    pub progress: (u32, u32),
    /// Time of the last transition.
    pub since: Instant,
}

/// Requests to the scheduler from the map owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Check this target at once (after the check in progress, if any, completes).
    CheckNow { service: usize, backend: usize },
    /// While on, check this target at least every `fastinter` (e.g. while its service has no
    /// backend, until one rises).
    Fast {
        service: usize,
        backend: usize,
        on: bool,
    },
}

/// What a target's task gets from the dispatcher.
#[derive(Debug, Clone, Copy)]
enum Ctl {
    Now,
    Fast(bool),
}

/// Starts one task per target and a dispatcher for commands; returns the command sender.
/// Must be called within a tokio runtime.
pub fn spawn(targets: Vec<Target>, updates: mpsc::Sender<Update>) -> mpsc::Sender<Command> {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    let mut ctls: HashMap<(usize, usize), mpsc::UnboundedSender<Ctl>> = HashMap::new();
    for t in targets {
        let (tx, rx) = mpsc::unbounded_channel();
        if ctls.insert((t.service, t.backend), tx).is_some() {
            tracing::warn!(
                service = t.service,
                backend = t.backend,
                "health: target listed twice; commands reach the last one"
            );
        }
        tokio::spawn(run_target(t, updates.clone(), rx));
    }
    tokio::spawn(async move {
        while let Some(cmd) = cmd_rx.recv().await {
            let (key, ctl) = match cmd {
                Command::CheckNow { service, backend } => ((service, backend), Ctl::Now),
                Command::Fast {
                    service,
                    backend,
                    on,
                } => ((service, backend), Ctl::Fast(on)),
            };
            match ctls.get(&key) {
                Some(tx) => {
                    if tx.send(ctl).is_err() {
                        ctls.remove(&key);
                    }
                }
                None => tracing::warn!(
                    service = key.0,
                    backend = key.1,
                    ?cmd,
                    "health: command for an unknown target ignored"
                ),
            }
        }
    });
    cmd_tx
}

async fn run_target(
    t: Target,
    updates: mpsc::Sender<Update>,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
) {
    let spec = t.spec.clone();
    let mut machine = if t.initially_up {
        Machine::new_up(&spec)
    } else {
        Machine::new(&spec)
    };
    let mut fast = false;
    let mut ctl_open = true;
    loop {
        let p = tokio::select! {
            p = probe(t.addr, &spec) => p,
            _ = updates.closed() => return,
        };
        let now = Instant::now();
        let first = machine.last().is_none();
        let transition = machine.observe(&p.outcome, now);
        log(&t, &p.outcome, transition.as_ref(), first);
        let update = Update {
            service: t.service,
            backend: t.backend,
            probe: p,
            transition,
            health: machine.health(),
            progress: machine.progress(),
            since: machine.since(),
        };
        if updates.send(update).await.is_err() {
            return;
        }
        // Sleep until the next check is due, re-evaluating the deadline on Fast changes.
        let end = Instant::now();
        loop {
            let mut interval = machine.next_interval(&spec);
            if fast {
                interval = interval.min(spec.fastinter);
            }
            let deadline = tokio::time::Instant::from_std(end + interval);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                c = ctl.recv(), if ctl_open => match c {
                    Some(Ctl::Now) => break,
                    Some(Ctl::Fast(on)) => fast = on,
                    None => ctl_open = false,
                },
                _ = updates.closed() => return,
            }
        }
    }
}

/// Logs transitions once (and the first check's result, which sets the initial state).
/// Never logs credentials: the outcome and cause carry status, body and error text only.
fn log(t: &Target, outcome: &Outcome, transition: Option<&Transition>, first: bool) {
    let (service, backend, addr, check) = (t.service, t.backend, t.addr, t.spec.name.as_str());
    match transition {
        Some(tr) if tr.up => {
            tracing::info!(service, backend, %addr, check, cause = %tr.cause, "health: backend UP")
        }
        Some(tr) => {
            tracing::warn!(service, backend, %addr, check, cause = %tr.cause, "health: backend DOWN")
        }
        None if first => {
            tracing::info!(service, backend, %addr, check, %outcome, "health: first check, backend stays DOWN")
        }
        None => tracing::debug!(service, backend, %addr, check, %outcome, "health: check"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::preset;
    use std::time::Duration;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A server that answers every check with `answer`, or never answers if `None`.
    async fn server(answer: Option<&'static str>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    let _ = s.read(&mut b).await;
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
        addr
    }

    fn spec(inter_ms: u64, timeout_ms: u64) -> Arc<CheckSpec> {
        let mut s = preset("neo4j-ha-master").unwrap();
        s.inter = Duration::from_millis(inter_ms);
        s.fastinter = Duration::from_millis(inter_ms);
        s.downinter = Duration::from_millis(inter_ms);
        s.timeout = Duration::from_millis(timeout_ms);
        Arc::new(s)
    }

    const MASTER: &str = "HTTP/1.0 200 OK\r\n\r\ntrue";

    #[tokio::test]
    async fn a_hung_backend_does_not_delay_another() {
        let hung = server(None).await;
        let healthy = server(Some(MASTER)).await;
        let (tx, mut rx) = mpsc::channel(64);
        let _cmd = spawn(
            vec![
                Target {
                    service: 0,
                    backend: 0,
                    addr: hung,
                    spec: spec(100, 2000),
                    initially_up: false,
                },
                Target {
                    service: 0,
                    backend: 1,
                    addr: healthy,
                    spec: spec(100, 2000),
                    initially_up: false,
                },
            ],
            tx,
        );
        let t0 = Instant::now();
        let mut healthy_times = Vec::new();
        while t0.elapsed() < Duration::from_millis(1000) {
            let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
            else {
                panic!("no update")
            };
            assert_eq!(
                u.backend, 1,
                "the hung backend's check cannot have finished yet"
            );
            healthy_times.push(t0.elapsed());
            if healthy_times.len() == 1 {
                assert!(
                    u.health.up && u.health.latest_positive && u.transition.is_some(),
                    "{u:?}"
                );
            } else {
                assert!(u.health.up && u.transition.is_none(), "{u:?}");
            }
        }
        // Checks every ~100 ms (plus the check's own latency) for a second.
        assert!(healthy_times.len() >= 7, "{healthy_times:?}");
        // Then the hung one reports its timeout, at 2 s.
        let u = loop {
            let u = rx.recv().await.unwrap();
            if u.backend == 0 {
                break u;
            }
        };
        assert!(
            t0.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t0.elapsed()
        );
        assert!(!u.health.up && u.transition.is_none());
        assert_eq!(
            u.probe.outcome,
            Outcome::Failed("timeout after 2s (waiting for the answer)".into())
        );
        assert_eq!(u.progress, (0, 1));
    }

    #[tokio::test]
    async fn check_now_and_fast() {
        let addr = server(Some(MASTER)).await;
        let (tx, mut rx) = mpsc::channel(64);
        let cmd = spawn(
            vec![Target {
                service: 2,
                backend: 5,
                addr,
                spec: spec(10_000, 500),
                initially_up: false,
            }],
            tx,
        );
        let u = rx.recv().await.unwrap();
        assert_eq!((u.service, u.backend, u.health.up), (2, 5, true));
        assert_eq!(u.transition.map(|t| t.up), Some(true));
        // Nothing for 10 s, unless asked.
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
        let t0 = Instant::now();
        cmd.send(Command::CheckNow {
            service: 2,
            backend: 5,
        })
        .await
        .unwrap();
        let u = rx.recv().await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(u.progress, (2, 0));
        // Unknown targets are ignored.
        cmd.send(Command::CheckNow {
            service: 9,
            backend: 9,
        })
        .await
        .unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err());
        // Fast: checks at fastinter (here set to 50 ms) instead of inter.
        let mut s = (*spec(10_000, 500)).clone();
        s.fastinter = Duration::from_millis(50);
        let (tx, mut rx) = mpsc::channel(64);
        let cmd = spawn(
            vec![Target {
                service: 0,
                backend: 0,
                addr,
                spec: Arc::new(s),
                initially_up: false,
            }],
            tx,
        );
        rx.recv().await.unwrap();
        cmd.send(Command::Fast {
            service: 0,
            backend: 0,
            on: true,
        })
        .await
        .unwrap();
        let t0 = Instant::now();
        for _ in 0..4 {
            rx.recv().await.unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_millis(800),
            "{:?}",
            t0.elapsed()
        );
        cmd.send(Command::Fast {
            service: 0,
            backend: 0,
            on: false,
        })
        .await
        .unwrap();
        // At most one check already scheduled at fastinter, then silence.
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn tasks_end_when_updates_are_dropped() {
        let addr = server(Some(MASTER)).await;
        let (tx, mut rx) = mpsc::channel(1);
        let cmd = spawn(
            vec![Target {
                service: 0,
                backend: 0,
                addr,
                spec: spec(20, 500),
                initially_up: false,
            }],
            tx,
        );
        rx.recv().await.unwrap();
        drop(rx);
        // The task notices at once; the dispatcher's target channel closes, commands still go in.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(cmd
            .send(Command::CheckNow {
                service: 0,
                backend: 0
            })
            .await
            .is_ok());
    }
}
