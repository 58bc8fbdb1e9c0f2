//! Appends that outlive openraft's per-call timeout.
//!
//! openraft 0.9 gives every AppendEntries call the heartbeat interval (50 ms) and drops it
//! after. A heartbeat fits in that easily; an entry carrying a big transaction (thousands
//! of tasks placed at once) may not, on a loaded 2-core machine, once it is sent, parsed
//! and fsynced by the follower — and a call dropped and sent again from the start never
//! gets through. So an append that carries entries runs in a task of its own, and
//! openraft's next call for the same leader and the same starting point joins it instead
//! of starting over. Its answer is fitted to the call that receives it: a follower that
//! took fewer entries than that call asked for answers a partial success, never more.
//!
//! openraft stamps an answer with the time of the call that received it, so a joined answer
//! looks fresher than it is to openraft's quorum-ack clock; in 0.9 that clock feeds only
//! metrics (nothing here reads leases from it).

use openraft::{
    error::{NetworkError, RPCError},
    raft::{AppendEntriesRequest, AppendEntriesResponse},
    LogId, Vote,
};
use tokio::task::JoinHandle;

use crate::types::{RaftId, TypeConfig};

type Answer =
    Result<AppendEntriesResponse<RaftId>, RPCError<RaftId, crate::RaftPeer, openraft::error::RaftError<RaftId>>>;

/// The append under way to one follower.
pub struct InFlight {
    vote: Vote<RaftId>,
    prev: Option<LogId<RaftId>>,
    /// The last entry it carries.
    last: Option<LogId<RaftId>>,
    task: JoinHandle<Answer>,
}

impl InFlight {
    /// Sends `rpc` with `send`, in a task of its own.
    pub fn start(
        rpc: &AppendEntriesRequest<TypeConfig>,
        send: impl std::future::Future<Output = Answer> + Send + 'static,
    ) -> Self {
        InFlight {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            last: rpc.entries.last().map(|e| e.log_id),
            task: tokio::spawn(send),
        }
    }

    /// Whether its answer can stand for `rpc`'s: the same leader term and starting point.
    /// The entries after that point are then the same ones, as far as both reach: a
    /// leader never rewrites its own log.
    pub fn answers(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        self.vote == rpc.vote && self.prev == rpc.prev_log_id
    }

    /// Waits for the answer, fitted to a call that asked up to `asked`. A caller dropped
    /// while waiting (openraft's timeout) leaves the append going, for the next call.
    pub async fn answer(&mut self, asked: Option<LogId<RaftId>>) -> Answer {
        let answer = (&mut self.task).await.map_err(|e| RPCError::Network(NetworkError::new(&e)))??;
        Ok(fit(answer, asked, self.last))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer for a call that asked the follower to hold entries up to `asked`, from an
/// append that sent entries up to `sent` (from the same starting point).
pub fn fit(
    answer: AppendEntriesResponse<RaftId>,
    asked: Option<LogId<RaftId>>,
    sent: Option<LogId<RaftId>>,
) -> AppendEntriesResponse<RaftId> {
    match answer {
        AppendEntriesResponse::Success if sent < asked => AppendEntriesResponse::PartialSuccess(sent),
        AppendEntriesResponse::PartialSuccess(matched) if matched >= asked => AppendEntriesResponse::Success,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;

    fn log(index: u64) -> Option<LogId<RaftId>> {
        Some(LogId::new(CommittedLeaderId::new(2, 1), index))
    }

    #[test]
    fn an_answer_never_claims_more_than_was_sent() {
        use AppendEntriesResponse::*;
        assert_eq!(fit(Success, log(10), log(10)), Success);
        assert_eq!(fit(Success, log(12), log(10)), PartialSuccess(log(10)), "asked for more than was sent");
        assert_eq!(fit(Success, log(8), log(10)), Success, "sent more than asked");
        assert_eq!(fit(PartialSuccess(log(9)), log(12), log(10)), PartialSuccess(log(9)));
        assert_eq!(fit(PartialSuccess(log(9)), log(8), log(10)), Success);
        assert_eq!(fit(Conflict, log(12), log(10)), Conflict);
        let higher = Vote::new(3, 2);
        assert_eq!(fit(HigherVote(higher), log(12), log(10)), HigherVote(higher));
    }

    fn rpc(term: u64, prev: u64, last: u64) -> AppendEntriesRequest<TypeConfig> {
        let entry = |i| openraft::Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), i),
            payload: openraft::EntryPayload::Blank,
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(term, 1), prev)),
            leader_commit: None,
            entries: (prev + 1..=last).map(entry).collect(),
        }
    }

    #[tokio::test]
    async fn a_later_call_from_the_same_point_joins_and_gets_a_fitted_answer() {
        let first = rpc(2, 4, 10);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let mut flight = InFlight::start(&first, async move {
            let _ = released.await;
            Ok(AppendEntriesResponse::Success)
        });
        // openraft gives up on the first call.
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), flight.answer(log(10))).await;
        assert!(gave_up.is_err(), "still under way");
        // Its next call carries more entries from the same point: it joins.
        let next = rpc(2, 4, 12);
        assert!(flight.answers(&next));
        assert!(!flight.answers(&rpc(3, 4, 12)), "another term");
        assert!(!flight.answers(&rpc(2, 6, 12)), "another starting point");
        release.send(()).unwrap();
        let answer = flight.answer(next.entries.last().map(|e| e.log_id)).await.unwrap();
        assert_eq!(answer, AppendEntriesResponse::PartialSuccess(first.entries.last().map(|e| e.log_id)));
    }
}
