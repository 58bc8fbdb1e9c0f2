//! Services -> the contents of the load-balancing maps. Pure, like `overlay`.
//!
//! Table and backend IDs are allocated (`Ids`), so two can never share one, and kept from
//! plan to plan, so a service keeps its IDs across updates. Maglev tables are built from the
//! backends' addresses alone, so every node makes the same choices (whatever IDs its
//! backends have there) and a backend leaving moves only its own share of flows.

use std::{
    collections::{BTreeSet, HashMap},
    hash::Hash,
    net::Ipv4Addr,
};

use shoal_api::dataplane::{DataplaneSpec, Protocol, PublishMode, ServiceVip};
use shoal_common::lb::{
    Backend, IngressEntry, IngressKey, MaglevTable, ServiceEntry, ServiceKey, HAIRPIN_PROBES, MAGLEV_PRIME,
    MAGLEV_SLOTS, PROTO_TCP, PROTO_UDP, SOCKET_VNI,
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
    /// The IDs this plan gave out.
    pub ids: Ids,
}

/// Which ID each Maglev table (a VIP port or a published port) and each backend has on
/// this node. Allocated, not hashed: a hash collision would send one service's traffic to
/// another's task. A plan keeps the IDs of the one before for what it still has, and gives
/// new things IDs neither plan uses, so no ID changes meaning while the kernel may still
/// hold its old entry (make-before-break).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ids {
    tables: HashMap<String, u32>,
    backends: HashMap<(u32, Ipv4Addr, u16), u32>,
    /// IDs the maps held when the agent started, before any plan: given out only once a
    /// plan has replaced them.
    held_tables: BTreeSet<u32>,
    held_backends: BTreeSet<u32>,
}

impl Ids {
    /// What the maps hold at start (an earlier run's entries, whatever they meant).
    pub fn held(tables: BTreeSet<u32>, backends: BTreeSet<u32>) -> Ids {
        Ids { held_tables: tables, held_backends: backends, ..Ids::default() }
    }

    /// Keeps `tables` and `backends` out too, until a plan has replaced them (what the maps
    /// hold after a failed update).
    pub fn hold(&mut self, tables: BTreeSet<u32>, backends: BTreeSet<u32>) {
        self.held_tables.extend(tables);
        self.held_backends.extend(backends);
    }
}

/// Gives out IDs for one kind for one plan (see `Ids`).
struct Allocator<'a, K> {
    previous: &'a HashMap<K, u32>,
    next: HashMap<K, u32>,
    /// Every ID the previous plan or the kernel holds, and every one given out so far.
    taken: BTreeSet<u32>,
    cursor: u32,
}

impl<'a, K: Hash + Eq + Clone> Allocator<'a, K> {
    fn new(previous: &'a HashMap<K, u32>, held: &BTreeSet<u32>) -> Self {
        let taken = previous.values().chain(held).copied().collect();
        Allocator { previous, next: HashMap::new(), taken, cursor: 0 }
    }

    /// `key`'s ID: the one it had, or the smallest free one (never 0).
    fn id(&mut self, key: &K) -> Result<u32, NetError> {
        if let Some(id) = self.next.get(key).or_else(|| self.previous.get(key)) {
            let id = *id;
            self.next.insert(key.clone(), id);
            return Ok(id);
        }
        loop {
            self.cursor = self.cursor.checked_add(1).ok_or(NetError::IdsExhausted)?;
            if self.taken.insert(self.cursor) {
                self.next.insert(key.clone(), self.cursor);
                return Ok(self.cursor);
            }
        }
    }
}

/// The allocators of one plan.
struct Allocators<'a> {
    tables: Allocator<'a, String>,
    backends: Allocator<'a, (u32, Ipv4Addr, u16)>,
}

