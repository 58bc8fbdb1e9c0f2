//! What the kernel holds, kept in memory by the object that put it there, so a change is
//! planned and written as the difference it makes alone, with no map read to diff.
//!
//! Each object of the desired state (a network, an endpoint, a service, a node) owns the
//! `Entries` it puts in the maps; the maps hold their union (`Plan`). Replacing one owner's
//! entries yields a `Delta`: the writes that make the maps match, in make-before-break
//! order, and what each key held before, to undo them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::Ipv4Addr,
    sync::Arc,
};

use ipnet::Ipv4Net;
use shoal_api::dataplane::{EndpointId, ServiceId};
use shoal_common::{
    lb::{Backend, IngressEntry, IngressKey, ServiceEntry, ServiceKey},
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeEntry},
};

use crate::net::{host::HostRoute, lb::Table, NetError};

/// An object of the desired state, as the owner of map entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Network(String),
    Endpoint(EndpointId),
    Service(ServiceId),
    Node(Ipv4Addr),
}

/// A Maglev table of a VIP port or a published port, named for the IDs it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName(pub String);

/// The entries one object puts in the kernel. Tables and backends carry the names their
/// IDs were given for, so the object's next entries keep the same IDs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Entries {
    pub endpoints: Vec<(EndpointKey, EndpointEntry)>,
    pub interfaces: Vec<(u32, InterfaceEntry)>,
    /// Workload interfaces that need `from_workload`: ifindex -> name.
    pub attach: Vec<(u32, String)>,
    pub host_routes: Vec<HostRoute>,
    pub nodes: Vec<u32>,
    pub services: Vec<(ServiceKey, ServiceEntry)>,
    pub ingress: Vec<(IngressKey, IngressEntry)>,
    /// (table, backend address, target port) -> ID, and the backend.
    pub backends: Vec<((u32, Ipv4Addr, u16), u32, Backend)>,
    /// A table with no backend keeps its ID but has no Maglev table in the map.
    pub tables: Vec<(TableName, u32, Option<Arc<Table>>)>,
    pub masquerade: Vec<Ipv4Net>,
    pub gateways: Vec<Ipv4Addr>,
}

/// A map's desired contents with, per key, how many owners put it there (nodes and shared
/// VIPs have several; every owner of a key puts the same value).
#[derive(Debug, Clone)]
pub struct Counted<K, V> {
    entries: HashMap<K, (V, u32)>,
}

impl<K: Hash + Eq, V: PartialEq> PartialEq for Counted<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<K, V> Default for Counted<K, V> {
    fn default() -> Self {
        Counted { entries: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> Counted<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(value, _)| value)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(key, (value, _))| (key, value))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn add(&mut self, key: K, value: V) {
        let entry = self.entries.entry(key).or_insert_with(|| (value.clone(), 0));
        entry.0 = value;
        entry.1 += 1;
    }

