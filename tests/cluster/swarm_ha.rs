//! The seeds' cluster through the real docker CLI: 3 managers + 3 workers, one leader, the
//! leader lost and regained, a partitioned manager, and acknowledged writes that survive the
//! leader being killed again and again, and then every manager at once.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use shoal_api::node::Node;
use shoal_lab::Lab;
use shoal_tests::{docker, docker_ok, eventually, lab, leader, node_ls};

const MANAGERS: [&str; 3] = ["mgr1", "mgr2", "mgr3"];

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn node_ls_shows_six_ready_nodes_one_leader_and_the_asking_node() {
    let lab = lab("e2eswarm", 3, 3);
    let rows = node_ls(&lab, "mgr2").expect("docker node ls on mgr2");
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(rows.iter().all(|r| r.status == "Ready"), "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.manager_status == "Leader").count(), 1, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.manager_status == "Reachable").count(), 2, "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.manager_status.is_empty()).count(), 3, "{rows:?}");
    let me: Vec<_> = rows.iter().filter(|r| r.is_self).collect();
    assert_eq!(me.len(), 1);
    assert_eq!(me[0].hostname, "mgr2");

    // The table as the seeds show it: the asking node marked with `*`.
    let table = docker_ok(&lab, "mgr2", &["node", "ls"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS", "ENGINE", "VERSION"]);
    assert!(table.lines().any(|l| l.contains(" * ") && l.contains("mgr2")), "{table}");

    let join = docker_ok(&lab, "mgr1", &["swarm", "join-token", "worker"]);
    assert!(join.contains("docker swarm join --token SWMTKN-1-"), "{join}");
    assert!(join.contains("10.77.1.1:2377"), "{join}");
    let worker = String::from_utf8_lossy(&docker(&lab, "wrk1", &["node", "ls"]).stderr).into_owned();
    assert!(worker.contains("Worker nodes can't be used to view or modify cluster state"), "{worker}");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn losing_the_leader_elects_another_and_it_comes_back_as_reachable() {
    let lab = lab("e2efailover", 3, 1);
    let old = leader(&lab, "mgr1").expect("a leader");
    let survivor = MANAGERS.into_iter().find(|m| *m != old).unwrap();

    lab.stop(&old).unwrap();
    let stopped = Instant::now();
    let new = eventually("a new leader", Duration::from_secs(15), || leader(&lab, survivor).filter(|l| *l != old));
    eprintln!("{new} leads {:?} after {old} stopped", stopped.elapsed());
    eventually("the old leader shown down and unreachable", Duration::from_secs(40), || {
        node_ls(&lab, survivor)?
            .into_iter()
            .find(|r| r.hostname == old && r.status == "Down" && r.manager_status == "Unreachable")
    });

    lab.start(&old).unwrap();
    eventually("the old leader reachable again", Duration::from_secs(30), || {
        node_ls(&lab, survivor)?
            .into_iter()
            .find(|r| r.hostname == old && r.status == "Ready" && r.manager_status == "Reachable")
    });
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_partitioned_manager_refuses_changes_while_the_majority_goes_on() {
    let lab = lab("e2epartition", 3, 1);
    let current = leader(&lab, "mgr1").expect("a leader");
    let cut = MANAGERS.into_iter().find(|m| *m != current).unwrap();
    let majority = MANAGERS.into_iter().find(|m| *m != cut).unwrap();

    lab.partition(&[cut]).unwrap();
    let refused = eventually("the minority to refuse", Duration::from_secs(20), || {
        let out = docker(&lab, cut, &["node", "update", "--label-add", "side=minority", "wrk1"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success() && err.contains("does not have a leader")).then_some(err)
    });
    assert!(refused.contains("more than half of the managers"), "{refused}");
    eventually("the majority to accept", Duration::from_secs(20), || {
        docker(&lab, majority, &["node", "update", "--label-add", "side=majority", "wrk1"])
            .status
            .success()
            .then_some(())
    });

    lab.heal().unwrap();
    let labels = eventually("the minority to catch up", Duration::from_secs(30), || {
        let out = docker(&lab, cut, &["node", "inspect", "wrk1", "--format", "{{json .Spec.Labels}}"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("majority").then_some(text)
    });
    assert!(!labels.contains("minority"), "a refused change was applied: {labels}");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn acknowledged_writes_survive_the_leader_and_then_every_manager_killed() {
    let lab = lab("e2edurable", 3, 1);
    let apis: Vec<_> = MANAGERS.iter().map(|m| lab.host(m).unwrap().api()).collect();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (apis, acked, done) = (apis.clone(), acked.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !done.load(Ordering::Relaxed) {
                let api = &apis[i % apis.len()];
                i += 1;
                let Ok(node) = api.get("/nodes/wrk1").and_then(|r| r.json::<Node>()) else { continue };
                let mut spec = node.spec.clone();
                spec.annotations.labels.insert(format!("w{i}"), "acked".into());
                let path = format!("/nodes/{}/update?version={}", node.id, node.meta.version.index);
                if api.post_json(&path, &spec).is_ok_and(|r| r.status == 200) {
                    acked.lock().unwrap().push(format!("w{i}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let acked_now = || acked.lock().unwrap().len();
    // SIGKILL, not SIGTERM: no shutdown path runs, so only what was on disk when the write
    // was acknowledged can bring it back.
    for _ in 0..5 {
        let current =
            eventually("a leader", Duration::from_secs(20), || MANAGERS.into_iter().find_map(|m| leader(&lab, m)));
        let before = acked_now();
        eventually("writes acknowledged under this leader", Duration::from_secs(20), || {
            (acked_now() >= before + 3).then_some(())
        });
        lab.kill(&current).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        lab.start(&current).unwrap();
    }
    // Then every manager at once, mid-write.
    let before = acked_now();
    eventually("writes acknowledged before the crash", Duration::from_secs(20), || {
        (acked_now() >= before + 3).then_some(())
    });
    for m in MANAGERS {
        lab.kill(m).unwrap();
    }
    for m in MANAGERS {
        lab.start(m).unwrap();
    }
    let before = acked_now();
    eventually("writes acknowledged after the crash", Duration::from_secs(30), || {
        (acked_now() >= before + 3).then_some(())
    });
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();

    let acked = acked.lock().unwrap().clone();
    for (m, api) in MANAGERS.iter().zip(&apis) {
        let missing = eventually("every acknowledged write on every manager", Duration::from_secs(30), || {
            let node = api.get("/nodes/wrk1").ok()?.json::<Node>().ok()?;
            let missing: Vec<&String> =
                acked.iter().filter(|k| !node.spec.annotations.labels.contains_key(*k)).collect();
            missing.is_empty().then_some(missing.len())
        });
        assert_eq!(missing, 0, "{m} lost acknowledged writes");
    }
    eprintln!("{} acknowledged writes, all present on all managers", acked.len());
}

/// The role in a node's certificate (`swarm-manager` / `swarm-worker` in its subject).
fn certificate_role(lab: &Lab, host: &str) -> String {
    let cert = std::fs::read(lab.host(host).unwrap().data_root.join("swarm/certs/node.crt")).unwrap();
    let out =
        shoal_lab::run_with_stdin(&["openssl", "x509", "-noout", "-subject"], &String::from_utf8_lossy(&cert)).unwrap();
    if out.contains("swarm-manager") {
        "manager".into()
    } else {
        "worker".into()
    }
}

/// How many raft members `host` counts.
fn raft_members(lab: &Lab, host: &str) -> Option<usize> {
    let info: shoal_api::info::Info = lab.host(host).ok()?.api().get("/info").ok()?.json().ok()?;
    Some(info.swarm.remote_managers.len())
}

/// Whether `docker node ls` on `from` shows `host` with a manager status.
fn shown_as_manager(lab: &Lab, from: &str, host: &str) -> Option<bool> {
    Some(!node_ls(lab, from)?.into_iter().find(|r| r.hostname == host)?.manager_status.is_empty())
}

/// Promotions and demotions are intents the leader carries out in raft: each completes even
/// when the leader is killed right after it was asked for, the store shows a node as a
/// manager exactly when raft has it as a voter, and a demoted node's certificate says
/// worker and its raft data is gone.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn promote_and_demote_complete_even_when_the_leader_dies_half_way() {
    let lab = lab("e2eroles", 3, 1);
    assert_eq!(raft_members(&lab, "mgr1"), Some(3));
    let leader_now =
        || eventually("a leader", Duration::from_secs(20), || MANAGERS.into_iter().find_map(|m| leader(&lab, m)));

    let out = docker_ok(&lab, "mgr1", &["node", "promote", "wrk1"]);
    assert!(out.contains("Node wrk1 promoted to a manager in the swarm."), "{out}");
    let killed = leader_now();
    lab.kill(&killed).unwrap();
    let asker = MANAGERS.into_iter().find(|m| *m != killed).unwrap();
    eventually("wrk1 in raft", Duration::from_secs(40), || (raft_members(&lab, asker)? == 4).then_some(()));
    eventually("wrk1 shown as a manager", Duration::from_secs(30), || {
        shown_as_manager(&lab, asker, "wrk1")?.then_some(())
    });
    eventually("wrk1 serving as a manager", Duration::from_secs(30), || {
        node_ls(&lab, "wrk1")?.into_iter().find(|r| r.is_self && r.manager_status == "Reachable")
    });
    assert_eq!(certificate_role(&lab, "wrk1"), "manager");
    lab.start(&killed).unwrap();

    // mgr3 out of raft, with the leader killed right after the request (mgr3 itself
    // perhaps).
    let asker = if leader_now() == "mgr1" { "mgr2" } else { "mgr1" };
    let out = docker_ok(&lab, asker, &["node", "demote", "mgr3"]);
    assert!(out.contains("Manager mgr3 demoted in the swarm."), "{out}");
    let killed = leader_now();
    lab.kill(&killed).unwrap();
    let watcher = ["mgr1", "mgr2", "wrk1"].into_iter().find(|m| *m != killed).unwrap();
    eventually("mgr3 out of raft", Duration::from_secs(40), || (raft_members(&lab, watcher)? == 3).then_some(()));
    eventually("mgr3 no longer shown as a manager", Duration::from_secs(30), || {
        (!shown_as_manager(&lab, watcher, "mgr3")?).then_some(())
    });
    if killed != "mgr3" {
        eventually("mgr3 a worker", Duration::from_secs(30), || {
            let err = String::from_utf8_lossy(&docker(&lab, "mgr3", &["node", "ls"]).stderr).into_owned();
            err.contains("Worker nodes can't be used").then_some(())
        });
    }
    lab.start(&killed).unwrap();
    eventually("mgr3's certificate says worker", Duration::from_secs(40), || {
        (certificate_role(&lab, "mgr3") == "worker").then_some(())
    });
    let raft_dir = lab.host("mgr3").unwrap().data_root.join("swarm/raft");
    eventually("mgr3's raft data gone", Duration::from_secs(20), || (!raft_dir.exists()).then_some(()));
    docker_ok(&lab, "wrk1", &["node", "update", "--label-add", "after=roles", "wrk1"]);
}
