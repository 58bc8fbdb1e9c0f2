//! The store at scale, for `cargo xtask bench control`: three managers in this process on
//! loopback (real raft over mutual TLS, real fsyncs), 1,000 nodes and 100,000 tasks written
//! in transactions through the leader, then a snapshot built and a fourth manager joining
//! and catching up from it; event latency from commit to a follower's watcher. Prints one
//! JSON object of figures on stdout.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use shoal_api::{
    node::{Node, NodeRole},
    task::{Task, TaskState},
};
use shoal_ca::{tls::TlsMaterial, DataKey, NodeIdentity, NodeKey, RootCa};
use shoal_store::{network, transport, Batch, ClusterStore, Filter, Kind, RaftPeer, StoreConfig};
use tokio::net::TcpListener;

const NODES: usize = 1_000;
const TASKS: usize = 100_000;
const BATCH: usize = 2_500;
const EVENT_SAMPLES: usize = 200;

struct Manager {
    store: Arc<ClusterStore>,
    peer: RaftPeer,
    /// Removed when the manager goes.
    _dir: tempfile::TempDir,
}

async fn manager(root: &RootCa, n: u64) -> Manager {
    let key = NodeKey::generate().unwrap();
    let identity = NodeIdentity { node_id: format!("node{n}"), role: NodeRole::Manager, cluster_id: "bench".into() };
    let material = TlsMaterial {
        root_pem: root.cert_pem().to_owned(),
        cert_pem: root.issue(&key.csr_pem().unwrap(), &identity, Duration::from_secs(3600)).unwrap(),
        key_pem: key.to_pem().to_string(),
    };
    // On disk like a manager's data root (not tmpfs): fsyncs cost what they cost.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = ClusterStore::open(StoreConfig {
        dir: dir.path().join("raft"),
        data_key: DataKey::generate().unwrap(),
        raft_id: n,
        client: transport::client(&material).unwrap(),
        generation: "bench".into(),
    })
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = shoal_ca::tls::server_config(&material).unwrap();
    tokio::spawn(transport::serve(
        listener,
        move || tls.clone(),
        network::routes(store.clone()),
        std::future::pending(),
    ));
    Manager { store, peer: RaftPeer { node_id: identity.node_id, addr }, _dir: dir }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = RootCa::generate().unwrap();
    let managers = [manager(&root, 1).await, manager(&root, 2).await, manager(&root, 3).await];
    managers[0].store.bootstrap(managers[0].peer.clone()).await.unwrap();
    for m in &managers[1..] {
        managers[0].store.add_manager(m.store.raft_id(), m.peer.clone()).await.unwrap();
    }
    let leader = &managers[0].store;

    // Writes: nodes, then tasks, in transactions.
    let started = Instant::now();
    let mut objects = 0;
    for chunk in (0..NODES).collect::<Vec<_>>().chunks(BATCH) {
        let mut batch = Batch::new();
        for i in chunk {
            let mut node = Node { id: format!("n{i:05}"), ..Default::default() };
            node.description.hostname = format!("host{i:05}");
            node.spec.annotations.labels = HashMap::from([("zone".into(), format!("z{}", i % 3))]);
            batch = batch.create(node);
        }
        objects += batch.len();
        leader.write(batch).await.unwrap();
    }
    for chunk in (0..TASKS).collect::<Vec<_>>().chunks(BATCH) {
        let mut batch = Batch::new();
        for i in chunk {
            let mut task = Task {
                id: format!("t{i:07}"),
                service_id: format!("s{:03}", i % 500),
                slot: (i / 500) as u64 + 1,
                node_id: format!("n{:05}", i % NODES),
                desired_state: TaskState::Running,
                ..Default::default()
            };
            task.annotations.name = format!("svc{:03}.{}", i % 500, i / 500 + 1);
            batch = batch.create(task);
        }
        objects += batch.len();
        leader.write(batch).await.unwrap();
    }
    let write_secs = started.elapsed().as_secs_f64();

    // Event latency: commit on the leader -> a follower's watcher.
    let mut watcher = managers[2].store.shared().watch(Filter::kinds(&[Kind::Node]));
    let mut latencies = Vec::new();
    for i in 0..EVENT_SAMPLES {
        let node = managers[0].store.shared().read(|s| Node::clone(s.nodes.get("n00000").unwrap()));
        let version = node.meta.version.index;
        let mut next = node;
        next.spec.annotations.labels.insert("e".into(), i.to_string());
        let sent = Instant::now();
        let applied = leader.write(Batch::new().update(next, version)).await.unwrap();
        loop {
            let event = watcher.recv().await.unwrap();
            if event.index >= applied.version {
                break;
            }
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);

    // Snapshot: built on the leader, then a new manager catches up from it.
    let started = Instant::now();
    leader.raft().trigger().snapshot().await.unwrap();
    let mut metrics = leader.raft().metrics();
    while metrics.borrow().snapshot.is_none_or(|s| s.index < leader.shared().last_applied()) {
        metrics.changed().await.unwrap();
    }
    let build_secs = started.elapsed().as_secs_f64();
    let snapshot_bytes = leader.snapshot_len().await.expect("a snapshot was built");
    // The log up to the snapshot goes, so a new manager must install the snapshot.
    leader.raft().trigger().purge_log(leader.shared().last_applied()).await.unwrap();
    let fourth = manager(&root, 4).await;
    let started = Instant::now();
    leader.add_manager(fourth.store.raft_id(), fourth.peer.clone()).await.unwrap();
    let target = leader.shared().last_applied();
    while fourth.store.shared().last_applied() < target {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let join_secs = started.elapsed().as_secs_f64();
    let tasks_on_fourth = fourth.store.shared().read(|s| s.tasks.len());
    assert_eq!(tasks_on_fourth, TASKS, "the new manager caught up");

    println!(
        "{}",
        json!({
            "nodes": NODES, "tasks": TASKS, "batch": BATCH,
            "objects_per_sec": objects as f64 / write_secs,
            "write_secs": write_secs,
            "event_p50_ms": percentile(&latencies, 0.5), "event_p99_ms": percentile(&latencies, 0.99),
            "snapshot_build_secs": build_secs,
            "snapshot_bytes": snapshot_bytes,
            "snapshot_build_mb_per_sec": snapshot_bytes as f64 / 1e6 / build_secs,
            "join_mb_per_sec": snapshot_bytes as f64 / 1e6 / join_secs,
            "join_catch_up_secs": join_secs,
            "peak_rss_kib_four_managers": rss_kib(),
        })
    );
    for m in managers.iter().chain(std::iter::once(&fourth)) {
        m.store.shutdown().await;
    }
}