    fn sub(&mut self, key: &K) {
        if let Some((_, count)) = self.entries.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                self.entries.remove(key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> FromIterator<(K, V)> for Counted<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut counted = Counted::default();
        for (key, value) in iter {
            counted.add(key, value);
        }
        counted
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> std::ops::Index<&K> for Counted<K, V> {
    type Output = V;

    fn index(&self, key: &K) -> &V {
        self.get(key).expect("no such key")
    }
}

/// The union of every owner's entries: exactly what the maps (and the host) hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub endpoints: Counted<EndpointKey, EndpointEntry>,
    pub interfaces: Counted<u32, InterfaceEntry>,
    pub attach: Counted<u32, String>,
    pub host_routes: Counted<HostRoute, ()>,
    pub nodes: Counted<u32, NodeEntry>,
    pub services: Counted<ServiceKey, ServiceEntry>,
    pub ingress: Counted<IngressKey, IngressEntry>,
    pub backends: Counted<u32, Backend>,
    pub maglev: Counted<u32, Arc<Table>>,
    pub masquerade: Counted<Ipv4Net, ()>,
    pub gateways: Counted<Ipv4Addr, ()>,
}

impl Plan {
    /// Whether the node must forward: the way out (masquerade) and the mesh's replies to
    /// clients leave through the kernel's route lookup for forwarding (`bpf_fib_lookup`),
    /// which refuses on an interface that does not forward.
    pub fn needs_forwarding(&self) -> bool {
        !self.masquerade.is_empty() || !self.ingress.is_empty()
    }

    /// Whether the node should forward: as it must (`needs_forwarding`), or for the VXLAN
    /// the programs send to other nodes (through the same lookup; without forwarding it goes
    /// through the VXLAN device, slower).
    pub fn wants_forwarding(&self) -> bool {
        self.needs_forwarding() || !self.nodes.is_empty()
    }

    /// The ports published on this node, whatever their protocol.
    pub fn published_ports(&self) -> BTreeSet<u16> {
        self.ingress.keys().map(|key| u16::from_be(key.port)).collect()
    }

    pub fn masquerade(&self) -> Vec<Ipv4Net> {
        let mut subnets: Vec<Ipv4Net> = self.masquerade.keys().copied().collect();
        subnets.sort();
        subnets
    }

    pub fn gateways(&self) -> Vec<Ipv4Addr> {
        let mut gateways: Vec<Ipv4Addr> = self.gateways.keys().copied().collect();
        gateways.sort();
        gateways
    }

    pub fn host_routes(&self) -> Vec<HostRoute> {
        let mut routes: Vec<HostRoute> = self.host_routes.keys().copied().collect();
        routes.sort();
        routes
    }
}

/// Writes to one map: `put` then (after every other map's puts) `delete`, and what each
/// touched key held before, to undo them.
#[derive(Debug, Clone)]
pub struct MapDelta<K, V> {
    pub put: Vec<(K, V)>,
    pub delete: Vec<K>,
    before: Vec<(K, Option<V>)>,
    seen: std::collections::HashSet<K>,
}

impl<K, V> Default for MapDelta<K, V> {
    fn default() -> Self {
        MapDelta { put: Vec::new(), delete: Vec::new(), before: Vec::new(), seen: Default::default() }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> MapDelta<K, V> {
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }

    /// Whether keys come or go (not only values change).
    pub fn changes_keys(&self) -> bool {
        let new = |key: &K| self.before.iter().any(|(k, was)| k == key && was.is_none());
        !self.delete.is_empty() || self.put.iter().any(|(key, _)| new(key))
    }

    /// Replaces `old` by `new` in `counted`, remembering what the keys held first.
    fn replace(&mut self, counted: &mut Counted<K, V>, old: Vec<(K, V)>, new: Vec<(K, V)>) {
        if old == new {
            return;
        }
        for (key, _) in old.iter().chain(&new) {
            if self.seen.insert(key.clone()) {
                self.before.push((key.clone(), counted.get(key).cloned()));
            }
        }
        for (key, _) in &old {
            counted.sub(key);
        }
        for (key, value) in new {
            counted.add(key, value);
        }
    }

    /// The writes from what the touched keys held first to what `counted` holds now.
    fn finish(&mut self, counted: &Counted<K, V>) {
        self.put.clear();
        self.delete.clear();
        for (key, was) in &self.before {
            match (counted.get(key), was) {
                (Some(now), Some(was)) if now == was => {}
                (Some(now), _) => self.put.push((key.clone(), now.clone())),
                (None, Some(_)) => self.delete.push(key.clone()),
                (None, None) => {}
            }
        }
    }
}

/// What one change writes, map by map.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pub endpoints: MapDelta<EndpointKey, EndpointEntry>,
    pub interfaces: MapDelta<u32, InterfaceEntry>,
    pub attach: MapDelta<u32, String>,
    pub host_routes: MapDelta<HostRoute, ()>,
    pub nodes: MapDelta<u32, NodeEntry>,
    pub services: MapDelta<ServiceKey, ServiceEntry>,
    pub ingress: MapDelta<IngressKey, IngressEntry>,
    pub backends: MapDelta<u32, Backend>,
    pub maglev: MapDelta<u32, Arc<Table>>,
    pub masquerade: MapDelta<Ipv4Net, ()>,
    pub gateways: MapDelta<Ipv4Addr, ()>,
}

impl Delta {
    /// The way out changed (masquerade or DNS rules to rewrite).
    pub fn touches_nat(&self) -> bool {
        !self.masquerade.is_empty() || !self.gateways.is_empty()
    }
}

/// Table and backend IDs: allocated, not hashed (a hash collision would send one service's
/// traffic to another's task), kept by an owner across its changes, and given out from a
/// cursor that only moves on (from the highest the maps held at start), so an ID freed by
/// one change is not given to another backend while conntrack may still remember it (not
/// for 4 billion allocations). Conntrack pins flows by backend ID, so the same backend (the
/// same table, address and port) coming back gets its ID back: after an undo, a service
/// removed and set again, or a restart (the maps' IDs, read at start).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ids {
    taken_tables: BTreeSet<u32>,
    taken_backends: BTreeSet<u32>,
    cursor_tables: u32,
    cursor_backends: u32,
    /// Table IDs freed by changes, by table name.
    reuse_tables: HashMap<TableName, u32>,
    /// Backend IDs freed by changes, by table name, address and port.
    reuse_backends: HashMap<(TableName, u32, u16), u32>,
    /// Table IDs the maps held at start, by table name (until the resync is done).
    held_tables: HashMap<TableName, u32>,
    /// Backend IDs the maps held at start, by table name, address and port.
    held_backends: HashMap<(TableName, u32, u16), u32>,
    /// Backend IDs the maps held at start in no table (draining backends), by address and
    /// port.
    orphans: HashMap<(u32, u16), Vec<u32>>,
}

/// IDs freed by changes remembered for their backend's return; past this many they are
/// forgotten wholesale (they only save the flows of a backend that comes back). What the
/// maps held at start is kept apart, whatever its size, until the resync is done.
const REUSE_MAX: usize = 1 << 16;

/// What the maps hold, read at start: tables by name, backends by table name and by value.
#[derive(Debug, Default)]
pub struct KernelIds {
    pub tables: Vec<(Vec<TableName>, u32)>,
    /// (the names of the tables that have it, ID, what it holds).
    pub backends: Vec<(Vec<TableName>, u32, Backend)>,
}

impl Ids {
    /// Keeps IDs out of use (what the maps held after a failed resync).
    pub fn hold(&mut self, tables: impl IntoIterator<Item = u32>, backends: impl IntoIterator<Item = u32>) {
        self.taken_tables.extend(tables);
        self.taken_backends.extend(backends);
    }

