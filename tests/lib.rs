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

pub fn addr(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

/// A workload called `name` on `host` at `address`/24 with the default overlay MTU.
pub fn workload(lab: &Lab, host: &str, name: &str, address: &str) -> Workload {
    lab.add_workload(host, name, addr(address), 24, DEFAULT_OVERLAY_MTU)
        .unwrap_or_else(|e| panic!("workload {host}/{name}: {e:#}"))
}
