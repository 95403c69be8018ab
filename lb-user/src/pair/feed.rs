//! What this node tells its peer, gathered on the GC's thread, which already drains the data
//! path's rings and walks the tables: each flow the data path established (`FLOW_SYNC`), each
//! flow that ended (the data path's `CONN_EVENTS` and the GC's own expiries), and at every pass
//! the flows that carried a segment since the pass before (their state: sequence numbers,
//! close bits, last activity). The messages go to the sender's thread ([`super::stream`]) over
//! a bounded channel; a full channel drops the message and counts it (the next pass's refresh,
//! or the snapshot of the next connection, makes up for it).
//!
//! A drain reads the flows established first, then the ends: under churn most flows end in
//! the drain that found them, which takes them back before anything is sent (one hash insert
//! and one removal a flow). Ends go out before new flows, so a flow that ended is gone from
//! the peer before a new one takes its tuple or its port.
use std::sync::mpsc::{SyncSender, TrySendError};

use foldhash::{HashMap, HashSet};
use lb_common::{Flow, FlowKey, FlowSync};
use tracing::warn;

use super::{export_at, unix_now_ns, SyncedFlow};

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

/// A flow this old when it ends may have reached the peer in a snapshot (its stream
/// reconnected meanwhile) even if this feed never sent it: its end is sent.
pub const SNAPSHOT_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The messages of one drain.
pub type Batch = Vec<Outgoing>;

/// Batches queued for the sender at most (a drain every [`crate::gc::SYNC_EVERY`], 25 ms:
/// about 100 s).
pub const QUEUE: usize = 4096;

/// A flow to send at the drain's end, unless its end comes first.
#[derive(Clone, Copy)]
struct Queued {
    flow: FlowSync,
    /// `New` (else `Update`).
    new: bool,
    /// Taken back: it ended in the same drain.
    gone: bool,
}

/// The GC thread's side of the sync.
pub struct Feed {
    tx: SyncSender<Batch>,
    /// This drain's ends, sent first.
    ends: Vec<Outgoing>,
    /// This drain's (or this pass's) new and refreshed flows, and where each is among them.
    queued: Vec<Queued>,
    queued_at: HashMap<FlowKey, usize>,
    /// Ends of flows whose report was not read yet (established after the drain read the
    /// reports, ended before it read the ends): this drain's and the one before. Their
    /// reports, read in the next drain, are dropped.
    early: [HashSet<FlowKey>; 2],
    /// The instance's interfaces, in order.
    ifindexes: Vec<u32>,
    /// When the last pass began (data path clock): flows seen since are refreshed.
    last_pass_ns: u64,
    /// Flows this feed sent (new or refreshed) and that have not ended.
    sent: HashSet<FlowKey>,
    /// The clocks of the current drain ([`Feed::tick`]): the data path's (monotonic) and the
    /// wall clock, read once a drain.
    now_ns: u64,
    unix_ns: u64,
    /// Flows never sent: they ended before their drain's end, or before their report was read.
    pub ends_not_needed: u64,
    /// Messages lost to a full queue.
    pub dropped: u64,
}

impl Feed {
    pub fn new(tx: SyncSender<Batch>, ifindexes: Vec<u32>) -> Self {
        Self {
            tx,
            ends: Vec::new(),
            queued: Vec::new(),
            queued_at: HashMap::default(),
            early: Default::default(),
            ifindexes,
            sent: Default::default(),
            last_pass_ns: 0,
            now_ns: 0,
            unix_ns: 0,
            ends_not_needed: 0,
            dropped: 0,
        }
    }

    /// A drain begins at `now_ns` (the data path's clock).
    pub fn tick(&mut self, now_ns: u64) {
        self.now_ns = now_ns;
        self.unix_ns = unix_now_ns();
        let [this, before] = &mut self.early;
        std::mem::swap(this, before);
        this.clear();
    }

