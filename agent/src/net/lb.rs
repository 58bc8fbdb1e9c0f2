//! Services -> the contents of the load-balancing maps. Pure, like `overlay`.
//!
//! IDs are stable hashes of what they name, so every node computes the same ones and a
//! service keeps its ID across updates; Maglev tables are built from the backends' addresses
//! alone, so every node computes the same table and a backend leaving moves only its own
//! share of flows.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use shoal_api::dataplane::{DataplaneSpec, Protocol, PublishMode, ServiceVip};
use shoal_common::lb::{
    Backend, IngressEntry, IngressKey, MaglevTable, ServiceEntry, ServiceKey, MAGLEV_PRIME, MAGLEV_SLOTS, PROTO_TCP,
    PROTO_UDP, SOCKET_VNI,
};

use crate::net::NetError;

/// The load-balancing part of a plan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LbPlan {
    pub services: HashMap<ServiceKey, ServiceEntry>,
    /// Ports published on this node.
    pub ingress: HashMap<IngressKey, IngressEntry>,
    pub backends: HashMap<u32, Backend>,
    pub maglev: HashMap<u32, MaglevTable>,
}

/// Plans the services of `spec` for the node at `node_addr` (which decides where host-mode
/// ports are published).
pub fn plan(spec: &DataplaneSpec, node_addr: Ipv4Addr) -> Result<LbPlan, NetError> {
    let mut plan = LbPlan::default();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for svc in &spec.services {
        let Some(net) = spec.network(&svc.network) else { continue };
        if !svc.dnsrr {
            let vip = u32::from_ne_bytes(svc.vip.octets());
            for port in &svc.ports {
                let proto = proto_number(port.protocol);
                let key = ServiceKey { vni: net.vni, vip, port: port.port.to_be(), proto, _pad: 0 };
                let id = fnv32(&[&net.vni.to_be_bytes(), &svc.vip.octets(), &port.port.to_be_bytes(), &[proto]]);
                let label = format!("{}:{}/{proto} of {}", svc.vip, port.port, svc.name);
                let entry = plan.table(&mut names, id, label.clone(), &svc.backends, port.target_port)?;
                plan.services.insert(key, entry);
                // The socket hooks' copy, keyed without the network (a socket has none yet).
                let socket_key = ServiceKey { vni: SOCKET_VNI, ..key };
                if plan.services.insert(socket_key, entry).is_some() {
                    return Err(NetError::IdCollision(format!("{label}: the VIP is used on another network too")));
                }
            }
        }
        for port in &svc.published {
            let proto = proto_number(port.protocol);
            let (mode, backends) = match port.publish_mode {
                PublishMode::Ingress => ("ingress", svc.backends.clone()),
                PublishMode::Host => ("host", local_backends(spec, svc, node_addr)),
            };
            if backends.is_empty() && port.publish_mode == PublishMode::Host {
                continue;
            }
            let id = fnv32(&[mode.as_bytes(), &port.published_port.to_be_bytes(), &[proto]]);
            let label = format!("published {}/{proto} ({mode}) of {}", port.published_port, svc.name);
            let entry = plan.table(&mut names, id, label, &backends, port.target_port)?;
            let key = IngressKey { port: port.published_port.to_be(), proto, _pad: 0 };
            plan.ingress.insert(key, IngressEntry { id: entry.id, backends: entry.backends, vni: net.vni });
        }
    }
    Ok(plan)
}

impl LbPlan {
    /// Adds the backends `addrs` at `target_port` and their Maglev table under `id`.
    fn table(
        &mut self,
        names: &mut BTreeMap<u32, String>,
        id: u32,
        label: String,
        addrs: &[Ipv4Addr],
        target_port: u16,
    ) -> Result<ServiceEntry, NetError> {
        if let Some(other) = names.insert(id, label.clone()) {
            return Err(NetError::IdCollision(format!("{label} and {other}")));
        }
        let mut ids = Vec::new();
        for addr in addrs {
            let backend = Backend { addr: u32::from_ne_bytes(addr.octets()), port: target_port.to_be(), _pad: 0 };
            let backend_id = fnv32(&[&id.to_be_bytes(), &addr.octets(), &target_port.to_be_bytes()]);
            self.backends.insert(backend_id, backend);
            ids.push((format!("{addr}:{target_port}"), backend_id));
        }
        if !ids.is_empty() {
            self.maglev.insert(id, maglev(&ids));
        }
        Ok(ServiceEntry { id, backends: ids.len() as u32 })
    }
}

fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// The backends of `svc` whose endpoints run on the node at `node_addr`.
fn local_backends(spec: &DataplaneSpec, svc: &ServiceVip, node_addr: Ipv4Addr) -> Vec<Ipv4Addr> {
    let local = |addr: &Ipv4Addr| {
        spec.endpoints.iter().any(|ep| ep.network == svc.network && ep.addr == *addr && ep.node_addr == node_addr)
    };
    svc.backends.iter().copied().filter(local).collect()
}