    /// Moves the cursors past the maps' tables and backends, which only the same tables and
    /// backends take back (`table_for`, `backend_for`).
    pub fn hold_kernel(&mut self, kernel: &KernelIds) {
        let most = |ids: &mut dyn Iterator<Item = u32>| ids.max().unwrap_or(0);
        self.cursor_tables = self.cursor_tables.max(most(&mut kernel.tables.iter().map(|(_, id)| *id)));
        self.cursor_backends = self.cursor_backends.max(most(&mut kernel.backends.iter().map(|(_, id, _)| *id)));
        for (names, id) in &kernel.tables {
            for name in names {
                self.held_tables.insert(name.clone(), *id);
            }
        }
        for (names, id, backend) in &kernel.backends {
            if names.is_empty() {
                self.orphans.entry((backend.addr, backend.port)).or_default().push(*id);
            }
            for name in names {
                self.held_backends.insert((name.clone(), backend.addr, backend.port), *id);
            }
        }
    }

    /// Forgets what the maps held at start (the resync has replaced it).
    fn forget_kernel(&mut self) {
        self.held_tables.clear();
        self.held_backends.clear();
        self.orphans.clear();
    }

    /// The ID of table `name`: the one it had, or a new one.
    pub fn table_for(&mut self, name: &TableName) -> Result<u32, NetError> {
        for had in [self.reuse_tables.remove(name), self.held_tables.remove(name)].into_iter().flatten() {
            if self.taken_tables.insert(had) {
                return Ok(had);
            }
        }
        next_free(&mut self.cursor_tables, &mut self.taken_tables)
    }

    /// The ID of `backend` in table `table`: the one it had there, or one the maps held for
    /// the same address and port in no table (a draining backend), or a new one.
    pub fn backend_for(&mut self, table: &TableName, backend: &Backend) -> Result<u32, NetError> {
        // A remembered ID is taken back only if nobody has it (the cursor came round).
        let key = (table.clone(), backend.addr, backend.port);
        for had in [self.reuse_backends.remove(&key), self.held_backends.remove(&key)].into_iter().flatten() {
            if self.taken_backends.insert(had) {
                return Ok(had);
            }
        }
        while let Some(id) = self.orphans.get_mut(&(backend.addr, backend.port)).and_then(Vec::pop) {
            if self.taken_backends.insert(id) {
                return Ok(id);
            }
        }
        next_free(&mut self.cursor_backends, &mut self.taken_backends)
    }

