//! Helpers shared by the end-to-end tests in `cluster/`: where the binaries are, labs that
//! tear themselves down, and reading a host's BPF counters.
#![forbid(unsafe_code)]

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result};
use shoal_api::dataplane::DEFAULT_OVERLAY_MTU;
use shoal_lab::{Host, Lab, LabConfig, Workload};

pub use shoal_lab::overlay_spec;

/// `<target>/debug`: the test binary runs from `<target>/debug/deps`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(|deps| deps.parent()).expect("<target>/debug/deps").to_owned()
}

/// Brings up lab `name` with the given shape and a swarm formed over it; it is torn down
/// when dropped, pass or fail.
pub fn lab(name: &str, managers: usize, workers: usize) -> Lab {
    up(LabConfig { managers, workers, ..LabConfig::new(name, bin_dir()) })
}

/// Like `lab`, with no swarm: hosts running shoald only (data-plane tests).
pub fn plain_lab(name: &str, managers: usize, workers: usize) -> Lab {
    up(LabConfig { managers, workers, swarm: false, ..LabConfig::new(name, bin_dir()) })
}

fn up(config: LabConfig) -> Lab {
    assert!(is_root(), "the end-to-end tests build network namespaces: run them as root");
    match Lab::up(&config) {
        Ok(lab) => lab.teardown_on_drop(),
        Err(e) => {
            let _ = shoal_lab::down(&config.name);
            panic!("lab {} did not come up: {e:#}", config.name);
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Packets the kernel's VXLAN device on `host` has sent and received: independent evidence
/// that traffic was really encapsulated.
pub fn vxlan_packets(host: &Host) -> Result<(u64, u64)> {
    let out = shoal_lab::run_ok(&["ip", "-n", &host.netns, "-s", "-j", "link", "show", "shoal_vxlan"])?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let stats = &json[0]["stats64"];
    let read = |dir: &str| stats[dir]["packets"].as_u64().with_context(|| format!("no {dir} packets in {out}"));
    Ok((read("tx")?, read("rx")?))
}

/// Packets the notrack rule of `host`'s `shoal_raw` `chain` (output or prerouting) kept out
/// of connection tracking: VXLAN through the kernel's device.
pub fn untracked(host: &Host, chain: &str) -> Result<u64> {
    let argv = ["ip", "netns", "exec", &host.netns, "nft", "-j", "list", "chain", "ip", "shoal_raw", chain];
    let out = shoal_lab::run_ok(&argv)?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let rules = json["nftables"].as_array().cloned().unwrap_or_default();
    rules
        .iter()
        .find_map(|r| r["rule"]["expr"].as_array()?.iter().find_map(|e| e["counter"]["packets"].as_u64()))
        .with_context(|| format!("no notrack counter in {out}"))
}

pub fn addr(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

/// A workload called `name` on `host` at `address`/24 with the default overlay MTU.
pub fn workload(lab: &Lab, host: &str, name: &str, address: &str) -> Workload {
    lab.add_workload(host, name, addr(address), 24, DEFAULT_OVERLAY_MTU)
        .unwrap_or_else(|e| panic!("workload {host}/{name}: {e:#}"))
}

/// Runs the real docker CLI inside `host`'s namespace against its shoald.
pub fn docker(lab: &Lab, host: &str, args: &[&str]) -> std::process::Output {
    docker_with_stdin(lab, host, args, "")
}

/// Like `docker`, with `input` on the CLI's stdin (for prompts such as `swarm unlock`).
pub fn docker_with_stdin(lab: &Lab, host: &str, args: &[&str], input: &str) -> std::process::Output {
    cli(lab, host, "docker", args, input)
}

/// Runs our own `shoal` CLI inside `host`'s namespace; must succeed; returns its stdout.
pub fn shoal_ok(lab: &Lab, host: &str, args: &[&str]) -> String {
    succeeded("shoal", host, args, cli(lab, host, "shoal", args, ""))
}

/// The stdout of a CLI run that must have succeeded.
fn succeeded(program: &str, host: &str, args: &[&str], out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{program} {} on {host} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli(lab: &Lab, host: &str, program: &str, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let argv: Vec<String> = std::iter::once(program).chain(args.iter().copied()).map(str::to_owned).collect();
    let mut child = lab
        .command(host, &argv)
        .unwrap()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `docker ARGS` on `host`, which must succeed; returns its stdout.
pub fn docker_ok(lab: &Lab, host: &str, args: &[&str]) -> String {
    succeeded("docker", host, args, docker(lab, host, args))
}

/// `docker ARGS` on `host`, which must fail; returns its stderr.
pub fn docker_err(lab: &Lab, host: &str, args: &[&str]) -> String {
    let out = docker(lab, host, args);
    assert!(!out.status.success(), "docker {} on {host} unexpectedly succeeded", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Retries `check` every 200 ms until it returns `Some`, for at most `limit`.
pub fn eventually<T>(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// One row of `docker node ls`, from its `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub hostname: String,
    pub status: String,
    pub manager_status: String,
    pub is_self: bool,
}

/// `docker node ls` on `host`.
pub fn node_ls(lab: &Lab, host: &str) -> Option<Vec<NodeRow>> {
    let out = docker(lab, host, &["node", "ls", "--format", "{{.Hostname}}|{{.Status}}|{{.ManagerStatus}}|{{.Self}}"]);
    if !out.status.success() {
        return None;
    }
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 4).then(|| NodeRow {
                hostname: f[0].into(),
                status: f[1].into(),
                manager_status: f[2].into(),
                is_self: f[3] == "true",
            })
        })
        .collect();
    Some(rows)
}

/// The hostname of the manager `host` sees as leader.
pub fn leader(lab: &Lab, host: &str) -> Option<String> {
    node_ls(lab, host)?.into_iter().find(|r| r.manager_status == "Leader").map(|r| r.hostname)
}

/// A service `name` on network "blue" with VIP `vip`, forwarding `port` to `target_port` on
/// `backends`.
pub fn blue_service(
    name: &str,
    vip: &str,
    protocol: shoal_api::dataplane::Protocol,
    port: u16,
    target_port: u16,
    backends: &[&str],
) -> shoal_api::dataplane::ServiceVip {
    shoal_api::dataplane::ServiceVip {
        name: name.into(),
        network: "blue".into(),
        vip: addr(vip),
        ports: vec![shoal_api::dataplane::ServicePort { protocol, port, target_port }],
        backends: backends.iter().map(|a| addr(a)).collect(),
        draining: vec![],
        dnsrr: false,
        published: vec![],
    }
}
