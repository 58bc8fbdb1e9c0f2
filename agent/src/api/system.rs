//! `/_ping` and `/version`, which every Docker client calls before anything else.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderName, HeaderValue},
    response::IntoResponse,
    Json,
};
use shoal_api::{
    info::Info,
    node::{EngineDescription, NodeDescription, Platform, Resources},
    swarm::LocalNodeState,
    system::{Version, API_VERSION, MIN_API_VERSION},
};

use crate::api::Node;

/// `OK` plus the headers the CLI negotiates with; without `Api-Version` it falls back to 1.24.
/// `Swarm` tells the CLI whether swarm commands can work here.
pub async fn ping(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let swarm = match node.swarm.local_state() {
        LocalNodeState::Active if node.swarm.manager().is_ok() => "active/manager",
        LocalNodeState::Active => "active/worker",
        other => other.as_str(),
    };
    let h = |name: &'static str, value: &'static str| (HeaderName::from_static(name), HeaderValue::from_static(value));
    (
        [
            h("api-version", API_VERSION),
            h("ostype", "linux"),
            (HeaderName::from_static("swarm"), HeaderValue::from_static(swarm)),
            h("docker-experimental", "false"),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache, no-store, must-revalidate")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        "OK",
    )
}

pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_version: API_VERSION.to_owned(),
        min_api_version: MIN_API_VERSION.to_owned(),
        os: std::env::consts::OS.to_owned(),
        arch: docker_arch().to_owned(),
        kernel_version: kernel_version(),
    })
}

/// Go's GOARCH names, which Docker reports.
fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// What `/info` and the swarm say about this machine, read once at start.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub name: String,
    pub data_root: String,
    pub ncpu: u64,
    pub mem_total: i64,
    pub kernel_version: String,
    pub operating_system: String,
}

impl DaemonInfo {
    pub fn read(name: &str, data_root: &std::path::Path) -> Self {
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(str::to_owned)))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            .map_or(0, |kb| kb * 1024);
        let operating_system = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|o| {
                o.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
            })
            .unwrap_or_else(|| "Linux".into());
        DaemonInfo {
            name: name.to_owned(),
            data_root: data_root.display().to_string(),
            ncpu: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
            mem_total,
            kernel_version: kernel_version(),
            operating_system,
        }
    }

    /// The node description the swarm records (`docker node inspect` `Description`).
    pub fn description(&self) -> NodeDescription {
        NodeDescription {
            hostname: self.name.clone(),
            platform: Platform { architecture: std::env::consts::ARCH.into(), os: "linux".into() },
            resources: Resources { nano_cpus: self.ncpu as i64 * 1_000_000_000, memory_bytes: self.mem_total },
            engine: EngineDescription { engine_version: env!("CARGO_PKG_VERSION").into(), ..Default::default() },
            ..Default::default()
        }
    }
}

fn kernel_version() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// `GET /info`.
pub async fn info(State(node): State<Arc<Node>>) -> Json<Info> {
    let d = &node.daemon;
    Json(Info {
        id: d.name.clone(),
        name: d.name.clone(),
        driver: "overlay2".into(),
        server_version: env!("CARGO_PKG_VERSION").into(),
        operating_system: d.operating_system.clone(),
        os_type: "linux".into(),
        architecture: std::env::consts::ARCH.into(),
        ncpu: d.ncpu,
        mem_total: d.mem_total,
        kernel_version: d.kernel_version.clone(),
        docker_root_dir: d.data_root.clone(),
        swarm: node.swarm.info(),
        ..Default::default()
    })
}
