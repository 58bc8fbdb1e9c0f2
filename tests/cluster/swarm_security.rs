//! Security of the control plane: autolock, and everything the cluster port must refuse —
//! bad or rotated tokens, plain TCP, another CA's certificate, a worker calling raft, a
//! removed node's certificate.

use std::{path::Path, process::Command, time::Duration};

use shoal_api::{info::Info, swarm::Swarm};
use shoal_lab::Lab;
use shoal_tests::{docker, docker_err, docker_ok, docker_with_stdin, eventually, lab, node_ls, NodeRow};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn autolock_keeps_a_restarted_manager_locked_until_unlocked() {
    let lab = lab("e2elock", 3, 0);
    docker_ok(&lab, "mgr1", &["node", "update", "--label-add", "canary=plaintext-canary-label", "mgr1"]);
    let out = docker_ok(&lab, "mgr1", &["swarm", "update", "--autolock=true"]);
    let key = out
        .split_whitespace()
        .find(|w| w.starts_with("SWMKEY-1-"))
        .unwrap_or_else(|| panic!("no key in {out}"))
        .to_owned();
    let dek = lab.host("mgr2").unwrap().data_root.join("swarm/dek.json");
    eventually("mgr2 to wrap its data key", Duration::from_secs(20), || {
        std::fs::read_to_string(&dek).ok().filter(|t| t.contains("\"wrapped\": true"))
    });

    lab.stop("mgr2").unwrap();
    lab.start("mgr2").unwrap();
    let info: Info = lab.host("mgr2").unwrap().api().get("/info").unwrap().json().unwrap();
    assert_eq!(info.swarm.local_node_state.as_str(), "locked");
    let refused = docker_err(&lab, "mgr2", &["node", "ls"]);
    assert!(refused.contains("Swarm is encrypted and needs to be unlocked before it can be used"), "{refused}");
    let raft_db = std::fs::read(lab.host("mgr2").unwrap().data_root.join("swarm/raft/raft.db")).unwrap();
    assert!(!contains(&raft_db, b"plaintext-canary-label"), "a label is readable in the raft store on disk");
    eventually("the others to see mgr2 down", Duration::from_secs(40), || {
        node_ls(&lab, "mgr1")?.into_iter().find(|r| r.hostname == "mgr2" && r.manager_status == "Unreachable")
    });

    let wrong =
        docker_with_stdin(&lab, "mgr2", &["swarm", "unlock"], "SWMKEY-1-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n");
    assert!(!wrong.status.success(), "a wrong key unlocked the swarm");
    let unlocked = docker_with_stdin(&lab, "mgr2", &["swarm", "unlock"], &format!("{key}\n"));
    assert!(unlocked.status.success(), "{}", String::from_utf8_lossy(&unlocked.stderr));
    assert!(docker(&lab, "mgr2", &["node", "ls"]).status.success());
    eventually("mgr2 ready and reachable again", Duration::from_secs(30), || {
        node_ls(&lab, "mgr1")?
            .into_iter()
            .find(|r| r.hostname == "mgr2" && r.status == "Ready" && r.manager_status == "Reachable")
    });
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_cluster_port_refuses_what_it_must() {
    let lab = lab("e2erefuse", 1, 2);
    let manager = "10.77.1.1:2377";

    // Tokens: a made-up secret, a rotated token, then the current one.
    docker_ok(&lab, "wrk2", &["swarm", "leave"]);
    let old = docker_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "worker"]).trim().to_owned();
    let (digest, _) = old.rsplit_once('-').unwrap();
    let forged = format!("{digest}-{}", "0".repeat(25));
    let err = docker_err(&lab, "wrk2", &["swarm", "join", "--token", &forged, manager]);
    assert!(err.contains("valid join token"), "{err}");
    docker_ok(&lab, "mgr1", &["swarm", "join-token", "--rotate", "worker"]);
    let err = docker_err(&lab, "wrk2", &["swarm", "join", "--token", &old, manager]);
    assert!(err.contains("valid join token"), "a rotated token was accepted: {err}");
    let current = docker_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "worker"]).trim().to_owned();
    assert_ne!(current, old);
    let joined = docker_ok(&lab, "wrk2", &["swarm", "join", "--token", &current, manager]);
    assert!(joined.contains("This node joined a swarm as a worker."), "{joined}");

    // Plain TCP gets no HTTP answer.
    let plain = curl(&lab, "wrk1", &["http://10.77.1.1:2377/heartbeat"]);
    assert!(!plain.0.starts_with('2') && !plain.0.starts_with('4'), "plain HTTP answered: {plain:?}");

    // A certificate from another CA does not get through the handshake.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=intruder/OU=swarm-manager/O=other"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success());
    let wrk1 = certs(&lab, "wrk1");
    let foreign = curl(&lab, "wrk1", &tls_args(&wrk1.root, &cert, &key, "raft/vote"));
    assert_eq!(foreign.0, "000", "a foreign certificate got an HTTP answer: {foreign:?}");

    // A worker's certificate cannot call a manager-only endpoint.
    let worker = curl(&lab, "wrk1", &tls_args(&wrk1.root, &wrk1.cert, &wrk1.key, "raft/vote"));
    assert_eq!(worker.0, "403", "{worker:?}");
    let beat = curl(&lab, "wrk1", &tls_args(&wrk1.root, &wrk1.cert, &wrk1.key, "heartbeat"));
    assert_eq!(beat.0, "200", "a member's heartbeat should pass: {beat:?}");

    // Once removed, its certificate is refused though it has not expired.
    let id = docker_ok(&lab, "mgr1", &["node", "inspect", "wrk1", "--format", "{{.ID}}"]).trim().to_owned();
    docker_ok(&lab, "mgr1", &["node", "rm", "--force", &id]);
    let removed = curl(&lab, "wrk1", &tls_args(&wrk1.root, &wrk1.cert, &wrk1.key, "heartbeat"));
    assert_eq!(removed.0, "403", "{removed:?}");
}