/// Plans the services of `spec` for the node at `node_addr` (which decides where host-mode
/// ports are published).
pub fn plan(spec: &DataplaneSpec, node_addr: Ipv4Addr, previous: &Ids) -> Result<LbPlan, NetError> {
    let mut plan = LbPlan::default();
    let mut ids = Allocators {
        tables: Allocator::new(&previous.tables, &previous.held_tables),
        backends: Allocator::new(&previous.backends, &previous.held_backends),
    };
    for svc in &spec.services {
        let Some(net) = spec.network(&svc.network) else { continue };
        if !svc.dnsrr {
            let vip = u32::from_ne_bytes(svc.vip.octets());
            for port in &svc.ports {
                let proto = proto_number(port.protocol);
                let key = ServiceKey { vni: net.vni, vip, port: port.port.to_be(), proto, _pad: 0 };
                let label = format!("{}:{}/{proto} of {}", svc.vip, port.port, svc.name);
                let id = ids.tables.id(&format!("vip {} {}:{}/{proto}", net.vni, svc.vip, port.port))?;
                let entry = plan.table(&mut ids, id, &svc.backends, port.target_port)?;
                plan.services.insert(key, entry);
                // The socket hooks' copy, keyed without the network (a socket has none yet).
                let socket_key = ServiceKey { vni: SOCKET_VNI, ..key };
                if plan.services.insert(socket_key, entry).is_some() {
                    return Err(NetError::VipOnTwoNetworks(format!("{label}: the VIP is used on another network too")));
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
            let id = ids.tables.id(&format!("published {mode} {}/{proto}", port.published_port))?;
            let entry = plan.table(&mut ids, id, &backends, port.target_port)?;
            let key = IngressKey { port: port.published_port.to_be(), proto, _pad: 0 };
            plan.ingress.insert(key, IngressEntry { id: entry.id, backends: entry.backends, vni: net.vni });
        }
    }
    plan.ids = Ids { tables: ids.tables.next, backends: ids.backends.next, ..Ids::default() };
    Ok(plan)
}

impl LbPlan {
    /// The ports published on this node, whatever their protocol.
    pub fn published_ports(&self) -> std::collections::BTreeSet<u16> {
        self.ingress.keys().map(|key| u16::from_be(key.port)).collect()
    }

    /// Adds the backends `addrs` at `target_port` and their Maglev table under `id`.
    fn table(
        &mut self,
        allocators: &mut Allocators,
        id: u32,
        addrs: &[Ipv4Addr],
        target_port: u16,
    ) -> Result<ServiceEntry, NetError> {
        let mut ids = Vec::new();
        for addr in addrs {
            let backend = Backend { addr: u32::from_ne_bytes(addr.octets()), port: target_port.to_be(), _pad: 0 };
            let backend_id = allocators.backends.id(&(id, *addr, target_port))?;
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
    break_long_runs(&mut slots[..MAGLEV_PRIME]);
    for extra in MAGLEV_PRIME..MAGLEV_SLOTS {
        slots[extra] = slots[extra - MAGLEV_PRIME];
    }
    MaglevTable { slots }
}

/// The longest run of one backend a table may hold (cyclically, over its `MAGLEV_PRIME`
/// slots). The TC path probes `HAIRPIN_PROBES` slots from the flow's for a backend other
/// than the client; near the end of the table those probes wrap through the repeated
/// slots and see as few as `HAIRPIN_PROBES - 3` distinct ones, so runs must stay shorter
/// than that for the probes always to find another backend.
pub const MAX_RUN: usize = HAIRPIN_PROBES - 4;

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

    /// Whether every window the TC path probes (from any slot, wrapping) holds two backends.
    fn probes_always_find_another(table: &MaglevTable) -> bool {
        (0..MAGLEV_SLOTS).all(|first| {
            let window: Vec<u32> = (0..HAIRPIN_PROBES).map(|k| table.slots[(first + k) & (MAGLEV_SLOTS - 1)]).collect();
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
            let longest = (0..MAGLEV_PRIME)
                .map(|s| (0..).take_while(|k| table.slots[(s + k) % MAGLEV_PRIME] == table.slots[s]).count())
                .max();
            assert!(longest <= Some(MAX_RUN), "round {round}: a run of {longest:?}");
        }
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
            nodes: vec![],
        }
    }

    #[test]
    fn an_ingress_port_is_the_same_on_every_node() {
        let spec = published_spec(PublishMode::Ingress);
        let nodes = ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
            .map(|n| plan(&spec, n.parse().unwrap(), &Ids::default()).unwrap());
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
        let with = plan(&spec, "10.77.0.11".parse().unwrap(), &Ids::default()).unwrap();
        let entry = with.ingress.values().next().unwrap();
        assert_eq!(entry.backends, 1);
        let backend = with.backends.values().next().unwrap();
        assert_eq!(backend.addr, u32::from_ne_bytes([10, 78, 0, 11]), "its own backend only");
        let without = plan(&spec, "10.77.0.13".parse().unwrap(), &Ids::default()).unwrap();
        assert!(without.ingress.is_empty(), "not published where no backend runs");
    }

    #[test]
    fn ids_are_kept_for_what_stays_and_never_reused_while_the_kernel_may_hold_them() {
        let node: Ipv4Addr = "10.77.0.11".parse().unwrap();
        let mut spec = published_spec(PublishMode::Ingress);
        // Held at start: an earlier run's entries, whatever they meant.
        let first = plan(&spec, node, &Ids::held([1].into(), [1, 2].into())).unwrap();
        let table = first.ingress.values().next().unwrap().id;
        assert_eq!(table, 2, "the table skips the held ID 1");
        let mut backend_ids: Vec<u32> = first.backends.keys().copied().collect();
        backend_ids.sort();
        assert_eq!(backend_ids, [3, 4], "backends skip the held IDs 1 and 2");

        // The same spec again: the same IDs, held ones free once replaced.
        let again = plan(&spec, node, &first.ids).unwrap();
        assert_eq!(again, first);

        // One backend goes, another comes: the survivor keeps its ID, the newcomer gets one
        // neither plan uses (the gone one's may still be in the kernel, its table too).
        let gone = first.backends.iter().find(|(_, b)| b.addr == u32::from_ne_bytes([10, 78, 0, 12])).unwrap();
        spec.services[0].backends = vec!["10.78.0.11".parse().unwrap(), "10.78.0.13".parse().unwrap()];
        let next = plan(&spec, node, &first.ids).unwrap();
        assert_eq!(next.ingress.values().next().unwrap().id, table);
        let survivor = first.backends.iter().find(|(_, b)| b.addr == u32::from_ne_bytes([10, 78, 0, 11])).unwrap();
        assert_eq!(next.backends.get(survivor.0), Some(survivor.1));
        assert!(!next.backends.contains_key(gone.0), "a gone backend's ID is not reused at once");
        assert_eq!(next.backends.len(), 2);
        let newcomer = next.backends.keys().find(|id| *id != survivor.0).unwrap();
        assert_eq!(*newcomer, 1, "the smallest ID neither plan uses");
    }

    #[test]
    fn the_table_depends_only_on_the_backends() {
        let mut shuffled = backends(4);
        shuffled.reverse();
        assert_eq!(maglev(&backends(4)), maglev(&shuffled));
    }
}
