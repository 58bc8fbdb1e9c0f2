//! Changes to a node's desired overlay state (`POST /shoal/v1/dataplane/changes`): what the
//! control plane sends as tasks and services come and go, one object at a time, instead of
//! the whole state.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::{Endpoint, OverlayNetwork, Protocol, PublishedPort, ServiceVip};

/// One change. Adding what is already there as given changes nothing (a resent change is
/// harmless); adding something that is there differently, or removing what is not there, is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "Op", rename_all = "PascalCase", rename_all_fields = "PascalCase")]
pub enum Change {
    AddNetwork(OverlayNetwork),
    /// Refused while an endpoint or a service is on the network.
    RemoveNetwork {
        name: String,
    },
    AddEndpoint(Endpoint),
    RemoveEndpoint {
        network: String,
        addr: Ipv4Addr,
    },
    /// Declares a service on a network, or replaces it whole.
    SetService(ServiceVip),
    RemoveService {
        network: String,
        name: String,
    },
    /// Replaces a service's backends (its tasks' addresses on the network) and its draining
    /// ones (see `ServiceVip::draining`).
    SetBackends {
        network: String,
        service: String,
        backends: Vec<Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        draining: Vec<Ipv4Addr>,
    },
    Publish {
        network: String,
        service: String,
        port: PublishedPort,
    },
    Unpublish {
        network: String,
        service: String,
        protocol: Protocol,
        published_port: u16,
    },
    /// A node whose VXLAN traffic is taken (see `DataplaneSpec::nodes`).
    AddNode {
        addr: Ipv4Addr,
    },
    RemoveNode {
        addr: Ipv4Addr,
    },
}

impl Change {
    /// The object the change is about, in words ("service \"web\" on network \"blue\"").
    pub fn object(&self) -> String {
        match self {
            Change::AddNetwork(net) => format!("network {:?}", net.name),
            Change::RemoveNetwork { name } => format!("network {name:?}"),
            Change::AddEndpoint(ep) => format!("endpoint {} on network {:?}", ep.addr, ep.network),
            Change::RemoveEndpoint { network, addr } => format!("endpoint {addr} on network {network:?}"),
            Change::SetService(svc) => format!("service {:?} on network {:?}", svc.name, svc.network),
            Change::RemoveService { network, name }
            | Change::SetBackends { network, service: name, .. }
            | Change::Publish { network, service: name, .. }
            | Change::Unpublish { network, service: name, .. } => format!("service {name:?} on network {network:?}"),
            Change::AddNode { addr } | Change::RemoveNode { addr } => format!("node {addr}"),
        }
    }
}

/// Changes applied in order, as one step of the source's sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChangeBatch {
    /// The source's number for this batch, above every one applied before (the agent keeps
    /// the last one across restarts, so a source knows where to resume). Absent: the one
    /// after the last applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    pub changes: Vec<Change>,
}

/// What became of a batch: its sequence number and one result per change, in order. A
/// refused change changed nothing; the others applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChangeReport {
    pub sequence: u64,
    pub results: Vec<ChangeResult>,
}

/// One change's outcome, with the status Docker would answer it alone with: 200 applied
/// (or nothing to do), 400 invalid, 404 refers to something not declared, 409 conflicts
/// with the state, 500 the node failed to carry it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChangeResult {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ChangeResult {
    pub const APPLIED: ChangeResult = ChangeResult { status: 200, message: None };

    pub fn is_applied(&self) -> bool {
        self.status == 200
    }
}

/// The sequence the node has applied (`GET /shoal/v1/dataplane/sequence`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Sequence {
    pub sequence: u64,
    /// Objects of the saved state the node's last start could not restore (a workload's
    /// interface gone while it was down), each with why: they are not in its state, and the
    /// source must send them again. Cleared by a whole state (`PUT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_read_and_write_tagged_pascal_case() {
        let json = r#"{"Op":"SetBackends","Network":"blue","Service":"web","Backends":["10.78.0.2"]}"#;
        let change: Change = serde_json::from_str(json).unwrap();
        assert_eq!(
            change,
            Change::SetBackends {
                network: "blue".into(),
                service: "web".into(),
                backends: vec!["10.78.0.2".parse().unwrap()],
                draining: vec![],
            }
        );
        assert_eq!(serde_json::to_string(&change).unwrap(), json);
        let json = r#"{"Op":"AddNetwork","Name":"blue","Vni":7,"Subnet":"10.78.0.0/24"}"#;
        let Change::AddNetwork(net) = serde_json::from_str(json).unwrap() else { panic!("not a network") };
        assert_eq!((net.name.as_str(), net.vni), ("blue", 7));
        assert!(serde_json::from_str::<Change>(r#"{"Op":"Reboot"}"#).is_err());
    }
}
