//! Map keys and values shared by the BPF programs (`ebpf/shoal-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` with integer fields and explicit padding: no `bool`,
//! enums or `Option`, because the kernel hands these over as raw bytes and every bit pattern
//! must be a valid value. Each type has a `size_of` assertion; changing a layout means giving
//! the map a new name (`..._V2`) so a pinned map of the old shape is never reinterpreted.
#![no_std]

pub mod lb;
pub mod overlay;
pub mod stats;

/// Names of the pinned maps. The programs' `#[map(name = ...)]` takes only literals, so
/// `ebpf/shoal-ebpf/src/maps.rs` spells them again; the agent refuses to start when the
/// object lacks any of these (`net::bpf::Datapath::load`), so a mismatch cannot go unseen.
pub mod maps {
    /// `EndpointKey` -> `EndpointEntry`: where each overlay address lives.
    pub const ENDPOINTS: &str = "SHOAL_ENDPOINTS";
    /// host-side ifindex -> `InterfaceEntry`: which network a workload interface belongs to.
    pub const INTERFACES: &str = "SHOAL_INTERFACES";
    /// index 0 -> `NodeConfig`: per-node settings the programs need.
    pub const NODE_CONFIG: &str = "SHOAL_NODE_CONFIG_V3";
    /// Underlay address of each node of the cluster (host byte order, as a tunnel key
    /// gives it) -> `NodeEntry`: VXLAN from anywhere else is dropped.
    pub const NODES: &str = "SHOAL_NODES";
    /// `stats::*` code -> `Counter`, per CPU.
    pub const STATS: &str = "SHOAL_STATS_V2";
    /// `ServiceKey` -> `ServiceEntry`.
    pub const SERVICES: &str = "SHOAL_SERVICES";
    /// backend ID -> `Backend`.
    pub const BACKENDS: &str = "SHOAL_BACKENDS";
    /// table ID -> `MaglevTable`.
    pub const MAGLEV: &str = "SHOAL_MAGLEV";
    /// table ID -> `MaglevLargeTable`: the tables of services with more than
    /// `lb::LARGE_TABLE_BACKENDS` backends.
    pub const MAGLEV_LARGE: &str = "SHOAL_MAGLEV_LARGE";
    /// `IngressKey` -> `IngressEntry`: the ports published on this node's underlay address.
    pub const INGRESS: &str = "SHOAL_INGRESS";
    /// LRU `FlowKey` -> `CtEntry`: forward (client -> VIP) and reverse (backend -> client).
    pub const CONNTRACK: &str = "SHOAL_CONNTRACK_V2";
    /// LRU socket cookie -> `NatEntry`: the VIP a socket asked for, for `getpeername`.
    pub const SOCK_VIPS: &str = "SHOAL_SOCK_VIPS";
    /// LRU `SockPeerKey` -> `NatEntry`: the VIP a backend's datagrams to a socket must appear
    /// to come from (`recvmsg`).
    pub const SOCK_PEERS: &str = "SHOAL_SOCK_PEERS";
    /// LRU `FragmentKey` -> `FragmentPorts`: the ports of each fragmented datagram's first
    /// fragment, for its later ones.
    pub const FRAGMENTS: &str = "SHOAL_FRAGMENTS";
}
