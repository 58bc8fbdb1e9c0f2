//! Control-plane benchmark. On a 3-manager lab (release build): how long writes pause when
//! the leader crashes (SIGKILL) and when it stops gracefully (SIGTERM, handing over), how
//! long a durable write takes (fsync on a majority before the answer) through the leader
//! and through a follower, how many writes per second the cluster takes, and how long
//! `node ls` takes. Outside the lab (`controlplane/store/examples/scale.rs`, each manager a
//! process on loopback): the store holding 1,000 nodes and 100,000 tasks written through
//! raft, its snapshot, a new manager catching up, event latency and each manager's peak RSS.

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

use super::{stats::summarize, swarmkit};
use crate::{bootstrap, workspace};

const LAB: &str = "benchctl";
const WRITES: usize = 300;
const READS: usize = 300;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(5);
const WRITERS: usize = 6;

/// Shoal's leader failovers alone, printed (no report): crash, then graceful.
pub fn failovers_only(failovers: usize) -> Result<()> {
    let bin_dir = workspace::build_release()?;
    let lab = Lab::up(&LabConfig { managers: 3, workers: 0, ..LabConfig::new(LAB, &bin_dir) })?.teardown_on_drop();
    let mut shoal = ShoalManagers(&lab);
    let (settle, rejoin) = (Duration::from_secs(4), Duration::from_secs(3));
    eprintln!("== shoal: leader crash (SIGKILL), {failovers} times");
    let crash = failover_times(&mut shoal, failovers, Stop::Crash, settle, rejoin)?;
    eprintln!("== shoal: leader graceful stop (SIGTERM), {failovers} times");
    let graceful = failover_times(&mut shoal, failovers, Stop::Graceful, settle, rejoin)?;
    for (kind, samples) in [("crash", crash), ("graceful", graceful)] {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        println!("{kind}: min {:.0} ms, median {:.0} ms, max {:.0} ms", ms[0], ms[ms.len() / 2], ms[ms.len() - 1]);
    }
    Ok(())
}