/// Maglev's table (Eisenbud et al., NSDI 2016, section 3.4): each backend walks its own
/// permutation of the slots, taking turns, until every slot is taken. `backends` are
/// (name, ID); the names alone decide the permutations.
pub fn maglev(backends: &[(String, u32)]) -> MaglevTable {
    let mut sorted: Vec<&(String, u32)> = backends.iter().collect();
    sorted.sort();
    let m = MAGLEV_PRIME as u64;
    let walks: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(name, _)| {
            let offset = fnv64(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv64(name.as_bytes(), 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut slots = [u32::MAX; MAGLEV_SLOTS];
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in walks.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while slots[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            slots[slot] = sorted[i].1;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_PRIME {
                break 'fill;
            }
        }
    }
    for extra in MAGLEV_PRIME..MAGLEV_SLOTS {
        slots[extra] = slots[extra - MAGLEV_PRIME];
    }
    MaglevTable { slots }
}

fn fnv64(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn fnv32(parts: &[&[u8]]) -> u32 {
    let h =
        parts.iter().flat_map(|p| p.iter()).fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<(String, u32)> {
        (1..=n).map(|i| (format!("10.78.0.{i}:80"), i)).collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let table = maglev(&backends(3));
        for id in 1..=3 {
            let share = table.slots[..MAGLEV_PRIME].iter().filter(|s| **s == id).count();
            assert!((330..=350).contains(&share), "backend {id} has {share} of {MAGLEV_PRIME}");
        }
        assert_eq!(table.slots[MAGLEV_PRIME..], table.slots[..MAGLEV_SLOTS - MAGLEV_PRIME]);
    }

    #[test]
    fn removing_a_backend_moves_mostly_its_own_slots() {
        let before = maglev(&backends(5));
        let after = maglev(&backends(4));
        let moved = before.slots.iter().zip(after.slots.iter()).filter(|(b, a)| b != a && **b != 5).count();
        assert!(moved < MAGLEV_PRIME / 10, "{moved} slots of surviving backends moved");
    }

    fn published_spec(mode: PublishMode) -> DataplaneSpec {
        use shoal_api::{dataplane::*, MacAddr};
        let endpoint = |addr: &str, node: &str| Endpoint {
            network: "blue".into(),
            addr: addr.parse().unwrap(),
            mac: MacAddr::from_ipv4(addr.parse().unwrap()),
            node_addr: node.parse().unwrap(),
            interface: Some("veth".into()),
        };
        DataplaneSpec {
            networks: vec![OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())],
            endpoints: vec![endpoint("10.78.0.11", "10.77.0.11"), endpoint("10.78.0.12", "10.77.0.12")],
            services: vec![ServiceVip {
                name: "web".into(),
                network: "blue".into(),
                vip: "10.78.0.100".parse().unwrap(),
                ports: vec![],
                backends: vec!["10.78.0.11".parse().unwrap(), "10.78.0.12".parse().unwrap()],
                dnsrr: false,
                published: vec![PublishedPort {
                    protocol: Protocol::Tcp,
                    published_port: 8080,
                    target_port: 80,
                    publish_mode: mode,
                }],
            }],
        }
    }

    #[test]
    fn an_ingress_port_is_the_same_on_every_node() {
        let spec = published_spec(PublishMode::Ingress);
        let nodes = ["10.77.0.11", "10.77.0.12", "10.77.0.13"].map(|n| plan(&spec, n.parse().unwrap()).unwrap());
        for node in &nodes[1..] {
            assert_eq!(node, &nodes[0], "same ports, backends and tables everywhere");
        }
        let (key, entry) = nodes[0].ingress.iter().next().unwrap();
        assert_eq!((u16::from_be(key.port), key.proto, entry.backends, entry.vni), (8080, PROTO_TCP, 2, 4097));
        assert!(nodes[0].backends.values().all(|b| u16::from_be(b.port) == 80), "backends at the target port");
    }

    #[test]
    fn a_host_mode_port_is_only_on_nodes_with_a_backend_and_only_to_theirs() {
        let spec = published_spec(PublishMode::Host);
        let with = plan(&spec, "10.77.0.11".parse().unwrap()).unwrap();
        let entry = with.ingress.values().next().unwrap();
        assert_eq!(entry.backends, 1);
        let backend = with.backends.values().next().unwrap();
        assert_eq!(backend.addr, u32::from_ne_bytes([10, 78, 0, 11]), "its own backend only");
        let without = plan(&spec, "10.77.0.13".parse().unwrap()).unwrap();
        assert!(without.ingress.is_empty(), "not published where no backend runs");
    }

    #[test]
    fn the_table_depends_only_on_the_backends() {
        let mut shuffled = backends(4);
        shuffled.reverse();
        assert_eq!(maglev(&backends(4)), maglev(&shuffled));
    }
}
