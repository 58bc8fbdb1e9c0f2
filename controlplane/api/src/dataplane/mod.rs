//! A node's desired overlay state: networks and the endpoints on them, anywhere in the cluster.
//!
//! The control plane computes one of these per node; until it exists the lab and tests send it
//! to the agent's `PUT /shoal/v1/dataplane`. The agent turns it into BPF map entries.

mod change;
mod desired;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::MacAddr;

pub use change::{Change, ChangeBatch, ChangeReport, ChangeResult, Sequence};
pub use desired::{Desired, EndpointId, Rules, ServiceId};

/// Largest VXLAN network identifier (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// MTU of an overlay interface over a 1500-byte underlay: VXLAN adds 50 bytes.
pub const DEFAULT_OVERLAY_MTU: u32 = 1450;
/// Most backends (and most draining ones) a service may have on a network: each needs a slot
/// of its Maglev table, which has 1021.
pub const MAX_BACKENDS: usize = 1021;
/// Longest Linux interface name (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DataplaneSpec {
    #[serde(default)]
    pub networks: Vec<OverlayNetwork>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Services with a virtual IP on a network, balanced over backends on it.
    #[serde(default)]
    pub services: Vec<ServiceVip>,
    /// Underlay addresses of the cluster's nodes: overlay (VXLAN) traffic is taken from
    /// these only. The nodes of `endpoints` count too; a node that runs no endpoint but
    /// sends the routing mesh's traffic (a published port's clients) must be listed.
    #[serde(default)]
    pub nodes: Vec<Ipv4Addr>,
}

/// A service's virtual IP on one network (Docker's endpoint mode `vip`): connections to
/// `vip:port` are balanced over `backends`, each reached at `target_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceVip {
    pub name: String,
    pub network: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Addresses of the service's tasks on the network.
    #[serde(default)]
    pub backends: Vec<Ipv4Addr>,
    /// Tasks being stopped: the flows they have go on, no new flow goes to them, and DNS no
    /// longer gives them. A task in neither list is gone: its flows are balanced again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<Ipv4Addr>,
    /// Endpoint mode `dnsrr`: DNS answers the service's name with its tasks' addresses, not
    /// the VIP (which is then not balanced).
    #[serde(default)]
    pub dnsrr: bool,
    /// Ports published on the nodes' underlay addresses (`docker service create --publish`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<PublishedPort>,
}

/// A service port published on the nodes' own addresses, reached from outside the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PublishedPort {
    pub protocol: Protocol,
    /// Port on the nodes' addresses.
    pub published_port: u16,
    /// Port on each backend.
    pub target_port: u16,
    #[serde(default)]
    pub publish_mode: PublishMode,
}

/// Where a published port answers (Docker's `mode=` of `--publish`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node (the routing mesh), balanced over the backends on any node.
    #[default]
    Ingress,
    /// Only on the nodes running a backend, and only to their own backends.
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServicePort {
    pub protocol: Protocol,
    /// Port on the VIP.
    pub port: u16,
    /// Port on each backend.
    pub target_port: u16,
}

/// One overlay network: a flat IPv4 subnet carried over VXLAN with its own VNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OverlayNetwork {
    pub name: String,
    /// VXLAN network identifier, 1..=2^24-1, unique in the cluster.
    pub vni: u32,
    pub subnet: Ipv4Net,
    /// MTU whoever creates a workload's interface on this network gives it (the lab today,
    /// the executor later); `DEFAULT_OVERLAY_MTU` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The workloads' default gateway, answered by each node; the subnet's first address
    /// when absent (as Docker chooses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// No way out of the overlay (Docker's `--internal`): no gateway, no outbound traffic.
    #[serde(default)]
    pub internal: bool,
}

