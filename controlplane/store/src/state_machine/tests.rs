//! The state machine: events reach watchers right after the view they started from, an
//! entry of an unknown format stops applying before it, and snapshots round-trip.

use openraft::{CommittedLeaderId, EntryPayload};
use shoal_api::{node::Node, task::Task};

use super::*;
use crate::{
    command::{Batch, Body, Command},
    objects::Kind,
    watch::{Filter, WatchError},
};

fn store() -> (tempfile::TempDir, StateMachineStore) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("raft.db"), shoal_ca::DataKey::generate().unwrap()).unwrap();
    (dir, StateMachineStore::open(Arc::new(db)).unwrap())
}

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

fn create_tasks(index: u64, ids: &[&str]) -> Entry<TypeConfig> {
    let mut batch = Batch::new();
    for id in ids {
        batch = batch.create(Task { id: (*id).into(), service_id: "web".into(), ..Default::default() });
    }
    entry(index, Command::batch("t".into(), batch.0))
}

#[tokio::test]
async fn view_and_watch_sees_each_change_once() {
    let (_dir, mut sm) = store();
    sm.apply([create_tasks(1, &["a", "b"])]).await.unwrap();
    let shared = sm.shared();
    let (seen, mut watcher) = shared.view_and_watch(Filter::kinds(&[Kind::Task]), |s| s.tasks.len());
    assert_eq!((seen, watcher.after()), (2, 1));
    sm.apply([
        create_tasks(2, &["c"]),
        entry(3, Command::batch("t".into(), Batch::new().create(Node { id: "n".into(), ..Default::default() }).0)),
    ])
    .await
    .unwrap();
    let event = watcher.recv().await.unwrap();
    assert_eq!((event.index, event.id()), (2, "c"), "the first event is the first change after the view");
    assert!(watcher.try_recv().is_none(), "the node event was filtered out");
}

#[tokio::test]
async fn an_unknown_command_format_stops_the_state_machine_before_it() {
    let (_dir, mut sm) = store();
    let newer =
        Command { format: crate::command::FORMAT + 1, at: "t".into(), body: Body::Unsupported(serde_json::json!({})) };
    let error = sm.apply([create_tasks(1, &["a"]), entry(2, newer), create_tasks(3, &["b"])]).await.unwrap_err();
    assert!(error.to_string().contains("command format 2"), "{error}");
    let (last, _) = sm.applied_state().await.unwrap();
    assert_eq!(last.map(|l| l.index), Some(1), "the unknown entry does not count as applied");
    assert_eq!(sm.shared().read(|s| s.tasks.len()), 1);
}

/// Builds a snapshot and returns it as a follower would receive it.
async fn built(sm: &mut StateMachineStore) -> Snapshot<TypeConfig> {
    let meta = sm.build_snapshot().await.unwrap().meta;
    let current = sm.get_current_snapshot().await.unwrap().expect("stored");
    assert_eq!(current.meta, meta);
    current
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snapshot-"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn snapshots_round_trip_and_tell_watchers_to_resync() {
    let (_dir, mut sm) = store();
    sm.apply([create_tasks(1, &["a", "b", "c"])]).await.unwrap();
    let snapshot = built(&mut sm).await;
    assert!(snapshot.snapshot.get_ref().starts_with(b"SHOALSNP"), "binary, not JSON");

    let (_dir2, mut other) = store();
    let mut watcher = other.shared().watch(Filter::all());
    other.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(other.shared().read(|s| s.tasks.count(crate::Index::Service, "web")), 3);
    assert_eq!(watcher.recv().await.unwrap_err(), WatchError::Resync);
    let current = other.get_current_snapshot().await.unwrap().expect("persisted");
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn the_snapshot_file_is_sealed_replaced_whole_and_read_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = shoal_ca::DataKey::generate().unwrap();
    let open =
        || StateMachineStore::open(Arc::new(Db::open(&dir.path().join("raft.db"), key.clone()).unwrap())).unwrap();
    let mut sm = open();
    sm.apply([create_tasks(1, &["visible-task-id"])]).await.unwrap();
    sm.build_snapshot().await.unwrap();
    sm.apply([create_tasks(2, &["b"])]).await.unwrap();
    sm.build_snapshot().await.unwrap();
    let files = snapshot_files(dir.path());
    assert_eq!(files.len(), 1, "the replaced snapshot's file is gone: {files:?}");
    let bytes = std::fs::read(dir.path().join(&files[0])).unwrap();
    assert!(!bytes.windows(15).any(|w| w == b"visible-task-id"), "sealed on disk");

    // A crash mid-write leaves a temporary file; the next start removes it.
    std::fs::write(dir.path().join("snapshot-dead.snap.tmp"), b"half").unwrap();
    drop(sm);
    let reopened = open();
    assert_eq!(snapshot_files(dir.path()), files);
    assert_eq!(reopened.shared().read(|s| s.tasks.len()), 2);
    assert_eq!(reopened.shared().last_applied(), 2);

    // Another node's key cannot read it.
    let other = Db::open(&dir.path().join("raft.db"), shoal_ca::DataKey::generate().unwrap());
    assert!(other.is_err() || StateMachineStore::open(Arc::new(other.unwrap())).is_err());
}

#[tokio::test]
async fn a_snapshot_built_from_an_older_state_never_replaces_a_newer_one() {
    let (_dir, mut sm) = store();
    sm.apply([create_tasks(1, &["a"])]).await.unwrap();
    let old = built(&mut sm).await;
    sm.apply([create_tasks(2, &["b"])]).await.unwrap();
    let new = built(&mut sm).await;
    // The older build lands last (openraft builds in a task of its own, racing installs).
    let (_dir2, mut other) = store();
    other.install_snapshot(&new.meta, new.snapshot).await.unwrap();
    other.install_snapshot(&old.meta, old.snapshot).await.unwrap();
    let current = other.get_current_snapshot().await.unwrap().expect("persisted");
    assert_eq!(current.meta.last_log_id, new.meta.last_log_id, "the newer snapshot stays on disk");
}
