//! The BPF side of the network role: loads shoal's programs with their maps pinned under the
//! node's pin directory, attaches them (TCX, kernels >= 6.6), and writes map entries.
//! The only module that touches BPF.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        tc::SchedClassifierLink,
        CgroupSockAddr, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use shoal_api::dataplane::Counter;
use shoal_common::{
    lb::{
        Backend, CtEntry, FlowKey, IngressEntry, IngressKey, MaglevLargeTable, MaglevTable, NatEntry, ServiceEntry,
        ServiceKey, SOCKET_VNI,
    },
    maps,
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig, NodeEntry},
    stats,
};
use tracing::{debug, info, warn};

use crate::net::{
    lb,
    mirror::{Counted, Delta, KernelIds, Plan, TableName},
    NetError,
};

/// The object `build.rs` compiled from `ebpf/shoal-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shoal-ebpf.o"));

/// TC ingress on the host side of each workload veth.
const FROM_WORKLOAD: &str = "from_workload";
/// TC ingress on the node's VXLAN device.
const FROM_OVERLAY: &str = "from_overlay";
/// TC ingress on the node's underlay interface (the routing mesh).
const FROM_UNDERLAY: &str = "from_underlay";
/// cgroup hooks of the workloads' cgroup (socket-level balancing).
const SOCK_CONNECT: &str = "sock_connect";
const SOCK_SENDMSG: &str = "sock_sendmsg";
const SOCK_RECVMSG: &str = "sock_recvmsg";
const SOCK_GETPEERNAME: &str = "sock_getpeername";
const SOCK_HOOKS: [&str; 4] = [SOCK_CONNECT, SOCK_SENDMSG, SOCK_RECVMSG, SOCK_GETPEERNAME];

/// Pinned maps of earlier versions whose layout changed (now under `..._V<n>` names).
/// (`SHOAL_CONNTRACK` too, once its flows are carried over: `retire_old_conntrack`.)
const RETIRED_MAPS: [&str; 3] = ["SHOAL_NODE_CONFIG", "SHOAL_NODE_CONFIG_V2", "SHOAL_STATS"];

/// Insert only if the key is absent (`BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;
/// The conntrack map before it kept backend IDs (`NatEntry` values).
const RETIRED_CONNTRACK: &str = "SHOAL_CONNTRACK";

/// Where bpffs is mounted on every Linux host.
const BPFFS: &str = "/sys/fs/bpf";

/// TCX (fd-based TC attachments, no clsact qdisc to manage) arrived in Linux 6.6.
const MIN_KERNEL: (u8, u8) = (6, 6);

pub struct Datapath {
    ebpf: Ebpf,
    attachments: Attachments,
}

