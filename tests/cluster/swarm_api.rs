//! The Engine API for swarm objects under bad input, and through docker-py: Docker's status
//! codes and messages, and nothing changed.

use shoal_api::{node::Node, swarm::Swarm, ErrorResponse};
use shoal_tests::{docker_err, docker_ok, lab, plain_lab};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn bad_input_gets_dockers_status_and_changes_nothing() {
    let lab = lab("e2eswarmapi", 1, 1);
    let api = lab.host("mgr1").unwrap().api();
    let before: Node = api.get("/nodes/wrk1").unwrap().json().unwrap();
    let update = format!("/nodes/{}/update?version={}", before.id, before.meta.version.index);

    // (what, path, body, status, words of the message)
    type Case<'a> = (&'a str, String, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("malformed JSON", update.clone(), Some(b"{\"Role\":".to_vec()), 400, "invalid JSON"),
        ("unknown role", update.clone(), Some(br#"{"Role":"king"}"#.to_vec()), 400, "invalid JSON"),
        ("no version", format!("/nodes/{}/update", before.id), Some(b"{}".to_vec()), 400, "version"),
        ("unknown node", "/nodes/nosuchnode/update?version=1".into(), Some(b"{}".to_vec()), 404, "not found"),
        (
            "stale version",
            format!("/nodes/{}/update?version={}", before.id, before.meta.version.index - 1),
            Some(serde_json::to_vec(&before.spec).unwrap()),
            409,
            "update out of sequence",
        ),
        ("join when joined", "/swarm/join".into(), Some(b"{}".to_vec()), 503, "already part of a swarm"),
        ("unlock when unlocked", "/swarm/unlock".into(), Some(br#"{"UnlockKey":"x"}"#.to_vec()), 400, "not locked"),
        ("swarm update stale", "/swarm/update?version=1".into(), Some(b"{}".to_vec()), 409, "out of sequence"),
    ];
    for (what, path, body, status, message) in cases {
        let response = api.request("POST", &path, body.as_deref()).unwrap();
        assert_eq!(response.status, status, "{what}: {}", response.text());
        let error: ErrorResponse = response.json().unwrap_or_else(|_| panic!("{what}: not a Docker error body"));
        assert!(error.message.contains(message), "{what}: {:?}", error.message);
    }
    let missing = api.get("/nodes/nosuchnode").unwrap();
    assert_eq!(missing.status, 404);
    let after: Node = api.get("/nodes/wrk1").unwrap().json().unwrap();
    assert_eq!(after.meta.version, before.meta.version, "a refused request changed the node");
    assert_eq!(after.spec, before.spec);

    let worker = lab.host("wrk1").unwrap().api().get("/swarm").unwrap();
    assert_eq!(worker.status, 503, "{}", worker.text());
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn docker_py_reads_the_swarm_and_its_nodes() {
    let lab = lab("e2edockerpy", 1, 2);
    let host = lab.host("mgr1").unwrap();
    let swarm: Swarm = host.api().get("/swarm").unwrap().json().unwrap();
    let script = r#"
import sys, docker
c = docker.DockerClient(base_url=sys.argv[1])
nodes = c.nodes.list()
print(len(nodes))
print(sorted(n.attrs["Description"]["Hostname"] for n in nodes))
print(c.swarm.attrs["ID"])
print(c.info()["Swarm"]["LocalNodeState"])
managers = c.nodes.list(filters={"role": "manager"})
print(len(managers))
"#;
    let out = std::process::Command::new("python3").args(["-c", script, &host.docker_host()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["3", "['mgr1', 'wrk1', 'wrk2']", swarm.cluster.id.as_str(), "active", "1"]);
}

/// `docker swarm init` with the options users give it: refused whole (nothing created) when
/// one is wrong, and shown back by `docker info` / `GET /swarm` when right; `node ls`
/// filters as dockerd has them.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn swarm_init_takes_every_option_and_refuses_bad_ones_whole() {
    let lab = plain_lab("e2einit", 1, 0);
    // (The CLI masks a pool's host bits itself; the API refuses them.)
    let api = lab.host("mgr1").unwrap().api();
    let body = br#"{"ListenAddr":"0.0.0.0:2377","AdvertiseAddr":"eth0","DefaultAddrPool":["10.20.0.1/16"]}"#;
    let response = api.request("POST", "/swarm/init", Some(body)).unwrap();
    assert_eq!(response.status, 400, "{}", response.text());
    assert!(response.text().contains("host bits set"), "{}", response.text());
    let bad: [(&[&str], &str); 4] = [
        (&["--data-path-port", "80"], "data path port 80 is out of the valid range"),
        (&["--default-addr-pool", "10.20.0.0/16", "--default-addr-pool-mask-length", "12"], "invalid subnet size"),
        (&["--cert-expiry", "10m"], "minimum certificate expiry"),
        (&["--advertise-addr", "nosuchif0"], "advertise address must be an IP address"),
    ];
    for (args, words) in bad {
        let err = docker_err(&lab, "mgr1", &[&["swarm", "init"], args].concat());
        assert!(err.contains(words), "{args:?}: {err}");
        let state = docker_ok(&lab, "mgr1", &["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        assert_eq!(state.trim(), "inactive", "{args:?} left a swarm behind");
    }

    // The interface name (as dockerd accepts it) stands for its address.
    docker_ok(
        &lab,
        "mgr1",
        &[
            "swarm",
            "init",
            "--advertise-addr",
            "eth0:2377",
            "--default-addr-pool",
            "10.20.0.0/16",
            "--default-addr-pool-mask-length",
            "26",
            "--data-path-port",
            "7789",
            "--availability",
            "drain",
            "--task-history-limit",
            "3",
        ],
    );
    let swarm: Swarm = lab.host("mgr1").unwrap().api().get("/swarm").unwrap().json().unwrap();
    assert_eq!(swarm.cluster.default_addr_pool, ["10.20.0.0/16"]);
    assert_eq!((swarm.cluster.subnet_size, swarm.cluster.data_path_port), (26, 7789));
    assert_eq!(swarm.cluster.spec.orchestration.task_history_retention_limit, Some(3));
    let raw = lab.host("mgr1").unwrap().api().get("/swarm").unwrap().text();
    assert!(!raw.contains("PRIVATE KEY"), "GET /swarm returned a private key");
    let addr = docker_ok(&lab, "mgr1", &["info", "--format", "{{.Swarm.NodeAddr}}"]);
    assert_eq!(addr.trim(), lab.host("mgr1").unwrap().addr.to_string());
    let availability = docker_ok(&lab, "mgr1", &["node", "ls", "--format", "{{.Availability}}"]);
    assert_eq!(availability.trim(), "Drain");

    // node ls filters, and dockerd's refusal of an unknown one.
    docker_ok(&lab, "mgr1", &["node", "update", "--label-add", "zone=a", "mgr1"]);
    let ls = |filter: &str| docker_ok(&lab, "mgr1", &["node", "ls", "-q", "--filter", filter]).lines().count();
    assert_eq!(ls("node.label=zone=a"), 1);
    assert_eq!(ls("node.label=zone=b"), 0);
    assert_eq!(ls("label=zone"), 0, "label= is the engine's labels");
    assert_eq!(ls("role=manager"), 1);
    assert_eq!(ls("membership=accepted"), 1);
    let err = docker_err(&lab, "mgr1", &["node", "ls", "--filter", "colour=red"]);
    assert!(err.contains("invalid filter 'colour'"), "{err}");
}
