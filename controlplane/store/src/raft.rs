//! `ClusterStore`: one manager's replica — the raft node built from the log, the state
//! machine and the network — with the operations the rest of the manager uses: commit a
//! transaction (forwarded to the leader when we are not it), read the state, watch changes,
//! and change the set of managers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use openraft::{
    error::{ClientWriteError, RaftError},
    ChangeMembers, Raft, RaftMetrics, SnapshotPolicy,
};
use serde::{Deserialize, Serialize};
use shoal_ca::DataKey;
use tracing::info;

use crate::{
    command::{Batch, Command, Mutation},
    db::Db,
    log::LogStore,
    network::{Forward, Network},
    objects::StoredObject,
    state::{ClusterState, CommandError},
    state_machine::{Shared, StateMachineStore},
    types::{Applied, RaftId, RaftPeer, TypeConfig},
};

/// How long a write may wait for a quorum before the caller hears there is none. A manager
/// cut off from the majority must refuse changes with a clear error rather than hang.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(6);

/// Raft timings. A follower of a known leader stands for election once it has not heard
/// from it for the leader lease (openraft: `election_timeout_max`) plus its election timeout
/// (drawn once per process from the range), here 0.8-1.0 s of silence: sixteen or more
/// missed heartbeats, which a loaded two-core machine does not miss by accident (the bench
/// counts spurious elections), and a crashed leader replaced in about a second (swarmkit:
/// 10 s). openraft looks at its election timer every 1.5 heartbeats, so short heartbeats
/// also make the moment a follower stands less coarse. `election` adds the rest.
const HEARTBEAT: Duration = Duration::from_millis(50);
pub(crate) const ELECTION_MIN: Duration = Duration::from_millis(300);
pub(crate) const ELECTION_MAX: Duration = Duration::from_millis(500);
/// One snapshot chunk (and, for the last, the follower's install of the whole state) may
/// take this long: a 100k-task state is tens of MB to move, decode and persist on a loaded
/// two-core machine. openraft's 200 ms default would never let a big snapshot land.
const INSTALL_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Entries per AppendEntries: a transaction entry may carry thousands of objects, so keep
/// a message well under the cluster port's size limit.
const MAX_PAYLOAD_ENTRIES: u64 = 32;
/// How often a read-modify-write is retried when another writer changed the object first.
const UPDATE_ATTEMPTS: usize = 5;

pub struct StoreConfig {
    /// Directory of the database (`<data-root>/swarm/raft`).
    pub dir: PathBuf,
    pub data_key: DataKey,
    pub raft_id: RaftId,
    /// Dials other managers with this node's certificate.
    pub client: reqwest::Client,
    /// Which incarnation of the cluster this replica belongs to: new at `swarm init` and at
    /// every `--force-new-cluster`, handed to nodes as they join. Raft traffic between
    /// replicas of different generations is refused, whatever their state holds (an empty
    /// replica too), so the old incarnation's managers cannot reach the new one.
    pub generation: String,
}

/// Why a write did not happen. Nothing was changed in any case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Refused(#[from] CommandError),
    /// No quorum can be reached from here (Docker's wording, which users search for).
    #[error("The swarm does not have a leader. It's possible that too few managers are online. Make sure more than half of the managers are online.")]
    NoLeader,
    #[error("{0}")]
    Unavailable(String),
    /// The write was handed to raft but no answer came in time: it may yet be applied, or
    /// not. Read before trying again (or retry with the same request ID where there is one).
    #[error("the write may or may not have been applied ({0}): check before trying again")]
    Ambiguous(String),
}

pub struct ClusterStore {
    raft: Raft<TypeConfig>,
    generation: String,
    /// Set while a stopping leader hands over: it takes no new writes (they would grow its
    /// log past what the chosen successor holds, and the successor would lose the vote).
    pub(crate) handing_over: AtomicBool,
    /// Proposals under way on this replica (`try_local`): a hand-over waits for them.
    pub(crate) in_flight: AtomicUsize,
    /// When a leader's append last reached this replica (see `election`).
    pub(crate) last_append: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Set while this replica stands early (`election::stand_early`).
    pub(crate) standing: AtomicBool,
    db: Arc<Db>,
    shared: Arc<Shared>,
    pub(crate) network: Network,
    raft_id: RaftId,
}