impl Datapath {
    /// Loads the programs; maps already pinned in `pin_dir` are reused, with their contents.
    pub fn load(pin_dir: &Path) -> Result<Self, NetError> {
        let kernel = KernelVersion::current().map_err(|e| NetError::Kernel(e.to_string()))?;
        if kernel < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
            return Err(NetError::Kernel(format!(
                "kernel {kernel} is too old: shoal needs {}.{} or newer (TCX)",
                MIN_KERNEL.0, MIN_KERNEL.1
            )));
        }
        ensure_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pin_dir).load(OBJECT)?;
        for name in [
            maps::ENDPOINTS,
            maps::INTERFACES,
            maps::NODE_CONFIG,
            maps::NODES,
            maps::STATS,
            maps::SERVICES,
            maps::BACKENDS,
            maps::MAGLEV,
            maps::INGRESS,
            maps::CONNTRACK,
            maps::SOCK_VIPS,
            maps::SOCK_PEERS,
            maps::FRAGMENTS,
            maps::MAGLEV_LARGE,
        ] {
            if ebpf.map(name).is_none() {
                return Err(map_error(name, MapError::InvalidName { name: name.into() }));
            }
        }
        for name in [FROM_WORKLOAD, FROM_OVERLAY, FROM_UNDERLAY] {
            classifier(&mut ebpf, name)?.load().map_err(|source| NetError::Program { program: name, source })?;
        }
        for name in SOCK_HOOKS {
            sock_addr(&mut ebpf, name)?.load().map_err(|source| NetError::Program { program: name, source })?;
        }
        // Flows an older shoald tracked: an upgrade must not reset every balanced connection.
        // Its workload programs go on tracking in the old map until the restore attaches
        // ours, so the flows are carried over now and again then (`retire_old_conntrack`).
        let old = pin_dir.join(RETIRED_CONNTRACK);
        if old.exists() {
            match migrate_conntrack(&mut ebpf, &old) {
                Ok(flows) => info!(flows, "carried the tracked flows of an older version over"),
                Err(e) => warn!(error = %e, "could not carry an older version's tracked flows over"),
            }
        }
        // Maps an older shoald pinned under names since retired (their layout changed).
        for retired in RETIRED_MAPS {
            if std::fs::remove_file(pin_dir.join(retired)).is_ok() {
                info!(map = retired, "removed a retired map's pin");
            }
        }
        info!(pin_dir = %pin_dir.display(), %kernel, "BPF programs loaded");
        let attachments = Attachments { dir: pin_dir.join("links"), links: BTreeMap::new() };
        std::fs::create_dir_all(&attachments.dir)?;
        Ok(Datapath { ebpf, attachments })
    }

    /// Carries over what an older version's programs tracked since `load` (they stay
    /// attached until the restore replaces them), then removes its map.
    pub fn retire_old_conntrack(&mut self, pin_dir: &Path) {
        let old = pin_dir.join(RETIRED_CONNTRACK);
        if !old.exists() {
            return;
        }
        match migrate_conntrack(&mut self.ebpf, &old) {
            Ok(flows) => info!(flows, "carried the last tracked flows of an older version over"),
            Err(e) => warn!(error = %e, "could not carry an older version's tracked flows over"),
        }
        if std::fs::remove_file(&old).is_ok() {
            info!(map = RETIRED_CONNTRACK, "removed a retired map's pin");
        }
    }

    /// Tells the programs the node's devices and address.
    pub fn configure(&mut self, config: NodeConfig) -> Result<(), NetError> {
        let mut map: Array<&mut MapData, NodeConfig> = self.map_mut(maps::NODE_CONFIG)?;
        map.set(0, config, 0).map_err(|e| map_error(maps::NODE_CONFIG, e))
    }

    /// Attaches `from_overlay` to the VXLAN device.
    pub fn attach_overlay(&mut self, device: &str, ifindex: u32) -> Result<(), NetError> {
        self.attach_single(FROM_OVERLAY, device, ifindex)
    }

    /// Attaches `from_underlay` to the interface with the node's underlay address.
    pub fn attach_underlay(&mut self, device: &str, ifindex: u32) -> Result<(), NetError> {
        self.attach_single(FROM_UNDERLAY, device, ifindex)
    }

    /// Attaches `program` to `device` and to nothing else.
    fn attach_single(&mut self, program: &'static str, device: &str, ifindex: u32) -> Result<(), NetError> {
        for stale in self.attachments.attached(program).filter(|i| *i != ifindex).collect::<Vec<_>>() {
            self.attachments.detach(program, stale);
        }
        self.attachments.remove_stale_pins(program, &BTreeSet::from([ifindex]));
        self.attachments.attach(&mut self.ebpf, program, device, ifindex)
    }

    /// Makes the maps hold exactly `plan` and attaches to exactly its interfaces, reading the
    /// maps to find what else they hold: at start, to adopt what an earlier run left without
    /// emptying anything first. Entries go in before attachments so a newly attached
    /// interface never sees a half-filled map.
    pub fn sync(&mut self, plan: &Plan) -> Result<(), NetError> {
        let mut nodes: HashMap<&mut MapData, u32, NodeEntry> = self.map_mut(maps::NODES)?;
        sync_hash_map(&mut nodes, maps::NODES, &wanted(&plan.nodes))?;
        let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> = self.map_mut(maps::ENDPOINTS)?;
        sync_hash_map(&mut endpoints, maps::ENDPOINTS, &wanted(&plan.endpoints))?;
        let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = self.map_mut(maps::INTERFACES)?;
        sync_hash_map(&mut interfaces, maps::INTERFACES, &wanted(&plan.interfaces))?;
        // Workloads' programs before the services that send them traffic (as `write`).
        let stale: Vec<u32> =
            self.attachments.attached(FROM_WORKLOAD).filter(|i| !plan.attach.contains_key(i)).collect();
        for ifindex in stale {
            self.attachments.detach(FROM_WORKLOAD, ifindex);
        }
        self.attachments.remove_stale_pins(FROM_WORKLOAD, &plan.attach.keys().copied().collect());
        for (&ifindex, name) in plan.attach.iter() {
            if !self.attachments.is_attached(FROM_WORKLOAD, ifindex) {
                self.attachments.attach(&mut self.ebpf, FROM_WORKLOAD, name, ifindex)?;
            }
        }
        self.sync_lb(plan)
    }

    /// Writes one change, without reading a map: every put, dependencies first (backends and
    /// tables before the services and ports that point at them, endpoints and interfaces
    /// before the attachments that use them, attachments before services that send traffic
    /// there), then every delete in the reverse order. So no packet meets an entry that
    /// points at something missing.
    pub fn write(&mut self, delta: &Delta) -> Result<(), NetError> {
        self.put(maps::BACKENDS, &delta.backends.put)?;
        let (small, large) = by_size(delta.maglev.put.iter().map(|(id, t)| (*id, &**t)));
        self.put::<u32, MaglevTable, _>(maps::MAGLEV, &small)?;
        self.put::<u32, MaglevLargeTable, _>(maps::MAGLEV_LARGE, &large)?;
        self.put(maps::ENDPOINTS, &delta.endpoints.put)?;
        self.put(maps::NODES, &delta.nodes.put)?;
        self.put(maps::INTERFACES, &delta.interfaces.put)?;
        // A new workload's program before any service may send it traffic: its replies need
        // the program's reverse NAT.
        for (ifindex, name) in &delta.attach.put {
            if !self.attachments.is_attached(FROM_WORKLOAD, *ifindex) {
                self.attachments.attach(&mut self.ebpf, FROM_WORKLOAD, name, *ifindex)?;
            }
        }
        self.put(maps::SERVICES, &delta.services.put)?;
        self.put(maps::INGRESS, &delta.ingress.put)?;
        for ifindex in &delta.attach.delete {
            self.attachments.detach(FROM_WORKLOAD, *ifindex);
        }
        self.delete::<IngressKey, IngressEntry>(maps::INGRESS, &delta.ingress.delete)?;
        self.delete::<ServiceKey, ServiceEntry>(maps::SERVICES, &delta.services.delete)?;
        self.delete::<u32, InterfaceEntry>(maps::INTERFACES, &delta.interfaces.delete)?;
        self.delete::<u32, NodeEntry>(maps::NODES, &delta.nodes.delete)?;
        self.delete::<EndpointKey, EndpointEntry>(maps::ENDPOINTS, &delta.endpoints.delete)?;
        // A table whose service crossed `LARGE_TABLE_BACKENDS` keeps its ID and moves map:
        // its copy in the other one goes once the services point at the new.
        let moved_out_of_small: Vec<u32> = large.iter().map(|(id, _)| *id).collect();
        let moved_out_of_large: Vec<u32> = small.iter().map(|(id, _)| *id).collect();
        self.delete::<u32, MaglevTable>(maps::MAGLEV, &moved_out_of_small)?;
        self.delete::<u32, MaglevLargeTable>(maps::MAGLEV_LARGE, &moved_out_of_large)?;
        self.delete::<u32, MaglevTable>(maps::MAGLEV, &delta.maglev.delete)?;
        self.delete::<u32, MaglevLargeTable>(maps::MAGLEV_LARGE, &delta.maglev.delete)?;
        self.delete::<u32, Backend>(maps::BACKENDS, &delta.backends.delete)
    }

    fn put<K: aya::Pod, V: aya::Pod, B: std::borrow::Borrow<V>>(
        &mut self,
        name: &'static str,
        entries: &[(K, B)],
    ) -> Result<(), NetError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut map: HashMap<&mut MapData, K, V> = self.map_mut(name)?;
        for (key, value) in entries {
            map.insert(key, value.borrow(), 0).map_err(|e| map_error(name, e))?;
        }
        Ok(())
    }

    /// Deletes `keys`; one already gone is fine (an undo may delete what never went in).
    fn delete<K: aya::Pod, V: aya::Pod>(&mut self, name: &'static str, keys: &[K]) -> Result<(), NetError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut map: HashMap<&mut MapData, K, V> = self.map_mut(name)?;
        for key in keys {
            match map.remove(key) {
                Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) => {}
                other => other.map_err(|e| map_error(name, e))?,
            }
        }
        Ok(())
    }

    /// Attaches the socket hooks to the workloads' cgroup: their `connect()` to a VIP then
    /// goes straight to a backend. The links end with the agent (new connections fall back to
    /// the TC path until it is back).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<(), NetError> {
        let dir = std::fs::File::open(cgroup)?;
        for name in SOCK_HOOKS {
            sock_addr(&mut self.ebpf, name)?
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|source| NetError::Program { program: name, source })?;
        }
        info!(cgroup = %cgroup.display(), "socket-level balancing attached");
        Ok(())
    }

    /// Services, make before break: backends and tables a service will point to go in before
    /// the service, and go away only after no service points to them.
    fn sync_lb(&mut self, plan: &Plan) -> Result<(), NetError> {
        let (small, large) = by_size(plan.maglev.iter().map(|(id, t)| (*id, &**t)));
        let (small, large): (StdHashMap<u32, &MaglevTable>, StdHashMap<u32, &MaglevLargeTable>) =
            (small.into_iter().collect(), large.into_iter().collect());
        let mut backends: HashMap<&mut MapData, u32, Backend> = self.map_mut(maps::BACKENDS)?;
        upsert(&mut backends, maps::BACKENDS, &wanted(&plan.backends))?;
        let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = self.map_mut(maps::MAGLEV)?;
        upsert(&mut maglev, maps::MAGLEV, &small)?;
        let mut maglev_large: HashMap<&mut MapData, u32, MaglevLargeTable> = self.map_mut(maps::MAGLEV_LARGE)?;
        upsert(&mut maglev_large, maps::MAGLEV_LARGE, &large)?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> = self.map_mut(maps::SERVICES)?;
        sync_hash_map(&mut services, maps::SERVICES, &wanted(&plan.services))?;
        let mut ingress: HashMap<&mut MapData, IngressKey, IngressEntry> = self.map_mut(maps::INGRESS)?;
        sync_hash_map(&mut ingress, maps::INGRESS, &wanted(&plan.ingress))?;
        let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = self.map_mut(maps::MAGLEV)?;
        prune(&mut maglev, maps::MAGLEV, &small)?;
        let mut maglev_large: HashMap<&mut MapData, u32, MaglevLargeTable> = self.map_mut(maps::MAGLEV_LARGE)?;
        prune(&mut maglev_large, maps::MAGLEV_LARGE, &large)?;
        let mut backends: HashMap<&mut MapData, u32, Backend> = self.map_mut(maps::BACKENDS)?;
        prune(&mut backends, maps::BACKENDS, &wanted(&plan.backends))
    }

    /// The table and backend IDs the maps hold (at start: an earlier run's), each with the
    /// names of the tables it serves: the same tables and backends take them back, so the
    /// flows conntrack pinned to a backend (by ID) stay pinned across a restart.
    pub fn lb_ids(&self) -> Result<KernelIds, NetError> {
        let map = |name: &'static str| {
            self.ebpf.map(name).ok_or_else(|| map_error(name, MapError::InvalidName { name: name.into() }))
        };
        let services: HashMap<&MapData, ServiceKey, ServiceEntry> =
            HashMap::try_from(map(maps::SERVICES)?).map_err(|e| map_error(maps::SERVICES, e))?;
        let ingress: HashMap<&MapData, IngressKey, IngressEntry> =
            HashMap::try_from(map(maps::INGRESS)?).map_err(|e| map_error(maps::INGRESS, e))?;
        let tables: HashMap<&MapData, u32, MaglevTable> =
            HashMap::try_from(map(maps::MAGLEV)?).map_err(|e| map_error(maps::MAGLEV, e))?;
        let large_tables: HashMap<&MapData, u32, MaglevLargeTable> =
            HashMap::try_from(map(maps::MAGLEV_LARGE)?).map_err(|e| map_error(maps::MAGLEV_LARGE, e))?;
        let backends: HashMap<&MapData, u32, Backend> =
            HashMap::try_from(map(maps::BACKENDS)?).map_err(|e| map_error(maps::BACKENDS, e))?;
        let mut names: BTreeMap<u32, Vec<TableName>> = BTreeMap::new();
        for item in services.iter() {
            let (key, entry) = item.map_err(|e| map_error(maps::SERVICES, e))?;
            if key.vni != SOCKET_VNI {
                let vip = std::net::Ipv4Addr::from(key.vip.to_ne_bytes());
                names.entry(entry.id).or_default().push(lb::vip_table(key.vni, vip, u16::from_be(key.port), key.proto));
            }
        }
        for item in ingress.iter() {
            let (key, entry) = item.map_err(|e| map_error(maps::INGRESS, e))?;
            // Either mode: the map does not say, and a port has one.
            for mode in ["ingress", "host"] {
                names.entry(entry.id).or_default().push(lb::published_table(mode, u16::from_be(key.port), key.proto));
            }
        }
        let mut serving: StdHashMap<u32, Vec<TableName>> = StdHashMap::new();
        let small = tables
            .iter()
            .map(|item| item.map(|(id, t)| (id, t.slots.to_vec())).map_err(|e| map_error(maps::MAGLEV, e)));
        let large = large_tables
            .iter()
            .map(|item| item.map(|(id, t)| (id, t.slots.to_vec())).map_err(|e| map_error(maps::MAGLEV_LARGE, e)));
        for item in small.chain(large) {
            let (id, slots) = item?;
            names.entry(id).or_default();
            let members: BTreeSet<u32> = slots.iter().copied().collect();
            for backend in members {
                serving.entry(backend).or_default().extend(names[&id].iter().cloned());
            }
        }
        let mut held =
            KernelIds { tables: names.into_iter().map(|(id, names)| (names, id)).collect(), backends: Vec::new() };
        for item in backends.iter() {
            let (id, backend) = item.map_err(|e| map_error(maps::BACKENDS, e))?;
            held.backends.push((serving.remove(&id).unwrap_or_default(), id, backend));
        }
        Ok(held)
    }

    /// Every counter in use, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<Counter>, NetError> {
        let map = self
            .ebpf
            .map(maps::STATS)
            .ok_or_else(|| map_error(maps::STATS, MapError::InvalidName { name: maps::STATS.into() }))?;
        let per_cpu: PerCpuArray<&MapData, stats::Counter> =
            PerCpuArray::try_from(map).map_err(|e| map_error(maps::STATS, e))?;
        let mut out = Vec::new();
        for code in 0..stats::MAX {
            let Some(name) = stats::name(code) else {
                continue;
            };
            let values = per_cpu.get(&code, 0).map_err(|e| map_error(maps::STATS, e))?;
            let (packets, bytes) = values.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            out.push(Counter { code, name: name.to_owned(), packets, bytes });
        }
        Ok(out)
    }

    /// Detaches every program; the maps stay pinned.
    pub fn detach_all(&mut self) {
        self.attachments.detach_all();
        info!("BPF programs detached");
    }

    /// Leaves every program attached (the pins hold the links), for a restart that must not
    /// interrupt traffic: the next run adopts the links and swaps in its own programs.
    pub fn release(&mut self) {
        self.attachments.release_all();
        info!("BPF programs left attached for the next start");
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, NetError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map =
            self.ebpf.map_mut(name).ok_or_else(|| map_error(name, MapError::InvalidName { name: name.into() }))?;
        T::try_from(map).map_err(|e| map_error(name, e))
    }
}

