//! The desired state -> the exact map entries each of its objects puts in the kernel. Pure:
//! no kernel, so the whole translation is unit-tested.

use std::{collections::BTreeMap, net::Ipv4Addr};

use shoal_api::dataplane::{Desired, Endpoint, OverlayNetwork};
use shoal_common::overlay::{EndpointEntry, EndpointKey, InterfaceEntry, GATEWAY_NODE, IFACE_OUTBOUND};

use crate::net::{
    host::HostRoute,
    lb,
    mirror::{Delta, Entries, Ids, Mirror, Owner},
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

/// The entries `owner` puts in the kernel on the node at `node_addr` (none: it is not
/// declared). `links` must hold the interface of a local endpoint; `mirror` gives the
/// owner's current entries, whose IDs are kept, and new IDs.
pub fn entries(
    desired: &Desired,
    owner: &Owner,
    node_addr: Ipv4Addr,
    links: &LocalLinks,
    mirror: &mut Mirror,
) -> Result<Option<Entries>, NetError> {
    Ok(match owner {
        Owner::Network(name) => desired.network(name).map(network_entries),
        Owner::Endpoint((network, addr)) => {
            let (Some(ep), Some(net)) = (desired.endpoint(network, *addr), desired.network(network)) else {
                return Ok(None);
            };
            let new = endpoint_entries(ep, net, node_addr, links)?;
            let ours = mirror.entries(owner).map_or(&[][..], |e| &e.attach[..]);
            if let Some((_, name)) =
                new.attach.iter().find(|a| mirror.plan().attach.contains_key(&a.0) && !ours.contains(a))
            {
                return Err(NetError::InterfaceShared(name.clone()));
            }
            Some(new)
        }
        Owner::Service((network, name)) => {
            let (Some(svc), Some(net)) = (desired.service(network, name), desired.network(network)) else {
                return Ok(None);
            };
            let here = |addr: &&Ipv4Addr| desired.endpoint(network, **addr).is_some_and(|ep| ep.node_addr == node_addr);
            let local = |addrs: &[Ipv4Addr]| -> Vec<Ipv4Addr> { addrs.iter().filter(here).copied().collect() };
            let (backends, draining) = (local(&svc.backends), local(&svc.draining));
            let previous = mirror.entries(owner).cloned();
            Some(lb::service_entries(svc, net, &backends, &draining, previous.as_ref(), &mut mirror.ids)?)
        }
        // Never this node itself: VXLAN from its own address is a local process's, not a node's.
        Owner::Node(addr) => desired.nodes().any(|n| n == addr).then(|| Entries {
            nodes: [*addr].into_iter().filter(|a| *a != node_addr).map(u32::from).collect(),
            ..Entries::default()
        }),
    })
}

/// Every owner of `desired`, in the order their entries go in.
pub fn owners(desired: &Desired) -> Vec<Owner> {
    desired
        .networks()
        .map(|n| Owner::Network(n.name.clone()))
        .chain(desired.endpoints().map(|e| Owner::Endpoint((e.network.clone(), e.addr))))
        .chain(desired.services().map(|s| Owner::Service((s.network.clone(), s.name.clone()))))
        .chain(desired.nodes().map(|n| Owner::Node(*n)))
        .collect()
}

/// A network's gateway answers ARP like an endpoint; packets to it go to this node's stack.
fn network_entries(net: &OverlayNetwork) -> Entries {
    let mut entries = Entries::default();
    if let Some(gateway) = net.gateway() {
        let key = EndpointKey { vni: net.vni, addr: u32::from_ne_bytes(gateway.octets()) };
        let mac = shoal_api::MacAddr::from_ipv4(gateway).0;
        entries.endpoints.push((key, EndpointEntry { ifindex: 0, node_addr: GATEWAY_NODE, mac, router_mac: [0; 6] }));
        entries.gateways.push(gateway);
        entries.masquerade.push(net.subnet);
    }
    entries
}

/// An endpoint on this node is reached through its veth (and the host routes replies to it);
/// one elsewhere through its node, whose VXLAN is then taken.
fn endpoint_entries(
    ep: &Endpoint,
    net: &OverlayNetwork,
    node_addr: Ipv4Addr,
    links: &LocalLinks,
) -> Result<Entries, NetError> {
    let mut entries = Entries::default();
    let key = EndpointKey { vni: net.vni, addr: u32::from_ne_bytes(ep.addr.octets()) };
    let entry = if ep.node_addr == node_addr {
        let name = ep.interface.as_deref().ok_or(NetError::MissingInterface(ep.addr))?;
        let link = links.get(name).ok_or_else(|| NetError::InterfaceNotFound(name.to_owned()))?;
        entries.attach.push((link.index, name.to_owned()));
        entries.interfaces.push((link.index, interface_entry(net, key.addr, link.mac)));
        if !net.internal {
            entries.host_routes.push(HostRoute { addr: ep.addr, ifindex: link.index, mac: ep.mac.0 });
        }
        EndpointEntry { ifindex: link.index, node_addr: u32::from(node_addr), mac: ep.mac.0, router_mac: link.mac }
    } else {
        entries.nodes.push(u32::from(ep.node_addr));
        EndpointEntry { ifindex: 0, node_addr: u32::from(ep.node_addr), mac: ep.mac.0, router_mac: [0; 6] }
    };
    entries.endpoints.push((key, entry));
    Ok(entries)
}

/// The mirror of every object of `desired` at once (tests, and checks of the incremental
/// path against it).
pub fn build(desired: &Desired, node_addr: Ipv4Addr, links: &LocalLinks, ids: Ids) -> Result<Mirror, NetError> {
    let mut mirror = Mirror::with_ids(ids);
    let mut delta = Delta::default();
    for owner in owners(desired) {
        let new = entries(desired, &owner, node_addr, links, &mut mirror)?;
        mirror.replace(owner, new, &mut delta);
    }
    Ok(mirror)
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
        dataplane::{DataplaneSpec, Endpoint, OverlayNetwork, Rules},
        MacAddr,
    };

    use super::*;
    use crate::net::mirror::Plan;

    fn plan(spec: &DataplaneSpec, node: Ipv4Addr, links: &LocalLinks) -> Result<Plan, NetError> {
        let desired = Desired::from_spec(spec, Rules::default()).unwrap();
        build(&desired, node, links, Ids::default()).map(|mirror| mirror.plan().clone())
    }

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
            endpoint([10, 78, 0, 3], THERE, Some("elsewhere")),
        ]);
        let plan = plan(&spec, HERE, &links()).unwrap();

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
    }

    #[test]
    fn vxlan_is_taken_from_the_other_nodes_listed_or_running_endpoints() {
        let ingress_only = Ipv4Addr::new(10, 77, 0, 13);
        let mut spec = spec(vec![
            endpoint([10, 78, 0, 2], HERE, Some("shw-a")),
            endpoint([10, 78, 0, 3], THERE, Some("elsewhere")),
        ]);
        spec.nodes = vec![HERE, ingress_only];
        let plan = plan(&spec, HERE, &links()).unwrap();
        let mut nodes: Vec<u32> = plan.nodes.keys().copied().collect();
        nodes.sort();
        assert_eq!(nodes, [u32::from(THERE), u32::from(ingress_only)], "never this node itself");
    }

    #[test]
    fn local_endpoint_needs_an_existing_unshared_interface() {
        let missing = spec(vec![endpoint([10, 78, 0, 2], HERE, None)]);
        assert!(matches!(plan(&missing, HERE, &links()), Err(NetError::MissingInterface(_))));

        let unknown = spec(vec![endpoint([10, 78, 0, 2], HERE, Some("shw-b"))]);
        assert!(matches!(plan(&unknown, HERE, &links()), Err(NetError::InterfaceNotFound(_))));

        let shared =
            spec(vec![endpoint([10, 78, 0, 2], HERE, Some("shw-a")), endpoint([10, 78, 0, 4], HERE, Some("shw-a"))]);
        assert!(matches!(plan(&shared, HERE, &links()), Err(NetError::InterfaceShared(_))));
    }
}