impl ClusterStore {
    /// Opens (or creates) this manager's replica and starts its raft node.
    pub async fn open(config: StoreConfig) -> Result<Arc<Self>, WriteError> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| WriteError::Unavailable(format!("{}: {e}", config.dir.display())))?;
        let db = Db::open(&config.dir.join("raft.db"), config.data_key)
            .map(Arc::new)
            .map_err(|e| WriteError::Unavailable(format!("opening the raft database: {e}")))?;
        let state_machine = StateMachineStore::open(db.clone())
            .map_err(|e| WriteError::Unavailable(format!("reading the last snapshot: {e}")))?;
        let shared = state_machine.shared();
        let raft_config = openraft::Config {
            cluster_name: "shoal".into(),
            heartbeat_interval: HEARTBEAT.as_millis() as u64,
            election_timeout_min: ELECTION_MIN.as_millis() as u64,
            election_timeout_max: ELECTION_MAX.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(2000),
            max_in_snapshot_log_to_keep: 500,
            install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT.as_millis() as u64,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| WriteError::Unavailable(format!("raft config: {e}")))?;
        let network = Network::new(config.client, config.generation.clone());
        let raft =
            Raft::new(config.raft_id, Arc::new(raft_config), network.clone(), LogStore::new(db.clone()), state_machine)
                .await
                .map_err(|e| WriteError::Unavailable(format!("starting raft: {e}")))?;
        Ok(Arc::new(ClusterStore {
            raft,
            handing_over: Default::default(),
            in_flight: Default::default(),
            last_append: Default::default(),
            standing: Default::default(),
            generation: config.generation,
            shared,
            network,
            raft_id: config.raft_id,
            db,
        }))
    }

    /// Makes this replica the single member of a new cluster.
    pub async fn bootstrap(&self, me: RaftPeer) -> Result<(), WriteError> {
        let members = BTreeMap::from([(self.raft_id, me)]);
        self.raft.initialize(members).await.map_err(|e| WriteError::Unavailable(format!("initializing raft: {e}")))?;
        self.wait_for_leader(WRITE_TIMEOUT).await
    }

    /// Size in bytes of the snapshot this replica holds, as stored (sealed chunks), if any.
    pub async fn snapshot_len(&self) -> Option<u64> {
        crate::db::blocking(&self.db, |db| db.snapshot_size()).await.ok()?
    }

    /// Dials the other managers with `client` from now on (a renewed certificate, a new
    /// trust root).
    pub fn set_client(&self, client: reqwest::Client) {
        self.network.set_client(client);
    }

    /// The cluster incarnation this replica belongs to (see `StoreConfig::generation`).
    pub fn generation(&self) -> &str {
        &self.generation
    }

    pub fn raft_id(&self) -> RaftId {
        self.raft_id
    }

    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn metrics(&self) -> RaftMetrics<RaftId, RaftPeer> {
        self.raft.metrics().borrow().clone()
    }

    /// Node IDs of the raft voters.
    pub fn voter_nodes(&self) -> BTreeSet<String> {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        membership.voter_ids().filter_map(|id| membership.get_node(&id)).map(|p| p.node_id.clone()).collect()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().current_leader == Some(self.raft_id)
    }

    /// Commits `batch` through the leader, stamped with the current time: every mutation or
    /// none. The result's version is the entry's raft index, the new version of every
    /// object the batch created or updated.
    pub async fn write(&self, batch: Batch) -> Result<Applied, WriteError> {
        self.shared.read(|s| stale_update(s, &batch))?;
        self.commit(Command::batch(now_rfc3339(), batch.0)).await
    }

    /// Like `write`, only if this replica leads (never forwarded): for leader-only roles,
    /// whose decisions rest on what this manager saw while leading.
    pub async fn write_as_leader(&self, batch: Batch) -> Result<Applied, WriteError> {
        self.shared.read(|s| stale_update(s, &batch))?;
        let applied = self.run_as_leader(Forward::Write(Command::batch(now_rfc3339(), batch.0))).await?;
        applied.ok_or_else(|| WriteError::Unavailable("raft returned no result".into()))
    }

    /// Takes member `id` (voter or learner) out of raft, only if this replica leads.
    pub async fn remove_member_as_leader(&self, id: RaftId) -> Result<(), WriteError> {
        self.run_as_leader(Forward::RemoveMember { id }).await.map(|_| ())
    }

    async fn run_as_leader(&self, forward: Forward) -> Result<Option<Applied>, WriteError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.try_local(&forward)).await {
            Err(_) => Err(WriteError::Ambiguous(format!("no quorum answered within {WRITE_TIMEOUT:?}"))),
            Ok(Err(Local::NotLeader(_))) => Err(WriteError::NoLeader),
            Ok(Err(Local::Failed(e))) => Err(e),
            Ok(Ok(applied)) => Ok(applied),
        }
    }

    /// Replaces the whole state (`swarm init --force-new-cluster`'s first entry).
    pub async fn restore(&self, state: ClusterState) -> Result<Applied, WriteError> {
        self.commit(Command::restore(now_rfc3339(), state)).await
    }

    /// Read-modify-write of one object, swarmkit's `store.Update`: `change` edits a copy of
    /// the current object and says whether there is anything to write; the write carries
    /// the version read, and is re-done from a fresh read if another writer got there first.
    /// `Ok(None)` when `change` found nothing to do.
    pub async fn update<T: StoredObject>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut T) -> Result<bool, CommandError>,
    ) -> Result<Option<Applied>, WriteError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let current = self.shared.read(|s| T::table(s).get(id).cloned());
            let current = current.ok_or_else(|| CommandError::NotFound { kind: T::KIND.to_string(), id: id.into() })?;
            let version = current.meta().version.index;
            let mut object = T::clone(&current);
            if !change(&mut object)? {
                return Ok(None);
            }
            let update = Mutation::Update { object: T::wrap(Arc::new(object)), version };
            match self.write(Batch(vec![update])).await {
                // Another writer got there first: wait until this replica shows its change
                // (a follower may not have applied it yet) and start again from there.
                Err(WriteError::Refused(CommandError::OutOfSequence)) => {
                    self.wait_for_change::<T>(id, version).await;
                    continue;
                }
                other => return other.map(Some),
            }
        }
        Err(CommandError::OutOfSequence.into())
    }

    async fn commit(&self, command: Command) -> Result<Applied, WriteError> {
        let applied = self.submit(Forward::Write(command)).await?;
        let applied = applied.ok_or_else(|| WriteError::Unavailable("the leader returned no result".into()))?;
        // Read-your-writes: a write forwarded to the leader is answered once this replica has
        // applied it too, so the caller's next read here sees it (`docker node update` twice
        // in a row on a follower must not fail with a stale version).
        self.wait_applied(applied.version).await;
        Ok(applied)
    }

    /// Waits (bounded) until this replica holds object `id` at a version other than `version`.
    async fn wait_for_change<T: StoredObject>(&self, id: &str, version: u64) {
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            loop {
                let now = self.shared.read(|s| T::table(s).get(id).map(|o| o.meta().version.index));
                if now != Some(version) || metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Waits (bounded) until this replica has applied the entry at `index`.
    async fn wait_applied(&self, index: u64) {
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            loop {
                if metrics.borrow().last_applied.is_some_and(|l| l.index >= index) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Adds a manager: first as a learner that catches up, then as a voter.
    pub async fn add_manager(&self, id: RaftId, peer: RaftPeer) -> Result<(), WriteError> {
        self.submit(Forward::AddManager { id, peer }).await.map(|_| ())
    }

    pub async fn remove_manager(&self, id: RaftId) -> Result<(), WriteError> {
        self.submit(Forward::RemoveManager { id }).await.map(|_| ())
    }

    /// Runs `forward` here if we lead, else on the leader.
    async fn submit(&self, forward: Forward) -> Result<Option<Applied>, WriteError> {
        let tried = self.metrics().current_leader;
        match self.submit_once(&forward).await {
            // Mid-election, or the leader we knew is gone: wait for the outcome (about one
            // election timeout) rather than fail a write a moment before another leads.
            Err(WriteError::NoLeader) if self.wait_for_new_leader(tried, ELECTION_MAX * 2).await => {
                self.submit_once(&forward).await
            }
            other => other,
        }
    }

    /// Waits (bounded) until a leader other than `old` is known.
    async fn wait_for_new_leader(&self, old: Option<RaftId>, limit: Duration) -> bool {
        let mut metrics = self.raft.metrics();
        let waited = tokio::time::timeout(limit, async {
            loop {
                let leader = metrics.borrow().current_leader;
                if leader.is_some() && leader != old {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
        waited.await.is_ok()
    }

    async fn submit_once(&self, forward: &Forward) -> Result<Option<Applied>, WriteError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.try_local(forward)).await {
            // Proposed here as leader, not committed in time: a quorum may still take it.
            Err(_) => Err(WriteError::Ambiguous(format!("no quorum answered within {WRITE_TIMEOUT:?}"))),
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(Local::NotLeader(Some(leader)))) => {
                tokio::time::timeout(WRITE_TIMEOUT, self.network.forward(&leader.addr, forward)).await.unwrap_or_else(
                    |_| Err(WriteError::Ambiguous(format!("the leader at {} did not answer in time", leader.addr))),
                )
            }
            Ok(Err(Local::NotLeader(None))) => Err(WriteError::NoLeader),
            Ok(Err(Local::Failed(e))) => Err(e),
        }
    }

    /// Runs a forwarded write; the caller believed we lead. No second hop: if leadership
    /// moved meanwhile the caller hears `NoLeader` and may retry.
    pub(crate) async fn execute_as_leader(&self, forward: Forward) -> Result<Option<Applied>, WriteError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.try_local(&forward)).await {
            Err(_) => Err(WriteError::Ambiguous(format!("no quorum answered within {WRITE_TIMEOUT:?}"))),
            Ok(Err(Local::NotLeader(_))) => Err(WriteError::NoLeader),
            Ok(Err(Local::Failed(e))) => Err(e),
            Ok(Ok(applied)) => Ok(applied),
        }
    }

    async fn try_local(&self, forward: &Forward) -> Result<Option<Applied>, Local> {
        // Counted before the hand-over flag is read (both SeqCst): a hand-over that sees no
        // proposal under way knows none will start.
        let _in_flight = InFlight::enter(&self.in_flight);
        if self.handing_over.load(Ordering::SeqCst) {
            // Writers wait for the successor (`submit` waits out an election).
            return Err(Local::NotLeader(None));
        }
        let result = match forward {
            Forward::Write(command) => {
                command.admissible().map_err(|e| Local::Failed(e.into()))?;
                self.raft.client_write(command.clone()).await.map(|r| Some(r.data))
            }
            Forward::AddManager { id, peer } => {
                let added = self.raft.add_learner(*id, peer.clone(), true).await;
                match added {
                    Ok(_) => self
                        .raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                        .await
                        .map(|_| None),
                    Err(e) => Err(e),
                }
            }
            Forward::RemoveMember { id } => {
                let voter = self.metrics().membership_config.membership().voter_ids().any(|v| v == *id);
                let change = if voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([*id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([*id]))
                };
                self.raft.change_membership(change, false).await.map(|_| None)
            }
            Forward::RemoveManager { id } => self
                .raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([*id])), false)
                .await
                .map(|_| None),
        };
        match result {
            Ok(Some(Ok(applied))) => Ok(Some(applied)),
            Ok(Some(Err(refused))) => Err(Local::Failed(WriteError::Refused(refused))),
            Ok(None) => Ok(None),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(to))) => Err(Local::NotLeader(to.leader_node)),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(Local::Failed(WriteError::Unavailable(format!("changing the managers: {e}"))))
            }
            Err(RaftError::Fatal(e)) => Err(Local::Failed(WriteError::Unavailable(format!("raft stopped: {e}")))),
        }
    }

    /// Waits until some manager leads (after bootstrap or a restart).
    pub async fn wait_for_leader(&self, limit: Duration) -> Result<(), WriteError> {
        let mut metrics = self.raft.metrics();
        let waited = tokio::time::timeout(limit, async {
            loop {
                if metrics.borrow().current_leader.is_some() {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        waited.map_err(|_| WriteError::NoLeader)
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        info!(raft_id = self.raft_id, "cluster store closed");
    }
}

/// An update whose writer read an older version than this replica already holds is refused
/// here, without a raft entry: versions only grow, so it would be refused at apply time too.
/// (A replica that lags cannot tell; apply time decides then.)
fn stale_update(state: &ClusterState, batch: &Batch) -> Result<(), CommandError> {
    for mutation in &batch.0 {
        let (kind, id, version) = match mutation {
            Mutation::Update { object, version } => (object.kind(), object.id(), *version),
            Mutation::Delete { kind, id, version: Some(version) } => (*kind, id.as_str(), *version),
            _ => continue,
        };
        if state.version_of(kind, id).is_some_and(|current| current > version) {
            return Err(CommandError::OutOfSequence);
        }
    }
    Ok(())
}

enum Local {
    NotLeader(Option<RaftPeer>),
    Failed(WriteError),
}

/// Now in RFC 3339 with nanoseconds, as Docker timestamps objects.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// Counts one proposal under way for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