struct Certs {
    root: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn certs(lab: &Lab, host: &str) -> Certs {
    let dir = lab.host(host).unwrap().data_root.join("swarm/certs");
    Certs { root: dir.join("root.crt"), cert: dir.join("node.crt"), key: dir.join("node.key") }
}

/// curl arguments for a POST to the manager's cluster port over mutual TLS, dialled by
/// address but verified as `swarm-manager`, as nodes do.
fn tls_args(root: &Path, cert: &Path, key: &Path, path: &str) -> Vec<String> {
    vec![
        "--cacert".into(),
        root.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--resolve".into(),
        "swarm-manager:2377:10.77.1.1".into(),
        "-H".into(),
        "content-type: application/json".into(),
        "-d".into(),
        r#"{"addr":"10.77.2.1","description":null}"#.into(),
        format!("https://swarm-manager:2377/{path}"),
    ]
}

/// Runs curl inside `host`; returns the HTTP status curl saw ("000" for none) and stderr.
fn curl<S: AsRef<str>>(lab: &Lab, host: &str, args: &[S]) -> (String, String) {
    let mut argv: Vec<String> =
        // HTTP/1.1: curl 7.88 reports an early answer on HTTP/2 (a 403 sent before the
        // request body is read, then RST_STREAM NO_ERROR) as a stream error.
        ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"].map(String::from).to_vec();
    argv.extend(args.iter().map(|a| a.as_ref().to_owned()));
    let out = lab.command(host, &argv).unwrap().output().unwrap();
    (String::from_utf8_lossy(&out.stdout).trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A `swarm join` whose answer was lost is tried again with the same request ID: the retry
/// gets the node the first try made (same ID, a certificate for its key), so no ghost node
/// holds the hostname; another request for that hostname is refused while it is live.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_retried_join_makes_one_node() {
    let lab = lab("e2ejoinretry", 1, 0);
    let token = docker_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "worker"]).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let (key, csr) = (dir.path().join("k.pem"), dir.path().join("csr.pem"));
    let made = Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=ghost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let description = shoal_api::node::NodeDescription { hostname: "ghost".into(), ..Default::default() };
    let join = |request_id: &str| -> (String, serde_json::Value) {
        let body = serde_json::json!({
            "token": token,
            "csr_pem": std::fs::read_to_string(&csr).unwrap(),
            "advertise_addr": "10.77.9.9",
            "listen_addr": "0.0.0.0:2377",
            "availability": "active",
            "description": description,
            "request_id": request_id,
        });
        let root = certs(&lab, "mgr1").root;
        let argv: Vec<String> = ["curl", "-sS", "--http1.1", "--max-time", "10", "-w", "\n%{http_code}"]
            .into_iter()
            .map(String::from)
            .chain([
                "--cacert".into(),
                root.display().to_string(),
                "--resolve".into(),
                "swarm-manager:2377:10.77.1.1".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                body.to_string(),
                "https://swarm-manager:2377/join".into(),
            ])
            .collect();
        let out = lab.command("mgr1", &argv).unwrap().output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (reply, status) = text.rsplit_once('\n').unwrap();
        (status.to_owned(), serde_json::from_str(reply).unwrap_or_default())
    };
    let (status, first) = join("request-one");
    assert_eq!(status, "200", "{first}");
    let (status, again) = join("request-one");
    assert_eq!(status, "200", "the retry was refused: {again}");
    assert_eq!(first["node_id"], again["node_id"], "the retry made another node");
    let ghosts = docker_ok(&lab, "mgr1", &["node", "ls", "--filter", "name=ghost", "-q"]);
    assert_eq!(ghosts.lines().count(), 1, "{ghosts}");
    let (status, other) = join("request-two");
    assert_eq!(status, "409", "a second live node took the hostname: {other}");
}