/// Copies the flows of the retired conntrack map at `old` into the current one, seen now,
/// each forward entry with the ID of the backend at its address and port (so it is balanced
/// again if that backend leaves); entries the current map has already are left alone.
fn migrate_conntrack(ebpf: &mut Ebpf, old: &Path) -> Result<usize, NetError> {
    let data = MapData::from_pin(old).map_err(|e| map_error(RETIRED_CONNTRACK, e))?;
    let flows: HashMap<MapData, FlowKey, NatEntry> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|e| map_error(RETIRED_CONNTRACK, e))?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_err(|e| NetError::Kernel(format!("the monotonic clock: {e}")))?
        .tv_sec() as u32;
    let backends: StdHashMap<(u32, u16), u32> = {
        let map = ebpf
            .map(maps::BACKENDS)
            .ok_or_else(|| map_error(maps::BACKENDS, MapError::InvalidName { name: maps::BACKENDS.into() }))?;
        let backends: HashMap<&MapData, u32, Backend> =
            HashMap::try_from(map).map_err(|e| map_error(maps::BACKENDS, e))?;
        backends.iter().filter_map(Result::ok).map(|(id, b)| ((b.addr, b.port), id)).collect()
    };
    let map = ebpf
        .map_mut(maps::CONNTRACK)
        .ok_or_else(|| map_error(maps::CONNTRACK, MapError::InvalidName { name: maps::CONNTRACK.into() }))?;
    let mut current: HashMap<&mut MapData, FlowKey, CtEntry> =
        HashMap::try_from(map).map_err(|e| map_error(maps::CONNTRACK, e))?;
    let mut carried = 0;
    for item in flows.iter() {
        let (flow, nat) = item.map_err(|e| map_error(RETIRED_CONNTRACK, e))?;
        // A forward entry names a backend; a reverse one a VIP or published address (never
        // a backend's) or, with flags, a way back.
        let backend = match nat.flags {
            0 => backends.get(&(nat.addr, nat.port)).copied().unwrap_or(0),
            _ => 0,
        };
        match current.insert(flow, CtEntry { nat, backend, seen: now }, BPF_NOEXIST) {
            Ok(()) => carried += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(nix::libc::EEXIST) => {}
            Err(e) => return Err(map_error(maps::CONNTRACK, e)),
        }
    }
    Ok(carried)
}

