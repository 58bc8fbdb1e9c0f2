//! Every map the programs use. All are pinned by name under the node's pin path, so they
//! outlive an agent restart and the agent reconciles them instead of recreating them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use shoal_common::{
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig},
    stats::{Counter, MAX},
};

/// Overlay endpoints on every node, by (VNI, address).
#[map(name = "SHOAL_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointEntry> = HashMap::pinned(65536, 0);

/// Workload interfaces on this node, by host-side ifindex.
#[map(name = "SHOAL_INTERFACES")]
pub static INTERFACES: HashMap<u32, InterfaceEntry> = HashMap::pinned(4096, 0);

/// Node-wide settings at index 0.
#[map(name = "SHOAL_NODE_CONFIG")]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

/// Outcome counters, indexed by `shoal_common::stats` codes.
#[map(name = "SHOAL_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(MAX, 0);

/// Looks `key` up and copies the value out. A preallocated hash map may recycle an element
/// for a concurrent update while a program still holds a reference to it, so programs never
/// keep references into the maps across helper calls.
#[inline(always)]
pub fn lookup<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: the pointer is valid for this program run; the value is copied at once.
    map.get_ptr(key).map(|value| unsafe { *value })
}
