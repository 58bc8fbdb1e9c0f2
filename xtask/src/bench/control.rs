//! Control-plane benchmark on a 3-manager lab: how long a leader failover takes (leader
//! stopped -> first acknowledged write), how long a durable write takes (fsync on a
//! majority before the answer) through the leader and through a follower, how many writes
//! per second the cluster takes, and how long `node ls` takes.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use shoal_api::node::Node;
use shoal_lab::{ApiClient, Lab, LabConfig};

use super::stats::{summarize, Summary};
use crate::workspace;

const LAB: &str = "benchctl";
const WRITES: usize = 300;
const READS: usize = 300;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(5);
const WRITERS: usize = 6;

pub fn run(failovers: usize) -> Result<()> {
    workspace::build()?;
    let lab = Lab::up(&LabConfig { managers: 3, workers: WRITERS, ..LabConfig::new(LAB, workspace::bin_dir()) })?
        .teardown_on_drop();
    let leader_name = leader(&lab)?;
    let follower_name = ["mgr1", "mgr2", "mgr3"].into_iter().find(|m| *m != leader_name).unwrap().to_owned();
    let leader_api = lab.host(&leader_name)?.api();
    let follower_api = lab.host(&follower_name)?.api();

    eprintln!("== write latency: {WRITES} sequential label updates through the leader ({leader_name})");
    let via_leader = sequential_writes(&leader_api, "wrk1", WRITES)?;
    eprintln!("== write latency: {WRITES} sequential label updates through a follower ({follower_name})");
    let via_follower = sequential_writes(&follower_api, "wrk2", WRITES)?;
    eprintln!("== node ls latency: {READS} GET /nodes on the leader and on a follower");
    let ls_leader = reads(&leader_api, READS)?;
    let ls_follower = reads(&follower_api, READS)?;
    eprintln!("== write throughput: {WRITERS} writers, each on its own node, for {THROUGHPUT_WINDOW:?}");
    let throughput = throughput(&lab, &leader_api)?;
    eprintln!("== leader failover, {failovers} times: stop the leader, time the first acknowledged write");
    let failover = failover_times(&lab, failovers)?;

    let report = report(&via_leader, &via_follower, &ls_leader, &ls_follower, throughput, &failover);
    let path = workspace::root().join("docs/benchmarks/control-plane.md");
    std::fs::create_dir_all(path.parent().context("docs dir")?)?;
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

fn leader(lab: &Lab) -> Result<String> {
    for m in ["mgr1", "mgr2", "mgr3"] {
        if let Ok(nodes) = lab.host(m)?.api().get("/nodes").and_then(|r| r.json::<Vec<Node>>()) {
            if let Some(n) = nodes.iter().find(|n| n.manager_status.as_ref().is_some_and(|s| s.leader)) {
                return Ok(n.description.hostname.clone());
            }
        }
    }
    bail!("no leader")
}

/// One label update: read the node, write it back at the version read. `Ok(true)` when
/// acknowledged.
fn write_label(api: &ApiClient, node: &str, key: &str) -> Result<bool> {
    let node: Node = api.get(&format!("/nodes/{node}"))?.json()?;
    let mut spec = node.spec.clone();
    spec.annotations.labels.insert(key.to_owned(), "1".into());
    let response = api.post_json(&format!("/nodes/{}/update?version={}", node.id, node.meta.version.index), &spec)?;
    Ok(response.status == 200)
}

fn sequential_writes(api: &ApiClient, node: &str, count: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        if !write_label(api, node, &format!("l{}", i % 20))? {
            bail!("write {i} was refused");
        }
        samples.push(started.elapsed());
    }
    Ok(samples)
}

fn reads(api: &ApiClient, count: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let response = api.get("/nodes")?;
        if response.status != 200 {
            bail!("GET /nodes: {}", response.status);
        }
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Acknowledged writes per second with several writers at once.
fn throughput(lab: &Lab, api: &ApiClient) -> Result<f64> {
    let done = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let workers: Vec<String> = lab.hosts.iter().filter(|h| h.name.starts_with("wrk")).map(|h| h.name.clone()).collect();
    let started = Instant::now();
    let threads: Vec<_> = workers
        .into_iter()
        .map(|node| {
            let (api, done, acked) = (api.clone(), done.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    if write_label(&api, &node, &format!("t{}", i % 20)).unwrap_or(false) {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(THROUGHPUT_WINDOW);
    done.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(acked.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// Stop the leader; from a survivor, retry a write until one is acknowledged.
fn failover_times(lab: &Lab, rounds: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let old = leader(lab)?;
        let survivor = ["mgr1", "mgr2", "mgr3"].into_iter().find(|m| *m != old).unwrap();
        let api = lab.host(survivor)?.api();
        lab.stop(&old)?;
        let started = Instant::now();
        loop {
            if write_label(&api, "wrk1", "failover").unwrap_or(false) {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("no write acknowledged within 60 s of stopping {old}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = started.elapsed();
        eprintln!(
            "  round {}: {old} stopped, first write through {survivor} after {:.0} ms",
            round + 1,
            took.as_secs_f64() * 1000.0
        );
        samples.push(took);
        lab.start(&old)?;
        // Let it catch up before the next round.
        std::thread::sleep(Duration::from_secs(3));
    }
    Ok(samples)
}

fn report(
    via_leader: &[Duration],
    via_follower: &[Duration],
    ls_leader: &[Duration],
    ls_follower: &[Duration],
    throughput: f64,
    failover: &[Duration],
) -> String {
    let row = |what: &str, s: &[Duration]| -> String { summarize(s).row(what) };
    let failover_summary: Summary = summarize(failover);
    format!(
        "# Control plane benchmark\n\n\
         Measured by `cargo xtask bench control` on a lab of 3 managers and {WRITERS} workers (network\n\
         namespaces on one 2-core VM, every shoald a debug build), all in one run. Writes are\n\
         `POST /nodes/{{id}}/update` after a `GET` of the node, as `docker node update` does, each on\n\
         a fresh unix-socket connection; an acknowledged write is fsynced on a majority of managers.\n\n\
         | measurement | n | min ms | median ms | p99 ms | max ms |\n\
         |---|---|---|---|---|---|\n\
         {}\n{}\n{}\n{}\n{}\n\n\
         Write throughput: **{throughput:.0} acknowledged writes/s** ({WRITERS} concurrent writers through the\n\
         leader, {THROUGHPUT_WINDOW:?}).\n\n\
         ## Beside swarmkit's defaults\n\n\
         | | shoal (measured) | swarmkit default |\n\
         |---|---|---|\n\
         | leader failover (stop -> first write) | median {:.1} s, max {:.1} s | election after 10 s (10 ticks of 1 s) plus a heartbeat |\n\
         | node shown Down after it stops | 3 missed heartbeats of 5 s = 15 s | ~15 s (5 s heartbeat with grace) |\n\n\
         shoal's raft elects after 1.5-3 s without a heartbeat (heartbeat every 250 ms); swarmkit's\n\
         numbers are its documented defaults, not measured here (no Docker engine can run on this\n\
         machine).\n",
        row("write through the leader", via_leader),
        row("write through a follower (forwarded)", via_follower),
        row("node ls on the leader", ls_leader),
        row("node ls on a follower", ls_follower),
        row("leader failover: stop -> first acknowledged write", failover),
        failover_summary.median / 1000.0,
        failover_summary.max / 1000.0,
    )
}