fn map_error(map: &'static str, source: MapError) -> NetError {
    match &source {
        // A hash map at its `max_entries` says E2BIG ("argument list too long"): said plainly.
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(nix::libc::E2BIG) => {
            let capacity = match map {
                maps::MAGLEV_LARGE => "at most 1024 service ports with more than 32 backends on a node",
                _ => "every entry it can hold is taken",
            };
            NetError::MapFull { map, capacity }
        }
        _ => NetError::Map { map, source },
    }
}

fn sock_addr<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, NetError> {
    program(ebpf, name)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, NetError> {
    program(ebpf, name)
}

/// The loaded program `name` as its type `P`.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, NetError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(NetError::Program { program: name, source: aya::programs::ProgramError::UnexpectedProgramType })?;
    program.try_into().map_err(|source| NetError::Program { program: name, source })
}

/// A plan's map as the key -> value view the sync functions take.
fn wanted<K: std::hash::Hash + Eq + Copy, V: Clone + PartialEq>(counted: &Counted<K, V>) -> StdHashMap<K, &V> {
    counted.iter().map(|(k, v)| (*k, v)).collect()
}

/// Makes the map hold exactly `want`. Stale keys go first, so the map never needs room for
/// old and new together; unchanged entries are not rewritten, so programs reading them see
/// no churn.
fn sync_hash_map<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    want: &StdHashMap<K, &V>,
) -> Result<(), NetError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    prune(map, name, want)?;
    upsert(map, name, want)
}

