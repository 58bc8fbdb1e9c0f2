//! The embedded database under a manager's raft directory (redb): one table for the log,
//! one for records (vote, committed, purge point, which snapshot file is current), and the
//! snapshot files beside it (`snapshot_file`). Every value is sealed with the node's data
//! key (log entries and records as JSON, the snapshot as its own binary encoding in sealed
//! chunks); every write is durable (fsync) before it returns, so whatever raft
//! acknowledges is on disk. Every call blocks: async callers run them on
//! the blocking pool (`blocking`), never on a runtime worker.

use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use shoal_ca::DataKey;

use crate::snapshot_file::{ChunkReader, ChunkWriter};

/// Log entries by index. Big-endian integer keys keep index order.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Named records.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");

pub const VOTE: &str = "vote";
pub const COMMITTED: &str = "committed";
pub const LAST_PURGED: &str = "last_purged";
/// The snapshot's raft metadata and the name of the file holding its data.
const SNAPSHOT: &str = "snapshot";
/// Where the snapshot was kept before it had a file of its own (`migrate_legacy_snapshot`).
const LEGACY_SNAPSHOT_META: &str = "snapshot_meta";
const LEGACY_SNAPSHOT_DATA: &str = "snapshot_data";

#[derive(Serialize, serde::Deserialize)]
struct SnapshotRecord<T> {
    meta: T,
    file: String,
}

/// A name no earlier snapshot file of this process or an earlier one has.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

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
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
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
    /// Where snapshot files live: the database's directory.
    dir: PathBuf,
}

