//! A service -> its load-balancing entries. Pure, like `overlay`.
//!
//! Table and backend IDs are allocated (`mirror::Ids`), so two can never share one, and kept
//! by a service across its changes. Maglev tables are built from the backends' addresses
//! alone, so every node makes the same choices (whatever IDs its backends have there) and a
//! backend leaving moves only its own share of flows.

use std::{net::Ipv4Addr, sync::Arc};

use shoal_api::dataplane::{OverlayNetwork, Protocol, PublishMode, ServiceVip};
use shoal_common::{
    lb::{
        Backend, IngressEntry, IngressKey, MaglevLargeTable, MaglevTable, ServiceEntry, ServiceKey, HAIRPIN_PROBES,
        LARGE_TABLE, LARGE_TABLE_BACKENDS, MAGLEV_LARGE_PRIME, MAGLEV_LARGE_SLOTS, MAGLEV_PRIME, MAGLEV_SLOTS,
        PROTO_TCP, PROTO_UDP, SMALL_TABLE_AGAIN, SOCKET_VNI,
    },
    overlay::{EndpointEntry, EndpointKey},
};

use crate::net::{
    mirror::{Entries, Ids, TableName},
    NetError,
};

/// The entries of `svc` on `net`: its VIP (answered like an endpoint), a Maglev table per
/// VIP port and per published port, with their backends. `local_backends` are the backends
/// running on this node (a host-mode port is published only where one runs, and only to
/// those); `previous` are the service's entries now, whose IDs are kept. Draining backends
/// keep their entries (and IDs), so their flows go on, but are in no table.
pub fn service_entries(
    svc: &ServiceVip,
    net: &OverlayNetwork,
    local_backends: &[Ipv4Addr],
    local_draining: &[Ipv4Addr],
    previous: Option<&Entries>,
    ids: &mut Ids,
) -> Result<Entries, NetError> {
    let mut entries = Entries::default();
    let mut tables = Tables { previous, ids };
    if !svc.dnsrr {
        // With no interface and no node, a VIP is only ever a destination the programs rewrite.
        let vip = u32::from_ne_bytes(svc.vip.octets());
        let mac = shoal_api::MacAddr::from_ipv4(svc.vip).0;
        entries.endpoints.push((
            EndpointKey { vni: net.vni, addr: vip },
            EndpointEntry { ifindex: 0, node_addr: 0, mac, router_mac: [0; 6] },
        ));
        for port in &svc.ports {
            let proto = proto_number(port.protocol);
            let key = ServiceKey { vni: net.vni, vip, port: port.port.to_be(), proto, _pad: 0 };
            let name = vip_table(net.vni, svc.vip, port.port, proto);
            let entry = tables.add(&mut entries, name, &svc.backends, &svc.draining, port.target_port)?;
            entries.services.push((key, entry));
            // The socket hooks' copy, keyed without the network (a socket has none yet).
            entries.services.push((ServiceKey { vni: SOCKET_VNI, ..key }, entry));
        }
    }
    for port in &svc.published {
        let proto = proto_number(port.protocol);
        let (mode, backends, draining) = match port.publish_mode {
            PublishMode::Ingress => ("ingress", &svc.backends[..], &svc.draining[..]),
            PublishMode::Host => ("host", local_backends, local_draining),
        };
        if backends.is_empty() && draining.is_empty() && port.publish_mode == PublishMode::Host {
            continue;
        }
        let name = published_table(mode, port.published_port, proto);
        let entry = tables.add(&mut entries, name, backends, draining, port.target_port)?;
        let key = IngressKey { port: port.published_port.to_be(), proto, _pad: 0 };
        entries.ingress.push((key, IngressEntry { id: entry.id, backends: entry.backends, vni: net.vni }));
    }
    Ok(entries)
}

/// The name of the table of a VIP port (`proto`: the IP protocol number).
pub fn vip_table(vni: u32, vip: Ipv4Addr, port: u16, proto: u8) -> TableName {
    TableName(format!("vip {vni} {vip}:{port}/{proto}"))
}

/// The name of the table of a published port (`mode`: "ingress" or "host").
pub fn published_table(mode: &str, port: u16, proto: u8) -> TableName {
    TableName(format!("published {mode} {port}/{proto}"))
}

/// Gives one service's tables and backends their IDs: the ones they had, or new ones.
struct Tables<'a> {
    previous: Option<&'a Entries>,
    ids: &'a mut Ids,
}

