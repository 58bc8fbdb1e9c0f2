//! Desired overlay state -> the exact contents of the forwarding maps. Pure: no kernel, so the
//! whole translation is unit-tested.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use shoal_api::dataplane::DataplaneSpec;
use shoal_api::dataplane::OverlayNetwork;
use shoal_common::overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeEntry, GATEWAY_NODE, IFACE_OUTBOUND};

use crate::net::{
    host::HostRoute,
    lb::{self, Ids, LbPlan},
    NetError,
};

/// What the planner needs to know about a local interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub mac: [u8; 6],
}

/// Local interfaces by name, as resolved by `net::link`.
pub type LocalLinks = BTreeMap<String, LinkInfo>;

/// The full desired contents of the maps and the set of workload interfaces to attach to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: HashMap<EndpointKey, EndpointEntry>,
    pub interfaces: HashMap<u32, InterfaceEntry>,
    /// ifindex -> name of every interface that needs `from_workload`.
    pub attach: BTreeMap<u32, String>,
    pub lb: LbPlan,
    /// Local workloads the host's stack routes replies to.
    pub host_routes: Vec<HostRoute>,
    /// Subnets of networks with a way out, masqueraded to the node's address.
    pub masquerade: Vec<ipnet::Ipv4Net>,
    /// Gateway addresses: DNS queries to them go to this node's DNS server.
    pub gateways: Vec<std::net::Ipv4Addr>,
    /// The cluster's nodes (host byte order), whose VXLAN `from_overlay` takes.
    pub nodes: HashMap<u32, NodeEntry>,
}

/// Names of the interfaces of endpoints that run on this node.
pub fn local_interfaces(spec: &DataplaneSpec, node_addr: Ipv4Addr) -> impl Iterator<Item = &str> {
    spec.endpoints.iter().filter(move |ep| ep.node_addr == node_addr).filter_map(|ep| ep.interface.as_deref())
}

/// Plans the maps for a validated `spec` on the node at `node_addr`, keeping the table and
/// backend IDs of `previous` (the plan the kernel holds now).
pub fn plan(spec: &DataplaneSpec, node_addr: Ipv4Addr, links: &LocalLinks, previous: &Ids) -> Result<Plan, NetError> {
    let mut plan = Plan::default();
    for ep in &spec.endpoints {
        // Validation guarantees the network exists; a missing one would be a caller bug.
        let Some(net) = spec.network(&ep.network) else {
            continue;
        };
        let key = EndpointKey { vni: net.vni, addr: u32::from_ne_bytes(ep.addr.octets()) };
        let entry = if ep.node_addr == node_addr {
            let name = ep.interface.as_deref().ok_or(NetError::MissingInterface(ep.addr))?;
            let link = links.get(name).ok_or_else(|| NetError::InterfaceNotFound(name.to_owned()))?;
            if plan.attach.insert(link.index, name.to_owned()).is_some() {
                return Err(NetError::InterfaceShared(name.to_owned()));
            }
            plan.interfaces.insert(link.index, interface_entry(net, key.addr, link.mac));
            if !net.internal {
                plan.host_routes.push(HostRoute { addr: ep.addr, ifindex: link.index, mac: ep.mac.0 });
            }
            EndpointEntry { ifindex: link.index, node_addr: u32::from(node_addr), mac: ep.mac.0, router_mac: link.mac }
        } else {
            EndpointEntry { ifindex: 0, node_addr: u32::from(ep.node_addr), mac: ep.mac.0, router_mac: [0; 6] }
        };
        plan.endpoints.insert(key, entry);
    }
    // A gateway answers ARP like an endpoint; packets to it go to this node's stack.
    for net in &spec.networks {
        let Some(gateway) = net.gateway() else { continue };
        let key = EndpointKey { vni: net.vni, addr: u32::from_ne_bytes(gateway.octets()) };
        let mac = shoal_api::MacAddr::from_ipv4(gateway).0;
        plan.endpoints.insert(key, EndpointEntry { ifindex: 0, node_addr: GATEWAY_NODE, mac, router_mac: [0; 6] });
    }
    // A VIP answers ARP like an endpoint; with no interface and no node it is only ever a
    // destination the programs rewrite.
    for svc in spec.services.iter().filter(|s| !s.dnsrr) {
        let Some(net) = spec.network(&svc.network) else { continue };
        let key = EndpointKey { vni: net.vni, addr: u32::from_ne_bytes(svc.vip.octets()) };
        let mac = shoal_api::MacAddr::from_ipv4(svc.vip).0;
        plan.endpoints.insert(key, EndpointEntry { ifindex: 0, node_addr: 0, mac, router_mac: [0; 6] });
    }
    // Never this node itself: VXLAN from its own address is a local process's, not a node's.
    plan.nodes = spec
        .nodes
        .iter()
        .chain(spec.endpoints.iter().map(|ep| &ep.node_addr))
        .filter(|addr| **addr != node_addr)
        .map(|addr| (u32::from(*addr), NodeEntry::default()))
        .collect();
    plan.lb = lb::plan(spec, node_addr, previous)?;
    plan.masquerade = spec.networks.iter().filter(|n| !n.internal).map(|n| n.subnet).collect();
    plan.gateways = spec.networks.iter().filter_map(|n| n.gateway()).collect();
    plan.host_routes.sort();
    Ok(plan)
}

