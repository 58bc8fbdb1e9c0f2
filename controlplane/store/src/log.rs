//! The raft log and vote (openraft `RaftLogStorage`), durable in the node's database.

use std::{fmt::Debug, ops::RangeBounds, sync::Arc};

use openraft::{
    storage::{LogFlushed, LogState, RaftLogStorage},
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};

use crate::{
    db::{Db, DbError, COMMITTED, LAST_PURGED, VOTE},
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

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        self.db.entries(range).map_err(io(StorageIOError::read_logs))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<RaftId>> = self.db.record(LAST_PURGED).map_err(io(StorageIOError::read_logs))?;
        let last = self
            .db
            .last_entry::<Entry<TypeConfig>>()
            .map_err(io(StorageIOError::read_logs))?
            .map(|entry| entry.log_id)
            .or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftId>) -> Result<()> {
        self.db.put_record(VOTE, vote).map_err(io(StorageIOError::write_vote))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftId>>> {
        self.db.record(VOTE).map_err(io(StorageIOError::read_vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId<RaftId>>) -> Result<()> {
        self.db.put_record(COMMITTED, &committed).map_err(io(StorageIOError::write_logs))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<RaftId>>> {
        Ok(self.db.record::<Option<LogId<RaftId>>>(COMMITTED).map_err(io(StorageIOError::read_logs))?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The write is durable when `append` returns, so the flush is complete at once.
        let written = self.db.append(entries.into_iter().map(|entry| (entry.log_id.index, entry)));
        let result = written.map_err(io(StorageIOError::write_logs));
        callback.log_io_completed(result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
        result
    }

    async fn truncate(&mut self, log_id: LogId<RaftId>) -> Result<()> {
        self.db.delete_entries(log_id.index.., None::<(&str, &())>).map_err(io(StorageIOError::write_logs))
    }

    async fn purge(&mut self, log_id: LogId<RaftId>) -> Result<()> {
        self.db.delete_entries(..=log_id.index, Some((LAST_PURGED, &log_id))).map_err(io(StorageIOError::write_logs))
    }
}
