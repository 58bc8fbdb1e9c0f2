//! The store at scale, for `cargo xtask bench control`: three managers, each a process of
//! its own on loopback (real raft over mutual TLS, real fsyncs), 1,000 nodes and 100,000
//! tasks written in transactions through the leader (this process), then a snapshot built
//! and a fourth manager joining and catching up from it; event latency from a commit on
//! the leader to a follower's watcher; the peak RSS of each manager. Prints one JSON object
//! of figures on stdout.
//!
//! The other managers are this program run again as `scale replica <raft id> <dir>`: they
//! print `addr <address>` once they serve, then `applied <index> <tasks>` as they apply and
//! `event <index> <unix ns>` for every node event their watcher sees, and stop when their
//! stdin closes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use shoal_api::{
    node::{Node, NodeRole},
    task::{Task, TaskState},
};
use shoal_ca::{tls::TlsMaterial, DataKey, NodeIdentity, NodeKey, RootCa};
use shoal_store::{network, transport, Batch, ClusterStore, Filter, Kind, RaftPeer, StoreConfig, WatchError};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
    sync::mpsc,
};

const NODES: usize = 1_000;
const TASKS: usize = 100_000;
const BATCH: usize = 2_500;
const EVENT_SAMPLES: usize = 200;

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Peak RSS of process `pid` (`self` for this one), in KiB.
fn peak_rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Writes manager `n`'s certificate and key, issued by `root`, under `dir`.
fn issue(root: &RootCa, dir: &Path, n: u64) -> TlsMaterial {
    let key = NodeKey::generate().unwrap();
    let identity = NodeIdentity { node_id: format!("node{n}"), role: NodeRole::Manager, cluster_id: "bench".into() };
    let material = TlsMaterial {
        root_pem: root.cert_pem().to_owned(),
        cert_pem: root.issue(&key.csr_pem().unwrap(), &identity, Duration::from_secs(3600)).unwrap(),
        key_pem: key.to_pem().to_string(),
    };
    std::fs::write(dir.join(format!("node{n}.root")), &material.root_pem).unwrap();
    std::fs::write(dir.join(format!("node{n}.crt")), &material.cert_pem).unwrap();
    std::fs::write(dir.join(format!("node{n}.key")), &material.key_pem).unwrap();
    material
}

