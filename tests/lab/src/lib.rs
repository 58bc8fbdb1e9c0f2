//! The multi-host lab: hosts are network namespaces on one machine, wired by veths to a
//! switch (a bridge in a namespace of its own), each running its own `shoald` with its own
//! data root, API socket and BPF pin directory.
//!
//! Every name the lab creates starts with the lab's name (`shoal-` by default), so
//! [`down`] finds and removes all of it, also after a crash. Used by `cargo xtask lab ...`
//! and by the end-to-end tests (each test runs its own lab under its own name).
//!
//! Addresses (only ever inside the lab's namespaces): the underlay is 10.77.0.0/16, managers
//! at 10.77.1.N, workers at 10.77.2.N.
#![forbid(unsafe_code)]

mod api;
mod cgroups;
mod cmd;
mod netns;
mod shoald;
mod swarm;
mod teardown;
mod workload;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use shoal_api::dataplane::{ChangeBatch, ChangeReport, Counter, DataplaneSpec, OverlayNetwork};

pub use api::{ApiClient, Response};
pub use cgroups::command as cgroup_command;
pub use cmd::{run, run_ok, run_with_stdin};
pub use netns::{command as netns_command, in_netns};
pub use teardown::down;
pub use workload::{
    ping, tcp_exchange, tcp_exchange_from, BulkServer, Conversation, TextServer, UdpClient, UdpTextServer, Workload,
};

/// Lab name used by `cargo xtask lab` when none is given.
pub const DEFAULT_LAB: &str = "shoal";
/// Prefix length of the underlay network.
pub const UNDERLAY_PREFIX: u8 = 16;
/// Where labs keep their state: one directory per lab.
pub const STATE_ROOT: &str = "/run/shoal-lab";
/// bpffs directory under which each lab pins its hosts' maps (`<root>/<lab>/<host>`); apart
/// from a real node's `/sys/fs/bpf/shoal/<node>`, so `down` never touches a real node's maps.
pub const BPF_ROOT: &str = "/sys/fs/bpf/shoal-lab";

/// The shape of a lab to bring up.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every namespace and directory of this lab.
    pub name: String,
    pub managers: usize,
    pub workers: usize,
    /// Directory holding the `shoald` and `shoal` binaries.
    pub bin_dir: PathBuf,
    /// Form a swarm: init on the first manager, join the rest with the tokens.
    pub swarm: bool,
}

impl LabConfig {
    /// The seeds' shape: 3 managers and 3 workers.
    pub fn new(name: &str, bin_dir: impl Into<PathBuf>) -> Self {
        LabConfig { name: name.to_owned(), managers: 3, workers: 3, bin_dir: bin_dir.into(), swarm: true }
    }
}

/// One host of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// `mgr1`, `wrk2`, ...
    pub name: String,
    pub netns: String,
    /// Address on the lab underlay (the host's `eth0`).
    pub addr: Ipv4Addr,
    pub data_root: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// The host's workloads' cgroup (v2), where shoald attaches its socket hooks; `None` where
    /// the machine has no cgroup2 mount.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

impl Host {
    /// The `DOCKER_HOST` value that reaches this host's API.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn api(&self) -> ApiClient {
        ApiClient::new(&self.socket)
    }

    /// The counters of this host's BPF programs.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        self.api().get("/shoal/v1/dataplane/stats")?.json()
    }

    /// Packets this host's programs counted under `code` (`shoal_common::stats`).
    pub fn packets(&self, code: u32) -> Result<u64> {
        Ok(self.counters()?.iter().find(|c| c.code == code).map_or(0, |c| c.packets))
    }
}

/// One overlay network with every given workload on it.
pub fn overlay_spec(network: &str, vni: u32, subnet: &str, workloads: &[&Workload]) -> Result<DataplaneSpec> {
    Ok(DataplaneSpec {
        networks: vec![OverlayNetwork::new(network, vni, subnet.parse()?)],
        endpoints: workloads.iter().map(|w| w.endpoint(network)).collect(),
        services: vec![],
        nodes: vec![],
    })
}

/// A running lab. Dropping it leaves the lab up unless it was made with
/// [`Lab::teardown_on_drop`], which tests use so a failing test still cleans up.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    pub hosts: Vec<Host>,
    pub bin_dir: PathBuf,
    #[serde(skip)]
    teardown_on_drop: bool,
}

