//! Services -> the contents of the load-balancing maps. Pure, like `overlay`.
//!
//! IDs are stable hashes of what they name, so every node computes the same ones and a
//! service keeps its ID across updates; Maglev tables are built from the backends' addresses
//! alone, so every node computes the same table and a backend leaving moves only its own
//! share of flows.

use std::collections::{BTreeMap, HashMap};

use shoal_api::dataplane::{DataplaneSpec, Protocol};
use shoal_common::lb::{
    Backend, MaglevTable, ServiceEntry, ServiceKey, MAGLEV_PRIME, MAGLEV_SLOTS, PROTO_TCP, PROTO_UDP, SOCKET_VNI,
};

use crate::net::NetError;

/// The load-balancing part of a plan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LbPlan {
    pub services: HashMap<ServiceKey, ServiceEntry>,
    pub backends: HashMap<u32, Backend>,
    pub maglev: HashMap<u32, MaglevTable>,
}

pub fn plan(spec: &DataplaneSpec) -> Result<LbPlan, NetError> {
    let mut plan = LbPlan::default();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for svc in spec.services.iter().filter(|s| !s.dnsrr) {
        let Some(net) = spec.network(&svc.network) else { continue };
        let vip = u32::from_ne_bytes(svc.vip.octets());
        for port in &svc.ports {
            let proto = match port.protocol {
                Protocol::Tcp => PROTO_TCP,
                Protocol::Udp => PROTO_UDP,
            };
            let key = ServiceKey { vni: net.vni, vip, port: port.port.to_be(), proto, _pad: 0 };
            let id = fnv32(&[&net.vni.to_be_bytes(), &svc.vip.octets(), &port.port.to_be_bytes(), &[proto]]);
            let label = format!("{}:{}/{proto} of {}", svc.vip, port.port, svc.name);
            if let Some(other) = names.insert(id, label.clone()) {
                return Err(NetError::IdCollision(format!("{label} and {other}")));
            }
            let mut ids = Vec::new();
            for addr in &svc.backends {
                let backend =
                    Backend { addr: u32::from_ne_bytes(addr.octets()), port: port.target_port.to_be(), _pad: 0 };
                let backend_id = fnv32(&[&id.to_be_bytes(), &addr.octets(), &port.target_port.to_be_bytes()]);
                plan.backends.insert(backend_id, backend);
                ids.push((format!("{addr}:{}", port.target_port), backend_id));
            }
            let entry = ServiceEntry { id, backends: ids.len() as u32 };
            plan.services.insert(key, entry);
            // The socket hooks' copy, keyed without the network (a socket has none yet).
            let socket_key = ServiceKey { vni: SOCKET_VNI, ..key };
            if plan.services.insert(socket_key, entry).is_some() {
                return Err(NetError::IdCollision(format!("{label}: the VIP is used on another network too")));
            }
            if !ids.is_empty() {
                plan.maglev.insert(id, maglev(&ids));
            }
        }
    }
    Ok(plan)
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

    #[test]
    fn the_table_depends_only_on_the_backends() {
        let mut shuffled = backends(4);
        shuffled.reverse();
        assert_eq!(maglev(&backends(4)), maglev(&shuffled));
    }
}
