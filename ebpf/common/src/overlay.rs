//! Overlay forwarding state: endpoints by (VNI, address), workload interfaces, node config.

/// Key of the endpoint map: one overlay address on one overlay network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// VXLAN network identifier of the overlay network.
    pub vni: u32,
    /// IPv4 address in network byte order, exactly as it sits in the packet.
    pub addr: u32,
}

/// Where an overlay address lives, and how to hand a packet to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    /// Host-side veth of a local endpoint; 0 when the endpoint is on another node.
    pub ifindex: u32,
    /// Underlay IPv4 address of the node running the endpoint, in host byte order
    /// (the order `bpf_skb_set_tunnel_key` expects in `remote_ipv4`).
    pub node_addr: u32,
    /// The endpoint's own MAC address: the destination MAC of frames handed to it.
    pub mac: [u8; 6],
    /// Source MAC of frames handed to a local endpoint (its host-side veth, the address our
    /// ARP replies give out); zero for remote endpoints.
    pub router_mac: [u8; 6],
}

/// A workload interface (host side of a veth) attached to an overlay network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceEntry {
    /// VNI of the network this interface is attached to.
    pub vni: u32,
    /// The workload's own address on that network, network byte order: the only source
    /// address its packets and ARP requests may carry.
    pub addr: u32,
    /// MAC of the host-side veth: the answer to every ARP request from the workload, so all
    /// its overlay traffic comes to us.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The network's subnet and mask, network byte order: destinations outside it leave the
    /// overlay through the node (when `flags` has `IFACE_OUTBOUND`).
    pub subnet: u32,
    pub mask: u32,
    pub flags: u32,
}

/// `InterfaceEntry::flags`: the network has a way out (not `--internal`).
pub const IFACE_OUTBOUND: u32 = 1;

/// `EndpointEntry::node_addr` of a network's gateway: the node itself, reached through the
/// host's stack.
pub const GATEWAY_NODE: u32 = u32::MAX;

/// Node-wide settings, stored at index 0 of `NODE_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// ifindex of the node's `vxlan external` device; 0 while it does not exist.
    pub vxlan_ifindex: u32,
    /// ifindex of the interface holding the node's underlay address, where published ports
    /// answer and ingress replies leave; 0 when the node has none (no routing mesh).
    pub underlay_ifindex: u32,
    /// The node's underlay address, network byte order: published ports answer on it only
    /// (a node that routes for others must not take their traffic).
    pub underlay_addr: u32,
    /// The swarm's data path (VXLAN) UDP port, network byte order: a workload's datagrams
    /// to it never reach the node's stack, where the VXLAN device would take them for
    /// another node's.
    pub data_path_port: u16,
    /// `NODE_*` flags.
    pub flags: u16,
}

/// `NodeConfig::flags`: the routing mesh answers this node's clients by direct server
/// return: a published port's flow to a backend on another node carries the port in its
/// VXLAN header (the GBP policy ID), and that node sends the replies straight to the client
/// from this node's address and the port, instead of back through this node. Opt-in: the
/// underlay must let a node send from another's address.
pub const NODE_MESH_DSR: u16 = 1;

/// `NodeConfig::flags`: VXLAN goes through the node's VXLAN device both ways, as the
/// kernel's own, instead of being built and taken apart by the programs. For a node whose
/// traffic to other nodes needs the stack's output and input path: IPsec policies (xfrm) on
/// the node addresses, netfilter rules on VXLAN, routing policy by port or mark. Slower.
pub const NODE_VXLAN_BY_DEVICE: u16 = 2;

/// Value of the `NODES` map: nothing yet (the key is what counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeEntry {
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(core::mem::size_of::<EndpointEntry>() == 20);
const _: () = assert!(core::mem::size_of::<InterfaceEntry>() == 28);
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);
const _: () = assert!(core::mem::size_of::<NodeEntry>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all five types are repr(C), made only of integers and byte arrays with explicit
    // padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InterfaceEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeEntry {}
}