/// One address on an overlay network, on some node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Endpoint {
    /// Name of the `OverlayNetwork` it is attached to.
    pub network: String,
    pub addr: Ipv4Addr,
    pub mac: MacAddr,
    /// Underlay address of the node that runs it.
    pub node_addr: Ipv4Addr,
    /// Host-side veth of the endpoint; required on the node that runs it, ignored elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// What is wrong with a `DataplaneSpec`; the agent answers 400 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("network name must not be empty")]
    EmptyNetworkName,
    #[error("network {0:?} is declared twice")]
    DuplicateNetwork(String),
    #[error("network {name:?}: VNI {vni} is outside 1..={VNI_MAX}")]
    VniOutOfRange { name: String, vni: u32 },
    #[error("network {name:?}: VNI {vni} is already used by another network")]
    DuplicateVni { name: String, vni: u32 },
    #[error("network {name:?}: MTU {mtu} is outside 576..=9000")]
    MtuOutOfRange { name: String, mtu: u32 },
    #[error("endpoint {addr}: network {network:?} is not declared")]
    UnknownNetwork { network: String, addr: Ipv4Addr },
    #[error("endpoint {addr}: not a host address of network {network:?} ({subnet})")]
    AddrOutsideSubnet { network: String, addr: Ipv4Addr, subnet: Ipv4Net },
    #[error("endpoint {addr} appears twice on network {network:?}")]
    DuplicateEndpoint { network: String, addr: Ipv4Addr },
    #[error("endpoint {addr}: invalid interface name {name:?}")]
    InvalidInterfaceName { addr: Ipv4Addr, name: String },
    #[error(
        "network {network:?}: gateway {gateway} is not a host address of {subnet}, or is taken by an endpoint or VIP"
    )]
    BadGateway { network: String, gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("service {service:?}: network {network:?} is not declared")]
    ServiceNetwork { service: String, network: String },
    #[error("service {service:?}: {addr} is not a host address of network {network:?}")]
    ServiceAddrOutsideSubnet { service: String, network: String, addr: Ipv4Addr },
    #[error("service {service:?}: VIP {vip} is already an endpoint's address")]
    VipIsEndpoint { service: String, vip: Ipv4Addr },
    #[error("service {service:?}: port 0 is not a port")]
    ZeroPort { service: String },
    #[error("service {service:?}: {vip}:{port}/{protocol:?} is declared twice")]
    DuplicateServicePort { service: String, vip: Ipv4Addr, port: u16, protocol: Protocol },
    #[error("service {service:?}: published port {port}/{protocol:?} is already in use")]
    DuplicatePublishedPort { service: String, port: u16, protocol: Protocol },
    #[error("service {service:?}: port published with ingress mode can't be used with dnsrr mode")]
    IngressWithDnsrr { service: String },
    #[error("service {service:?}: port {port}/{protocol:?} is {what} on every node: it cannot be published")]
    ReservedPort { service: String, port: u16, protocol: Protocol, what: &'static str },
    #[error("networks {first:?} and {second:?} have overlapping subnets ({first_subnet} and {second_subnet}): a node could not tell their traffic apart")]
    OverlappingSubnets { first: String, first_subnet: Ipv4Net, second: String, second_subnet: Ipv4Net },
    #[error("node address {0} is not a node's unicast address")]
    BadNodeAddr(Ipv4Addr),
    #[error("service {service:?} is declared twice on network {network:?}")]
    DuplicateService { service: String, network: String },
    #[error("service {service:?}: {vip}:{port}/{protocol:?} is service {other:?}'s on another network: a socket's connect() could not tell them apart")]
    VipOnTwoNetworks { service: String, other: String, vip: Ipv4Addr, port: u16, protocol: Protocol },
    #[error("network {network:?} is in use by {users} endpoint(s) or service(s)")]
    NetworkInUse { network: String, users: usize },
    #[error("{0} is not declared")]
    NotDeclared(String),
    #[error("service {service:?}: more than {max} backends (or draining ones) on one network")]
    TooManyBackends { service: String, max: usize },
}

impl SpecError {
    /// The status Docker would answer a change with: 404 when it names what is not declared,
    /// 409 when it conflicts with what is, 400 when it is wrong in itself.
    pub fn status(&self) -> u16 {
        match self {
            SpecError::NotDeclared(_) | SpecError::UnknownNetwork { .. } | SpecError::ServiceNetwork { .. } => 404,
            SpecError::DuplicateNetwork(_)
            | SpecError::DuplicateVni { .. }
            | SpecError::DuplicateEndpoint { .. }
            | SpecError::DuplicateService { .. }
            | SpecError::DuplicateServicePort { .. }
            | SpecError::DuplicatePublishedPort { .. }
            | SpecError::VipIsEndpoint { .. }
            | SpecError::VipOnTwoNetworks { .. }
            | SpecError::NetworkInUse { .. }
            | SpecError::OverlappingSubnets { .. } => 409,
            _ => 400,
        }
    }
}

impl DataplaneSpec {
    /// Checks everything that can be checked without the node's kernel (the rules are
    /// `Desired`'s, met object by object).
    pub fn validate(&self) -> Result<(), SpecError> {
        Desired::from_spec(self, Rules::default()).map(|_| ())
    }

    pub fn network(&self, name: &str) -> Option<&OverlayNetwork> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// What new input must also satisfy, beyond `validate` (a state saved by an older
    /// version is restored without it, minus its reserved ports; see `without_reserved`):
    /// `Rules::strict`, no overlapping subnets and no published port the node itself uses
    /// on its address (`reserved`): the mesh would take the node's own traffic.
    pub fn check_new(&self, reserved: &[ReservedPort]) -> Result<(), SpecError> {
        Desired::from_spec(self, Rules::strict(reserved.to_vec())).map(|_| ())
    }

