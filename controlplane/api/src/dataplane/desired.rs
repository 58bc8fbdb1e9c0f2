//! A node's desired overlay state, indexed, and changed one object at a time.
//!
//! Every rule a state keeps is checked here, per object, against the state as it is: a whole
//! `DataplaneSpec` is built by adding its objects one by one, so a spec and a stream of
//! `Change`s meet the same rules, and one bad change is refused on its own. Each applied
//! change returns its inverse, which puts the state back exactly (the agent's undo when the
//! kernel or the disk fails half-way).

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use indexmap::{IndexMap, IndexSet};

use super::{
    is_host_addr, is_valid_ifname, Change, DataplaneSpec, Endpoint, OverlayNetwork, Protocol, PublishMode,
    ReservedPort, ServiceVip, SpecError, MAX_BACKENDS, VNI_MAX,
};

/// The rules that depend on who gives the state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Ports the node uses on its own address: never published.
    pub reserved: Vec<ReservedPort>,
    /// Refuse a network whose subnet overlaps another's, as Docker does ("Pool overlaps with
    /// other one on this address space"): connection tracking, the way out and DNS tell
    /// networks apart by address. Off only to restore a state an older version accepted.
    pub disjoint_subnets: bool,
}

impl Rules {
    /// Everything, for new input.
    pub fn strict(reserved: Vec<ReservedPort>) -> Rules {
        Rules { reserved, disjoint_subnets: true }
    }
}

/// A service's key: (network, name). A service on several networks has one VIP on each.
pub type ServiceId = (String, String);
/// An endpoint's key: (network, address).
pub type EndpointId = (String, Ipv4Addr);

/// The state, in the order its objects were declared (`to_spec` gives them back so).
#[derive(Debug, Clone, Default)]
pub struct Desired {
    rules: Rules,
    networks: IndexMap<String, OverlayNetwork>,
    endpoints: IndexMap<EndpointId, Endpoint>,
    services: IndexMap<ServiceId, ServiceVip>,
    nodes: IndexSet<Ipv4Addr>,
    vnis: HashMap<u32, String>,
    /// How many endpoints and services each network has: one in use cannot go.
    users: HashMap<String, usize>,
    /// The services with each VIP on each network (several may share one).
    vips: HashMap<(String, Ipv4Addr), BTreeSet<String>>,
    /// Who has each VIP port. One owner across networks: the socket hooks see no network.
    vip_ports: HashMap<(Ipv4Addr, u16, Protocol), ServiceId>,
    /// Each service's name as DNS sees it (case folded), per network: two names DNS cannot
    /// tell apart are one service.
    dns_names: HashMap<(String, String), String>,
    /// Who publishes each port on the nodes' addresses (host mode too: one node address,
    /// one listener per port, and two services' backends may share a node).
    published: HashMap<(u16, Protocol), ServiceId>,
}

impl Desired {
    pub fn new(rules: Rules) -> Desired {
        Desired { rules, ..Desired::default() }
    }

    /// Builds the state of `spec` under `rules`, or says what is first wrong with it.
    pub fn from_spec(spec: &DataplaneSpec, rules: Rules) -> Result<Desired, SpecError> {
        let mut desired = Desired::new(rules);
        for change in additions(spec) {
            if desired.apply(&change)?.is_none() && !matches!(change, Change::AddNode { .. }) {
                return Err(twice(&change));
            }
        }
        Ok(desired)
    }

