//! Our own `shoal` CLI forms and manages a swarm with docker's verbs, flags and messages.

use shoal_tests::{plain_lab, shoal_ok};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn shoal_cli_forms_and_manages_a_swarm() {
    let lab = plain_lab("e2ecli", 2, 1);
    let init = shoal_ok(&lab, "mgr1", &["swarm", "init", "--advertise-addr", "10.77.1.1"]);
    assert!(init.starts_with("Swarm initialized: current node ("), "{init}");
    assert!(init.contains("shoal swarm join --token SWMTKN-1-") && init.contains("10.77.1.1:2377"), "{init}");

    let manager_token = shoal_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "manager"]).trim().to_owned();
    let worker_token = shoal_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "worker"]).trim().to_owned();
    let joined = shoal_ok(
        &lab,
        "mgr2",
        &["swarm", "join", "--token", &manager_token, "--advertise-addr", "10.77.1.2", "10.77.1.1:2377"],
    );
    assert_eq!(joined.trim(), "This node joined a swarm as a manager.");
    let joined = shoal_ok(&lab, "wrk1", &["swarm", "join", "--token", &worker_token, "10.77.1.1:2377"]);
    assert_eq!(joined.trim(), "This node joined a swarm as a worker.");

    let table = shoal_ok(&lab, "mgr2", &["node", "ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS", "ENGINE", "VERSION"]
    );
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines.iter().any(|l| l.contains(" * ") && l.contains("mgr2") && l.contains("Reachable")), "{table}");
    assert!(lines.iter().any(|l| l.contains("mgr1") && l.contains("Leader")), "{table}");

    assert_eq!(shoal_ok(&lab, "mgr1", &["node", "update", "--label-add", "zone=east", "wrk1"]).trim(), "wrk1");
    let pretty = shoal_ok(&lab, "mgr1", &["node", "inspect", "--pretty", "wrk1"]);
    assert!(pretty.contains("zone=east") && pretty.contains("Hostname:\t\twrk1"), "{pretty}");
    assert_eq!(
        shoal_ok(&lab, "mgr1", &["node", "promote", "wrk1"]).trim(),
        "Node wrk1 promoted to a manager in the swarm."
    );
    assert_eq!(shoal_ok(&lab, "mgr1", &["node", "demote", "wrk1"]).trim(), "Manager wrk1 demoted in the swarm.");
    let updated = shoal_ok(&lab, "mgr1", &["swarm", "update", "--autolock"]);
    assert!(updated.contains("Swarm updated.") && updated.contains("SWMKEY-1-"), "{updated}");
    assert!(shoal_ok(&lab, "mgr1", &["swarm", "unlock-key", "-q"]).trim().starts_with("SWMKEY-1-"));

    let root = shoal_ok(&lab, "mgr2", &["swarm", "ca"]);
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    let rotated = shoal_ok(&lab, "mgr2", &["swarm", "ca", "--rotate"]);
    assert!(rotated.contains("rotated CA certificates:   3/3 nodes"), "{rotated}");
    assert!(!rotated.contains(root.trim()) && rotated.trim_end().ends_with("-----END CERTIFICATE-----"), "{rotated}");
}
