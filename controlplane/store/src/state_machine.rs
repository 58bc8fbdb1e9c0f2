//! The state machine (openraft `RaftStateMachine`): applies committed commands to the
//! in-memory `ClusterState`, builds and installs snapshots (persisted, sealed), and
//! announces every change to watchers — the roles react to these instead of calling each
//! other.

use std::{
    io::Cursor,
    sync::{Arc, RwLock},
};

use openraft::{
    storage::{RaftStateMachine, Snapshot},
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    db::{Db, DbError, SNAPSHOT},
    state::{ClusterState, CommandError},
    types::{Applied, Change, RaftId, RaftPeer, TypeConfig},
};

type Result<T> = std::result::Result<T, StorageError<RaftId>>;
type Membership = StoredMembership<RaftId, RaftPeer>;

/// How many changes a slow watcher may fall behind before it must re-read everything.
const WATCH_BUFFER: usize = 1024;

/// What replicas have applied, readable by the rest of the manager.
pub struct Shared {
    applied: RwLock<AppliedState>,
    changes: broadcast::Sender<Change>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

    /// Changes from now on. A receiver that lags gets `RecvError::Lagged` and should treat it
    /// as `Change::All`.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

/// A snapshot as stored: openraft's metadata plus the serialized state.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftId, RaftPeer>,
    data: Vec<u8>,
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
        if let Some(snapshot) = db.record::<StoredSnapshot>(SNAPSHOT)? {
            applied.state = serde_json::from_slice(&snapshot.data)?;
            applied.last_applied = snapshot.meta.last_log_id;
            applied.membership = snapshot.meta.last_membership;
        }
        let (changes, _) = broadcast::channel(WATCH_BUFFER);
        Ok(StateMachineStore { db, shared: Arc::new(Shared { applied: RwLock::new(applied), changes }) })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn announce(&self, change: Change) {
        // No watchers is fine: nobody to tell.
        let _ = self.shared.changes.send(change);
    }

    fn snapshot_of(applied: &AppliedState) -> std::result::Result<StoredSnapshot, DbError> {
        let data = serde_json::to_vec(&applied.state)?;
        let id = applied.last_applied.map_or(0, |l| l.index);
        Ok(StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id: format!("{id}-{}", applied.last_applied.map_or(0, |l| l.leader_id.term)),
            },
            data,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let stored = {
            let applied = self.shared.applied.read().unwrap_or_else(|p| p.into_inner());
            Self::snapshot_of(&applied).map_err(io(StorageIOError::read_state_machine))?
        };
        self.db.put_record(SNAPSHOT, &stored).map_err(io(|e| StorageIOError::write_snapshot(None, e)))?;
        Ok(Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) })
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
        let mut changes = Vec::new();
        {
            let mut applied = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                let index = entry.log_id.index;
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Ok(Applied { version: index })),
                    EntryPayload::Normal(command) => {
                        let (result, change) = applied.state.apply(index, command);
                        results.push(result);
                        changes.extend(change);
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        results.push(Ok(Applied { version: index }));
                        changes.push(Change::All);
                    }
                }
            }
        }
        for change in changes {
            self.announce(change);
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
        let state: ClusterState = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.db.put_record(SNAPSHOT, &stored).map_err(io(|e| StorageIOError::write_snapshot(None, e)))?;
        {
            let mut applied = self.shared.applied.write().unwrap_or_else(|p| p.into_inner());
            applied.state = state;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        self.announce(Change::All);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> =
            self.db.record(SNAPSHOT).map_err(io(|e| StorageIOError::read_snapshot(None, e)))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