/// What `from_workload` needs to know about a workload's interface on `net`.
fn interface_entry(net: &OverlayNetwork, addr: u32, mac: [u8; 6]) -> InterfaceEntry {
    let mask = u32::MAX.checked_shl(32 - u32::from(net.subnet.prefix_len())).unwrap_or(0);
    InterfaceEntry {
        vni: net.vni,
        addr,
        mac,
        _pad: [0; 2],
        subnet: u32::from(net.subnet.network()).to_be(),
        mask: mask.to_be(),
        flags: if net.internal { 0 } else { IFACE_OUTBOUND },
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::{
        dataplane::{Endpoint, OverlayNetwork},
        MacAddr,
    };

    use super::*;

    const HERE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    const THERE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
    const VETH_MAC: [u8; 6] = [0xaa, 0, 0, 0, 0, 1];

    fn endpoint(addr: [u8; 4], node: Ipv4Addr, interface: Option<&str>) -> Endpoint {
        let addr = Ipv4Addr::from(addr);
        Endpoint {
            network: "blue".into(),
            addr,
            mac: MacAddr::from_ipv4(addr),
            node_addr: node,
            interface: interface.map(Into::into),
        }
    }

    fn spec(endpoints: Vec<Endpoint>) -> DataplaneSpec {
        DataplaneSpec {
            networks: vec![OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())],
            endpoints,
            services: vec![],
            nodes: vec![],
        }
    }

    fn links() -> LocalLinks {
        [("shw-a".to_owned(), LinkInfo { index: 7, mac: VETH_MAC })].into_iter().collect()
    }

    #[test]
    fn local_endpoint_gets_its_veth_and_remote_one_its_node() {
        let spec = spec(vec![
            endpoint([10, 78, 0, 2], HERE, Some("shw-a")),
            endpoint([10, 78, 0, 3], THERE, Some("ignored-elsewhere")),
        ]);
        let plan = plan(&spec, HERE, &links(), &Ids::default()).unwrap();

        let local = plan.endpoints[&EndpointKey { vni: 4097, addr: u32::from_ne_bytes([10, 78, 0, 2]) }];
        assert_eq!(local.ifindex, 7);
        assert_eq!(local.router_mac, VETH_MAC);
        assert_eq!(local.mac, [0x02, 0x42, 10, 78, 0, 2]);

        let remote = plan.endpoints[&EndpointKey { vni: 4097, addr: u32::from_ne_bytes([10, 78, 0, 3]) }];
        assert_eq!(remote.ifindex, 0);
        assert_eq!(remote.node_addr, u32::from(THERE), "tunnel keys take host byte order");

        assert_eq!(plan.interfaces[&7].vni, 4097);
        assert_eq!(plan.interfaces[&7].addr, u32::from_ne_bytes([10, 78, 0, 2]), "packet byte order");
        assert_eq!(plan.attach, [(7, "shw-a".to_owned())].into_iter().collect());
        assert_eq!(local_interfaces(&spec, HERE).collect::<Vec<_>>(), ["shw-a"]);
    }

    #[test]
    fn vxlan_is_taken_from_the_other_nodes_listed_or_running_endpoints() {
        let ingress_only = Ipv4Addr::new(10, 77, 0, 13);
        let mut spec = spec(vec![
            endpoint([10, 78, 0, 2], HERE, Some("shw-a")),
            endpoint([10, 78, 0, 3], THERE, Some("ignored-elsewhere")),
        ]);
        spec.nodes = vec![HERE, ingress_only];
        let plan = plan(&spec, HERE, &links(), &Ids::default()).unwrap();
        let mut nodes: Vec<u32> = plan.nodes.keys().copied().collect();
        nodes.sort();
        assert_eq!(nodes, [u32::from(THERE), u32::from(ingress_only)], "never this node itself");
    }

    #[test]
    fn local_endpoint_needs_an_existing_unshared_interface() {
        let missing = spec(vec![endpoint([10, 78, 0, 2], HERE, None)]);
        assert!(matches!(plan(&missing, HERE, &links(), &Ids::default()), Err(NetError::MissingInterface(_))));

        let unknown = spec(vec![endpoint([10, 78, 0, 2], HERE, Some("shw-b"))]);
        assert!(matches!(plan(&unknown, HERE, &links(), &Ids::default()), Err(NetError::InterfaceNotFound(_))));

        let shared =
            spec(vec![endpoint([10, 78, 0, 2], HERE, Some("shw-a")), endpoint([10, 78, 0, 4], HERE, Some("shw-a"))]);
        assert!(matches!(plan(&shared, HERE, &links(), &Ids::default()), Err(NetError::InterfaceShared(_))));
    }
}