/// Removes the keys `want` does not have.
fn prune<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    want: &StdHashMap<K, &V>,
) -> Result<(), NetError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let present: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(|e| map_error(name, e))?;
    for key in present.iter().filter(|k| !want.contains_key(k)) {
        map.remove(key).map_err(|e| map_error(name, e))?;
    }
    Ok(())
}

/// Writes every entry of `want` that differs from the map's.
fn upsert<K, V>(
    map: &mut HashMap<&mut MapData, K, V>,
    name: &'static str,
    want: &StdHashMap<K, &V>,
) -> Result<(), NetError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    for (key, value) in want {
        if map.get(key, 0).is_ok_and(|current| current == **value) {
            continue;
        }
        map.insert(key, *value, 0).map_err(|e| map_error(name, e))?;
    }
    Ok(())
}

/// Mounts bpffs on `/sys/fs/bpf` when the host has not (no systemd here to do it), then
/// creates `pin_dir`, which must end up on bpffs for pinning to work.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), NetError> {
    let is_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if !is_bpffs(Path::new(BPFFS)) {
        mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(NetError::MountBpfFs)?;
        info!(path = BPFFS, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir)?;
    if !is_bpffs(pin_dir) {
        return Err(NetError::NotBpfFs(pin_dir.to_owned()));
    }
    Ok(())
}

