//! `GET /info`: the daemon and, for swarm clients, `Swarm` (moby `api/types/system/info.go`).

use serde::{Deserialize, Serialize};

use crate::swarm::SwarmInfo;

/// The fields of Docker's `Info` that clients of a swarm read; the rest are left at what a
/// daemon with no local containers would report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Info {
    #[serde(rename = "ID")]
    pub id: String,
    pub containers: u64,
    pub containers_running: u64,
    pub containers_paused: u64,
    pub containers_stopped: u64,
    pub images: u64,
    pub driver: String,
    pub name: String,
    pub server_version: String,
    pub operating_system: String,
    #[serde(rename = "OSType")]
    pub os_type: String,
    pub architecture: String,
    #[serde(rename = "NCPU")]
    pub ncpu: u64,
    pub mem_total: i64,
    pub kernel_version: String,
    pub docker_root_dir: String,
    pub swarm: SwarmInfo,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}
