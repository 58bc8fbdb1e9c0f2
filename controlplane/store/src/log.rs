//! The raft log and vote (openraft `RaftLogStorage`), durable in the node's database. Every
//! database call runs on the blocking pool.

use std::{fmt::Debug, ops::RangeBounds, sync::Arc};

use openraft::{
    storage::{LogFlushed, LogState, RaftLogStorage},
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use crate::{
    db::{blocking, Db, DbError, COMMITTED, LAST_PURGED, VOTE},
    types::{RaftId, TypeConfig},
};

type Result<T> = std::result::Result<T, StorageError<RaftId>>;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        LogStore { db }
    }
}

fn io(kind: fn(AnyError) -> StorageIOError<RaftId>) -> impl Fn(DbError) -> StorageError<RaftId> {
    move |e| kind(AnyError::new(&e)).into()
}

/// The range as owned bounds, to move it to the blocking pool.
fn owned_range(range: &impl RangeBounds<u64>) -> (std::ops::Bound<u64>, std::ops::Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let range = owned_range(&range);
        blocking(&self.db, move |db| db.entries(range)).await.map_err(io(StorageIOError::read_logs))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let (last_purged, last) = blocking(&self.db, |db| {
            let last_purged: Option<LogId<RaftId>> = db.record(LAST_PURGED)?;
            let last = db.last_entry::<Entry<TypeConfig>>()?.map(|entry| entry.log_id);
            Ok((last_purged, last))
        })
        .await
        .map_err(io(StorageIOError::read_logs))?;
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last.or(last_purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftId>) -> Result<()> {
        let vote = *vote;
        blocking(&self.db, move |db| db.put_record(VOTE, &vote)).await.map_err(io(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftId>>> {
        blocking(&self.db, |db| db.record(VOTE)).await.map_err(io(StorageIOError::read_vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId<RaftId>>) -> Result<()> {
        blocking(&self.db, move |db| db.put_record(COMMITTED, &committed)).await.map_err(io(StorageIOError::write_logs))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<RaftId>>> {
        let committed = blocking(&self.db, |db| db.record::<Option<LogId<RaftId>>>(COMMITTED));
        Ok(committed.await.map_err(io(StorageIOError::read_logs))?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The write is durable when `append` returns, so the flush is complete at once.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let written =
            blocking(&self.db, move |db| db.append(entries.into_iter().map(|entry| (entry.log_id.index, entry)))).await;
        let result = written.map_err(io(StorageIOError::write_logs));
        callback.log_io_completed(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        result
    }

    async fn truncate(&mut self, log_id: LogId<RaftId>) -> Result<()> {
        blocking(&self.db, move |db| db.delete_entries(log_id.index.., None::<(&str, &())>))
            .await
            .map_err(io(StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId<RaftId>) -> Result<()> {
        blocking(&self.db, move |db| db.delete_entries(..=log_id.index, Some((LAST_PURGED, &log_id))))
            .await
            .map_err(io(StorageIOError::write_logs))
    }
}
