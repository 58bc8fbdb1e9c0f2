//! Swarm-scoped networks (moby `api/types/swarm/network.go`): overlays the allocator gives
//! a VNI and a subnet, and every node's data plane then carries.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::swarm::{Annotations, Meta};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subnet: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamOptions {
    #[serde(default, deserialize_with = "crate::null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<IpamConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSpec {
    #[serde(flatten)]
    pub annotations: Annotations,
    /// `overlay` for every network shoal carries.
    #[serde(default)]
    pub driver: String,
    #[serde(default, deserialize_with = "crate::null_as_default", skip_serializing_if = "HashMap::is_empty")]
    pub options: HashMap<String, String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub ingress: bool,
    #[serde(default, rename = "IPAMOptions", skip_serializing_if = "Option::is_none")]
    pub ipam_options: Option<IpamOptions>,
}

/// A swarm network as the store keeps it: the user's spec and what the allocator gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Network {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: NetworkSpec,
    /// The VXLAN network identifier, once allocated (0 before).
    #[serde(default)]
    pub vni: u32,
    /// Subnets and gateways, once allocated.
    #[serde(default, rename = "IPAMOptions", skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamOptions>,
}