pub fn run(failovers: usize, stability: Duration) -> Result<()> {
    let bin_dir = workspace::build_release()?;
    bootstrap::ensure_packages(&[("docker.io", "dockerd 20.10: real Docker Swarm beside shoal in benchmarks")])?;
    eprintln!("== the store at scale: 1,000 nodes and 100,000 tasks through raft (managers on loopback, release)");
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
    eprintln!("== stability: {stability:?} idle, then {stability:?} under writers: elections counted");
    let elections = spurious_elections(&lab, &leader_api, stability)?;
    let mut shoal = ShoalManagers(&lab);
    eprintln!("== shoal: leader crash (SIGKILL), {failovers} times: writes through a survivor, the longest pause");
    let (settle, rejoin) = (Duration::from_secs(4), Duration::from_secs(3));
    let crash = failover_times(&mut shoal, failovers, Stop::Crash, settle, rejoin)?;
    eprintln!("== shoal: leader graceful stop (SIGTERM), {failovers} times");
    let graceful = failover_times(&mut shoal, failovers, Stop::Graceful, settle, rejoin)?;
    eprintln!("== shoal: a manager killed, until the leader shows it Down");
    let down = (0..3).map(|_| node_down_time(&mut shoal)).collect::<Result<Vec<_>>>()?;

    eprintln!("== Docker Swarm (Debian dockerd 20.10, swarmkit): three managers on the same switch");
    let swarmkit = match swarmkit::DockerSwarm::up(&lab) {
        Ok(mut docker) => {
            // swarmkit elects after 10 ticks of 1 s and a restarted manager takes a while to
            // rejoin: longer windows, so no round is cut short.
            let (settle, rejoin) = (Duration::from_secs(40), Duration::from_secs(15));
            eprintln!("== swarmkit: leader crash (SIGKILL), {failovers} times");
            let crash = failover_times(&mut docker, failovers, Stop::Crash, settle, rejoin)?;
            eprintln!("== swarmkit: leader graceful stop (SIGTERM), {failovers} times");
            let graceful = failover_times(&mut docker, failovers, Stop::Graceful, settle, rejoin)?;
            eprintln!("== swarmkit: a manager killed, until the leader shows it Down");
            let down = (0..3).map(|_| node_down_time(&mut docker)).collect::<Result<Vec<_>>>()?;
            Some(Peer { crash, graceful, down })
        }
        Err(e) => {
            eprintln!("  swarmkit could not run here: {e:#}");
            None
        }
    };

    let measured = Measured {
        via_leader,
        via_follower,
        ls_leader,
        ls_follower,
        throughput,
        crash,
        graceful,
        down,
        elections,
        stability,
        swarmkit,
        scale,
    };
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

/// One label update: read the node, write it back at the version read (as `docker node
/// update` does; plain JSON, so the same call works against dockerd). `Ok(true)` when
/// acknowledged.
fn write_label(api: &ApiClient, node: &str, key: &str) -> Result<bool> {
    let node: serde_json::Value = api.get(&format!("/nodes/{node}"))?.json()?;
    let (id, version) = (node["ID"].as_str().unwrap_or_default(), node["Version"]["Index"].as_u64().unwrap_or(0));
    let mut spec = node["Spec"].clone();
    spec["Labels"][key] = "1".into();
    let response = api.post_json(&format!("/nodes/{id}/update?version={version}"), &spec)?;
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

/// Leadership terms begun so far on the lab's managers (each term's leader logs its
/// liveness role starting).
fn elections_so_far(lab: &Lab) -> usize {
    ["mgr1", "mgr2", "mgr3"]
        .iter()
        .filter_map(|m| std::fs::read_to_string(&lab.host(m).ok()?.log).ok())
        .map(|log| log.lines().filter(|l| l.contains("leader role started") && l.contains("liveness")).count())
        .sum()
}

/// Elections during `window` idle, then during `window` with writers going: a healthy
/// cluster has none (`(idle, loaded)`).
fn spurious_elections(lab: &Lab, api: &ApiClient, window: Duration) -> Result<(usize, usize)> {
    let start = elections_so_far(lab);
    std::thread::sleep(window);
    let idle = elections_so_far(lab) - start;
    let started = Instant::now();
    while started.elapsed() < window {
        throughput(lab, api)?;
    }
    let loaded = elections_so_far(lab) - start - idle;
    Ok((idle, loaded))
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

/// A cluster of three managers the failover measurements run against: shoal's lab, or
/// real Docker Swarm (`swarmkit.rs`).
pub trait Managers {
    fn names(&self) -> Vec<String>;
    fn api(&self, name: &str) -> ApiClient;
    fn leader(&self) -> Result<String>;
    fn kill(&mut self, name: &str) -> Result<()>;
    fn stop(&mut self, name: &str) -> Result<()>;
    fn start(&mut self, name: &str) -> Result<()>;
}

/// shoal's lab as `Managers`.
struct ShoalManagers<'a>(&'a Lab);

impl Managers for ShoalManagers<'_> {
    fn names(&self) -> Vec<String> {
        ["mgr1", "mgr2", "mgr3"].map(String::from).to_vec()
    }

    fn api(&self, name: &str) -> ApiClient {
        self.0.host(name).expect("a lab manager").api()
    }

    fn leader(&self) -> Result<String> {
        leader(self.0)
    }

    fn kill(&mut self, name: &str) -> Result<()> {
        self.0.kill(name)
    }

    fn stop(&mut self, name: &str) -> Result<()> {
        self.0.stop(name)
    }

    fn start(&mut self, name: &str) -> Result<()> {
        self.0.start(name).map(|_| ())
    }
}

/// How the leader goes.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL: nothing runs on the way out.
    Crash,
    /// SIGTERM: an orderly stop (shoald hands leadership over first).
    Graceful,
}

