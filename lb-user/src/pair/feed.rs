//! What this node tells its peer, gathered on the GC's thread, which already drains the data
//! path's rings and walks the tables: each flow the data path established (`FLOW_SYNC`), each
//! flow that ended (the data path's `CONN_EVENTS` and the GC's own expiries), and at every pass
//! the flows that carried a segment since the pass before (their state: sequence numbers,
//! close bits, last activity). The messages go to the sender's thread ([`super::stream`]) over
//! a bounded channel; a full channel drops the message and counts it (the next pass's refresh,
//! or the snapshot of the next connection, makes up for it).
use std::{
    collections::VecDeque,
    sync::mpsc::{SyncSender, TrySendError},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashSet};
use lb_common::{Flow, FlowKey, FlowSync};
use tracing::warn;

use super::{export, SyncedFlow};

/// One message for the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// A flow the data path established: installed unless the peer has it.
    New(SyncedFlow),
    /// A flow's current state: installed whether or not the peer has it.
    Update(SyncedFlow),
    /// The flow with this forward key ended.
    End(FlowKey),
}

/// How long an ended flow's key is remembered: a `FLOW_SYNC` record drained after the flow's
/// end (the two rings are drained one after the other) is not sent.
const RECENT_ENDS: Duration = Duration::from_secs(2);

/// A flow this old when it ends may have reached the peer in a snapshot (its stream
/// reconnected meanwhile) even if this feed never sent it: its end is sent.
pub const SNAPSHOT_AGE: Duration = Duration::from_secs(1);

/// The messages of one drain.
pub type Batch = Vec<Outgoing>;

/// Batches queued for the sender at most (a drain every 10 ms: about 40 s).
pub const QUEUE: usize = 4096;

/// The GC thread's side of the sync.
pub struct Feed {
    tx: SyncSender<Batch>,
    /// What this drain found, sent as one batch by [`Feed::flush`] (one wakeup of the
    /// sender's thread a drain, not one a flow).
    pending: Vec<Outgoing>,
    /// The instance's interfaces, in order.
    ifindexes: Vec<u32>,
    /// Keys of the flows that ended in the last [`RECENT_ENDS`], and the same in the order
    /// they ended (pruned from the front: O(1) a flow, whatever the rate).
    recent_ends: HashMap<FlowKey, Instant>,
    ended_order: VecDeque<(Instant, FlowKey)>,
    /// When the last pass began (data path clock): flows seen since are refreshed.
    last_pass_ns: u64,
    /// Flows this feed sent (new or refreshed) and that have not ended.
    sent: HashSet<FlowKey>,
    /// The time of the current drain ([`Feed::tick`]): one clock read per drain, not per end.
    now: Instant,
    /// Ends not sent: the peer never had the flow.
    pub ends_not_needed: u64,
    /// Messages lost to a full queue.
    pub dropped: u64,
}

impl Feed {
    pub fn new(tx: SyncSender<Batch>, ifindexes: Vec<u32>) -> Self {
        Self {
            tx,
            pending: Vec::new(),
            ifindexes,
            recent_ends: HashMap::default(),
            ended_order: VecDeque::new(),
            sent: Default::default(),
            now: Instant::now(),
            ends_not_needed: 0,
            last_pass_ns: 0,
            dropped: 0,
        }
    }

    fn send(&mut self, m: Outgoing) {
        self.pending.push(m);
    }

    /// Hands what this drain found to the sender's thread.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.tx.try_send(std::mem::take(&mut self.pending)) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) => self.dropped += b.len() as u64,
            // The sender's thread is gone (the agent stops).
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Reads the clock for the ends of the drain that follows.
    pub fn tick(&mut self) {
        self.now = Instant::now();
    }

    /// The flow with forward key `key`, begun `age_ns` ago, ended. The peer is told only if
    /// it may have the flow: this feed sent it, or it is older than [`SNAPSHOT_AGE`] (a
    /// snapshot may have carried it). Under churn most flows end before their report is read;
    /// they never reach the peer, and neither does their end.
    pub fn ended(&mut self, key: &FlowKey, age_ns: u64) {
        let sent = self.sent.remove(key);
        let now = self.now;
        while let Some(&(t, k)) = self.ended_order.front() {
            if now.duration_since(t) < RECENT_ENDS {
                break;
            }
            self.ended_order.pop_front();
            // A key that ended again since is still recent.
            if self.recent_ends.get(&k) == Some(&t) {
                self.recent_ends.remove(&k);
            }
        }
        self.recent_ends.insert(*key, now);
        self.ended_order.push_back((now, *key));
        if sent || age_ns >= SNAPSHOT_AGE.as_nanos() as u64 {
            self.send(Outgoing::End(*key));
        } else {
            self.ends_not_needed += 1;
        }
    }

