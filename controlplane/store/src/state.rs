//! Every object of the cluster, one table per kind, and the one place that changes them:
//! `ClusterState::apply`.
//!
//! Apply is pure — a function of the state, the command and the raft index — so every
//! replica decides alike. The checks that depend on the state (the version a writer read,
//! unique names, the last manager) happen here, at apply time, where they cannot race. A
//! transaction is applied mutation by mutation, each checked against the state as the
//! earlier ones left it; the first refusal undoes the ones before it, so a batch changes
//! all or nothing.

use std::{collections::BTreeSet, sync::Arc};

use serde::{Deserialize, Serialize};
use shoal_api::{network::Network, node::Node, service::Service, task::Task};

use crate::{
    command::{Body, Command, Mutation},
    objects::{with_object, Cluster, Index, Kind, Object, Rules, StoredObject},
    table::Table,
    types::Applied,
    watch::{Action, Event},
};

/// Every object of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "Image", into = "Image")]
pub struct ClusterState {
    /// At most one: the swarm's record.
    pub clusters: Table<Cluster>,
    pub nodes: Table<Node>,
    pub services: Table<Service>,
    pub tasks: Table<Task>,
    pub networks: Table<Network>,
    /// IDs of removed nodes: their certificates stay valid until they expire, so every
    /// endpoint refuses them by ID.
    pub removed_nodes: BTreeSet<String>,
    /// Raft member IDs of a cluster this one replaced (`swarm init --force-new-cluster`):
    /// the old managers, should they come back with their old raft state, are refused, so
    /// they can neither depose the new leader nor truncate its log.
    pub retired_raft_ids: BTreeSet<u64>,
}

/// Why a command was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    /// The writer read an older version than the current one (Docker: "update out of
    /// sequence").
    #[error("update out of sequence")]
    OutOfSequence,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Invalid(String),
    /// The entry was written in a command format this replica does not know.
    #[error("command format {0} is newer than this shoald understands (up to {max}): upgrade it", max = crate::command::FORMAT)]
    UnsupportedFormat(u32),
}

/// How to take back one applied mutation.
enum Undo {
    /// Put back the object as it was (an update or a delete).
    Restore(Object),
    /// Remove an object the batch created.
    Remove(Kind, String),
    /// Forget a node ID the batch added to `removed_nodes`.
    Unremove(String),
}

/// The outcome of applying one entry: the result for its writer and the events for
/// watchers (none when refused; `Replaced` when the whole state was swapped).
pub enum Outcome {
    Applied(Result<Applied, CommandError>, Vec<Event>),
    Replaced,
}