impl Lab {
    /// Clears whatever an earlier run of this lab left, then builds the switch and the hosts
    /// and starts `shoald` on each, printing a progress line per step.
    pub fn up(config: &LabConfig) -> Result<Lab> {
        check_name(&config.name)?;
        if config.managers == 0 || config.managers > 9 || config.workers > 9 {
            bail!("a lab has 1-9 managers and 0-9 workers");
        }
        let _lock = teardown::lock()?;
        teardown::down_locked(&config.name)?;
        for bin in ["shoald", "shoal"] {
            let path = config.bin_dir.join(bin);
            if !path.is_file() {
                bail!("{} is missing: build the workspace first (`cargo build --bins`)", path.display());
            }
        }
        let started = Instant::now();
        let state_dir = state_dir(&config.name);
        std::fs::create_dir_all(&state_dir)?;
        netns::ensure_bpffs(Path::new(STATE_ROOT))?;
        netns::create_switch(&config.name)?;
        let names = (1..=config.managers)
            .map(|i| (format!("mgr{i}"), Ipv4Addr::new(10, 77, 1, i as u8)))
            .chain((1..=config.workers).map(|i| (format!("wrk{i}"), Ipv4Addr::new(10, 77, 2, i as u8))));
        let mut lab = Lab {
            name: config.name.clone(),
            hosts: Vec::new(),
            bin_dir: config.bin_dir.clone(),
            teardown_on_drop: false,
        };
        for (name, addr) in names {
            let dir = state_dir.join(&name);
            let host = Host {
                netns: format!("{}-{name}", config.name),
                addr,
                data_root: dir.join("data"),
                socket: dir.join("shoald.sock"),
                log: dir.join("shoald.log"),
                pid_file: dir.join("shoald.pid"),
                cgroup: cgroups::create(&config.name, &name)?,
                name,
            };
            std::fs::create_dir_all(&dir)?;
            netns::create_host(&config.name, &host)?;
            lab.hosts.push(host);
            lab.save()?;
        }
        for host in &lab.hosts {
            let t = Instant::now();
            let pid = shoald::start(&lab, host, &[])?;
            eprintln!(
                "  {:<5} {:<12} shoald ready (pid {pid}) in {:.2}s",
                host.name,
                host.addr.to_string(),
                t.elapsed().as_secs_f64()
            );
        }
        if config.swarm {
            swarm::form(&lab, config.managers)?;
        }
        eprintln!("lab {} up: {} hosts in {:.1}s", lab.name, lab.hosts.len(), started.elapsed().as_secs_f64());
        Ok(lab)
    }

