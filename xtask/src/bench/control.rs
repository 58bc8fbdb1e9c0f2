//! Control-plane benchmark. On a 3-manager lab (release build): how long writes pause when
//! the leader crashes (SIGKILL) and when it stops gracefully (SIGTERM, handing over), how
//! long a durable write takes (fsync on a majority before the answer) through the leader
//! and through a follower, how many writes per second the cluster takes, and how long
//! `node ls` takes. In process (`controlplane/store/examples/scale.rs`): the store holding
//! 1,000 nodes and 100,000 tasks written through raft, its snapshot, a new manager catching
//! up, and event latency.

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
    let bin_dir = workspace::build_release()?;
    eprintln!("== the store at scale: 1,000 nodes and 100,000 tasks through raft (in process, release)");
    let scale = scale()?;
    let lab =
        Lab::up(&LabConfig { managers: 3, workers: WRITERS, ..LabConfig::new(LAB, &bin_dir) })?.teardown_on_drop();
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
    eprintln!("== leader crash (SIGKILL), {failovers} times: writes through a survivor, the longest pause");
    let crash = failover_times(&lab, failovers, Stop::Crash)?;
    eprintln!("== leader graceful stop (SIGTERM), {failovers} times: writes through a survivor, the longest pause");
    let graceful = failover_times(&lab, failovers, Stop::Graceful)?;

    let measured = Measured { via_leader, via_follower, ls_leader, ls_follower, throughput, crash, graceful, scale };
    let report = report(&measured);
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

/// How the leader goes.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL: nothing runs on the way out.
    Crash,
    /// SIGTERM: shoald's orderly stop, which hands leadership over first.
    Graceful,
}

