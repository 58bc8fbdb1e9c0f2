//! Getting a new leader quickly, on top of openraft's own elections: a stopping leader hands
//! over (`hand_over`), and a survivor of a crashed leader that holds the longest log stands
//! at once (`stand_early`).
//!
//! Why the second: when the leader dies with writes under way, the two survivors' logs often
//! differ by an entry. If the one that is behind stands first, the other refuses it by log
//! but, in openraft 0.9, does not take its term; standing later at its own timeout it then
//! asks for that same term, which the first has already voted itself, and is refused too;
//! only its next timeout wins. That cost 2-2.6 s in one failover out of two under a writer,
//! against about 0.9 s otherwise.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use openraft::{
    raft::{VoteRequest, VoteResponse},
    ServerState,
};
use tracing::info;

use crate::{
    raft::{ClusterStore, ELECTION_MAX, ELECTION_MIN},
    RaftId,
};

impl ClusterStore {
    /// Notes that a leader's append reached this replica (it is alive).
    pub(crate) fn heard_from_leader(&self) {
        *self.last_append.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// Whether no leader's append has reached this replica for a leader lease.
    fn leader_silent(&self) -> bool {
        let last = *self.last_append.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|at| at.elapsed() > ELECTION_MAX)
    }

    /// Called with each vote this replica answered: if it refused a candidate whose log is
    /// shorter than its own while no leader is heard, it stands now (see the module doc).
    pub(crate) fn after_vote(self: &Arc<Self>, request: &VoteRequest<RaftId>, response: &VoteResponse<RaftId>) {
        let refused_shorter_log = !response.vote_granted && response.last_log_id > request.last_log_id;
        // Already voted for another at this term or later (a new leader may just have won).
        let vote = self.metrics().vote;
        let moved_on =
            vote.leader_id().term >= request.vote.leader_id().term && vote.leader_id().node_id != self.raft_id();
        if !refused_shorter_log
            || moved_on
            || !self.leader_silent()
            || self.handing_over.load(Ordering::SeqCst)
            || self.metrics().state == ServerState::Leader
        {
            return;
        }
        if self.standing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            store.stand_early().await;
            store.standing.store(false, Ordering::SeqCst);
        });
    }

    /// Stands for election now; once more if the first round only taught it a newer term.
    async fn stand_early(&self) {
        let start = self.metrics().current_term;
        for _ in 0..2 {
            info!("a candidate with a shorter log asked for a vote and no leader is heard: standing now");
            if self.raft().trigger().elect().await.is_err() {
                return;
            }
            let mut metrics = self.raft().metrics();
            let _ = tokio::time::timeout(ELECTION_MIN / 2, async {
                loop {
                    let now = metrics.borrow_and_update().clone();
                    if now.current_term > start && now.current_leader.is_some() {
                        return;
                    }
                    if metrics.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            let now = self.metrics();
            if now.current_term > start && now.current_leader.is_some() {
                return;
            }
        }
    }

    /// A leader that is about to stop hands over (a graceful `docker` daemon stop, SIGTERM):
    /// it stops proposing, waits until what it proposed is done and a voter has its whole
    /// log, asks that voter to stand for election now, and waits for it to win, so writes
    /// pause for an election round trip instead of the followers' election timeout. `false`
    /// if there was nothing to hand over or it did not happen within `limit` (then the others
    /// elect as after a crash).
    pub async fn hand_over(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if !self.is_leader() {
            return false;
        }
        self.handing_over.store(true, Ordering::SeqCst);
        let handed = self.hand_over_to_a_voter(deadline).await;
        self.handing_over.store(false, Ordering::SeqCst);
        handed
    }

    async fn hand_over_to_a_voter(&self, deadline: tokio::time::Instant) -> bool {
        // A proposal that got in before the flag would grow the log after the successor was
        // found caught up, and the successor would then lose the vote by log.
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let target = loop {
            let metrics = self.metrics();
            let membership = metrics.membership_config.membership().clone();
            let caught_up = |id: &RaftId| {
                metrics.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index)
                    >= metrics.last_log_index
            };
            let voters: Vec<RaftId> = membership.voter_ids().filter(|id| *id != self.raft_id()).collect();
            if voters.is_empty() {
                return false;
            }
            if let Some(peer) = voters.iter().find(|id| caught_up(id)).and_then(|id| membership.get_node(id)) {
                break peer.clone();
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if let Err(e) = self.network.elect(&target.addr).await {
            tracing::warn!(to = %target.node_id, error = %e, "handing over leadership failed");
            return false;
        }
        // Until the successor leads, as this replica hears from it: stopping as soon as this
        // one stepped down could drop the vote it just granted before it reached the successor.
        let mut metrics = self.raft().metrics();
        let term = metrics.borrow().current_term;
        let someone_else_leads = |m: &openraft::RaftMetrics<RaftId, crate::RaftPeer>| {
            m.current_term > term && m.current_leader.is_some_and(|l| l != self.raft_id())
        };
        let handed = tokio::time::timeout_at(deadline, async {
            while !someone_else_leads(&metrics.borrow()) {
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        let handed = handed.await.is_ok();
        info!(to = %target.node_id, handed, "leadership handed over");
        handed
    }
}