impl ClusterState {
    /// The swarm's record, once the swarm exists.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.clusters.iter().next()
    }

    pub fn managers(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.find(Index::Role, "manager")
    }

    /// The version of object `id` of `kind`, if there is one.
    pub fn version_of(&self, kind: Kind, id: &str) -> Option<u64> {
        fn of<T: StoredObject>(table: &Table<T>, id: &str) -> Option<u64> {
            table.get(id).map(|o| o.meta().version.index)
        }
        match kind {
            Kind::Cluster => of(&self.clusters, id),
            Kind::Node => of(&self.nodes, id),
            Kind::Service => of(&self.services, id),
            Kind::Task => of(&self.tasks, id),
            Kind::Network => of(&self.networks, id),
        }
    }

    /// Applies `command` at raft index `index`.
    pub fn apply(&mut self, index: u64, command: Command) -> Outcome {
        let at = command.at;
        match command.body {
            Body::Restore(state) => {
                *self = *state;
                self.restamp(index);
                Outcome::Replaced
            }
            Body::Unsupported(_) => Outcome::Applied(Err(CommandError::UnsupportedFormat(command.format)), Vec::new()),
            Body::Batch(mutations) => {
                let mut undo = Vec::with_capacity(mutations.len());
                let mut events = Vec::with_capacity(mutations.len());
                for mutation in mutations {
                    match self.mutate(index, &at, mutation, &mut undo) {
                        Ok(event) => events.push(event),
                        Err(e) => {
                            self.roll_back(undo);
                            return Outcome::Applied(Err(e), Vec::new());
                        }
                    }
                }
                Outcome::Applied(Ok(Applied { version: index }), events)
            }
        }
    }

    fn mutate(
        &mut self,
        index: u64,
        at: &str,
        mutation: Mutation,
        undo: &mut Vec<Undo>,
    ) -> Result<Event, CommandError> {
        match mutation {
            Mutation::Create(object) => with_object!(object, o => self.create(index, at, o, undo)),
            Mutation::Update { object, version } => with_object!(object, o => self.update(index, at, o, version, undo)),
            Mutation::Delete { kind, id, version } => match kind {
                Kind::Cluster => self.delete::<Cluster>(index, &id, version, undo),
                Kind::Node => self.delete::<Node>(index, &id, version, undo),
                Kind::Service => self.delete::<Service>(index, &id, version, undo),
                Kind::Task => self.delete::<Task>(index, &id, version, undo),
                Kind::Network => self.delete::<Network>(index, &id, version, undo),
            },
        }
    }

    fn create<T: Rules>(
        &mut self,
        index: u64,
        at: &str,
        new: Arc<T>,
        undo: &mut Vec<Undo>,
    ) -> Result<Event, CommandError> {
        if new.id().is_empty() {
            return Err(CommandError::Invalid(format!("a {} needs an ID", T::KIND)));
        }
        if T::table(self).get(new.id()).is_some() {
            return Err(CommandError::Conflict(format!("{} {} already exists", T::KIND, new.id())));
        }
        T::check_create(self, &new)?;
        let mut new = Arc::unwrap_or_clone(new);
        let meta = new.meta_mut();
        meta.version.index = index;
        meta.created_at = at.to_owned();
        meta.updated_at = at.to_owned();
        let new = Arc::new(new);
        T::table_mut(self).insert(new.clone());
        undo.push(Undo::Remove(T::KIND, new.id().to_owned()));
        Ok(Event { index, action: Action::Create, old: None, new: Some(T::wrap(new)) })
    }

    fn update<T: Rules>(
        &mut self,
        index: u64,
        at: &str,
        new: Arc<T>,
        version: u64,
        undo: &mut Vec<Undo>,
    ) -> Result<Event, CommandError> {
        let old = T::table(self).get(new.id()).cloned().ok_or_else(|| not_found(T::KIND, new.id()))?;
        if old.meta().version.index != version {
            return Err(CommandError::OutOfSequence);
        }
        T::check_update(self, &old, &new)?;
        let mut new = Arc::unwrap_or_clone(new);
        let meta = new.meta_mut();
        meta.version.index = index;
        meta.created_at = old.meta().created_at.clone();
        meta.updated_at = at.to_owned();
        let new = Arc::new(new);
        T::table_mut(self).insert(new.clone());
        undo.push(Undo::Restore(T::wrap(old.clone())));
        Ok(Event { index, action: Action::Update, old: Some(T::wrap(old)), new: Some(T::wrap(new)) })
    }

    fn delete<T: Rules>(
        &mut self,
        index: u64,
        id: &str,
        version: Option<u64>,
        undo: &mut Vec<Undo>,
    ) -> Result<Event, CommandError> {
        let old = T::table(self).get(id).cloned().ok_or_else(|| not_found(T::KIND, id))?;
        if version.is_some_and(|v| v != old.meta().version.index) {
            return Err(CommandError::OutOfSequence);
        }
        T::check_delete(self, &old)?;
        T::table_mut(self).remove(id);
        undo.push(Undo::Restore(T::wrap(old.clone())));
        if T::KIND == Kind::Node && self.removed_nodes.insert(id.to_owned()) {
            undo.push(Undo::Unremove(id.to_owned()));
        }
        Ok(Event { index, action: Action::Delete, old: Some(T::wrap(old)), new: None })
    }

    /// Gives every object the version `index`: restored objects carry versions from the
    /// old cluster's log, which the new log will reach again, and a writer holding such a
    /// number must not match an object changed since.
    fn restamp(&mut self, index: u64) {
        fn restamp<T: StoredObject>(table: &mut Table<T>, index: u64) {
            let objects: Vec<Arc<T>> = table.iter().cloned().collect();
            for object in objects {
                let mut object = Arc::unwrap_or_clone(object);
                object.meta_mut().version.index = index;
                table.insert(Arc::new(object));
            }
        }
        restamp(&mut self.clusters, index);
        restamp(&mut self.nodes, index);
        restamp(&mut self.services, index);
        restamp(&mut self.tasks, index);
        restamp(&mut self.networks, index);
    }

    fn roll_back(&mut self, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Restore(object) => with_object!(object, o => {
                    put_back(self, o);
                }),
                Undo::Remove(kind, id) => match kind {
                    Kind::Cluster => drop(self.clusters.remove(&id)),
                    Kind::Node => drop(self.nodes.remove(&id)),
                    Kind::Service => drop(self.services.remove(&id)),
                    Kind::Task => drop(self.tasks.remove(&id)),
                    Kind::Network => drop(self.networks.remove(&id)),
                },
                Undo::Unremove(id) => {
                    self.removed_nodes.remove(&id);
                }
            }
        }
    }
}

fn put_back<T: StoredObject>(state: &mut ClusterState, object: Arc<T>) {
    T::table_mut(state).insert(object);
}

fn not_found(kind: Kind, id: &str) -> CommandError {
    CommandError::NotFound { kind: kind.to_string(), id: id.to_owned() }
}

/// The state as it is written out (snapshots, restores): each table as a list of its
/// objects; the indexes are rebuilt on reading. Built from shared objects, so taking one is
/// cheap and can be encoded away from the state's lock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Image {
    pub clusters: Vec<Arc<Cluster>>,
    pub nodes: Vec<Arc<Node>>,
    pub services: Vec<Arc<Service>>,
    pub tasks: Vec<Arc<Task>>,
    pub networks: Vec<Arc<Network>>,
    pub removed_nodes: Vec<String>,
    #[serde(default)]
    pub retired_raft_ids: Vec<u64>,
}

impl From<&ClusterState> for Image {
    fn from(state: &ClusterState) -> Self {
        Image {
            clusters: state.clusters.iter().cloned().collect(),
            nodes: state.nodes.iter().cloned().collect(),
            services: state.services.iter().cloned().collect(),
            tasks: state.tasks.iter().cloned().collect(),
            networks: state.networks.iter().cloned().collect(),
            removed_nodes: state.removed_nodes.iter().cloned().collect(),
            retired_raft_ids: state.retired_raft_ids.iter().copied().collect(),
        }
    }
}

impl From<ClusterState> for Image {
    fn from(state: ClusterState) -> Self {
        Image::from(&state)
    }
}

impl From<Image> for ClusterState {
    fn from(image: Image) -> Self {
        ClusterState {
            clusters: image.clusters.into_iter().collect(),
            nodes: image.nodes.into_iter().collect(),
            services: image.services.into_iter().collect(),
            tasks: image.tasks.into_iter().collect(),
            networks: image.networks.into_iter().collect(),
            removed_nodes: image.removed_nodes.into_iter().collect(),
            retired_raft_ids: image.retired_raft_ids.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests;