impl Tables<'_> {
    /// Adds the table `name` over `addrs` at `target_port` to `entries`, and the entries of
    /// `draining` (in no table).
    fn add(
        &mut self,
        entries: &mut Entries,
        name: TableName,
        addrs: &[Ipv4Addr],
        draining: &[Ipv4Addr],
        target_port: u16,
    ) -> Result<ServiceEntry, NetError> {
        let previous_table = self.previous.and_then(|p| p.tables.iter().find(|(n, _, _)| *n == name));
        let was_large = matches!(previous_table, Some((_, _, Some(table))) if matches!(**table, Table::Large(_)));
        let id = match previous_table {
            Some((_, id, _)) => *id,
            None => self.ids.table_for(&name)?,
        };
        let had: std::collections::HashMap<(u32, Ipv4Addr, u16), u32> =
            self.previous.map(|p| p.backends.iter().map(|(k, id, _)| (*k, *id)).collect()).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut members = Vec::new();
        for (addr, serving) in addrs.iter().map(|a| (a, true)).chain(draining.iter().map(|a| (a, false))) {
            let key = (id, *addr, target_port);
            // A backend listed twice (or serving and draining) is one backend.
            if !seen.insert(key) {
                continue;
            }
            let backend = Backend { addr: u32::from_ne_bytes(addr.octets()), port: target_port.to_be(), _pad: 0 };
            let backend_id = match had.get(&key) {
                Some(backend_id) => *backend_id,
                None => self.ids.backend_for(&name, &backend)?,
            };
            entries.backends.push((key, backend_id, backend));
            if serving {
                members.push((format!("{addr}:{target_port}"), backend_id));
            }
        }
        let count = members.len() as u32;
        let large = count > LARGE_TABLE_BACKENDS || (was_large && count > SMALL_TABLE_AGAIN);
        let table = (!members.is_empty()).then(|| Arc::new(maglev_sized(&members, large)));
        entries.tables.push((name, id, table));
        Ok(ServiceEntry { id, backends: if large && count > 0 { count | LARGE_TABLE } else { count } })
    }
}

fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// A service's Maglev table as the maps hold it: 1021 slots (`SHOAL_MAGLEV`), or 16381 for a
/// service with more than `LARGE_TABLE_BACKENDS` backends (`SHOAL_MAGLEV_LARGE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Table {
    Small(Box<MaglevTable>),
    Large(Box<MaglevLargeTable>),
}

impl Table {
    /// Every slot, the repeated ones past the prime included.
    pub fn slots(&self) -> &[u32] {
        match self {
            Table::Small(table) => &table.slots,
            Table::Large(table) => &table.slots,
        }
    }
}

/// Maglev's table (Eisenbud et al., NSDI 2016, section 3.4): each backend walks its own
/// permutation of the slots, taking turns, until every slot is taken. `backends` are
/// (name, ID); the names alone decide the permutations. Large past
/// `LARGE_TABLE_BACKENDS` backends.
pub fn maglev(backends: &[(String, u32)]) -> Table {
    maglev_sized(backends, backends.len() > LARGE_TABLE_BACKENDS as usize)
}

/// `maglev`, large or not as the caller says (a service keeps a large table until it is
/// down to `SMALL_TABLE_AGAIN` backends).
pub fn maglev_sized(backends: &[(String, u32)], large: bool) -> Table {
    if large {
        // (64 KiB may pass through the stack on its way to the box: the agent's threads
        // have 2 MiB.)
        let mut table = Box::new(MaglevLargeTable { slots: [u32::MAX; MAGLEV_LARGE_SLOTS] });
        fill(backends, MAGLEV_LARGE_PRIME, &mut table.slots);
        Table::Large(table)
    } else {
        let mut table = Box::new(MaglevTable { slots: [u32::MAX; MAGLEV_SLOTS] });
        fill(backends, MAGLEV_PRIME, &mut table.slots);
        Table::Small(table)
    }
}

