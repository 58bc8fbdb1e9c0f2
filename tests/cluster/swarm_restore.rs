//! Backup and restore, as the seeds do it: a copy of a manager's data root taken while its
//! daemon is stopped, put back after every manager is lost, and `swarm init
//! --force-new-cluster` brings the swarm back with its state.

use std::{process::Command, time::Duration};

use shoal_tests::{docker_ok, eventually, lab, node_ls};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_backup_of_a_manager_brings_the_swarm_back_with_force_new_cluster() {
    let lab = lab("e2erestore", 3, 1);
    docker_ok(&lab, "mgr1", &["node", "update", "--label-add", "backup=kept", "wrk1"]);
    let cluster_id = docker_ok(&lab, "mgr1", &["info", "--format", "{{.Swarm.Cluster.ID}}"]).trim().to_owned();

    // Back up mgr1 while its daemon is stopped.
    let data_root = lab.host("mgr1").unwrap().data_root.clone();
    let backup = tempfile::tempdir().unwrap();
    lab.stop("mgr1").unwrap();
    assert!(Command::new("cp").arg("-a").arg(&data_root).arg(backup.path()).status().unwrap().success());
    lab.start("mgr1").unwrap();

    // Lose every manager and mgr1's disk; restore the backup in its place.
    for m in ["mgr1", "mgr2", "mgr3"] {
        lab.stop(m).unwrap();
    }
    std::fs::remove_dir_all(&data_root).unwrap();
    let copied = backup.path().join(data_root.file_name().unwrap());
    assert!(Command::new("cp").arg("-a").arg(&copied).arg(&data_root).status().unwrap().success());
    lab.start("mgr1").unwrap();

    let out = docker_ok(&lab, "mgr1", &["swarm", "init", "--force-new-cluster"]);
    assert!(out.contains("Swarm initialized"), "{out}");
    let rows = eventually("mgr1 leading", Duration::from_secs(20), || {
        let rows = node_ls(&lab, "mgr1")?;
        rows.iter().any(|r| r.hostname == "mgr1" && r.manager_status == "Leader").then_some(rows)
    });
    assert_eq!(rows.len(), 4, "every node is still known: {rows:?}");
    let same = docker_ok(&lab, "mgr1", &["info", "--format", "{{.Swarm.Cluster.ID}}"]).trim().to_owned();
    assert_eq!(same, cluster_id, "the swarm keeps its identity");
    let labels = docker_ok(&lab, "mgr1", &["node", "inspect", "wrk1", "--format", "{{json .Spec.Labels}}"]);
    assert!(labels.contains("kept"), "{labels}");
    eventually("wrk1 reporting in to the new cluster", Duration::from_secs(40), || {
        node_ls(&lab, "mgr1")?.into_iter().find(|r| r.hostname == "wrk1" && r.status == "Ready")
    });
    docker_ok(&lab, "mgr1", &["node", "update", "--label-add", "after=restore", "wrk1"]);
}