/// TCX attachments, each pinned at `<pin_dir>/links/<program>@<ifindex>` so it outlives the
/// agent (TCX links are file descriptors: without a pin they end with the process).
struct Attachments {
    dir: PathBuf,
    links: BTreeMap<(&'static str, u32), (String, FdLink)>,
}

impl Attachments {
    fn pin_path(&self, program: &str, ifindex: u32) -> PathBuf {
        self.dir.join(format!("{program}@{ifindex}"))
    }

    /// Attaches `program` to `ifname`, adopting a link an earlier run pinned for it: the
    /// link's program is swapped atomically, so traffic never meets an interface without one.
    fn attach(&mut self, ebpf: &mut Ebpf, program: &'static str, ifname: &str, ifindex: u32) -> Result<(), NetError> {
        let path = self.pin_path(program, ifindex);
        let prog = classifier(ebpf, program)?;
        let adopted = match PinnedLink::from_pin(&path) {
            Ok(pinned) => match adopt(prog, pinned, program) {
                Ok(link) => Some(link),
                Err(e) => {
                    // The interface it was on is gone; start over on the one there now.
                    debug!(program, interface = ifname, error = %e, "pinned link not adoptable");
                    let _ = std::fs::remove_file(&path);
                    None
                }
            },
            Err(_) => None,
        };
        let link = match adopted {
            Some(link) => link,
            None => {
                let id = prog
                    .attach(ifname, TcAttachType::Ingress)
                    .map_err(|source| NetError::Program { program, source })?;
                let link = prog.take_link(id).map_err(|source| NetError::Program { program, source })?;
                let fd = FdLink::try_from(link).map_err(|e| NetError::Link(e.to_string()))?;
                FdLink::from(fd.pin(&path).map_err(|e| NetError::Link(e.to_string()))?)
            }
        };
        debug!(program, interface = ifname, ifindex, "attached");
        self.links.insert((program, ifindex), (ifname.to_owned(), link));
        Ok(())
    }

