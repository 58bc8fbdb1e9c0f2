//! Tasks: indexed by service, node, slot and desired state, the lookups the orchestrators,
//! the scheduler and the dispatcher make on every event. Like swarmkit, the store checks no
//! references between tasks and services: the orchestrators own that consistency.

use shoal_api::task::Task;

use super::{Index, Rules};

stored_object!(Task in tasks, id: id, meta: meta, name: annotations.name, keys: task_keys);

/// The keys of a task in its kind's own indexes.
fn task_keys(task: &Task, keys: &mut Vec<(Index, String)>) {
    if !task.service_id.is_empty() {
        keys.push((Index::Service, task.service_id.clone()));
        keys.push((Index::Slot, slot_key(&task.service_id, task.slot, &task.node_id)));
    }
    if !task.node_id.is_empty() {
        keys.push((Index::Node, task.node_id.clone()));
    }
    keys.push((Index::DesiredState, task.desired_state.as_str().to_owned()));
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
