//! The embedded database under a manager's raft directory (redb): one table for the log,
//! one for records (vote, committed, purge point, the snapshot). Every value is sealed with
//! the node's data key (log entries and small records as JSON, the snapshot as its own
//! binary encoding); every write transaction is committed durably (fsync) before it returns,
//! so whatever raft acknowledges is on disk. Every call blocks: async callers run them on
//! the blocking pool (`blocking`), never on a runtime worker.

use std::{path::Path, sync::Arc};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use shoal_ca::DataKey;

/// Log entries by index. Big-endian integer keys keep index order.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Named records.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

pub const VOTE: &str = "vote";
pub const COMMITTED: &str = "committed";
pub const LAST_PURGED: &str = "last_purged";
/// The snapshot's raft metadata (JSON) and its data (`codec`), written together.
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Boxed: redb's error is large and this travels through every storage call.
    #[error("database: {0}")]
    Redb(Box<redb::Error>),
    #[error("encoding: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("sealing: {0}")]
    Seal(#[from] shoal_ca::CaError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::codec::CodecError),
    /// The blocking task running the work panicked or was cancelled.
    #[error("database worker: {0}")]
    Worker(String),
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for DbError {
            fn from(e: $ty) -> Self {
                DbError::Redb(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

pub struct Db {
    db: Database,
    key: DataKey,
}

impl Db {
    pub fn open(path: &Path, key: DataKey) -> Result<Self, DbError> {
        let db = Database::create(path)?;
        // Create both tables up front so readers never meet a missing table.
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(RECORDS)?;
        tx.commit()?;
        Ok(Db { db, key })
    }

    fn seal<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, DbError> {
        Ok(self.key.seal(&serde_json::to_vec(value)?)?)
    }

    fn unseal<T: DeserializeOwned>(&self, sealed: &[u8]) -> Result<T, DbError> {
        Ok(serde_json::from_slice(&self.key.open(sealed)?)?)
    }

    pub fn put_record<T: Serialize>(&self, name: &str, value: &T) -> Result<(), DbError> {
        let sealed = self.seal(value)?;
        let tx = self.db.begin_write()?;
        tx.open_table(RECORDS)?.insert(name, sealed.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn record<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, DbError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RECORDS)?;
        let Some(sealed) = table.get(name)? else {
            return Ok(None);
        };
        Ok(Some(self.unseal(sealed.value())?))
    }

    /// Stores a snapshot (its metadata and data) in one durable transaction, unless the one
    /// stored is not `older` than it: a snapshot built from an older state can finish after
    /// a newer one was installed (openraft builds in a task of its own), and must not
    /// replace it — the log before the newer one is already purged.
    pub fn put_snapshot<T: Serialize + DeserializeOwned>(
        &self,
        meta: &T,
        data: &[u8],
        older: impl Fn(&T) -> bool,
    ) -> Result<bool, DbError> {
        let sealed_meta = self.seal(meta)?;
        let data = self.key.seal(data)?;
        let tx = self.db.begin_write()?;
        {
            let mut records = tx.open_table(RECORDS)?;
            let stored = records.get(SNAPSHOT_META)?.map(|m| self.unseal::<T>(m.value())).transpose()?;
            if stored.is_some_and(|stored| !older(&stored)) {
                return Ok(false);
            }
            records.insert(SNAPSHOT_META, sealed_meta.as_slice())?;
            records.insert(SNAPSHOT_DATA, data.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// The stored snapshot's metadata and data, if there is one.
    pub fn snapshot<T: DeserializeOwned>(&self) -> Result<Option<(T, Vec<u8>)>, DbError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RECORDS)?;
        let (Some(meta), Some(data)) = (table.get(SNAPSHOT_META)?, table.get(SNAPSHOT_DATA)?) else {
            return Ok(None);
        };
        Ok(Some((self.unseal(meta.value())?, self.key.open(data.value())?)))
    }

    /// Writes entries `(index, value)` in one durable transaction.
    pub fn append<T: Serialize>(&self, entries: impl IntoIterator<Item = (u64, T)>) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(LOG)?;
            for (index, value) in entries {
                let sealed = self.seal(&value)?;
                table.insert(index, sealed.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Entries with index in `range`, in order.
    pub fn entries<T: DeserializeOwned>(&self, range: impl std::ops::RangeBounds<u64>) -> Result<Vec<T>, DbError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(LOG)?;
        let mut out = Vec::new();
        for item in table.range(range)? {
            let (_, sealed) = item?;
            out.push(self.unseal(sealed.value())?);
        }
        Ok(out)
    }

    pub fn last_entry<T: DeserializeOwned>(&self) -> Result<Option<T>, DbError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(LOG)?;
        let Some((_, sealed)) = table.last()? else {
            return Ok(None);
        };
        Ok(Some(self.unseal(sealed.value())?))
    }

    /// Deletes entries with index in `range` and, in the same transaction, writes `record`.
    pub fn delete_entries<T: Serialize>(
        &self,
        range: impl std::ops::RangeBounds<u64>,
        record: Option<(&str, &T)>,
    ) -> Result<(), DbError> {
        let sealed = record.map(|(name, value)| self.seal(value).map(|s| (name, s))).transpose()?;
        let tx = self.db.begin_write()?;
        {
            let mut log = tx.open_table(LOG)?;
            log.retain_in(range, |_, _| false)?;
            if let Some((name, sealed)) = &sealed {
                tx.open_table(RECORDS)?.insert(*name, sealed.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// Runs `work` on the database from the blocking pool: redb commits fsync, and a runtime
/// worker stuck in one would stall every task scheduled on it (raft's timers included).
pub async fn blocking<T: Send + 'static>(
    db: &Arc<Db>,
    work: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
) -> Result<T, DbError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || work(&db)).await.unwrap_or_else(|e| Err(DbError::Worker(e.to_string())))
}
