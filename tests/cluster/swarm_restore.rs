//! Backup and restore, as the seeds do it: a copy of a manager's data root taken while its
//! daemon is stopped, put back after every manager is lost, and `swarm init
//! --force-new-cluster` brings the swarm back with its state.

use std::{process::Command, time::Duration};

use shoal_tests::{docker_ok, eventually, lab, leader, node_ls};

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

/// `--force-new-cluster` fences the old cluster: managers that come back with their old
/// raft state (a higher term, a longer log, a quorum of the old membership between them)
/// are refused by the new cluster, so they can neither depose its leader nor truncate its
/// log, and what it wrote stands.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn old_managers_that_come_back_cannot_undo_force_new_cluster() {
    let lab = lab("e2efence", 3, 1);
    for m in ["mgr2", "mgr3"] {
        lab.kill(m).unwrap();
    }
    let out = docker_ok(&lab, "mgr1", &["swarm", "init", "--force-new-cluster"]);
    assert!(out.contains("Swarm initialized"), "{out}");
    let mgr1_leads = || leader(&lab, "mgr1").is_some_and(|l| l == "mgr1");
    eventually("mgr1 leading the new cluster", Duration::from_secs(20), || mgr1_leads().then_some(()));
    docker_ok(&lab, "mgr1", &["node", "update", "--label-add", "fence0=new", "wrk1"]);

    // The old managers come back, elect one of themselves in the old membership and try
    // to bring mgr1 (still a member there) into line.
    for m in ["mgr2", "mgr3"] {
        lab.start(m).unwrap();
    }
    for i in 1..=8 {
        std::thread::sleep(Duration::from_secs(2));
        assert!(mgr1_leads(), "mgr1 was deposed by a manager of the old cluster ({i})");
        docker_ok(&lab, "mgr1", &["node", "update", "--label-add", &format!("fence{i}=new"), "wrk1"]);
    }
    let labels = docker_ok(&lab, "mgr1", &["node", "inspect", "wrk1", "--format", "{{json .Spec.Labels}}"]);
    for i in 0..=8 {
        assert!(labels.contains(&format!("fence{i}")), "write {i} of the new cluster lost: {labels}");
    }
}
