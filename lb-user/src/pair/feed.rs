//! What this node tells its peer, gathered on the GC's thread, which already drains the data
//! path's rings and walks the tables: each flow the data path established (`FLOW_SYNC`), each
//! flow that ended (the data path's `CONN_EVENTS` and the GC's own expiries), and at every pass
//! the flows that carried a segment since the pass before (their state: sequence numbers,
//! close bits, last activity). The messages go to the sender's thread ([`super::stream`]) over
//! a bounded channel; a full channel drops the message and counts it (the next pass's refresh,
//! or the snapshot of the next connection, makes up for it).
use std::{
    collections::{HashMap, VecDeque},
    sync::mpsc::{SyncSender, TrySendError},
    time::{Duration, Instant},
};

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

/// Messages queued for the sender at most.
pub const QUEUE: usize = 1 << 16;

/// The GC thread's side of the sync.
pub struct Feed {
    tx: SyncSender<Outgoing>,
    /// The instance's interfaces, in order.
    ifindexes: Vec<u32>,
    /// Keys of the flows that ended in the last [`RECENT_ENDS`], and the same in the order
    /// they ended (pruned from the front: O(1) a flow, whatever the rate).
    recent_ends: HashMap<FlowKey, Instant>,
    ended_order: VecDeque<(Instant, FlowKey)>,
    /// When the last pass began (data path clock): flows seen since are refreshed.
    last_pass_ns: u64,
    /// Messages lost to a full queue, and flows that could not be exported.
    pub dropped: u64,
    pub unexportable: u64,
}

impl Feed {
    pub fn new(tx: SyncSender<Outgoing>, ifindexes: Vec<u32>) -> Self {
        Self {
            tx,
            ifindexes,
            recent_ends: HashMap::new(),
            ended_order: VecDeque::new(),
            last_pass_ns: 0,
            dropped: 0,
            unexportable: 0,
        }
    }

    fn send(&mut self, m: Outgoing) {
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped += 1,
            // The sender's thread is gone (the agent stops).
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The flow with forward key `key` ended.
    pub fn ended(&mut self, key: &FlowKey) {
        let now = Instant::now();
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
        self.send(Outgoing::End(*key));
    }

    /// The data path established the flow `s` (`FLOW_SYNC`), read at `now_ns`.
    pub fn established(&mut self, s: &FlowSync, now_ns: u64) {
        if self.recent_ends.contains_key(&s.fwd_key) {
            return;
        }
        match export(s, now_ns, &self.ifindexes) {
            Ok(f) => self.send(Outgoing::New(f)),
            Err(e) => {
                self.unexportable += 1;
                warn!("flow not synced: {e:#}");
            }
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
        feed.ended(&a.fwd_key);
        feed.established(&a, 150);
        feed.established(&b, 150);
        let got: Vec<_> = rx.try_iter().collect();
        assert!(
            matches!(got[..], [Outgoing::End(k), Outgoing::New(f)] if k == a.fwd_key && f.client.port() == 1001)
        );

        // First pass: everything seen since 0 is refreshed; second: only what moved since.
        feed.pass(200, [(b.fwd_key, b.fwd, b.rev)].into_iter());
        assert!(matches!(
            rx.try_iter().collect::<Vec<_>>()[..],
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
        let got: Vec<_> = rx.try_iter().collect();
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
        feed.established(&flow(2, 1), 2);
        assert_eq!(feed.dropped, 1);
    }
}