    /// The lab `name` as `up` left it.
    pub fn load(name: &str) -> Result<Lab> {
        let file = state_dir(name).join("lab.json");
        let bytes = std::fs::read(&file).with_context(|| format!("lab {name} is not up (no {})", file.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Makes dropping this lab tear it down (for tests).
    pub fn teardown_on_drop(mut self) -> Self {
        self.teardown_on_drop = true;
        self
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| format!("lab {} has no host {name}", self.name))
    }

    /// Stops `host`'s shoald (SIGTERM, then SIGKILL after a grace period); keeps its data.
    pub fn stop(&self, host: &str) -> Result<()> {
        shoald::stop(self.host(host)?)
    }

    /// Kills `host`'s shoald with SIGKILL (a crash); keeps its data.
    pub fn kill(&self, host: &str) -> Result<()> {
        shoald::kill_now(self.host(host)?)
    }

    /// Starts `host`'s shoald again on its existing data root.
    pub fn start(&self, host: &str) -> Result<u32> {
        shoald::start(self, self.host(host)?, &[])
    }

    /// Like `start`, with extra shoald flags (until the next plain `start`).
    pub fn start_with(&self, host: &str, extra: &[String]) -> Result<u32> {
        shoald::start(self, self.host(host)?, extra)
    }

    /// Whether `host`'s shoald is running and answers on its socket.
    pub fn is_serving(&self, host: &str) -> Result<bool> {
        let host = self.host(host)?;
        Ok(shoald::running_pid(host).is_some() && host.api().get("/_ping").is_ok_and(|r| r.status == 200))
    }

    /// A command that runs `argv` inside `host`'s network namespace with `DOCKER_HOST` set to
    /// the host's API and `shoal` on `PATH`.
    pub fn command(&self, host: &str, argv: &[String]) -> Result<std::process::Command> {
        let host = self.host(host)?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin_dir.clone()];
        dirs.extend(std::env::split_paths(&path));
        let mut command = netns::command(&host.netns, argv);
        command.env("DOCKER_HOST", host.docker_host()).env("PATH", std::env::join_paths(dirs)?);
        Ok(command)
    }

    /// Adds a workload namespace on `host`: a veth whose host side is `shw-<name>` and whose
    /// inside is `eth0` with `addr`/`prefix` and the overlay MTU.
    pub fn add_workload(&self, host: &str, name: &str, addr: Ipv4Addr, prefix: u8, mtu: u32) -> Result<Workload> {
        workload::create(&self.name, self.host(host)?, name, addr, prefix, mtu)
    }

    /// Attaches `workload` to another network too: an interface `inside` in its namespace
    /// with host side `shw-<name>`, at `addr`/`prefix`. The returned value describes that
    /// interface (its `endpoint` is the workload on the other network).
    pub fn attach_workload(
        &self,
        workload: &Workload,
        name: &str,
        inside: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u32,
    ) -> Result<Workload> {
        let host = self.hosts.iter().find(|h| h.addr == workload.node_addr).context("the workload's host")?;
        workload::plug(host, &workload.netns, name, inside, addr, prefix, mtu)
    }

    /// Adds a machine outside the cluster on the lab switch, running no shoald: namespace
    /// `<lab>-<name>` whose `eth0` has `addr` on the underlay (a client of published ports).
    /// Returns the namespace; `down` removes it with the rest of the lab.
    pub fn add_client(&self, name: &str, addr: Ipv4Addr) -> Result<String> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            bail!("client name {name:?}: use lowercase letters and digits only");
        }
        if name == "switch" || self.hosts.iter().any(|h| h.name == name || h.addr == addr) {
            bail!("lab {}: {name} or {addr} is already a host's", self.name);
        }
        let netns = format!("{}-{name}", self.name);
        netns::create_plugged(&self.name, &netns, name, addr)?;
        Ok(netns)
    }

    /// Adds a client outside the cluster behind a router, for paths narrower than the links
    /// at either end: router namespace `<lab>-<name>rtr` at `router` on the underlay, and
    /// client namespace `<lab>-<name>` at `<subnet>.2/24` behind it, both links 1500 bytes,
    /// but the router's route to the client takes only `path_mtu` bytes (so it answers
    /// bigger packets with "fragmentation needed", as a narrow hop on the way would). Every
    /// host routes `<subnet>.0/24` through the router. Returns the client's namespace and
    /// address.
    pub fn add_client_behind_router(
        &self,
        name: &str,
        router: Ipv4Addr,
        subnet: [u8; 3],
        path_mtu: u32,
    ) -> Result<(String, Ipv4Addr)> {
        let router_ns = self.add_client(&format!("{name}rtr"), router)?;
        let netns = format!("{}-{name}", self.name);
        let [a, b, c] = subnet;
        let (client, inside, network) =
            (Ipv4Addr::new(a, b, c, 2), format!("{a}.{b}.{c}.1"), format!("{a}.{b}.{c}.0/24"));
        run_ok(&["ip", "netns", "add", &netns])?;
        run_ok(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
        run_ok(&[
            "ip", "-n", &router_ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        run_ok(&["ip", "-n", &router_ns, "addr", "add", &format!("{inside}/24"), "dev", "eth1"])?;
        run_ok(&["ip", "-n", &router_ns, "link", "set", "eth1", "up"])?;
        run_ok(&["ip", "-n", &netns, "addr", "add", &format!("{client}/24"), "dev", "eth0"])?;
        run_ok(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
        run_ok(&["ip", "-n", &netns, "route", "add", "default", "via", &inside])?;
        let mtu = path_mtu.to_string();
        run_ok(&["ip", "-n", &router_ns, "route", "replace", &network, "dev", "eth1", "mtu", "lock", &mtu])?;
        run_ok(&["nsenter", &format!("--net=/run/netns/{router_ns}"), "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for host in &self.hosts {
            run_ok(&["ip", "-n", &host.netns, "route", "replace", &network, "via", &router.to_string()])?;
        }
        Ok((netns, client))
    }

    /// Cuts `hosts` off from the other hosts on the lab switch (they still reach each other).
    pub fn partition(&self, hosts: &[&str]) -> Result<()> {
        for host in hosts {
            self.host(host)?;
        }
        netns::partition(&self.name, hosts)
    }

    /// Undoes every partition.
    pub fn heal(&self) -> Result<()> {
        netns::heal(&self.name)
    }

    /// Sends `spec` to every host's shoald, with every host of the lab as the cluster's
    /// nodes (the lab stands in for the control plane); fails unless each one accepts it.
    pub fn apply_dataplane(&self, spec: &DataplaneSpec) -> Result<()> {
        let mut spec = spec.clone();
        for host in &self.hosts {
            if !spec.nodes.contains(&host.addr) {
                spec.nodes.push(host.addr);
            }
        }
        for host in &self.hosts {
            let response = host.api().put_json("/shoal/v1/dataplane", &spec)?;
            if response.status != 200 {
                bail!("{}: dataplane refused ({}): {}", host.name, response.status, response.text());
            }
        }
        Ok(())
    }

    /// Sends `batch` to every host's shoald (the lab stands in for the control plane);
    /// returns each host's report, failing unless each one took the batch (the report says
    /// what became of each change).
    pub fn apply_changes(&self, batch: &ChangeBatch) -> Result<Vec<ChangeReport>> {
        let mut reports = Vec::new();
        for host in &self.hosts {
            let response = host.api().post_json("/shoal/v1/dataplane/changes", batch)?;
            if response.status != 200 {
                bail!("{}: changes refused ({}): {}", host.name, response.status, response.text());
            }
            reports.push(response.json()?);
        }
        Ok(reports)
    }

    fn save(&self) -> Result<()> {
        let file = state_dir(&self.name).join("lab.json");
        std::fs::write(&file, serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.teardown_on_drop {
            if let Err(e) = down(&self.name) {
                eprintln!("lab {}: teardown failed: {e:#}", self.name);
            }
        }
    }
}

/// Lab names are lowercase letters and digits: `down` finds a lab's namespaces by the
/// prefix `<name>-` and removes directories named after it, so a name with a dash could
/// match another lab's, and an empty or `..` name could reach outside the lab's own.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        bail!("lab name {name:?}: use lowercase letters and digits only");
    }
    Ok(())
}

fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(lab)
}