/// Fills the first `prime` of `slots` (all `u32::MAX`) by Maglev's walks, and the rest (up
/// to a power of two the programs index with a mask) with the first ones again.
fn fill(backends: &[(String, u32)], prime: usize, slots: &mut [u32]) {
    let mut sorted: Vec<&(String, u32)> = backends.iter().collect();
    sorted.sort();
    let m = prime as u64;
    let walks: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(name, _)| {
            let offset = fnv64(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv64(name.as_bytes(), 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
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
            if filled == prime {
                break 'fill;
            }
        }
    }
    break_long_runs(&mut slots[..prime]);
    for extra in prime..slots.len() {
        slots[extra] = slots[extra - prime];
    }
}

/// The longest run of one backend a table may hold (cyclically, over its `MAGLEV_PRIME`
/// slots). The TC path probes `HAIRPIN_PROBES` slots from the flow's for a backend other
/// than the client; near the end of the table those probes wrap through the repeated
/// slots and see as few as `HAIRPIN_PROBES - 3` distinct ones, so runs must stay shorter
/// than that for the probes always to find another backend.
pub const MAX_RUN: usize = HAIRPIN_PROBES - 4;
// The reasoning above holds for both table sizes because both repeat the same number of
// slots past their prime.
const _: () = assert!(MAGLEV_SLOTS - MAGLEV_PRIME == MAGLEV_LARGE_SLOTS - MAGLEV_LARGE_PRIME);

/// Breaks every run of one backend longer than `MAX_RUN` by swapping a slot of the run with
/// the nearest slot of another backend that sits between two slots not of the run's
/// backend. Swaps keep every backend's share; the result is a function of the table alone,
/// so every node still builds the same one. Maglev alone gives runs of 8 and more
/// (six backends: 1 flow in ~300 from one of them was balanced back to itself and lost).
fn break_long_runs(slots: &mut [u32]) {
    let n = slots.len();
    if slots.iter().all(|s| *s == slots[0]) {
        return;
    }
    let at = |slots: &[u32], i: usize| slots[i % n];
    // Each pass fixes every run it meets; a swap can lengthen a neighbouring run of the
    // other backend by one, which a later pass fixes. Tables converge in a pass or two.
    for _ in 0..16 {
        let mut changed = false;
        for start in 0..n {
            let backend = slots[start];
            if (1..=MAX_RUN).any(|k| at(slots, start + k) != backend) {
                continue;
            }
            let inside = (start + MAX_RUN) % n;
            let quiet =
                |q: usize| at(slots, q) != backend && at(slots, q + n - 1) != backend && at(slots, q + 1) != backend;
            let far = (1..n).map(|d| (inside + d) % n);
            let other = far.clone().find(|q| quiet(*q)).or_else(|| far.clone().find(|q| slots[*q] != backend));
            if let Some(q) = other {
                slots.swap(inside, q);
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
    // Not seen in any table tried (the unit tests cover hundreds); said rather than shipped
    // silently, since a run this long lets a client be balanced back to itself.
    tracing::warn!("a Maglev table still holds a run longer than {MAX_RUN} slots after 16 passes");
}

fn fnv64(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use shoal_api::dataplane::{DataplaneSpec, Desired, Rules};

    use super::*;
    use crate::net::{
        mirror::{Delta, Mirror, Owner},
        overlay::{self, LinkInfo},
    };

    fn backends(n: u32) -> Vec<(String, u32)> {
        (1..=n).map(|i| (format!("10.78.0.{i}:80"), i)).collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let table = maglev(&backends(3));
        assert!(matches!(table, Table::Small(_)));
        let slots = table.slots();
        for id in 1..=3 {
            let share = slots[..MAGLEV_PRIME].iter().filter(|s| **s == id).count();
            assert!((330..=350).contains(&share), "backend {id} has {share} of {MAGLEV_PRIME}");
        }
        assert_eq!(slots[MAGLEV_PRIME..], slots[..MAGLEV_SLOTS - MAGLEV_PRIME]);
    }

    #[test]
    fn many_backends_get_a_large_table_and_a_fair_share_of_it() {
        let table = maglev(&backends(LARGE_TABLE_BACKENDS));
        assert!(matches!(table, Table::Small(_)), "up to the limit, the small table");
        let table = maglev(&backends(100));
        assert!(matches!(table, Table::Large(_)));
        let slots = table.slots();
        assert_eq!(slots.len(), MAGLEV_LARGE_SLOTS);
        // 163.8 slots each: Maglev keeps every share within a slot or two of it.
        for id in 1..=100 {
            let share = slots[..MAGLEV_LARGE_PRIME].iter().filter(|s| **s == id).count();
            assert!((160..=168).contains(&share), "backend {id} has {share} of {MAGLEV_LARGE_PRIME}");
        }
        assert_eq!(slots[MAGLEV_LARGE_PRIME..], slots[..MAGLEV_LARGE_SLOTS - MAGLEV_LARGE_PRIME]);
        // In the small table, 100 backends would have had 10 or 11 slots each: 10% apart.
        assert!(probes_always_find_another(&table));
    }

    #[test]
    fn a_large_table_stays_large_until_the_service_is_well_below_the_line() {
        let net = shoal_api::dataplane::OverlayNetwork::new("blue", 4097, "10.78.0.0/16".parse().unwrap());
        let addrs = |n: usize| (0..n).map(|i| Ipv4Addr::new(10, 78, 1, i as u8 + 1)).collect::<Vec<_>>();
        let service = |n: usize| ServiceVip {
            name: "web".into(),
            network: "blue".into(),
            vip: Ipv4Addr::new(10, 78, 0, 100),
            ports: vec![shoal_api::dataplane::ServicePort { protocol: Protocol::Tcp, port: 80, target_port: 80 }],
            backends: addrs(n),
            draining: vec![],
            dnsrr: false,
            published: vec![],
        };
        let mut ids = Ids::default();
        let mut previous: Option<Entries> = None;
        let mut sizes = Vec::new();
        for n in [30, 33, 32, 25, 24, 30, 33] {
            let entries = service_entries(&service(n), &net, &[], &[], previous.as_ref(), &mut ids).unwrap();
            let (_, entry) = entries.services[0];
            let large = entry.backends & LARGE_TABLE != 0;
            assert_eq!(entry.backends & !LARGE_TABLE, n as u32);
            assert_eq!(matches!(entries.tables[0].2.as_deref(), Some(Table::Large(_))), large);
            sizes.push(large);
            previous = Some(entries);
        }
        assert_eq!(sizes, [false, true, true, true, false, false, true]);
    }

    /// The table's Maglev prime (its slots past it repeat the first ones).
    fn prime_of(table: &Table) -> usize {
        match table {
            Table::Small(_) => MAGLEV_PRIME,
            Table::Large(_) => MAGLEV_LARGE_PRIME,
        }
    }

    /// Whether every window the TC path probes (from any slot, wrapping) holds two backends.
    fn probes_always_find_another(table: &Table) -> bool {
        let slots = table.slots();
        (0..slots.len()).all(|first| {
            let window: Vec<u32> = (0..HAIRPIN_PROBES).map(|k| slots[(first + k) & (slots.len() - 1)]).collect();
            window.iter().any(|b| *b != window[0])
        })
    }

    #[test]
    fn a_client_that_is_a_backend_always_finds_another_within_the_probes() {
        // The demo's six backends: plain Maglev gave 10.78.0.12 a run of 9 slots, so 1 flow
        // in ~300 from that workload was balanced back to itself and lost.
        let demo: Vec<(String, u32)> = (11..=16).map(|i| (format!("10.78.0.{i}:8080"), i)).collect();
        assert!(probes_always_find_another(&maglev(&demo)));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..300 {
            let count = 2 + round % 40;
            let set: Vec<(String, u32)> = (0..count)
                .map(|i| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (
                        format!("10.{}.{}.{}:{}", seed >> 56, (seed >> 48) & 255, (seed >> 40) & 255, seed & 0xffff),
                        i + 1,
                    )
                })
                .collect();
            let table = maglev(&set);
            assert!(probes_always_find_another(&table), "round {round}: {count} backends");
            let (slots, prime) = (table.slots(), prime_of(&table));
            let longest = (0..prime).map(|s| (0..).take_while(|k| slots[(s + k) % prime] == slots[s]).count()).max();
            assert!(longest <= Some(MAX_RUN), "round {round}: a run of {longest:?}");
        }
    }

    #[test]
    fn removing_a_backend_moves_mostly_its_own_slots() {
        let before = maglev(&backends(5));
        let after = maglev(&backends(4));
        let moved = before.slots().iter().zip(after.slots()).filter(|(b, a)| b != a && **b != 5).count();
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
                draining: vec![],
                dnsrr: false,
                published: vec![PublishedPort {
                    protocol: Protocol::Tcp,
                    published_port: 8080,
                    target_port: 80,
                    publish_mode: mode,
                }],
            }],
            nodes: vec![],
        }
    }

    fn mirror(spec: &DataplaneSpec, node: &str, ids: Ids) -> Mirror {
        let desired = Desired::from_spec(spec, Rules::default()).unwrap();
        let links = [("veth".to_owned(), LinkInfo { index: 9, mac: [2, 0, 0, 0, 0, 9] })].into();
        overlay::build(&desired, node.parse().unwrap(), &links, ids).unwrap()
    }

    #[test]
    fn an_ingress_port_is_the_same_on_every_node() {
        let spec = published_spec(PublishMode::Ingress);
        let nodes = ["10.77.0.11", "10.77.0.12", "10.77.0.13"].map(|n| mirror(&spec, n, Ids::default()));
        let lb = |m: &Mirror| {
            let p = m.plan();
            (p.services.clone(), p.ingress.clone(), p.backends.clone(), p.maglev.clone())
        };
        for node in &nodes[1..] {
            assert_eq!(lb(node), lb(&nodes[0]), "same ports, backends and tables everywhere");
        }
        let (key, entry) = nodes[0].plan().ingress.iter().next().unwrap();
        assert_eq!((u16::from_be(key.port), key.proto, entry.backends, entry.vni), (8080, PROTO_TCP, 2, 4097));
        assert!(
            nodes[0].plan().backends.iter().all(|(_, b)| u16::from_be(b.port) == 80),
            "backends at the target port"
        );
    }

    #[test]
    fn a_host_mode_port_is_only_on_nodes_with_a_backend_and_only_to_theirs() {
        let spec = published_spec(PublishMode::Host);
        let with = mirror(&spec, "10.77.0.11", Ids::default());
        let entry = with.plan().ingress.iter().next().unwrap().1;
        assert_eq!(entry.backends, 1);
        let backend = with.plan().backends.iter().next().unwrap().1;
        assert_eq!(backend.addr, u32::from_ne_bytes([10, 78, 0, 11]), "its own backend only");
        let without = mirror(&spec, "10.77.0.13", Ids::default());
        assert!(without.plan().ingress.is_empty(), "not published where no backend runs");
    }

    #[test]
    fn ids_are_kept_for_what_stays_and_never_reused_while_the_kernel_may_hold_them() {
        let node: Ipv4Addr = "10.77.0.11".parse().unwrap();
        let mut spec = published_spec(PublishMode::Ingress);
        // Held at start: an earlier run's entries, whatever they meant.
        let mut held = Ids::default();
        held.hold([1], [1, 2]);
        let mut mirror = mirror(&spec, "10.77.0.11", held);
        let table = mirror.plan().ingress.iter().next().unwrap().1.id;
        assert_eq!(table, 2, "the table skips the held ID 1");
        let mut backend_ids: Vec<u32> = mirror.plan().backends.keys().copied().collect();
        backend_ids.sort();
        assert_eq!(backend_ids, [3, 4], "backends skip the held IDs 1 and 2");
        let id_of = |m: &Mirror, last: u8| {
            m.plan().backends.iter().find(|(_, b)| b.addr == u32::from_ne_bytes([10, 78, 0, last])).map(|(id, _)| *id)
        };
        let (survivor, gone) = (id_of(&mirror, 11).unwrap(), id_of(&mirror, 12).unwrap());

        // One backend goes, another comes: the survivor keeps its ID, the newcomer gets a new
        // one (the gone one's may still be in conntrack).
        spec.services[0].backends = vec!["10.78.0.11".parse().unwrap(), "10.78.0.13".parse().unwrap()];
        let desired = Desired::from_spec(&spec, Rules::default()).unwrap();
        let owner = Owner::Service(("blue".into(), "web".into()));
        let new = overlay::entries(&desired, &owner, node, &Default::default(), &mut mirror).unwrap();
        let mut delta = Delta::default();
        mirror.replace(owner, new, &mut delta);
        mirror.finish(&mut delta);
        assert_eq!(mirror.plan().ingress.iter().next().unwrap().1.id, table);
        assert_eq!(id_of(&mirror, 11), Some(survivor));
        let newcomer = id_of(&mirror, 13).unwrap();
        assert!(newcomer != gone && newcomer > 4, "a fresh ID: {newcomer}");
        assert_eq!(delta.backends.delete, [gone]);
        assert_eq!(mirror.plan().backends.len(), 2);

        // The gone backend comes back (an undo, a task back in its service): its old ID,
        // which the flows conntrack pinned to it still carry.
        spec.services[0].backends.push("10.78.0.12".parse().unwrap());
        let desired = Desired::from_spec(&spec, Rules::default()).unwrap();
        let owner = Owner::Service(("blue".into(), "web".into()));
        let new = overlay::entries(&desired, &owner, node, &Default::default(), &mut mirror).unwrap();
        mirror.replace(owner, new, &mut Delta::default());
        assert_eq!(id_of(&mirror, 12), Some(gone));
    }

    #[test]
    fn a_service_may_have_as_many_backends_as_its_table_has_slots() {
        assert_eq!(shoal_api::dataplane::MAX_BACKENDS, MAGLEV_PRIME);
    }

    #[test]
    fn the_table_depends_only_on_the_backends() {
        let mut shuffled = backends(4);
        shuffled.reverse();
        assert_eq!(maglev(&backends(4)), maglev(&shuffled));
    }
}