/// `docker swarm ca --rotate`, as Docker does it: a new root; every node's certificate
/// reissued by it while old and new are both trusted (the CLI's progress waits for all);
/// then the new root alone and new join tokens. Raft between the managers and the workers'
/// heartbeats go on throughout, a manager restarted afterwards comes back with its new
/// certificate, tokens pinning the old root are refused and the new ones join. Then again
/// with the operator's own root (`--ca-cert/--ca-key`), which must be a CA with its key.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn ca_rotate_reissues_every_certificate_and_keeps_the_cluster_working() {
    let lab = lab("e2ecarot", 3, 2);
    let manager = "10.77.1.1:2377";
    let before: Swarm = lab.host("mgr1").unwrap().api().get("/swarm").unwrap().json().unwrap();
    // A node that is gone holds a rotation up (it could not come back after), so wrk2 leaves
    // and is removed; it joins again afterwards.
    docker_ok(&lab, "wrk2", &["swarm", "leave"]);
    eventually("wrk2 down", Duration::from_secs(20), || {
        node_ls(&lab, "mgr1")?.into_iter().find(|r| r.hostname == "wrk2" && r.status == "Down")
    });
    docker_ok(&lab, "mgr1", &["node", "rm", "wrk2"]);

    // From a follower: the update is forwarded to the leader.
    let printed = rotate(&lab, "mgr2", &[]);
    let after = converged(&lab);
    assert_ne!(after.cluster.tls_info.trust_root, before.cluster.tls_info.trust_root);
    assert!(printed.contains(after.cluster.tls_info.trust_root.trim()), "the CLI prints the new root: {printed}");
    assert_ne!(after.join_tokens.worker, before.join_tokens.worker);
    assert_ne!(after.join_tokens.manager, before.join_tokens.manager);

    // The cluster still works: writes through each manager, the workers heartbeating.
    for host in ["mgr1", "mgr2", "mgr3"] {
        docker_ok(&lab, host, &["node", "update", "--label-add", &format!("after-rotation={host}"), "wrk1"]);
    }
    lab.stop("mgr1").unwrap();
    lab.start("mgr1").unwrap();
    eventually("every node ready and every manager reachable", Duration::from_secs(40), || {
        let rows = node_ls(&lab, "mgr1")?;
        let manager_ok =
            |r: &NodeRow| r.hostname.starts_with("wrk") || ["Leader", "Reachable"].contains(&&*r.manager_status);
        (rows.len() == 4 && rows.iter().all(|r| r.status == "Ready" && manager_ok(r))).then_some(())
    });
    let err = docker_err(&lab, "wrk2", &["swarm", "join", "--token", &before.join_tokens.worker, manager]);
    assert!(err.contains("root CA does not match the join token"), "a token pinning the old root: {err}");
    let joined = docker_ok(&lab, "wrk2", &["swarm", "join", "--token", &after.join_tokens.worker, manager]);
    assert!(joined.contains("This node joined a swarm as a worker."), "{joined}");

    // The operator's root: refused whole unless it is a CA with its own key.
    let dir = tempfile::tempdir().unwrap();
    let (ours, other) = (shoal_ca::RootCa::generate().unwrap(), shoal_ca::RootCa::generate().unwrap());
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (cert, key, wrong_key) =
        (file("ca.pem", ours.cert_pem()), file("ca-key.pem", &ours.key_pem()), file("other.pem", &other.key_pem()));
    let out = lab
        .command("mgr1", &argv(&["docker", "swarm", "ca", "--rotate", "--ca-cert", &cert, "--ca-key", &wrong_key]))
        .unwrap()
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the key does not belong to the certificate"));
    let unchanged: Swarm = lab.host("mgr1").unwrap().api().get("/swarm").unwrap().json().unwrap();
    assert!(!unchanged.cluster.root_rotation_in_progress && unchanged.cluster.tls_info == after.cluster.tls_info);
    rotate(&lab, "mgr1", &["--ca-cert", &cert, "--ca-key", &key]);
    let operator = converged(&lab);
    assert_eq!(operator.cluster.tls_info.trust_root, ours.cert_pem());
}

/// `docker swarm ca --rotate ARGS` on `host`, within two minutes; its stdout.
fn rotate(lab: &Lab, host: &str, args: &[&str]) -> String {
    let line = [&["timeout", "120", "docker", "swarm", "ca", "--rotate"], args].concat();
    let out = lab.command(host, &argv(&line)).unwrap().output().unwrap();
    assert!(
        out.status.success(),
        "swarm ca --rotate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The swarm once its root rotation is done, checked against every node's own report: each
/// trusts the new root alone and holds a certificate it issued.
fn converged(lab: &Lab) -> Swarm {
    let swarm: Swarm = lab.host("mgr1").unwrap().api().get("/swarm").unwrap().json().unwrap();
    assert!(!swarm.cluster.root_rotation_in_progress);
    let nodes: Vec<shoal_api::node::Node> = lab.host("mgr1").unwrap().api().get("/nodes").unwrap().json().unwrap();
    for node in nodes {
        assert_eq!(node.description.tls_info, swarm.cluster.tls_info, "{}", node.description.hostname);
    }
    swarm
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}
