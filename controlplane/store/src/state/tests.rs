//! `ClusterState::apply`: transactions are all or nothing, versions are raft indexes, and
//! each kind's invariants hold whatever order a batch takes.

use shoal_api::{
    node::{NodeAvailability, NodeRole, NodeSpec, NodeState},
    service::Service,
    task::TaskState,
};

use super::*;
use crate::command::Batch;

const AT: &str = "2026-11-21T00:00:00Z";

fn node(id: &str, hostname: &str, role: NodeRole) -> Node {
    let mut node = Node { id: id.into(), ..Default::default() };
    node.description.hostname = hostname.into();
    node.spec.role = role;
    node.status.state = NodeState::Ready;
    node
}

fn task(id: &str, service: &str, slot: u64) -> Task {
    Task { id: id.into(), service_id: service.into(), slot, desired_state: TaskState::Running, ..Default::default() }
}

fn apply(state: &mut ClusterState, index: u64, batch: Batch) -> (Result<Applied, CommandError>, Vec<Event>) {
    match state.apply(index, Command::batch(AT.into(), batch.0)) {
        Outcome::Applied(result, events) => (result, events),
        Outcome::Replaced => panic!("a batch never replaces the state"),
    }
}

fn swarm() -> ClusterState {
    let mut state = ClusterState::default();
    let cluster =
        Cluster { info: shoal_api::swarm::ClusterInfo { id: "c1".into(), ..Default::default() }, ..Default::default() };
    let (result, events) =
        apply(&mut state, 1, Batch::new().create(cluster).create(node("m1", "mgr1", NodeRole::Manager)));
    assert_eq!(result, Ok(Applied { version: 1 }));
    assert_eq!(events.len(), 2);
    state
}

#[test]
fn versions_are_raft_indexes_and_stale_writers_lose() {
    let mut state = swarm();
    apply(&mut state, 2, Batch::new().create(node("w1", "wrk1", NodeRole::Worker))).0.unwrap();
    let w1 = state.nodes.get("w1").unwrap().clone();
    assert_eq!((w1.meta.version.index, w1.meta.created_at.as_str()), (2, AT));

    let mut drained = Node::clone(&w1);
    drained.spec = NodeSpec { availability: NodeAvailability::Drain, ..Default::default() };
    let (ok, events) = apply(&mut state, 3, Batch::new().update(drained.clone(), 2));
    assert_eq!(ok, Ok(Applied { version: 3 }));
    let event = &events[0];
    assert_eq!((event.index, event.action, event.kind(), event.id()), (3, Action::Update, Kind::Node, "w1"));
    assert_eq!(event.old.as_ref().and_then(|o| o.as_node()).map(|n| n.meta.version.index), Some(2));

    let (stale, events) = apply(&mut state, 4, Batch::new().update(drained, 2));
    assert_eq!(stale, Err(CommandError::OutOfSequence));
    assert!(events.is_empty());
    assert_eq!(state.nodes.get("w1").unwrap().meta.version.index, 3, "a refused command changes nothing");
}

#[test]
fn a_batch_that_fails_half_way_changes_nothing() {
    let mut state = swarm();
    let before = state.clone();
    // Three tasks go in, then a duplicate ID refuses the batch: none of them may stay.
    let batch = Batch::new().create(task("t1", "s1", 1)).create(task("t2", "s1", 2)).create(task("t3", "s1", 3));
    let batch = batch.delete(Kind::Node, "nope", None);
    let (result, events) = apply(&mut state, 2, batch);
    assert!(matches!(result, Err(CommandError::NotFound { .. })));
    assert!(events.is_empty());
    assert_eq!(state, before);
    assert_eq!(state.tasks.count(Index::Service, "s1"), 0, "no index entry survives the roll-back");

    // An update and a delete roll back too, removed_nodes included.
    apply(&mut state, 3, Batch::new().create(node("w1", "wrk1", NodeRole::Worker))).0.unwrap();
    let before = state.clone();
    let mut renamed = Node::clone(state.nodes.get("w1").unwrap());
    renamed.spec.annotations.labels.insert("k".into(), "v".into());
    let batch = Batch::new().update(renamed, 3).delete(Kind::Node, "w1", None).create(task("t1", "s1", 1));
    let batch = batch.create(task("t1", "s1", 1));
    assert!(matches!(apply(&mut state, 4, batch).0, Err(CommandError::Conflict(_))));
    assert_eq!(state, before);
    assert!(!state.removed_nodes.contains("w1"));
}

#[test]
fn a_thousand_tasks_are_one_entry_with_one_event_each() {
    let mut state = swarm();
    let mut batch = Batch::new();
    for i in 1..=1000 {
        batch = batch.create(task(&format!("t{i}"), "web", i));
    }
    let (result, events) = apply(&mut state, 2, batch);
    assert_eq!(result, Ok(Applied { version: 2 }));
    assert_eq!(events.len(), 1000);
    assert!(events.iter().all(|e| e.index == 2 && e.action == Action::Create));
    assert_eq!(state.tasks.count(Index::Service, "web"), 1000);
    assert_eq!(state.tasks.find(Index::Slot, "web/500").next().unwrap().id, "t500");
}