/// A writer loops on a survivor the whole time; the leader goes; the figure is the longest
/// gap between two acknowledged writes (the pause writers saw). Then the old leader comes
/// back and catches up before the next round.
fn failover_times(
    cluster: &mut dyn Managers,
    rounds: usize,
    stop: Stop,
    settle: Duration,
    rejoin: Duration,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        let old = cluster.leader()?;
        let survivor = cluster.names().into_iter().find(|m| *m != old).context("no survivor")?;
        let api = cluster.api(&survivor);
        // Writes go to one node object: the survivor's own (by ID, as dockerd's hostnames
        // in namespaces are all the machine's).
        let nodes: serde_json::Value = api.get("/nodes")?.json()?;
        let target = nodes[0]["ID"].as_str().context("no node to write to")?.to_owned();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (api, done) = (api.clone(), done.clone());
            std::thread::spawn(move || {
                let mut acks = vec![Instant::now()];
                while !done.load(Ordering::Relaxed) {
                    if write_label(&api, &target, "failover").unwrap_or(false) {
                        acks.push(Instant::now());
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                acks
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        match stop {
            Stop::Crash => cluster.kill(&old)?,
            Stop::Graceful => cluster.stop(&old)?,
        }
        std::thread::sleep(settle);
        done.store(true, Ordering::Relaxed);
        let acks = writer.join().map_err(|_| anyhow::anyhow!("the writer panicked"))?;
        // No write at all after the stop: the pause lasted at least the whole window.
        let last = *acks.last().expect("the writer's first instant");
        let pause = acks.windows(2).map(|w| w[1] - w[0]).chain([Instant::now() - last]).max().unwrap_or_default();
        eprintln!(
            "  round {}: {old} gone, writes through {survivor} paused at most {:.0} ms",
            round + 1,
            pause.as_secs_f64() * 1000.0
        );
        samples.push(pause);
        cluster.start(&old)?;
        std::thread::sleep(rejoin);
    }
    Ok(samples)
}

/// A manager that is not the leader is killed; the time until the leader shows its node
/// Down (heartbeats missed), then it comes back.
fn node_down_time(cluster: &mut dyn Managers) -> Result<Duration> {
    let leader = cluster.leader()?;
    let victim = cluster.names().into_iter().find(|m| *m != leader).context("no other manager")?;
    let api = cluster.api(&leader);
    let nodes: Vec<serde_json::Value> = api.get("/nodes")?.json()?;
    // The victim's node: the one whose manager address is the victim's socket peer... found
    // by asking the victim itself who it is before it goes.
    let me: serde_json::Value = cluster.api(&victim).get("/info")?.json()?;
    let id = me["Swarm"]["NodeID"].as_str().context("no node ID in /info")?.to_owned();
    if !nodes.iter().any(|n| n["ID"] == id.as_str()) {
        bail!("the leader does not list {victim}");
    }
    // Only a node the leader sees Ready can be seen to go (after a restart it may not have
    // reported in yet).
    let ready = Instant::now();
    while api.get(&format!("/nodes/{id}"))?.json::<serde_json::Value>()?["Status"]["State"] != "ready" {
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("{victim} not shown ready within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.kill(&victim)?;
    let killed = Instant::now();
    loop {
        let node: serde_json::Value = api.get(&format!("/nodes/{id}"))?.json()?;
        if node["Status"]["State"] == "down" {
            break;
        }
        if killed.elapsed() > Duration::from_secs(120) {
            bail!("{victim} not shown down within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = killed.elapsed();
    eprintln!("  {victim} killed, shown down after {:.1} s", took.as_secs_f64());
    cluster.start(&victim)?;
    std::thread::sleep(Duration::from_secs(3));
    Ok(took)
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

/// Docker Swarm's figures from the same harness.
struct Peer {
    crash: Vec<Duration>,
    graceful: Vec<Duration>,
    down: Vec<Duration>,
}

struct Measured {
    down: Vec<Duration>,
    elections: (usize, usize),
    stability: Duration,
    swarmkit: Option<Peer>,
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
         A crash (SIGKILL) is noticed by a follower after 0.8-1.0 s without a heartbeat (openraft's\n\
         leader lease, 0.5 s, plus an election timeout of 0.3-0.5 s; heartbeat 50 ms), and a survivor\n\
         that refuses a shorter-logged candidate stands at once. A graceful stop (SIGTERM) hands over\n\
         first: the leader takes no new writes, waits for the writes under way and for a voter\n\
         holding its whole log, and asks it to stand at once.\n\n\
         Write throughput: **{:.0} acknowledged writes/s** ({WRITERS} concurrent writers through the\n\
         leader, {THROUGHPUT_WINDOW:?}, one node object each).\n\n\
         ## The store at scale\n\n\
         Three managers, each a process of its own, on loopback (real raft over mutual TLS, redb with\n\
         fsync on disk, the snapshot a file of sealed chunks), {} nodes then {} tasks written through\n\
         the leader in transactions of {} objects (`controlplane/store/examples/scale.rs`):\n\n\
         | figure | value |\n\
         |---|---|\n\
         | write throughput | {:.0} objects/s ({:.1} s for all) |\n\
         | snapshot size (MessagePack, sealed) | {:.1} MB |\n\
         | snapshot build (copy, encode and seal as a stream, fsync) | {:.2} s, {:.0} MB/s |\n\
         | a 4th manager joins and catches up (snapshot sent, installed, voter) | {:.2} s, {:.0} MB/s |\n\
         | event latency, commit on the leader -> a follower's watcher | p50 {:.1} ms, p99 {:.1} ms |\n\
         | peak RSS of the leader (its process also makes the writes) | {:.0} MiB |\n\
         | peak RSS of each follower | {} MiB |\n\
         | peak RSS of the manager that joined from the snapshot | {:.0} MiB |\n\n\
         ## Beside Docker Swarm\n\n\
         {}\n",
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
        f("peak_rss_mib_leader"),
        m.scale["peak_rss_mib_followers"]
            .as_array()
            .map(|a| a.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        f("peak_rss_mib_joined"),
        beside_swarmkit(m),
    )
}

/// The comparison with real Docker Swarm, measured by the same harness in the same run.
fn beside_swarmkit(m: &Measured) -> String {
    let s = |d: &[Duration]| {
        let s = summarize(d);
        format!("{:.2} / {:.2} / {:.2} s", s.min / 1000.0, s.median / 1000.0, s.max / 1000.0)
    };
    let (idle, loaded) = m.elections;
    let mut out = format!(
        "min / median / max over the rounds; Docker Swarm is Debian's dockerd 20.10 (swarmkit), three\n\
         managers in namespaces on the same lab switch, its defaults (heartbeat 5 s, election tick 10 s).\n\n\
         | | shoal | Docker Swarm |\n\
         |---|---|---|\n\
         | writes paused by a leader crash (SIGKILL) | {} | {} |\n\
         | writes paused by a graceful leader stop (SIGTERM) | {} | {} |\n\
         | a manager killed -> the leader shows it Down | {} | {} |\n\n\
         Spurious elections on shoal's lab: {idle} in {:?} idle, {loaded} in {:?} under the writers\n\
         above (heartbeat 50 ms; a follower stands after 0.8-1.0 s of silence).\n",
        s(&m.crash),
        m.swarmkit.as_ref().map_or("not measured".into(), |p| s(&p.crash)),
        s(&m.graceful),
        m.swarmkit.as_ref().map_or("not measured".into(), |p| s(&p.graceful)),
        s(&m.down),
        m.swarmkit.as_ref().map_or("not measured".into(), |p| s(&p.down)),
        m.stability,
        m.stability,
    );
    if m.swarmkit.is_none() {
        out.push_str(
            "\nDocker Swarm could not be brought up on this machine in this run (see the benchmark's output).\n",
        );
    }
    out
}
