//! The state machine (openraft `RaftStateMachine`): applies committed commands to the
//! in-memory `ClusterState`, hands each entry's events to the watchers, and builds and
//! installs snapshots (binary, sealed, persisted).
//!
//! Snapshots are built from a copy of the state taken under the read lock (the objects are
//! shared, so the copy is a list of pointers) and encoded straight into the snapshot file
//! with no lock held, on the blocking pool: applying goes on meanwhile, and the encoding is
//! never held whole in memory. The data is read whole (decrypted, in memory) only where
//! openraft 0.9's snapshot API wants a seekable buffer: to send it to a follower, as it
//! arrives from the leader, and once at start, when openraft asks for the current snapshot
//! only to learn its meta.

use std::{
    io::Cursor,
    sync::{Arc, RwLock},
};

use openraft::{
    storage::{RaftStateMachine, Snapshot},
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};

use crate::{
    codec,
    db::{blocking, Db, DbError},
    state::{ClusterState, CommandError, Image, Outcome},
    types::{Applied, RaftId, RaftPeer, TypeConfig},
    watch::{Filter, Hub, Watcher, WATCH_BUFFER},
};

type Result<T> = std::result::Result<T, StorageError<RaftId>>;
type Membership = StoredMembership<RaftId, RaftPeer>;

/// What this replica has applied, readable by the rest of the manager.
pub struct Shared {
    applied: RwLock<AppliedState>,
    hub: Hub,
}

#[derive(Debug, Clone, Default)]
struct AppliedState {
    last_applied: Option<LogId<RaftId>>,
    membership: Membership,
    state: ClusterState,
}

impl Shared {
    /// Reads the current state; keep `f` short, appliers wait for it.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.applied.read().unwrap_or_else(|p| p.into_inner()).state)
    }

    /// The raft membership as last applied.
    pub fn membership(&self) -> Membership {
        self.applied.read().unwrap_or_else(|p| p.into_inner()).membership.clone()
    }

    /// The raft index of the last applied entry (0 before any).
    pub fn last_applied(&self) -> u64 {
        self.applied.read().unwrap_or_else(|p| p.into_inner()).last_applied.map_or(0, |l| l.index)
    }

    /// Reads the state with `f` and returns a watch of every change after that read, so the
    /// caller neither misses nor double-counts one (swarmkit's `ViewAndWatch`).
    pub fn view_and_watch<T>(&self, filter: Filter, f: impl FnOnce(&ClusterState) -> T) -> (T, Watcher) {
        let applied = self.applied.read().unwrap_or_else(|p| p.into_inner());
        let view = f(&applied.state);
        let after = applied.last_applied.map_or(0, |l| l.index);
        (view, self.hub.subscribe(filter, after, WATCH_BUFFER))
    }

    /// A watch of every change from now on.
    pub fn watch(&self, filter: Filter) -> Watcher {
        self.view_and_watch(filter, |_| ()).1
    }
}

#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Db>,
    shared: Arc<Shared>,
}

fn io(kind: fn(AnyError) -> StorageIOError<RaftId>) -> impl Fn(DbError) -> StorageError<RaftId> {
    move |e| kind(AnyError::new(&e)).into()
}

impl StateMachineStore {
    /// Starts from the last persisted snapshot, if any; raft re-applies the log after it.
    pub(crate) fn open(db: Arc<Db>) -> std::result::Result<Self, DbError> {
        let mut applied = AppliedState::default();
        if let Some((meta, state)) =
            db.snapshot::<SnapshotMeta<RaftId, RaftPeer>, _>(|data| Ok(codec::decode_from(data)?))?
        {
            applied.state = state;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        Ok(StateMachineStore { db, shared: Arc::new(Shared { applied: RwLock::new(applied), hub: Hub::default() }) })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (image, last_applied, membership) = {
            let applied = self.shared.applied.read().unwrap_or_else(|p| p.into_inner());
            (Image::from(&applied.state), applied.last_applied, applied.membership.clone())
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                last_applied.map_or(0, |l| l.index),
                last_applied.map_or(0, |l| l.leader_id.term)
            ),
        };
        let stored_meta = meta.clone();
        blocking(&self.db, move |db| {
            let newer = |stored: &SnapshotMeta<RaftId, RaftPeer>| stored.last_log_id < stored_meta.last_log_id;
            db.put_snapshot(&stored_meta, newer, |out| Ok(codec::encode_into(out, &image)?))
        })
        .await
        .map_err(io(|e| StorageIOError::write_snapshot(None, e)))?;
        // openraft keeps only a built snapshot's meta; replication reads the data back with
        // `get_current_snapshot` when a follower needs it, so none is held here.
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId<RaftId>>, Membership)> {
        let applied = self.shared.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<std::result::Result<Applied, CommandError>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut applied = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
        for entry in entries {
            let index = entry.log_id.index;
            match entry.payload {
                EntryPayload::Blank => results.push(Ok(Applied { version: index })),
                EntryPayload::Normal(command) => {
                    let format = command.format;
                    match applied.state.apply(index, command) {
                        Outcome::Applied(Err(CommandError::UnsupportedFormat(_)), _) => {
                            // Stop here, before this entry counts as applied: a replica that
                            // skipped it would silently diverge from the others.
                            let message = format!(
                                "raft entry {index} is in command format {format}, newer than this shoald \
                                 understands (up to {}): upgrade shoald on this manager",
                                crate::command::FORMAT
                            );
                            tracing::error!("{message}");
                            let error = AnyError::error(message);
                            return Err(
                                StorageIOError::new(ErrorSubject::Apply(entry.log_id), ErrorVerb::Read, error).into()
                            );
                        }
                        Outcome::Applied(result, events) => {
                            results.push(result);
                            self.shared.hub.publish(events);
                        }
                        Outcome::Replaced => {
                            results.push(Ok(Applied { version: index }));
                            self.shared.hub.resync_all();
                        }
                    }
                }
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    results.push(Ok(Applied { version: index }));
                }
            }
            applied.last_applied = Some(entry.log_id);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftId, RaftPeer>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let stored_meta = meta.clone();
        let state = blocking(&self.db, move |db| {
            let state = codec::decode(&data)?;
            let not_newer = |stored: &SnapshotMeta<RaftId, RaftPeer>| stored.last_log_id <= stored_meta.last_log_id;
            db.put_snapshot(&stored_meta, not_newer, |out| Ok(out.write_all(&data)?))?;
            Ok(state)
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        let replaced = {
            let mut applied = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            self.shared.hub.resync_all();
            std::mem::replace(&mut applied.state, state)
        };
        // Freeing a big state takes a while: not under the lock.
        drop(replaced);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let stored = blocking(&self.db, |db| {
            db.snapshot::<SnapshotMeta<RaftId, RaftPeer>, _>(|data| {
                let mut bytes = Vec::new();
                data.read_to_end(&mut bytes)?;
                Ok(bytes)
            })
        })
        .await
        .map_err(io(|e| StorageIOError::read_snapshot(None, e)))?;
        Ok(stored.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests;