#[test]
fn hostnames_are_unique_but_a_batch_may_replace_a_node() {
    let mut state = swarm();
    let dup = apply(&mut state, 2, Batch::new().create(node("x", "mgr1", NodeRole::Worker)));
    assert!(matches!(dup.0, Err(CommandError::Conflict(_))));
    assert!(state.nodes.get("x").is_none());

    let mut gone = node("w1", "wrk1", NodeRole::Worker);
    gone.status.state = NodeState::Down;
    apply(&mut state, 2, Batch::new().create(gone)).0.unwrap();
    // The join of a machine whose old entry is down: delete it and add the new one at once.
    let rejoin = Batch::new().delete(Kind::Node, "w1", Some(2)).create(node("w2", "wrk1", NodeRole::Worker));
    apply(&mut state, 3, rejoin).0.unwrap();
    assert!(state.nodes.get("w2").is_some() && state.nodes.get("w1").is_none());
    assert!(state.removed_nodes.contains("w1"), "the replaced node's certificate stops working");
    let again = apply(&mut state, 4, Batch::new().create(node("w1", "wrk9", NodeRole::Worker)));
    assert!(matches!(again.0, Err(CommandError::Conflict(_))), "a removed ID never comes back");
}

#[test]
fn the_last_manager_cannot_be_demoted_or_removed() {
    let mut state = swarm();
    let mut demoted = Node::clone(state.nodes.get("m1").unwrap());
    demoted.spec.role = NodeRole::Worker;
    let refused = apply(&mut state, 2, Batch::new().update(demoted, 1));
    assert!(matches!(refused.0, Err(CommandError::FailedPrecondition(_))));
    let removed = apply(&mut state, 2, Batch::new().delete(Kind::Node, "m1", None));
    assert!(matches!(removed.0, Err(CommandError::FailedPrecondition(_))));
    assert_eq!(state.managers().count(), 1);
}

#[test]
fn the_cluster_is_a_singleton_and_service_names_are_unique() {
    let mut state = swarm();
    let second =
        Cluster { info: shoal_api::swarm::ClusterInfo { id: "c2".into(), ..Default::default() }, ..Default::default() };
    assert!(matches!(apply(&mut state, 2, Batch::new().create(second)).0, Err(CommandError::Conflict(_))));
    assert!(matches!(
        apply(&mut state, 2, Batch::new().delete(Kind::Cluster, "c1", None)).0,
        Err(CommandError::FailedPrecondition(_))
    ));

    let service = |id: &str, name: &str| {
        let mut s = Service { id: id.into(), ..Default::default() };
        s.spec.annotations.name = name.into();
        s
    };
    apply(&mut state, 2, Batch::new().create(service("s1", "web"))).0.unwrap();
    let clash = apply(&mut state, 3, Batch::new().create(service("s2", "web")));
    assert_eq!(clash.0, Err(CommandError::Conflict("service web already exists".into())));
    assert_eq!(state.services.resolve("web").unwrap().id, "s1");
}

#[test]
fn a_newer_format_is_refused_without_a_change() {
    let mut state = swarm();
    let before = state.clone();
    let command =
        Command { format: crate::command::FORMAT + 1, at: AT.into(), body: Body::Unsupported(serde_json::json!({})) };
    match state.apply(2, command) {
        Outcome::Applied(Err(CommandError::UnsupportedFormat(f)), events) => {
            assert_eq!(f, crate::command::FORMAT + 1);
            assert!(events.is_empty());
        }
        _ => panic!("an unknown format must be refused"),
    }
    assert_eq!(state, before);
}

#[test]
fn a_restore_gives_every_object_the_restore_entry_as_version() {
    let mut old = swarm();
    assert!(apply(&mut old, 40, Batch::new().create(task("t1", "s1", 1))).0.is_ok());
    let mut state = ClusterState::default();
    assert!(matches!(state.apply(3, Command::restore(AT.into(), old)), Outcome::Replaced));
    // A writer holding version 40 from the old cluster must not match once the new log
    // reaches index 40 again.
    assert_eq!(state.version_of(Kind::Task, "t1"), Some(3));
    assert_eq!(state.version_of(Kind::Node, "m1"), Some(3));
}

#[test]
fn the_leader_admits_only_commands_it_can_apply() {
    let mut command = Command::batch(AT.into(), Batch::new().create(task("t", "s", 1)).0);
    assert_eq!(command.admissible(), Ok(()));
    command.format = crate::command::FORMAT + 1;
    assert_eq!(command.admissible(), Err(CommandError::UnsupportedFormat(crate::command::FORMAT + 1)));
    let too_many = (0..=crate::command::MAX_BATCH).map(|i| Mutation::Create(task(&i.to_string(), "s", 1).into()));
    let command = Command::batch(AT.into(), too_many.collect());
    assert!(matches!(command.admissible(), Err(CommandError::Invalid(m)) if m.contains("at most 5000")));
    let heavy = Task {
        id: "x".into(),
        annotations: shoal_api::swarm::Annotations { name: "x".repeat(1 << 20), ..Default::default() },
        ..Default::default()
    };
    let heavy = (0..100).map(|i| Mutation::Create(Task { id: i.to_string(), ..heavy.clone() }.into()));
    let command = Command::batch(AT.into(), heavy.collect());
    assert!(matches!(command.admissible(), Err(CommandError::Invalid(m)) if m.contains("weigh at most")));
}