    /// Hands what this drain found to the sender's thread: the ends, then the flows that did
    /// not end.
    pub fn flush(&mut self) {
        let mut batch = std::mem::take(&mut self.ends);
        let mut keys = Vec::new();
        for q in self.queued.drain(..).filter(|q| !q.gone) {
            match export_at(&q.flow, self.now_ns, self.unix_ns, &self.ifindexes) {
                Ok(f) => {
                    keys.push(q.flow.fwd_key);
                    batch.push(if q.new {
                        Outgoing::New(f)
                    } else {
                        Outgoing::Update(f)
                    });
                }
                Err(e) => warn!("flow not synced: {e:#}"),
            }
        }
        self.queued_at.clear();
        if batch.is_empty() {
            return;
        }
        match self.tx.try_send(batch) {
            Ok(()) => self.sent.extend(keys),
            Err(TrySendError::Full(b)) => self.dropped += b.len() as u64,
            // The sender's thread is gone (the agent stops).
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The flow with forward key `key`, begun `age_ns` ago, ended. The peer is told only if
    /// it may have the flow: this feed sent it, or it is older than [`SNAPSHOT_AGE`] (a
    /// snapshot may have carried it). A flow found in this drain is taken back.
    pub fn ended(&mut self, key: &FlowKey, age_ns: u64) {
        if let Some(i) = self.queued_at.remove(key) {
            let q = &mut self.queued[i];
            q.gone = true;
            if q.new {
                self.ends_not_needed += 1;
                return;
            }
        }
        if self.sent.remove(key) || age_ns >= SNAPSHOT_AGE.as_nanos() as u64 {
            self.ends.push(Outgoing::End(*key));
        } else {
            // Its report comes in a later drain, if at all.
            self.early[0].insert(*key);
            self.ends_not_needed += 1;
        }
    }

    /// The data path established the flow `s` (`FLOW_SYNC`).
    pub fn established(&mut self, s: &FlowSync) {
        let ended_early = |set: &mut HashSet<FlowKey>| !set.is_empty() && set.remove(&s.fwd_key);
        let [this, before] = &mut self.early;
        if ended_early(this) || ended_early(before) {
            return;
        }
        self.queued_at.insert(s.fwd_key, self.queued.len());
        self.queued.push(Queued {
            flow: *s,
            new: true,
            gone: false,
        });
    }

    /// A pass began at `now_ns`; `live` flows (forward key, forward and reply entries) follow.
    pub fn pass(&mut self, now_ns: u64, live: impl Iterator<Item = (FlowKey, Flow, Flow)>) {
        let since = self.last_pass_ns;
        self.last_pass_ns = now_ns;
        self.now_ns = now_ns;
        self.unix_ns = unix_now_ns();
        for (fwd_key, fwd, rev) in live {
            if fwd.last_seen_ns.max(rev.last_seen_ns) <= since {
                continue;
            }
            self.queued_at.insert(fwd_key, self.queued.len());
            self.queued.push(Queued {
                flow: FlowSync { fwd_key, fwd, rev },
                new: false,
                gone: false,
            });
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

    fn drained(rx: &std::sync::mpsc::Receiver<Batch>) -> Vec<Outgoing> {
        rx.try_iter().flatten().collect()
    }

    #[test]
    fn a_flow_found_and_ended_in_one_drain_is_never_sent_nor_is_its_end() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut feed = Feed::new(tx, vec![4, 9]);
        let (a, b) = (flow(1000, 100), flow(1001, 100));
        feed.tick(150);
        feed.established(&a);
        feed.established(&b);
        feed.ended(&a.fwd_key, 1_000);
        feed.flush();
        let got = drained(&rx);
        assert!(
            matches!(got[..], [Outgoing::New(f)] if f.client.port() == 1001),
            "{got:?}"
        );
        assert_eq!(feed.ends_not_needed, 1);
    }

    #[test]
    fn a_flow_whose_end_is_read_before_its_report_is_not_sent() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut feed = Feed::new(tx, vec![4, 9]);
        let a = flow(1000, 100);
        // Established after this drain read the reports, ended before it read the ends.
        feed.tick(150);
        feed.ended(&a.fwd_key, 1_000);
        feed.flush();
        // Its report comes in the next drain.
        feed.tick(160);
        feed.established(&a);
        feed.flush();
        assert!(drained(&rx).is_empty());
        assert_eq!(feed.ends_not_needed, 1);
    }

    #[test]
    fn ends_go_before_new_flows_and_only_for_flows_the_peer_may_have() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut feed = Feed::new(tx, vec![4, 9]);
        let b = flow(1001, 100);
        feed.tick(150);
        feed.established(&b);
        feed.flush();
        assert!(matches!(drained(&rx)[..], [Outgoing::New(_)]));
        // `b` was sent: its end is; an old flow's end always is (a snapshot may have had it);
        // a young one never sent is not. The ends come before the drain's new flow.
        feed.tick(200);
        let c = flow(1002, 190);
        feed.established(&c);
        feed.ended(&b.fwd_key, 1_000);
        feed.ended(&flow(999, 0).fwd_key, 2 * SNAPSHOT_AGE.as_nanos() as u64);
        feed.ended(&flow(998, 0).fwd_key, 1_000);
        feed.flush();
        let got = drained(&rx);
        assert!(
            matches!(got[..], [Outgoing::End(x), Outgoing::End(_), Outgoing::New(f)]
                if x == b.fwd_key && f.client.port() == 1002),
            "{got:?}"
        );
    }

    #[test]
    fn a_pass_refreshes_only_flows_that_moved_and_an_expiry_in_it_sends_the_end_alone() {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        let mut feed = Feed::new(tx, vec![4, 9]);
        let b = flow(1001, 100);
        // First pass: everything seen since 0 is refreshed; second: only what moved since.
        feed.pass(200, [(b.fwd_key, b.fwd, b.rev)].into_iter());
        feed.flush();
        assert!(matches!(drained(&rx)[..], [Outgoing::Update(_)]));
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
        let got = drained(&rx);
        assert!(
            matches!(got[..], [Outgoing::Update(f)] if f.client.port() == 1002),
            "{got:?}"
        );
        // Refreshed and expired by the same pass: the peer had it, it gets the end only.
        let late = flow(1002, 350);
        feed.pass(400, [(late.fwd_key, late.fwd, late.rev)].into_iter());
        feed.ended(&late.fwd_key, 1_000);
        feed.flush();
        let got = drained(&rx);
        assert!(
            matches!(got[..], [Outgoing::End(k)] if k == late.fwd_key),
            "{got:?}"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let mut feed = Feed::new(tx, vec![4, 9]);
        feed.tick(2);
        feed.established(&flow(1, 1));
        feed.flush();
        feed.tick(3);
        feed.established(&flow(2, 1));
        feed.established(&flow(3, 1));
        feed.flush();
        assert_eq!(feed.dropped, 2, "the second batch, whole");
    }
}