    /// Remembers IDs an owner no longer uses, for their table or backend's return.
    fn freed(&mut self, tables: &[(TableName, u32)], backends: &[(TableName, u32, u16, u32)]) {
        if !tables.is_empty() && self.reuse_tables.len() + tables.len() > REUSE_MAX {
            self.reuse_tables.clear();
        }
        if !backends.is_empty() && self.reuse_backends.len() + backends.len() > REUSE_MAX {
            self.reuse_backends.clear();
        }
        for (name, id) in tables {
            self.reuse_tables.insert(name.clone(), *id);
        }
        for (name, addr, port, id) in backends {
            self.reuse_backends.insert((name.clone(), *addr, *port), *id);
        }
    }
}

fn next_free(cursor: &mut u32, taken: &mut BTreeSet<u32>) -> Result<u32, NetError> {
    for _ in 0..=u32::MAX as u64 {
        *cursor = cursor.checked_add(1).unwrap_or(1);
        if taken.insert(*cursor) {
            return Ok(*cursor);
        }
        if taken.len() as u64 >= u32::MAX as u64 {
            break;
        }
    }
    Err(NetError::IdsExhausted)
}

/// Every owner's entries and their union.
#[derive(Debug, Default)]
pub struct Mirror {
    parts: BTreeMap<Owner, Entries>,
    plan: Plan,
    pub ids: Ids,
}

impl Mirror {
    /// An empty mirror that gives out IDs from `ids`.
    pub fn with_ids(ids: Ids) -> Mirror {
        Mirror { ids, ..Mirror::default() }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn entries(&self, owner: &Owner) -> Option<&Entries> {
        self.parts.get(owner)
    }

    pub fn owners(&self) -> impl Iterator<Item = &Owner> {
        self.parts.keys()
    }

    /// Makes `new` the entries of `owner` (none: it is gone), records in `delta` what the
    /// maps must change (see `finish`), and returns what the owner had, to put back with
    /// another `replace`.
    pub fn replace(&mut self, owner: Owner, new: Option<Entries>, delta: &mut Delta) -> Option<Entries> {
        let old = self.parts.remove(&owner);
        let empty = Entries::default();
        let (o, n) = (old.as_ref().unwrap_or(&empty), new.as_ref().unwrap_or(&empty));
        let plan = &mut self.plan;
        delta.endpoints.replace(&mut plan.endpoints, o.endpoints.clone(), n.endpoints.clone());
        delta.interfaces.replace(&mut plan.interfaces, o.interfaces.clone(), n.interfaces.clone());
        delta.attach.replace(&mut plan.attach, o.attach.clone(), n.attach.clone());
        let routes = |e: &Entries| e.host_routes.iter().map(|r| (*r, ())).collect();
        delta.host_routes.replace(&mut plan.host_routes, routes(o), routes(n));
        let nodes = |e: &Entries| e.nodes.iter().map(|n| (*n, NodeEntry::default())).collect();
        delta.nodes.replace(&mut plan.nodes, nodes(o), nodes(n));
        delta.services.replace(&mut plan.services, o.services.clone(), n.services.clone());
        delta.ingress.replace(&mut plan.ingress, o.ingress.clone(), n.ingress.clone());
        let backends = |e: &Entries| e.backends.iter().map(|(_, id, b)| (*id, *b)).collect();
        delta.backends.replace(&mut plan.backends, backends(o), backends(n));
        let tables = |e: &Entries| e.tables.iter().filter_map(|(_, id, t)| Some((*id, t.clone()?))).collect();
        delta.maglev.replace(&mut plan.maglev, tables(o), tables(n));
        let unit = |items: &[Ipv4Net]| items.iter().map(|i| (*i, ())).collect();
        delta.masquerade.replace(&mut plan.masquerade, unit(&o.masquerade), unit(&n.masquerade));
        let unit = |items: &[Ipv4Addr]| items.iter().map(|i| (*i, ())).collect();
        delta.gateways.replace(&mut plan.gateways, unit(&o.gateways), unit(&n.gateways));
        // IDs the owner no longer uses are free (the cursor has moved past them); those it
        // uses are taken, also when old entries come back.
        for (_, id, _) in &o.tables {
            self.ids.taken_tables.remove(id);
        }
        for (_, id, _) in &o.backends {
            self.ids.taken_backends.remove(id);
        }
        let kept_table = |id: &u32| n.tables.iter().any(|(_, t, _)| t == id);
        let kept_backend = |id: &u32| n.backends.iter().any(|(_, b, _)| b == id);
        let name_of = |table: u32| o.tables.iter().find(|(_, t, _)| *t == table).map(|(name, _, _)| name.clone());
        let tables: Vec<(TableName, u32)> =
            o.tables.iter().filter(|(_, id, _)| !kept_table(id)).map(|(name, id, _)| (name.clone(), *id)).collect();
        let backends: Vec<(TableName, u32, u16, u32)> = o
            .backends
            .iter()
            .filter(|(_, id, _)| !kept_backend(id))
            .filter_map(|((table, _, _), id, b)| Some((name_of(*table)?, b.addr, b.port, *id)))
            .collect();
        self.ids.freed(&tables, &backends);
        self.ids.taken_tables.extend(n.tables.iter().map(|(_, id, _)| *id));
        self.ids.taken_backends.extend(n.backends.iter().map(|(_, id, _)| *id));
        if let Some(new) = new {
            self.parts.insert(owner, new);
        }
        old
    }

    /// Frees the IDs held at start that no entry uses (the maps no longer hold them once
    /// synced to this mirror).
    pub fn forget_held(&mut self) {
        self.ids.forget_kernel();
        self.ids.taken_tables = self.parts.values().flat_map(|e| e.tables.iter().map(|(_, id, _)| *id)).collect();
        self.ids.taken_backends = self.parts.values().flat_map(|e| e.backends.iter().map(|(_, id, _)| *id)).collect();
    }

    /// Fills `delta`'s writes: from what the keys it touched held first to what they hold now.
    pub fn finish(&self, delta: &mut Delta) {
        let plan = &self.plan;
        delta.endpoints.finish(&plan.endpoints);
        delta.interfaces.finish(&plan.interfaces);
        delta.attach.finish(&plan.attach);
        delta.host_routes.finish(&plan.host_routes);
        delta.nodes.finish(&plan.nodes);
        delta.services.finish(&plan.services);
        delta.ingress.finish(&plan.ingress);
        delta.backends.finish(&plan.backends);
        delta.maglev.finish(&plan.maglev);
        delta.masquerade.finish(&plan.masquerade);
        delta.gateways.finish(&plan.gateways);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_part(nodes: &[u32]) -> Entries {
        Entries { nodes: nodes.to_vec(), ..Entries::default() }
    }

    #[test]
    fn a_shared_key_stays_until_its_last_owner_goes() {
        let mut mirror = Mirror::default();
        let mut delta = Delta::default();
        mirror.replace(Owner::Node("10.0.0.1".parse().unwrap()), Some(node_part(&[1])), &mut delta);
        mirror.replace(Owner::Network("blue".into()), Some(node_part(&[1, 2])), &mut delta);
        mirror.finish(&mut delta);
        let mut put: Vec<u32> = delta.nodes.put.iter().map(|(k, _)| *k).collect();
        put.sort();
        assert_eq!(put, [1, 2]);

        let mut delta = Delta::default();
        mirror.replace(Owner::Network("blue".into()), None, &mut delta);
        mirror.finish(&mut delta);
        assert!(delta.nodes.put.is_empty());
        assert_eq!(delta.nodes.delete, [2], "1 still has an owner");
    }

    #[test]
    fn a_value_changed_and_changed_back_in_one_delta_writes_nothing() {
        let mut mirror = Mirror::default();
        let mut delta = Delta::default();
        let owner = Owner::Network("blue".into());
        mirror.replace(owner.clone(), Some(node_part(&[1])), &mut delta);
        let mut delta = Delta::default();
        let old = mirror.replace(owner.clone(), Some(node_part(&[2])), &mut delta);
        mirror.replace(owner, old, &mut delta);
        mirror.finish(&mut delta);
        assert!(delta.nodes.is_empty(), "{delta:?}");
    }

    #[test]
    fn ids_are_not_reused_soon_after_they_are_freed() {
        let mut ids = Ids::default();
        ids.hold([1], []);
        let first = ids.table_for(&TableName("a".into())).unwrap();
        assert_eq!(first, 2, "held IDs are skipped");
        ids.taken_tables.remove(&first);
        assert_eq!(ids.table_for(&TableName("b".into())).unwrap(), 3, "a freed ID waits for the cursor to come round");
    }
}