    /// Builds as much of `spec` as `rules` allow, each object that breaks one left out and
    /// said (a saved state, restored under rules that have grown stricter since).
    pub fn from_spec_leaving_out(spec: &DataplaneSpec, rules: Rules) -> (Desired, Vec<String>) {
        let mut desired = Desired::new(rules);
        let mut left_out = Vec::new();
        for change in additions(spec) {
            if let Err(e) = desired.apply(&change) {
                left_out.push(format!("{}: {e}", change.object()));
            }
        }
        (desired, left_out)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn set_rules(&mut self, rules: Rules) {
        self.rules = rules;
    }

    pub fn to_spec(&self) -> DataplaneSpec {
        DataplaneSpec {
            networks: self.networks.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            nodes: self.nodes.iter().copied().collect(),
        }
    }

    pub fn network(&self, name: &str) -> Option<&OverlayNetwork> {
        self.networks.get(name)
    }

    pub fn networks(&self) -> impl Iterator<Item = &OverlayNetwork> {
        self.networks.values()
    }

    pub fn endpoint(&self, network: &str, addr: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.get(&(network.to_owned(), addr))
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    pub fn service(&self, network: &str, name: &str) -> Option<&ServiceVip> {
        self.services.get(&(network.to_owned(), name.to_owned()))
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceVip> {
        self.services.values()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Ipv4Addr> {
        self.nodes.iter()
    }

    /// The changes that turn this state into `target`: first what goes (services, endpoints,
    /// nodes, then networks), then what comes (networks, endpoints, services, nodes). A
    /// network that changed goes and comes back with everything on it; a service that
    /// changed is replaced in place.
    pub fn changes_to(&self, target: &Desired) -> (Vec<Change>, Vec<Change>) {
        let changed_networks: BTreeSet<&str> = self
            .networks
            .values()
            .filter(|n| target.networks.get(&n.name) != Some(*n))
            .map(|n| n.name.as_str())
            .collect();
        let on_changed = |network: &str| changed_networks.contains(network);
        let mut going = Vec::new();
        for id in self.services.keys() {
            if on_changed(&id.0) || !target.services.contains_key(id) {
                going.push(Change::RemoveService { network: id.0.clone(), name: id.1.clone() });
            }
        }
        for (id, ep) in &self.endpoints {
            if on_changed(&id.0) || target.endpoints.get(id) != Some(ep) {
                going.push(Change::RemoveEndpoint { network: id.0.clone(), addr: id.1 });
            }
        }
        for addr in self.nodes.iter().filter(|a| !target.nodes.contains(*a)) {
            going.push(Change::RemoveNode { addr: *addr });
        }
        for name in &changed_networks {
            going.push(Change::RemoveNetwork { name: (*name).to_owned() });
        }
        let mut coming = Vec::new();
        for net in target.networks.values() {
            if self.networks.get(&net.name) != Some(net) {
                coming.push(Change::AddNetwork(net.clone()));
            }
        }
        for (id, ep) in &target.endpoints {
            if on_changed(&id.0) || self.endpoints.get(id) != Some(ep) {
                coming.push(Change::AddEndpoint(ep.clone()));
            }
        }
        for (id, svc) in &target.services {
            if on_changed(&id.0) || self.services.get(id) != Some(svc) {
                coming.push(Change::SetService(svc.clone()));
            }
        }
        for addr in target.nodes.iter().filter(|a| !self.nodes.contains(*a)) {
            coming.push(Change::AddNode { addr: *addr });
        }
        (going, coming)
    }

    /// Applies `change` if the state allows it, and returns the change that undoes it
    /// (`None`: there was nothing to do). Refused changes leave the state as it was.
    pub fn apply(&mut self, change: &Change) -> Result<Option<Change>, SpecError> {
        match change {
            Change::AddNetwork(net) => self.add_network(net),
            Change::RemoveNetwork { name } => self.remove_network(name).map(Some),
            Change::AddEndpoint(ep) => self.add_endpoint(ep),
            Change::RemoveEndpoint { network, addr } => self.remove_endpoint(network, *addr).map(Some),
            Change::SetService(svc) => self.set_service(svc.clone()),
            Change::RemoveService { network, name } => self.remove_service(network, name).map(Some),
            Change::SetBackends { network, service, backends, draining } => {
                let mut svc = self.existing_service(network, service)?.clone();
                svc.backends.clone_from(backends);
                svc.draining.clone_from(draining);
                self.set_service(svc)
            }
            Change::Publish { network, service, port } => {
                let mut svc = self.existing_service(network, service)?.clone();
                let same = |p: &&mut super::PublishedPort| {
                    p.published_port == port.published_port && p.protocol == port.protocol
                };
                // In place when the port is there already: a resent Publish changes nothing.
                match svc.published.iter_mut().find(same) {
                    Some(there) => *there = *port,
                    None => svc.published.push(*port),
                }
                self.set_service(svc)
            }
            Change::Unpublish { network, service, protocol, published_port } => {
                let mut svc = self.existing_service(network, service)?.clone();
                let before = svc.published.len();
                svc.published.retain(|p| !(p.published_port == *published_port && p.protocol == *protocol));
                if svc.published.len() == before {
                    return Err(SpecError::NotDeclared(format!(
                        "published port {published_port}/{protocol:?} of service {service:?}"
                    )));
                }
                self.set_service(svc)
            }
            Change::AddNode { addr } => {
                check_node_addr(*addr)?;
                Ok(self.nodes.insert(*addr).then_some(Change::RemoveNode { addr: *addr }))
            }
            Change::RemoveNode { addr } => match self.nodes.shift_remove(addr) {
                true => Ok(Some(Change::AddNode { addr: *addr })),
                false => Err(SpecError::NotDeclared(format!("node {addr}"))),
            },
        }
    }

    fn add_network(&mut self, net: &OverlayNetwork) -> Result<Option<Change>, SpecError> {
        if net.name.is_empty() {
            return Err(SpecError::EmptyNetworkName);
        }
        if let Some(current) = self.networks.get(&net.name) {
            return match current == net {
                true => Ok(None),
                false => Err(SpecError::DuplicateNetwork(net.name.clone())),
            };
        }
        if net.vni == 0 || net.vni > VNI_MAX {
            return Err(SpecError::VniOutOfRange { name: net.name.clone(), vni: net.vni });
        }
        if self.vnis.contains_key(&net.vni) {
            return Err(SpecError::DuplicateVni { name: net.name.clone(), vni: net.vni });
        }
        if let Some(mtu) = net.mtu.filter(|m| !(576..=9000).contains(m)) {
            return Err(SpecError::MtuOutOfRange { name: net.name.clone(), mtu });
        }
        if let Some(gateway) = net.gateway().filter(|g| !is_host_addr(net.subnet, *g)) {
            return Err(SpecError::BadGateway { network: net.name.clone(), gateway, subnet: net.subnet });
        }
        if self.rules.disjoint_subnets {
            let overlaps = |b: &&OverlayNetwork| {
                b.subnet.contains(&net.subnet.network()) || net.subnet.contains(&b.subnet.network())
            };
            if let Some(other) = self.networks.values().find(overlaps) {
                return Err(SpecError::OverlappingSubnets {
                    first: other.name.clone(),
                    first_subnet: other.subnet,
                    second: net.name.clone(),
                    second_subnet: net.subnet,
                });
            }
        }
        self.vnis.insert(net.vni, net.name.clone());
        self.networks.insert(net.name.clone(), net.clone());
        Ok(Some(Change::RemoveNetwork { name: net.name.clone() }))
    }

    fn remove_network(&mut self, name: &str) -> Result<Change, SpecError> {
        if let Some(users) = self.users.get(name).filter(|n| **n > 0) {
            return Err(SpecError::NetworkInUse { network: name.to_owned(), users: *users });
        }
        let net =
            self.networks.shift_remove(name).ok_or_else(|| SpecError::NotDeclared(format!("network {name:?}")))?;
        self.vnis.remove(&net.vni);
        self.users.remove(name);
        Ok(Change::AddNetwork(net))
    }

    fn add_endpoint(&mut self, ep: &Endpoint) -> Result<Option<Change>, SpecError> {
        let net = self
            .networks
            .get(&ep.network)
            .ok_or_else(|| SpecError::UnknownNetwork { network: ep.network.clone(), addr: ep.addr })?;
        let id = (ep.network.clone(), ep.addr);
        if let Some(current) = self.endpoints.get(&id) {
            return match current == ep {
                true => Ok(None),
                false => Err(SpecError::DuplicateEndpoint { network: ep.network.clone(), addr: ep.addr }),
            };
        }
        if !is_host_addr(net.subnet, ep.addr) {
            return Err(SpecError::AddrOutsideSubnet { network: net.name.clone(), addr: ep.addr, subnet: net.subnet });
        }
        if let Some(name) = ep.interface.as_ref().filter(|name| !is_valid_ifname(name)) {
            return Err(SpecError::InvalidInterfaceName { addr: ep.addr, name: name.clone() });
        }
        check_node_addr(ep.node_addr)?;
        if net.gateway() == Some(ep.addr) {
            return Err(SpecError::BadGateway { network: net.name.clone(), gateway: ep.addr, subnet: net.subnet });
        }
        if let Some(service) = self.vips.get(&id).and_then(|services| services.first()) {
            return Err(SpecError::VipIsEndpoint { service: service.clone(), vip: ep.addr });
        }
        *self.users.entry(ep.network.clone()).or_default() += 1;
        self.endpoints.insert(id, ep.clone());
        Ok(Some(Change::RemoveEndpoint { network: ep.network.clone(), addr: ep.addr }))
    }

    fn remove_endpoint(&mut self, network: &str, addr: Ipv4Addr) -> Result<Change, SpecError> {
        let ep = self
            .endpoints
            .shift_remove(&(network.to_owned(), addr))
            .ok_or_else(|| SpecError::NotDeclared(format!("endpoint {addr} on network {network:?}")))?;
        self.release_user(network);
        Ok(Change::AddEndpoint(ep))
    }

    fn existing_service(&self, network: &str, name: &str) -> Result<&ServiceVip, SpecError> {
        self.service(network, name)
            .ok_or_else(|| SpecError::NotDeclared(format!("service {name:?} on network {network:?}")))
    }

    /// Declares `svc` or replaces the one of its name on its network.
    fn set_service(&mut self, svc: ServiceVip) -> Result<Option<Change>, SpecError> {
        let id = (svc.network.clone(), svc.name.clone());
        let old = self.services.get(&id).cloned();
        if old.as_ref() == Some(&svc) {
            return Ok(None);
        }
        let folded = (svc.network.clone(), svc.name.to_ascii_lowercase());
        if self.dns_names.get(&folded).is_some_and(|name| *name != svc.name) {
            return Err(SpecError::DuplicateService { service: svc.name.clone(), network: svc.network.clone() });
        }
        if let Some(old) = &old {
            self.unindex_service(old);
        }
        if let Err(e) = self.check_service(&svc) {
            if let Some(old) = &old {
                self.index_service(old);
            }
            return Err(e);
        }
        self.index_service(&svc);
        if old.is_none() {
            *self.users.entry(svc.network.clone()).or_default() += 1;
            self.dns_names.insert(folded, svc.name.clone());
        }
        self.services.insert(id, svc.clone());
        Ok(Some(match old {
            Some(old) => Change::SetService(old),
            None => Change::RemoveService { network: svc.network, name: svc.name },
        }))
    }

    fn remove_service(&mut self, network: &str, name: &str) -> Result<Change, SpecError> {
        let svc = self
            .services
            .shift_remove(&(network.to_owned(), name.to_owned()))
            .ok_or_else(|| SpecError::NotDeclared(format!("service {name:?} on network {network:?}")))?;
        self.unindex_service(&svc);
        self.release_user(network);
        self.dns_names.remove(&(network.to_owned(), name.to_ascii_lowercase()));
        Ok(Change::SetService(svc))
    }

    /// What a service must satisfy against everything else declared.
    fn check_service(&self, svc: &ServiceVip) -> Result<(), SpecError> {
        let net = self
            .networks
            .get(&svc.network)
            .ok_or_else(|| SpecError::ServiceNetwork { service: svc.name.clone(), network: svc.network.clone() })?;
        if svc.backends.len() > MAX_BACKENDS || svc.draining.len() > MAX_BACKENDS {
            return Err(SpecError::TooManyBackends { service: svc.name.clone(), max: MAX_BACKENDS });
        }
        for addr in std::iter::once(&svc.vip).chain(&svc.backends).chain(&svc.draining) {
            if !is_host_addr(net.subnet, *addr) {
                return Err(SpecError::ServiceAddrOutsideSubnet {
                    service: svc.name.clone(),
                    network: net.name.clone(),
                    addr: *addr,
                });
            }
        }
        if self.endpoints.contains_key(&(svc.network.clone(), svc.vip)) {
            return Err(SpecError::VipIsEndpoint { service: svc.name.clone(), vip: svc.vip });
        }
        if net.gateway() == Some(svc.vip) {
            return Err(SpecError::BadGateway { network: net.name.clone(), gateway: svc.vip, subnet: net.subnet });
        }
        let mut ports = std::collections::HashSet::new();
        for p in &svc.ports {
            if p.port == 0 || p.target_port == 0 {
                return Err(SpecError::ZeroPort { service: svc.name.clone() });
            }
            let duplicate = SpecError::DuplicateServicePort {
                service: svc.name.clone(),
                vip: svc.vip,
                port: p.port,
                protocol: p.protocol,
            };
            if !ports.insert((p.port, p.protocol)) {
                return Err(duplicate);
            }
            if let Some((network, other)) = self.vip_ports.get(&(svc.vip, p.port, p.protocol)) {
                return Err(match *network == svc.network {
                    true => duplicate,
                    false => SpecError::VipOnTwoNetworks {
                        service: svc.name.clone(),
                        other: other.clone(),
                        vip: svc.vip,
                        port: p.port,
                        protocol: p.protocol,
                    },
                });
            }
        }
        let mut published = std::collections::HashSet::new();
        for p in &svc.published {
            if p.published_port == 0 || p.target_port == 0 {
                return Err(SpecError::ZeroPort { service: svc.name.clone() });
            }
            if svc.dnsrr && p.publish_mode == PublishMode::Ingress {
                return Err(SpecError::IngressWithDnsrr { service: svc.name.clone() });
            }
            if !published.insert((p.published_port, p.protocol))
                || self.published.contains_key(&(p.published_port, p.protocol))
            {
                return Err(SpecError::DuplicatePublishedPort {
                    service: svc.name.clone(),
                    port: p.published_port,
                    protocol: p.protocol,
                });
            }
            if let Some(r) = p.reserved_by(&self.rules.reserved) {
                return Err(r.refusal(&svc.name));
            }
        }
        Ok(())
    }

    fn index_service(&mut self, svc: &ServiceVip) {
        let id = (svc.network.clone(), svc.name.clone());
        self.vips.entry((svc.network.clone(), svc.vip)).or_default().insert(svc.name.clone());
        for p in &svc.ports {
            self.vip_ports.insert((svc.vip, p.port, p.protocol), id.clone());
        }
        for p in &svc.published {
            self.published.insert((p.published_port, p.protocol), id.clone());
        }
    }

    fn unindex_service(&mut self, svc: &ServiceVip) {
        let vip = (svc.network.clone(), svc.vip);
        if let Some(services) = self.vips.get_mut(&vip) {
            services.remove(&svc.name);
            if services.is_empty() {
                self.vips.remove(&vip);
            }
        }
        for p in &svc.ports {
            self.vip_ports.remove(&(svc.vip, p.port, p.protocol));
        }
        for p in &svc.published {
            self.published.remove(&(p.published_port, p.protocol));
        }
    }

    fn release_user(&mut self, network: &str) {
        if let Some(users) = self.users.get_mut(network) {
            *users = users.saturating_sub(1);
        }
    }
}

fn check_node_addr(addr: Ipv4Addr) -> Result<(), SpecError> {
    match addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
        true => Err(SpecError::BadNodeAddr(addr)),
        false => Ok(()),
    }
}

/// The changes that add every object of `spec`, in an order that satisfies the rules.
fn additions(spec: &DataplaneSpec) -> impl Iterator<Item = Change> + '_ {
    spec.networks
        .iter()
        .map(|n| Change::AddNetwork(n.clone()))
        .chain(spec.endpoints.iter().map(|e| Change::AddEndpoint(e.clone())))
        .chain(spec.services.iter().map(|s| Change::SetService(s.clone())))
        .chain(spec.nodes.iter().map(|addr| Change::AddNode { addr: *addr }))
}

/// The error for an object a spec declares twice, identically.
fn twice(change: &Change) -> SpecError {
    match change {
        Change::AddNetwork(net) => SpecError::DuplicateNetwork(net.name.clone()),
        Change::AddEndpoint(ep) => SpecError::DuplicateEndpoint { network: ep.network.clone(), addr: ep.addr },
        Change::SetService(svc) => {
            SpecError::DuplicateService { service: svc.name.clone(), network: svc.network.clone() }
        }
        other => SpecError::NotDeclared(format!("{other:?}")),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::{
        dataplane::{PublishedPort, ServicePort},
        MacAddr,
    };

    fn blue() -> OverlayNetwork {
        OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())
    }

    fn endpoint(addr: &str) -> Endpoint {
        let addr = addr.parse().unwrap();
        Endpoint {
            network: "blue".into(),
            addr,
            mac: MacAddr::from_ipv4(addr),
            node_addr: "10.77.0.11".parse().unwrap(),
            interface: None,
        }
    }

    /// Service "web" on "blue": VIP 10.78.0.100, 80/tcp to 8080 on 10.78.0.2.
    pub(in crate::dataplane) fn web() -> ServiceVip {
        ServiceVip {
            name: "web".into(),
            network: "blue".into(),
            vip: "10.78.0.100".parse().unwrap(),
            ports: vec![ServicePort { protocol: Protocol::Tcp, port: 80, target_port: 8080 }],
            backends: vec!["10.78.0.2".parse().unwrap()],
            draining: vec![],
            dnsrr: false,
            published: vec![],
        }
    }

    fn state() -> Desired {
        let mut d = Desired::new(Rules::strict(vec![]));
        for change in
            [Change::AddNetwork(blue()), Change::AddEndpoint(endpoint("10.78.0.2")), Change::SetService(web())]
        {
            d.apply(&change).unwrap();
        }
        d
    }

    #[test]
    fn every_change_is_undone_by_its_inverse() {
        let published = PublishedPort {
            protocol: Protocol::Tcp,
            published_port: 8080,
            target_port: 8080,
            publish_mode: PublishMode::Ingress,
        };
        let changes = [
            Change::AddEndpoint(endpoint("10.78.0.3")),
            Change::SetBackends { network: "blue".into(), service: "web".into(), backends: vec![], draining: vec![] },
            Change::Publish { network: "blue".into(), service: "web".into(), port: published },
            Change::RemoveService { network: "blue".into(), name: "web".into() },
            Change::RemoveEndpoint { network: "blue".into(), addr: "10.78.0.2".parse().unwrap() },
            Change::AddNode { addr: "10.77.0.13".parse().unwrap() },
            Change::AddNetwork(OverlayNetwork::new("red", 4098, "10.79.0.0/24".parse().unwrap())),
        ];
        for change in changes {
            let mut d = state();
            let before = d.to_spec();
            let inverse = d.apply(&change).unwrap().expect("a change");
            assert_ne!(d.to_spec(), before, "{change:?}");
            d.apply(&inverse).unwrap();
            assert_eq!(d.to_spec().networks, before.networks, "{change:?}");
            let mut after = d.to_spec();
            // Order aside (an undone removal comes back last), the state is the same.
            after.endpoints.sort_by_key(|e| e.addr);
            assert_eq!(
                (after.endpoints, after.services, after.nodes),
                (before.endpoints, before.services, before.nodes)
            );
        }
    }

    #[test]
    fn a_refused_change_changes_nothing_and_says_why() {
        let mut d = state();
        let before = d.to_spec();
        let refusals = [
            (Change::RemoveNetwork { name: "blue".into() }, "in use by 2"),
            (Change::RemoveEndpoint { network: "blue".into(), addr: "10.78.0.9".parse().unwrap() }, "not declared"),
            (Change::AddEndpoint(endpoint("10.78.0.100")), "VIP"),
            (Change::AddEndpoint(endpoint("10.78.0.1")), "gateway"),
            (
                Change::SetBackends {
                    network: "blue".into(),
                    service: "api".into(),
                    backends: vec![],
                    draining: vec![],
                },
                "not declared",
            ),
            (
                Change::SetBackends {
                    network: "blue".into(),
                    service: "web".into(),
                    backends: vec!["10.99.0.1".parse().unwrap()],
                    draining: vec![],
                },
                "not a host address",
            ),
            (Change::AddNetwork(OverlayNetwork::new("red", 4098, "10.78.0.128/25".parse().unwrap())), "overlapping"),
            (Change::AddNetwork(OverlayNetwork::new("red", 4097, "10.79.0.0/24".parse().unwrap())), "VNI 4097"),
        ];
        for (change, expected) in refusals {
            let error = d.apply(&change).unwrap_err().to_string();
            assert!(error.contains(expected), "{change:?}: {error}");
            assert_eq!(d.to_spec(), before, "{change:?} changed the state");
        }
        // The same VIP port on another network: the socket hooks could not tell them apart.
        d.apply(&Change::AddNetwork(OverlayNetwork::new("red", 4098, "10.79.0.0/16".parse().unwrap()))).unwrap();
        let mut twin = web();
        twin.network = "red".into();
        twin.vip = "10.79.0.100".parse().unwrap();
        twin.backends.clear();
        d.apply(&Change::SetService(twin.clone())).unwrap();
        let mut clash = twin;
        clash.name = "clash".into();
        clash.vip = web().vip;
        clash.network = "red".into();
        assert!(d.apply(&Change::SetService(clash)).is_err());
    }

    #[test]
    fn adding_what_is_there_changes_nothing_and_a_different_one_is_refused() {
        let mut d = state();
        assert_eq!(d.apply(&Change::AddNetwork(blue())), Ok(None));
        assert_eq!(d.apply(&Change::SetService(web())), Ok(None));
        let port = PublishedPort {
            protocol: Protocol::Tcp,
            published_port: 8080,
            target_port: 80,
            publish_mode: PublishMode::Ingress,
        };
        let publish = Change::Publish { network: "blue".into(), service: "web".into(), port };
        assert!(d.apply(&publish).unwrap().is_some());
        assert_eq!(d.apply(&publish), Ok(None), "a resent Publish changes nothing");
        // Names DNS cannot tell apart are one service.
        let mut shouting = web();
        shouting.name = "WEB".into();
        shouting.vip = "10.78.0.101".parse().unwrap();
        shouting.ports.clear();
        assert!(matches!(d.apply(&Change::SetService(shouting)), Err(SpecError::DuplicateService { .. })));
        let mut crowd = web();
        crowd.backends = (0..=MAX_BACKENDS as u32)
            .map(|i| std::net::Ipv4Addr::from(u32::from_be_bytes([10, 78, 0, 0]) + 2 + i % 250))
            .collect();
        assert!(matches!(d.apply(&Change::SetService(crowd)), Err(SpecError::TooManyBackends { .. })));
        let mut moved = endpoint("10.78.0.2");
        moved.node_addr = "10.77.0.12".parse().unwrap();
        assert!(matches!(d.apply(&Change::AddEndpoint(moved)), Err(SpecError::DuplicateEndpoint { .. })));
    }

    #[test]
    fn a_saved_state_under_stricter_rules_loses_only_what_breaks_them() {
        let mut spec = state().to_spec();
        let mut shouting = web();
        shouting.name = "WEB".into();
        shouting.vip = "10.78.0.101".parse().unwrap();
        shouting.ports.clear();
        spec.services.push(shouting);
        assert!(Desired::from_spec(&spec, Rules::default()).is_err());
        let (d, left_out) = Desired::from_spec_leaving_out(&spec, Rules::default());
        assert_eq!(d.services().count(), 1);
        assert_eq!(d.endpoints().count(), 1);
        assert_eq!(left_out.len(), 1);
        assert!(left_out[0].starts_with("service \"WEB\" on network \"blue\""), "{left_out:?}");
    }

    #[test]
    fn the_changes_between_two_states_lead_from_one_to_the_other() {
        let from = state();
        let mut spec = from.to_spec();
        spec.services[0].backends.push("10.78.0.3".parse().unwrap());
        spec.endpoints.push(endpoint("10.78.0.3"));
        spec.nodes.push("10.77.0.12".parse().unwrap());
        spec.networks.push(OverlayNetwork::new("red", 4098, "10.79.0.0/24".parse().unwrap()));
        let target = Desired::from_spec(&spec, Rules::strict(vec![])).unwrap();
        let (going, coming) = from.changes_to(&target);
        assert!(going.is_empty(), "{going:?}");
        assert_eq!(coming.len(), 4, "{coming:?}");
        let mut d = from.clone();
        for change in going.iter().chain(&coming) {
            d.apply(change).unwrap();
        }
        assert_eq!(d.to_spec(), spec);

        // A network that changes goes and comes back with what is on it.
        let mut moved = spec.clone();
        moved.networks[0].mtu = Some(1400);
        let target = Desired::from_spec(&moved, Rules::strict(vec![])).unwrap();
        let (going, coming) = d.changes_to(&target);
        assert_eq!(going.len(), 4, "web, two endpoints, blue: {going:?}");
        for change in going.iter().chain(&coming) {
            d.apply(change).unwrap();
        }
        let mut got = d.to_spec();
        got.networks.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(got.networks, moved.networks);
        assert_eq!((got.endpoints, got.services), (moved.endpoints, moved.services));
    }
}
