//! The embedded database under a manager's raft directory (redb): one table for the log,
//! one for small records (vote, committed, purge point, snapshot). Every value is JSON sealed
//! with the node's data key; every write transaction is committed durably (fsync) before it
//! returns, so whatever raft acknowledges is on disk.

use std::path::Path;

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
pub const SNAPSHOT: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Boxed: redb's error is large and this travels through every storage call.
    #[error("database: {0}")]
    Redb(Box<redb::Error>),
    #[error("encoding: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("sealing: {0}")]
    Seal(#[from] shoal_ca::CaError),
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
