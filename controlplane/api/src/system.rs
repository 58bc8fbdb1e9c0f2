//! `/_ping` and `/version`: what clients ask first to learn the API version.

use serde::{Deserialize, Serialize};

/// Newest Engine API version the daemon speaks (docker CLI 28 asks for 1.50/1.51).
pub const API_VERSION: &str = "1.51";
/// Oldest Engine API version the daemon accepts in `/v1.NN/` paths.
pub const MIN_API_VERSION: &str = "1.24";

/// Body of `GET /version` (Docker's `types.Version`, the fields clients read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    pub version: String,
    pub api_version: String,
    #[serde(rename = "MinAPIVersion")]
    pub min_api_version: String,
    pub os: String,
    pub arch: String,
    pub kernel_version: String,
}