    /// Refuses a published port in `reserved`.
    pub fn check_reserved(&self, reserved: &[ReservedPort]) -> Result<(), SpecError> {
        for svc in &self.services {
            if let Some(r) = svc.published.iter().find_map(|p| p.reserved_by(reserved)) {
                return Err(r.refusal(&svc.name));
            }
        }
        Ok(())
    }

    /// This spec without the published ports in `reserved`, and what was taken out.
    pub fn without_reserved(mut self, reserved: &[ReservedPort]) -> (DataplaneSpec, Vec<String>) {
        let mut removed = Vec::new();
        for svc in &mut self.services {
            svc.published.retain(|p| {
                let hit = p.reserved_by(reserved);
                if let Some(r) = hit {
                    removed.push(format!("{}/{:?} of {} ({})", r.port, r.protocol, svc.name, r.what));
                }
                hit.is_none()
            });
        }
        (self, removed)
    }
}

impl PublishedPort {
    /// The entry of `reserved` this port would take, if any.
    fn reserved_by<'a>(&self, reserved: &'a [ReservedPort]) -> Option<&'a ReservedPort> {
        reserved.iter().find(|r| r.port == self.published_port && r.protocol == self.protocol)
    }
}

/// A port a node uses on its own address, which no service may publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedPort {
    pub port: u16,
    pub protocol: Protocol,
    /// What uses it, for the error: "the data path (VXLAN) port".
    pub what: &'static str,
}

impl ReservedPort {
    /// The error for `service` publishing this port.
    fn refusal(&self, service: &str) -> SpecError {
        SpecError::ReservedPort {
            service: service.to_owned(),
            port: self.port,
            protocol: self.protocol,
            what: self.what,
        }
    }
}

impl OverlayNetwork {
    /// A network with Docker's defaults: MTU 1450, the first address as gateway, a way out.
    pub fn new(name: &str, vni: u32, subnet: Ipv4Net) -> Self {
        OverlayNetwork { name: name.to_owned(), vni, subnet, mtu: None, gateway: None, internal: false }
    }

    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_OVERLAY_MTU)
    }

    /// The gateway address, `None` on internal networks.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        if self.internal {
            return None;
        }
        Some(self.gateway.unwrap_or_else(|| Ipv4Addr::from(u32::from(self.subnet.network()) + 1)))
    }
}

/// In the subnet, and neither its network nor its broadcast address (for prefixes that have
/// them: /31 and /32 are all hosts).
fn is_host_addr(subnet: Ipv4Net, addr: Ipv4Addr) -> bool {
    subnet.contains(&addr) && (subnet.prefix_len() >= 31 || (addr != subnet.network() && addr != subnet.broadcast()))
}

fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// One outcome counter of the BPF programs, summed over CPUs (`GET /shoal/v1/dataplane/stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Counter {
    pub code: u32,
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DataplaneSpec {
        DataplaneSpec {
            networks: vec![OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())],
            endpoints: vec![Endpoint {
                network: "blue".into(),
                addr: "10.78.0.2".parse().unwrap(),
                mac: MacAddr::from_ipv4("10.78.0.2".parse().unwrap()),
                node_addr: "10.77.0.11".parse().unwrap(),
                interface: Some("shw-a".into()),
            }],
            services: vec![ServiceVip {
                published: vec![PublishedPort {
                    protocol: Protocol::Tcp,
                    published_port: 8080,
                    target_port: 8080,
                    publish_mode: PublishMode::Ingress,
                }],
                ..desired::tests::web()
            }],
            nodes: vec!["10.77.0.11".parse().unwrap(), "10.77.0.12".parse().unwrap()],
        }
    }

    #[test]
    fn published_ports_the_node_uses_itself_are_refused_by_name() {
        let reserved = [
            ReservedPort { port: 4789, protocol: Protocol::Udp, what: "the data path (VXLAN) port" },
            ReservedPort { port: 8080, protocol: Protocol::Tcp, what: "the cluster port" },
        ];
        let error = spec().check_new(&reserved).unwrap_err();
        assert_eq!(
            error.to_string(),
            "service \"web\": port 8080/Tcp is the cluster port on every node: it cannot be published"
        );
        let mut s = spec();
        s.services[0].published[0].protocol = Protocol::Udp;
        assert_eq!(s.check_new(&reserved), Ok(()), "the same number on the other protocol is free");
        let (kept, removed) = spec().without_reserved(&reserved);
        assert!(kept.services[0].published.is_empty());
        assert_eq!(removed, ["8080/Tcp of web (the cluster port)"]);
    }

    #[test]
    fn overlapping_subnets_are_refused_by_name() {
        let mut s = spec();
        let mut red = OverlayNetwork::new("red", 4098, "10.78.0.128/25".parse().unwrap());
        s.networks.push(red.clone());
        assert_eq!(
            s.check_new(&[]).unwrap_err().to_string(),
            "networks \"blue\" and \"red\" have overlapping subnets (10.78.0.0/24 and 10.78.0.128/25): a node could not tell their traffic apart"
        );
        red.subnet = "10.79.0.0/24".parse().unwrap();
        s.networks[1] = red;
        assert_eq!(s.check_new(&[]), Ok(()));
    }

    #[test]
    fn node_addresses_must_be_unicast() {
        for bad in ["0.0.0.0", "255.255.255.255", "239.1.1.1"] {
            let mut s = spec();
            s.nodes.push(bad.parse().unwrap());
            assert_eq!(s.validate(), Err(SpecError::BadNodeAddr(bad.parse().unwrap())));
        }
        let mut s = spec();
        s.endpoints[0].node_addr = Ipv4Addr::UNSPECIFIED;
        assert!(matches!(s.validate(), Err(SpecError::BadNodeAddr(_))));
    }

    #[test]
    fn accepts_a_consistent_spec() {
        assert_eq!(spec().validate(), Ok(()));
        assert_eq!(spec().networks[0].mtu(), DEFAULT_OVERLAY_MTU);
    }

    #[test]
    fn rejects_each_inconsistency() {
        let mut s = spec();
        s.networks[0].vni = 0;
        assert!(matches!(s.validate(), Err(SpecError::VniOutOfRange { .. })));

        let mut s = spec();
        s.networks.push(s.networks[0].clone());
        assert!(matches!(s.validate(), Err(SpecError::DuplicateNetwork(_))));

        let mut s = spec();
        let mut other = s.networks[0].clone();
        other.name = "red".into();
        s.networks.push(other);
        assert!(matches!(s.validate(), Err(SpecError::DuplicateVni { .. })));

        let mut s = spec();
        s.networks[0].mtu = Some(100);
        assert!(matches!(s.validate(), Err(SpecError::MtuOutOfRange { .. })));

        let mut s = spec();
        s.endpoints[0].network = "red".into();
        assert!(matches!(s.validate(), Err(SpecError::UnknownNetwork { .. })));

        for addr in ["10.79.0.2", "10.78.0.0", "10.78.0.255"] {
            let mut s = spec();
            s.endpoints[0].addr = addr.parse().unwrap();
            assert!(matches!(s.validate(), Err(SpecError::AddrOutsideSubnet { .. })), "{addr}");
        }

        let mut s = spec();
        s.endpoints.push(s.endpoints[0].clone());
        assert!(matches!(s.validate(), Err(SpecError::DuplicateEndpoint { .. })));

        let mut s = spec();
        s.endpoints[0].interface = Some("a-name-that-is-too-long".into());
        assert!(matches!(s.validate(), Err(SpecError::InvalidInterfaceName { .. })));

        let mut s = spec();
        s.services[0].vip = "10.78.0.2".parse().unwrap();
        assert!(matches!(s.validate(), Err(SpecError::VipIsEndpoint { .. })));

        let mut s = spec();
        s.services[0].backends.push("10.99.0.1".parse().unwrap());
        assert!(matches!(s.validate(), Err(SpecError::ServiceAddrOutsideSubnet { .. })));

        let mut s = spec();
        let port = s.services[0].ports[0];
        s.services[0].ports.push(port);
        assert!(matches!(s.validate(), Err(SpecError::DuplicateServicePort { .. })));

        let mut s = spec();
        s.services[0].ports[0].target_port = 0;
        assert!(matches!(s.validate(), Err(SpecError::ZeroPort { .. })));

        let mut s = spec();
        s.services[0].published[0].published_port = 0;
        assert!(matches!(s.validate(), Err(SpecError::ZeroPort { .. })));

        let mut s = spec();
        let mut other = s.services[0].clone();
        other.name = "api".into();
        other.vip = "10.78.0.101".parse().unwrap();
        other.published[0].publish_mode = PublishMode::Host;
        s.services.push(other);
        assert!(matches!(s.validate(), Err(SpecError::DuplicatePublishedPort { .. })));

        let mut s = spec();
        s.services[0].dnsrr = true;
        assert!(matches!(s.validate(), Err(SpecError::IngressWithDnsrr { .. })));
        s.services[0].published[0].publish_mode = PublishMode::Host;
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn reads_pascal_case_json() {
        let json = r#"{"Networks":[{"Name":"blue","Vni":7,"Subnet":"10.78.0.0/24"}],"Endpoints":[]}"#;
        let s: DataplaneSpec = serde_json::from_str(json).unwrap();
        assert_eq!(s.networks[0].vni, 7);
    }
}