    fn is_attached(&self, program: &'static str, ifindex: u32) -> bool {
        self.links.contains_key(&(program, ifindex))
    }

    fn attached(&self, program: &'static str) -> impl Iterator<Item = u32> + '_ {
        self.links.keys().filter(move |(p, _)| *p == program).map(|(_, i)| *i)
    }

    /// Unpins and closes: the link, and with it the attachment, is gone.
    fn detach(&mut self, program: &'static str, ifindex: u32) {
        let _ = std::fs::remove_file(self.pin_path(program, ifindex));
        if let Some((name, link)) = self.links.remove(&(program, ifindex)) {
            debug!(program, interface = %name, "detached");
            drop(link);
        }
    }

    /// Removes pins of `program` left for interfaces not in `keep` (by an earlier run).
    fn remove_stale_pins(&self, program: &str, keep: &BTreeSet<u32>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((p, index)) = name.split_once('@') else { continue };
            if p == program && index.parse::<u32>().is_ok_and(|i| !keep.contains(&i)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn detach_all(&mut self) {
        let keys: Vec<_> = self.links.keys().copied().collect();
        for (program, ifindex) in keys {
            self.detach(program, ifindex);
        }
    }

    /// Closes our descriptors; the pins keep every link in place.
    fn release_all(&mut self) {
        self.links.clear();
    }
}

/// Puts `prog` (this run's) into the link `pinned` holds; returns the link as ours.
fn adopt(prog: &mut SchedClassifier, pinned: PinnedLink, program: &'static str) -> Result<FdLink, NetError> {
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| NetError::Link(e.to_string()))?;
    let id = prog.attach_to_link(link).map_err(|source| NetError::Program { program, source })?;
    let link = prog.take_link(id).map_err(|source| NetError::Program { program, source })?;
    FdLink::try_from(link).map_err(|e| NetError::Link(e.to_string()))
}

#[path = "bpf_testbed.rs"]
pub mod testbed;

#[path = "bpf_packets.rs"]
pub mod packets;

#[cfg(test)]
#[path = "bpf_privileged.rs"]
mod privileged;

#[cfg(test)]
#[path = "bpf_fuzz.rs"]
mod fuzz;

#[cfg(test)]
#[path = "bpf_fragments_errors.rs"]
mod fragments_errors;

#[cfg(test)]
#[path = "bpf_vxlan.rs"]
mod vxlan;

/// Tables by the map that holds them.
type BySize<'a> = (Vec<(u32, &'a MaglevTable)>, Vec<(u32, &'a MaglevLargeTable)>);

/// Splits `tables` by size (`SHOAL_MAGLEV`, `SHOAL_MAGLEV_LARGE`).
fn by_size<'a>(tables: impl Iterator<Item = (u32, &'a lb::Table)>) -> BySize<'a> {
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for (id, table) in tables {
        match table {
            lb::Table::Small(t) => small.push((id, &**t)),
            lb::Table::Large(t) => large.push((id, &**t)),
        }
    }
    (small, large)
}

#[cfg(test)]
mod tests {
    use aya::{maps::MapError, sys::SyscallError};

    use super::*;

    fn failed(errno: i32) -> MapError {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn a_full_map_says_so_and_what_it_holds() {
        let full = map_error(maps::MAGLEV_LARGE, failed(nix::libc::E2BIG));
        assert!(matches!(full, NetError::MapFull { map: maps::MAGLEV_LARGE, .. }), "{full:?}");
        assert!(full.to_string().contains("more than 32 backends"), "{full}");
        assert_eq!(full.status(), 500);
        let other = map_error(maps::MAGLEV_LARGE, failed(nix::libc::ENOMEM));
        assert!(matches!(other, NetError::Map { .. }), "{other:?}");
    }
}