/// A writer loops on a survivor the whole time; the leader goes; the figure is the longest
/// gap between two acknowledged writes (the pause writers saw). Then the old leader comes
/// back and catches up before the next round.
fn failover_times(lab: &Lab, rounds: usize, stop: Stop) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let old = leader(lab)?;
        let survivor = ["mgr1", "mgr2", "mgr3"].into_iter().find(|m| *m != old).unwrap();
        let api = lab.host(survivor)?.api();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (api, done) = (api.clone(), done.clone());
            std::thread::spawn(move || {
                let mut acks = vec![Instant::now()];
                while !done.load(Ordering::Relaxed) {
                    if write_label(&api, "wrk1", "failover").unwrap_or(false) {
                        acks.push(Instant::now());
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                acks
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        let stopped = Instant::now();
        match stop {
            Stop::Crash => lab.kill(&old)?,
            Stop::Graceful => lab.stop(&old)?,
        }
        // Long enough for any election; then the writer stops.
        let settled = Instant::now() + Duration::from_secs(4);
        while Instant::now() < settled {
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::Relaxed);
        let acks = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
        if !acks.iter().any(|a| *a > stopped) {
            bail!("no write acknowledged within 4 s of stopping {old}");
        }
        let pause = acks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
        eprintln!(
            "  round {}: {old} gone, writes through {survivor} paused at most {:.0} ms",
            round + 1,
            pause.as_secs_f64() * 1000.0
        );
        samples.push(pause);
        lab.start(&old)?;
        std::thread::sleep(Duration::from_secs(3));
    }
    Ok(samples)
}

/// Runs the in-process scale benchmark (release) and returns its figures.
fn scale() -> Result<serde_json::Value> {
    let out = std::process::Command::new("cargo")
        .args(["run", "--quiet", "--release", "-p", "shoal-store", "--example", "scale"])
        .current_dir(workspace::root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the scale benchmark")?;
    if !out.status.success() {
        bail!("the scale benchmark failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default()).context("the scale benchmark's figures")
}

struct Measured {
    via_leader: Vec<Duration>,
    via_follower: Vec<Duration>,
    ls_leader: Vec<Duration>,
    ls_follower: Vec<Duration>,
    throughput: f64,
    crash: Vec<Duration>,
    graceful: Vec<Duration>,
    scale: serde_json::Value,
}

fn report(m: &Measured) -> String {
    let row = |what: &str, s: &[Duration]| -> String { summarize(s).row(what) };
    let (crash, graceful): (Summary, Summary) = (summarize(&m.crash), summarize(&m.graceful));
    let f = |key: &str| m.scale[key].as_f64().unwrap_or(f64::NAN);
    format!(
        "# Control plane benchmark\n\n\
         Measured by `cargo xtask bench control` in one run on one 2-core VM, release build. The lab:\n\
         3 managers and {WRITERS} workers (network namespaces, one shoald each). Writes are\n\
         `POST /nodes/{{id}}/update` after a `GET` of the node, as `docker node update` does, each on\n\
         a fresh unix-socket connection; an acknowledged write is fsynced on a majority of managers.\n\n\
         | measurement | n | min ms | median ms | p99 ms | max ms |\n\
         |---|---|---|---|---|---|\n\
         {}\n{}\n{}\n{}\n{}\n{}\n\n\
         Failover figures are the longest gap between two acknowledged writes of a writer looping\n\
         on a surviving manager while the leader goes (so they include finding the new leader).\n\
         A crash (SIGKILL) is noticed by a follower after 1.0-1.2 s without a heartbeat (openraft's\n\
         leader lease, 0.6 s, plus an election timeout of 0.4-0.6 s; heartbeat 100 ms). A graceful\n\
         stop (SIGTERM) hands over first: the leader takes no new writes, waits for a voter holding\n\
         its whole log and asks it to stand at once.\n\n\
         Write throughput: **{:.0} acknowledged writes/s** ({WRITERS} concurrent writers through the\n\
         leader, {THROUGHPUT_WINDOW:?}, one node object each).\n\n\
         ## The store at scale\n\n\
         Three managers in one process on loopback (real raft over mutual TLS, redb with fsync on\n\
         disk), {} nodes then {} tasks written through the leader in transactions of {} objects\n\
         (`controlplane/store/examples/scale.rs`):\n\n\
         | figure | value |\n\
         |---|---|\n\
         | write throughput | {:.0} objects/s ({:.1} s for all) |\n\
         | snapshot size (MessagePack, sealed) | {:.1} MB |\n\
         | snapshot build (copy, encode, seal, fsync) | {:.2} s, {:.0} MB/s |\n\
         | a 4th manager joins and catches up (snapshot sent, installed, voter) | {:.2} s, {:.0} MB/s |\n\
         | event latency, commit on the leader -> a follower's watcher | p50 {:.1} ms, p99 {:.1} ms |\n\
         | peak RSS of the process (4 managers' replicas, each holding it all) | {:.0} MiB |\n\n\
         ## Beside swarmkit\n\n\
         | | shoal (measured) | swarmkit default |\n\
         |---|---|---|\n\
         | writes paused by a leader crash | median {:.2} s, max {:.2} s | election after 10 s (10 ticks of 1 s) plus a heartbeat |\n\
         | writes paused by a graceful leader stop | median {:.2} s, max {:.2} s | the same: no hand-over |\n\
         | node shown Down after it stops | 3 missed heartbeats of 5 s = 15 s | ~15 s (5 s heartbeat with grace) |\n\n\
         swarmkit's figures are its documented defaults; a measured Debian dockerd 20.10 swarm beside\n\
         these is not in this report yet.\n",
        row("write through the leader", &m.via_leader),
        row("write through a follower (forwarded)", &m.via_follower),
        row("node ls on the leader", &m.ls_leader),
        row("node ls on a follower", &m.ls_follower),
        row("writes paused by a leader crash (SIGKILL)", &m.crash),
        row("writes paused by a graceful leader stop (SIGTERM)", &m.graceful),
        m.throughput,
        f("nodes"),
        f("tasks"),
        f("batch"),
        f("objects_per_sec"),
        f("write_secs"),
        f("snapshot_bytes") / 1e6,
        f("snapshot_build_secs"),
        f("snapshot_build_mb_per_sec"),
        f("join_catch_up_secs"),
        f("join_mb_per_sec"),
        f("event_p50_ms"),
        f("event_p99_ms"),
        f("peak_rss_kib_four_managers") / 1024.0,
        crash.median / 1000.0,
        crash.max / 1000.0,
        graceful.median / 1000.0,
        graceful.max / 1000.0,
    )
}