impl Db {
    pub fn open(path: &Path, key: DataKey) -> Result<Self, DbError> {
        let db = Database::create(path)?;
        // Create both tables up front so readers never meet a missing table.
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(RECORDS)?;
        tx.commit()?;
        let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let db = Db { db, key, dir };
        db.migrate_legacy_snapshot()?;
        db.remove_stray_snapshots()?;
        Ok(db)
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

    /// Stores a snapshot: `encode` streams its data into a new file (sealed chunks, fsynced
    /// and renamed into place), then one durable transaction points the snapshot record at
    /// it and the file it replaces goes. Nothing is written, and `false` returned, unless
    /// the stored snapshot is `older` than `meta`: a snapshot built from an older state can
    /// finish after a newer one was installed (openraft builds in a task of its own), and
    /// must not replace it — the log before the newer one is already purged.
    ///
    /// The database's single writer is held only for the record, never while encoding.
    pub fn put_snapshot<T: Serialize + DeserializeOwned>(
        &self,
        meta: &T,
        older: impl Fn(&T) -> bool,
        encode: impl FnOnce(&mut dyn Write) -> Result<(), DbError>,
    ) -> Result<bool, DbError> {
        if self.snapshot_record::<T>()?.is_some_and(|stored| !older(&stored.meta)) {
            return Ok(false);
        }
        let name = format!("snapshot-{}.snap", unique_suffix());
        let path = self.dir.join(&name);
        let temp = self.dir.join(format!("{name}.tmp"));
        let written = (|| {
            // A name taken (a clock stepped back) fails rather than truncating a file.
            let mut writer = ChunkWriter::new(BufWriter::new(File::create_new(&temp)?), &self.key, &name);
            encode(&mut writer)?;
            let file = writer.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            File::open(&self.dir)?.sync_all()?;
            Ok::<_, DbError>(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        let record = self.seal(&SnapshotRecord { meta, file: name.clone() })?;
        let tx = self.db.begin_write()?;
        let replaced = {
            let mut records = tx.open_table(RECORDS)?;
            let stored = records.get(SNAPSHOT)?.map(|r| self.unseal::<SnapshotRecord<T>>(r.value())).transpose()?;
            if stored.as_ref().is_some_and(|stored| !older(&stored.meta)) {
                drop(records);
                drop(tx);
                let _ = std::fs::remove_file(&path);
                return Ok(false);
            }
            records.insert(SNAPSHOT, record.as_slice())?;
            stored.map(|s| s.file)
        };
        tx.commit()?;
        // A reader that opened the old file before this keeps reading it (unlinked, not gone).
        if let Some(old) = replaced.filter(|old| *old != name) {
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        Ok(true)
    }

    fn snapshot_record<T: DeserializeOwned>(&self) -> Result<Option<SnapshotRecord<T>>, DbError> {
        self.record(SNAPSHOT)
    }

    /// The stored snapshot's metadata and what `decode` makes of its data as it reads it.
    pub fn snapshot<T: DeserializeOwned, S>(
        &self,
        decode: impl FnOnce(&mut dyn Read) -> Result<S, DbError>,
    ) -> Result<Option<(T, S)>, DbError> {
        // A snapshot written meanwhile deletes the file its record named before: read the
        // record again and open the new one.
        let mut attempts = 0;
        let (SnapshotRecord { meta, file: name }, file) = loop {
            let Some(record) = self.snapshot_record::<T>()? else {
                return Ok(None);
            };
            match File::open(self.dir.join(&record.file)) {
                Ok(file) => break (record, file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        };
        let mut reader = ChunkReader::new(BufReader::new(file), &self.key, &name);
        Ok(Some((meta, decode(&mut reader)?)))
    }

    /// The size on disk of the stored snapshot (sealed), if there is one.
    pub fn snapshot_size(&self) -> Result<Option<u64>, DbError> {
        let Some(record) = self.snapshot_record::<serde::de::IgnoredAny>()? else {
            return Ok(None);
        };
        Ok(Some(std::fs::metadata(self.dir.join(record.file))?.len()))
    }

    /// Moves a snapshot kept whole in the records table (before snapshot files) into a
    /// file. Idempotent: a crash between the two steps leaves both, and the next open only
    /// drops the old records.
    fn migrate_legacy_snapshot(&self) -> Result<(), DbError> {
        let legacy = {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(RECORDS)?;
            let (meta, data) = (table.get(LEGACY_SNAPSHOT_META)?, table.get(LEGACY_SNAPSHOT_DATA)?);
            match (meta, data) {
                (None, None) => return Ok(()),
                (Some(meta), Some(data)) => Some((meta.value().to_vec(), data.value().to_vec())),
                _ => None,
            }
        };
        if let Some((meta, data)) = legacy {
            if self.snapshot_record::<serde::de::IgnoredAny>()?.is_none() {
                let meta: serde_json::Value = self.unseal(&meta)?;
                let data = self.key.open(&data)?;
                tracing::info!(bytes = data.len(), "moving the snapshot out of the database into a file");
                self.put_snapshot(&meta, |_| true, |out| Ok(out.write_all(&data)?))?;
            }
        }
        let tx = self.db.begin_write()?;
        {
            let mut records = tx.open_table(RECORDS)?;
            records.remove(LEGACY_SNAPSHOT_META)?;
            records.remove(LEGACY_SNAPSHOT_DATA)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes snapshot files no record names: left by a crash mid-write, or replaced
    /// while a reader still had them open.
    fn remove_stray_snapshots(&self) -> Result<(), DbError> {
        let current = self.snapshot_record::<serde::de::IgnoredAny>()?.map(|r| r.file);
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("snapshot-") && current.as_deref() != Some(name) {
                tracing::info!(file = name, "removing a snapshot file no record names");
                let _ = std::fs::remove_file(self.dir.join(name));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_kept_in_the_database_moves_into_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        let key = DataKey::generate().unwrap();
        {
            let db = Db::open(&path, key.clone()).unwrap();
            let meta = db.seal(&serde_json::json!({"snapshot_id": "7-1"})).unwrap();
            let data = key.seal(b"SHOALSNP...state").unwrap();
            let tx = db.db.begin_write().unwrap();
            {
                let mut records = tx.open_table(RECORDS).unwrap();
                records.insert(LEGACY_SNAPSHOT_META, meta.as_slice()).unwrap();
                records.insert(LEGACY_SNAPSHOT_DATA, data.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let db = Db::open(&path, key).unwrap();
        let (meta, data) = db
            .snapshot::<serde_json::Value, _>(|r| {
                let mut data = Vec::new();
                r.read_to_end(&mut data)?;
                Ok(data)
            })
            .unwrap()
            .expect("moved");
        assert_eq!((meta["snapshot_id"].as_str(), data.as_slice()), (Some("7-1"), b"SHOALSNP...state".as_slice()));
        assert!(db.record::<serde_json::Value>(LEGACY_SNAPSHOT_DATA).unwrap().is_none(), "the old record is gone");
    }
}