    /// The data path established the flow `s` (`FLOW_SYNC`), read at `now_ns`.
    pub fn established(&mut self, s: &FlowSync, now_ns: u64) {
        if self.recent_ends.contains_key(&s.fwd_key) {
            return;
        }
        match export(s, now_ns, &self.ifindexes) {
            Ok(f) => {
                self.sent.insert(s.fwd_key);
                self.send(Outgoing::New(f));
            }
            Err(e) => warn!("flow not synced: {e:#}"),
        }
    }

    /// A pass began at `now_ns`; `live` flows (forward key, forward and reply entries) follow.
    pub fn pass(&mut self, now_ns: u64, live: impl Iterator<Item = (FlowKey, Flow, Flow)>) {
        let since = self.last_pass_ns;
        self.last_pass_ns = now_ns;
        for (fwd_key, fwd, rev) in live {
            if fwd.last_seen_ns.max(rev.last_seen_ns) <= since {
                continue;
            }
            if let Ok(f) = export(&FlowSync { fwd_key, fwd, rev }, now_ns, &self.ifindexes) {
                self.sent.insert(fwd_key);
                self.send(Outgoing::Update(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::{entries, wire, Iface, Local};

    fn flow(port: u16, last_seen_ns: u64) -> FlowSync {
        let f = SyncedFlow {
            client: std::net::SocketAddrV4::new([198, 18, 0, 2].into(), port),
            ..wire::tests::sample()
        };
        let l = Local {
            now_ns: last_seen_ns,
            service_id: 0,
            backend_id: 0,
            epoch: 0,
            client_iface: Iface {
                ifindex: 4,
                mac: [0; 6],
            },
            backend_iface: Iface {
                ifindex: 9,
                mac: [0; 6],
            },
        };
        let [(fwd_key, fwd), (_, rev)] = entries(
            &SyncedFlow {
                age_ns: 0,
                idle_ns: 0,
                ..f
            },
            &l,
        );
        FlowSync { fwd_key, fwd, rev }
    }

    #[test]
    fn a_flow_reported_after_its_end_is_not_sent_and_a_pass_refreshes_only_active_flows() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut feed = Feed::new(tx, vec![4, 9]);
        let (a, b) = (flow(1000, 100), flow(1001, 100));
        // `a` ends young before its report is read: neither its end nor its report is sent.
        feed.ended(&a.fwd_key, 1_000);
        feed.established(&a, 150);
        feed.established(&b, 150);
        feed.flush();
        let got: Vec<_> = rx.try_iter().flatten().collect();
        assert!(
            matches!(got[..], [Outgoing::New(f)] if f.client.port() == 1001),
            "{got:?}"
        );
        assert_eq!(feed.ends_not_needed, 1);
        // `b` was sent: its end is too; an old flow's end always is.
        feed.ended(&b.fwd_key, 1_000);
        feed.ended(&flow(999, 0).fwd_key, 2 * SNAPSHOT_AGE.as_nanos() as u64);
        feed.flush();
        let got: Vec<_> = rx.try_iter().flatten().collect();
        assert!(
            matches!(got[..], [Outgoing::End(x), Outgoing::End(_)] if x == b.fwd_key),
            "{got:?}"
        );

        // First pass: everything seen since 0 is refreshed; second: only what moved since.
        feed.pass(200, [(b.fwd_key, b.fwd, b.rev)].into_iter());
        feed.flush();
        assert!(matches!(
            rx.try_iter().flatten().collect::<Vec<_>>()[..],
            [Outgoing::Update(_)]
        ));
        let quiet = flow(1001, 150);
        let busy = flow(1002, 250);
        feed.pass(
            300,
            [
                (quiet.fwd_key, quiet.fwd, quiet.rev),
                (busy.fwd_key, busy.fwd, busy.rev),
            ]
            .into_iter(),
        );
        feed.flush();
        let got: Vec<_> = rx.try_iter().flatten().collect();
        assert!(
            matches!(got[..], [Outgoing::Update(f)] if f.client.port() == 1002),
            "{got:?}"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let mut feed = Feed::new(tx, vec![4, 9]);
        feed.established(&flow(1, 1), 2);
        feed.flush();
        feed.established(&flow(2, 1), 2);
        feed.established(&flow(3, 1), 2);
        feed.flush();
        assert_eq!(feed.dropped, 2, "the second batch, whole");
    }
}
