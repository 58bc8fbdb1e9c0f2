//! Tasks: indexed by service, node, slot and desired state, the lookups the orchestrators,
//! the scheduler and the dispatcher make on every event. Like swarmkit, the store checks no
//! references between tasks and services: the orchestrators own that consistency.

use std::sync::Arc;

use shoal_api::{swarm::Meta, task::Task};

use super::{Index, Object, Rules, StoredObject};
use crate::{state::ClusterState, table::Table, Kind};

impl StoredObject for Task {
    const KIND: Kind = Kind::Task;
    fn id(&self) -> &str {
        &self.id
    }
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut Meta {
        &mut self.meta
    }
    fn name(&self) -> &str {
        &self.annotations.name
    }
    fn index_keys(&self, keys: &mut Vec<(Index, String)>) {
        if !self.service_id.is_empty() {
            keys.push((Index::Service, self.service_id.clone()));
            keys.push((Index::Slot, slot_key(&self.service_id, self.slot, &self.node_id)));
        }
        if !self.node_id.is_empty() {
            keys.push((Index::Node, self.node_id.clone()));
        }
        keys.push((Index::DesiredState, self.desired_state.as_str().to_owned()));
    }
    fn wrap(object: Arc<Self>) -> Object {
        Object::Task(object)
    }
    fn table(state: &ClusterState) -> &Table<Self> {
        &state.tasks
    }
    fn table_mut(state: &mut ClusterState) -> &mut Table<Self> {
        &mut state.tasks
    }
}

impl Rules for Task {}

/// The `Slot` index key: a replicated task's slot, a global task's node.
pub fn slot_key(service_id: &str, slot: u64, node_id: &str) -> String {
    if slot > 0 {
        format!("{service_id}/{slot}")
    } else {
        format!("{service_id}/{node_id}")
    }
}