/// Opens manager `n`'s store under `dir` and serves its raft port.
async fn serve(dir: &Path, n: u64) -> (Arc<ClusterStore>, RaftPeer) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("node{n}.{ext}"))).unwrap();
    let material = TlsMaterial { root_pem: read("root"), cert_pem: read("crt"), key_pem: read("key") };
    let store = ClusterStore::open(StoreConfig {
        dir: dir.join(format!("node{n}")).join("raft"),
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
    (store, RaftPeer { node_id: format!("node{n}"), addr })
}

/// A manager in a process of its own (see the module's doc).
async fn replica(n: u64, dir: PathBuf) {
    let (store, peer) = serve(&dir, n).await;
    println!("addr {}", peer.addr);
    let shared = store.shared().clone();
    tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut watcher = shared.watch(Filter::kinds(&[Kind::Node]));
            loop {
                match watcher.recv().await {
                    Ok(event) => println!("event {} {}", event.index, unix_nanos()),
                    Err(WatchError::Resync) => watcher = shared.watch(Filter::kinds(&[Kind::Node])),
                    Err(_) => return,
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut reported = u64::MAX;
        loop {
            let applied = shared.last_applied();
            if applied != reported {
                reported = applied;
                println!("applied {applied} {}", shared.read(|s| s.tasks.len()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    // Until the benchmark closes our stdin.
    let _ = tokio::io::stdin().read_to_end(&mut Vec::new()).await;
    store.shutdown().await;
}

/// What a replica process reports.
enum Report {
    Applied { index: u64, tasks: usize },
    Event { index: u64, at_nanos: u128 },
}

struct Replica {
    child: Child,
    peer: RaftPeer,
    reports: mpsc::UnboundedReceiver<Report>,
}

impl Replica {
    async fn spawn(root: &RootCa, dir: &Path, n: u64) -> Replica {
        issue(root, dir, n);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["replica", &n.to_string()])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next_line().await.unwrap().expect("the replica serves");
        let addr = first.strip_prefix("addr ").expect("the replica's address").to_owned();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let fields: Vec<&str> = line.split(' ').collect();
                let report = match fields.as_slice() {
                    ["applied", index, tasks] => {
                        Report::Applied { index: index.parse().unwrap(), tasks: tasks.parse().unwrap() }
                    }
                    ["event", index, at] => {
                        Report::Event { index: index.parse().unwrap(), at_nanos: at.parse().unwrap() }
                    }
                    _ => continue,
                };
                if tx.send(report).is_err() {
                    return;
                }
            }
        });
        Replica { child, peer: RaftPeer { node_id: format!("node{n}"), addr }, reports }
    }

    fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(&self.child.id().expect("running").to_string())
    }

    /// Waits until this replica has applied `index` and holds `tasks` tasks.
    async fn caught_up(&mut self, index: u64, tasks: usize) {
        while let Some(report) = self.reports.recv().await {
            if matches!(report, Report::Applied { index: i, tasks: t } if i >= index && t == tasks) {
                return;
            }
        }
        panic!("the replica stopped before catching up");
    }

    /// When this replica's watcher saw the event of `index` or later, in unix ns.
    async fn saw(&mut self, index: u64) -> u128 {
        while let Some(report) = self.reports.recv().await {
            if let Report::Event { index: i, at_nanos } = report {
                if i >= index {
                    return at_nanos;
                }
            }
        }
        panic!("the replica stopped before seeing the event");
    }

    /// Closes its stdin and waits for it to stop.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Quiet unless RUST_LOG asks (openraft logs every retried append as an error).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, n, dir] = args.as_slice() {
        assert_eq!(mode, "replica", "usage: scale [replica <raft id> <dir>]");
        return replica(n.parse().unwrap(), dir.into()).await;
    }

    // On disk like a manager's data root (not tmpfs): fsyncs cost what they cost.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = RootCa::generate().unwrap();
    issue(&root, dir.path(), 1);
    let (leader, leader_peer) = serve(dir.path(), 1).await;
    let mut followers = [Replica::spawn(&root, dir.path(), 2).await, Replica::spawn(&root, dir.path(), 3).await];
    leader.bootstrap(leader_peer).await.unwrap();
    for f in &followers {
        let id = f.peer.node_id.trim_start_matches("node").parse().unwrap();
        leader.add_manager(id, f.peer.clone()).await.unwrap();
    }

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
    let written = leader.shared().last_applied();
    for f in &mut followers {
        f.caught_up(written, TASKS).await;
    }

    // Event latency: commit on the leader -> a follower's watcher (another process; one
    // clock on one machine).
    let watching = &mut followers[1];
    let mut latencies = Vec::new();
    for i in 0..EVENT_SAMPLES {
        let node = leader.shared().read(|s| Node::clone(s.nodes.get("n00000").unwrap()));
        let version = node.meta.version.index;
        let mut next = node;
        next.spec.annotations.labels.insert("e".into(), i.to_string());
        let sent = unix_nanos();
        let applied = leader.write(Batch::new().update(next, version)).await.unwrap();
        let seen = watching.saw(applied.version).await;
        latencies.push(seen.saturating_sub(sent) as f64 / 1e6);
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
    let mut fourth = Replica::spawn(&root, dir.path(), 4).await;
    let started = Instant::now();
    leader.add_manager(4, fourth.peer.clone()).await.unwrap();
    fourth.caught_up(leader.shared().last_applied(), TASKS).await;
    let join_secs = started.elapsed().as_secs_f64();

    let rss = |kib: u64| kib / 1024;
    let figures = json!({
        "nodes": NODES, "tasks": TASKS, "batch": BATCH,
        "objects_per_sec": objects as f64 / write_secs,
        "write_secs": write_secs,
        "event_p50_ms": percentile(&latencies, 0.5), "event_p99_ms": percentile(&latencies, 0.99),
        "snapshot_build_secs": build_secs,
        "snapshot_bytes": snapshot_bytes,
        "snapshot_build_mb_per_sec": snapshot_bytes as f64 / 1e6 / build_secs,
        "join_mb_per_sec": snapshot_bytes as f64 / 1e6 / join_secs,
        "join_catch_up_secs": join_secs,
        "peak_rss_mib_leader": rss(peak_rss_kib("self")),
        "peak_rss_mib_followers": followers.iter().map(|f| rss(f.peak_rss_kib())).collect::<Vec<_>>(),
        "peak_rss_mib_joined": rss(fourth.peak_rss_kib()),
    });
    for f in followers.into_iter().chain(std::iter::once(fourth)) {
        f.stop().await;
    }
    leader.shutdown().await;
    println!("{figures}");
}
