//! Every map the programs use. All are pinned by name under the node's pin path, so they
//! outlive an agent restart and the agent reconciles them instead of recreating them.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use shoal_common::{
    lb::{
        Backend, CtEntry, FlowKey, FragmentKey, FragmentPorts, IngressEntry, IngressKey, MaglevLargeTable, MaglevTable,
        NatEntry, ServiceEntry, ServiceKey, SockPeerKey,
    },
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig, NodeEntry},
    stats::{Counter, MAX},
};

/// Overlay endpoints on every node, by (VNI, address).
#[map(name = "SHOAL_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointEntry> = HashMap::pinned(65536, 0);

/// Workload interfaces on this node, by host-side ifindex.
#[map(name = "SHOAL_INTERFACES")]
pub static INTERFACES: HashMap<u32, InterfaceEntry> = HashMap::pinned(4096, 0);

/// Node-wide settings at index 0.
#[map(name = "SHOAL_NODE_CONFIG_V3")]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// The cluster's nodes by underlay address (host byte order): VXLAN from others is dropped.
#[map(name = "SHOAL_NODES")]
pub static NODES: HashMap<u32, NodeEntry> = HashMap::pinned(16384, 0);

/// Outcome counters, indexed by `shoal_common::stats` codes.
#[map(name = "SHOAL_STATS_V2")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX, 0);

/// Looks `key` up and copies the value out. A preallocated hash map may recycle an element
/// for a concurrent update while a program still holds a reference to it, so programs never
/// keep references into the maps across helper calls.
#[inline(always)]
pub fn lookup<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: the pointer is valid for this program run; the value is copied at once.
    map.get_ptr(key).map(|value| unsafe { *value })
}

/// `lookup` for the LRU map.
#[inline(always)]
pub fn lookup_lru<K, V: Copy>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: as `lookup`.
    map.get_ptr(key).map(|value| unsafe { *value })
}

/// Services by (network, VIP, port, protocol).
#[map(name = "SHOAL_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(65536, 0);

/// Backends by ID.
#[map(name = "SHOAL_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(262144, 0);

/// Each service port's Maglev table, by ID. Not preallocated: 4 KiB a table, only for the
/// tables in use (10,000 services with a VIP and a published port each take 80 MiB).
#[map(name = "SHOAL_MAGLEV")]
pub static MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);

/// The large Maglev tables (services with more than `LARGE_TABLE_BACKENDS` backends), by
/// ID. Not preallocated: 64 KiB a table.
#[map(name = "SHOAL_MAGLEV_LARGE")]
pub static MAGLEV_LARGE: HashMap<u32, MaglevLargeTable> = HashMap::pinned(1024, BPF_F_NO_PREALLOC);

/// Ports published on the node's underlay address (the routing mesh and host-mode ports).
#[map(name = "SHOAL_INGRESS")]
pub static INGRESS: HashMap<IngressKey, IngressEntry> = HashMap::pinned(16384, 0);

/// Balanced flows, both directions; least recently used go first when full.
#[map(name = "SHOAL_CONNTRACK_V2")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(262144, 0);

/// The VIP each socket connected to, by socket cookie, so `getpeername` shows it.
#[map(name = "SHOAL_SOCK_VIPS")]
pub static SOCK_VIPS: LruHashMap<u64, NatEntry> = LruHashMap::pinned(262144, 0);

/// The VIP behind each backend a socket sent datagrams to, so `recvmsg` shows the VIP.
#[map(name = "SHOAL_SOCK_PEERS")]
pub static SOCK_PEERS: LruHashMap<SockPeerKey, NatEntry> = LruHashMap::pinned(262144, 0);

/// The ports of each fragmented datagram, from its first fragment, for its later ones (as
/// Cilium's `cilium_ipv4_frag_datagrams`); least recently used go first when full.
#[map(name = "SHOAL_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> = LruHashMap::pinned(8192, 0);
