//! Three managers on loopback, talking raft over mutual TLS: writes from any of them land on
//! all, survive losing the leader, and nothing readable reaches the disk.

use std::{collections::HashMap, sync::Arc, time::Duration};

use shoal_api::node::{Node, NodeRole, NodeSpec};
use shoal_ca::{tls::TlsMaterial, DataKey, NodeIdentity, NodeKey, RootCa};
use shoal_store::{network, transport, Batch, Cluster, ClusterStore, RaftPeer, StoreConfig, WriteError};
use tokio::{net::TcpListener, sync::oneshot};

const CLUSTER: &str = "testcluster";

struct Manager {
    store: Arc<ClusterStore>,
    peer: RaftPeer,
    stop_server: Option<oneshot::Sender<()>>,
    /// Dials the others with this manager's certificate.
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn manager(root: &RootCa, n: u64) -> Manager {
    let key = NodeKey::generate().unwrap();
    let identity = NodeIdentity { node_id: format!("node{n}"), role: NodeRole::Manager, cluster_id: CLUSTER.into() };
    let material = TlsMaterial {
        root_pem: root.cert_pem().to_owned(),
        cert_pem: root.issue(&key.csr_pem().unwrap(), &identity, Duration::from_secs(3600)).unwrap(),
        key_pem: key.to_pem().to_string(),
    };
    let dir = tempfile::tempdir().unwrap();
    let client = transport::client(&material).unwrap();
    let store = ClusterStore::open(StoreConfig {
        dir: dir.path().join("raft"),
        data_key: DataKey::generate().unwrap(),
        raft_id: n,
        client: client.clone(),
        generation: "g1".into(),
    })
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let tls = shoal_ca::tls::server_config(&material).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(transport::serve(listener, move || tls.clone(), network::routes(store.clone()), async {
        let _ = stopped.await;
    }));
    Manager { store, peer: RaftPeer { node_id: identity.node_id, addr }, stop_server: Some(stop), client, _dir: dir }
}

fn first_node() -> Node {
    let mut node = Node { id: "node1".into(), ..Default::default() };
    node.description.hostname = "mgr1".into();
    node.spec.role = NodeRole::Manager;
    node
}

/// node1 as `m` holds it now.
fn node1(m: &Manager) -> Node {
    m.store.shared().read(|s| Node::clone(s.nodes.get("node1").expect("node1 exists")))
}

/// A transaction relabelling `node` if it is still at the version it was read at.
fn relabel(node: &Node, key: &str, value: &str) -> Batch {
    let mut spec = NodeSpec { role: NodeRole::Manager, ..Default::default() };
    spec.annotations.labels = HashMap::from([(key.to_owned(), value.to_owned())]);
    let version = node.meta.version.index;
    Batch::new().update(Node { spec, ..node.clone() }, version)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_replicate_forward_and_survive_the_leader() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let root = RootCa::generate().unwrap();
    let mut managers = vec![manager(&root, 1).await, manager(&root, 2).await, manager(&root, 3).await];

    // Setup: one manager bootstraps the cluster, the other two join through it.
    managers[0].store.bootstrap(managers[0].peer.clone()).await.unwrap();
    let mut cluster = Cluster::default();
    cluster.info.id = CLUSTER.into();
    managers[0].store.write(Batch::new().create(cluster).create(first_node())).await.unwrap();
    for i in 1..3 {
        let (id, peer) = (managers[i].store.raft_id(), managers[i].peer.clone());
        managers[0].store.add_manager(id, peer).await.unwrap();
    }

    // Run: a follower writes; the write is forwarded to the leader and lands everywhere.
    let before = node1(&managers[0]);
    let applied = managers[2].store.write(relabel(&before, "zone", "secret-plaintext-label")).await.unwrap();
    for m in &managers {
        eventually("replication", || node1(m).meta.version.index == applied.version).await;
    }
    // A stale version is refused wherever it is sent.
    let stale = managers[1].store.write(relabel(&before, "a", "b")).await;
    assert!(matches!(stale, Err(WriteError::Refused(_))), "{stale:?}");

    // A manager may not speak for another member: node3's certificate asking for votes as
    // member 1 (node1) is refused, and the leader stays.
    let term = managers[0].store.metrics().current_term;
    let forged = openraft::raft::VoteRequest::new(openraft::Vote::new(term + 5, 1), None);
    let vote = |generation: &str| {
        managers[2]
            .client
            .post(format!("https://{}/raft/vote", managers[1].peer.addr))
            .header(network::GENERATION_HEADER, generation)
            .json(&forged)
    };
    // Another incarnation of the cluster is not heard at all.
    let other = vote("g0").send().await.unwrap();
    assert_eq!(other.status(), reqwest::StatusCode::FORBIDDEN);
    assert!(other.text().await.unwrap().contains("another incarnation"));
    let reply = vote("g1").send().await.unwrap();
    assert_eq!(reply.status(), reqwest::StatusCode::FORBIDDEN);
    assert!(reply.text().await.unwrap().contains("may not speak for raft member 1"));
    assert_eq!(managers[1].store.metrics().current_term, term, "a forged vote changed nothing");

    // Check: the data on disk is sealed.
    for m in &managers {
        let raw = std::fs::read(m._dir.path().join("raft/raft.db")).unwrap();
        assert!(!raw.windows(22).any(|w| w == b"secret-plaintext-label"), "plaintext on disk");
    }

    // Lose the leader: the others elect a new one and keep accepting writes.
    let leader = managers[0].store.metrics().current_leader.unwrap();
    let index = managers.iter().position(|m| m.store.raft_id() == leader).unwrap();
    let mut old = managers.remove(index);
    old.stop_server.take().unwrap().send(()).unwrap();
    old.store.shutdown().await;
    for m in &managers {
        m.store.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    }
    eventually("a new leader", || managers[0].store.metrics().current_leader.is_some_and(|l| l != leader)).await;
    managers[1].store.write(relabel(&node1(&managers[0]), "after", "failover")).await.unwrap();
    for m in &managers {
        eventually("replication after failover", || node1(m).spec.annotations.labels.contains_key("after")).await;
    }

    // Lose a second manager: one of three cannot reach a quorum and says so.
    let mut gone = managers.remove(0);
    gone.stop_server.take().unwrap().send(()).unwrap();
    gone.store.shutdown().await;
    let refused = managers[0].store.write(relabel(&node1(&managers[0]), "x", "y")).await;
    // A follower hears there is no leader; a leader that lost its quorum had proposed the
    // write, which another manager coming back could still commit: ambiguous, not refused.
    assert!(matches!(refused, Err(WriteError::NoLeader | WriteError::Ambiguous(_))), "{refused:?}");
    assert!(!node1(&managers[0]).spec.annotations.labels.contains_key("x"), "applied without a quorum");
    for m in managers {
        m.store.shutdown().await;
    }
}
