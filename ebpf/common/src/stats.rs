//! The one numbered list of what the programs did with a packet: forwarding outcomes and
//! drop reasons, counted per CPU in the `STATS` map.
//!
//! Codes are never reused: a retired code stays here as `UNUSED_<n>`. The agent's
//! `net::stats` module prints these names; nothing else mirrors the list.

/// Packets and bytes for one code.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), two u64 fields, no padding.
unsafe impl aya::Pod for Counter {}

/// Delivered to a workload on this node, straight from another workload's veth.
pub const FORWARD_LOCAL: u32 = 0;
/// Encapsulated towards another node (tunnel key set, redirected to the VXLAN device).
pub const FORWARD_REMOTE: u32 = 1;
/// Arrived over VXLAN and delivered to a local workload.
pub const DELIVER_FROM_OVERLAY: u32 = 2;
/// ARP request from a workload answered by the program.
pub const ARP_REPLY: u32 = 3;
/// Not IPv4 or ARP (IPv6 neighbour discovery, ...): left to the stack.
pub const PASS_OTHER: u32 = 4;

/// First drop code; everything from here on is a drop.
pub const DROP_FIRST: u32 = 16;
/// Frame too short for the headers its EtherType promises.
pub const DROP_MALFORMED: u32 = 16;
/// Packet from a veth the agent has not registered as a workload interface.
pub const DROP_UNKNOWN_INTERFACE: u32 = 17;
/// Destination address not on the sender's overlay network.
pub const DROP_NO_ENDPOINT: u32 = 18;
/// No VXLAN device configured on this node.
pub const DROP_NO_OVERLAY_DEVICE: u32 = 19;
/// `bpf_skb_set_tunnel_key` / `bpf_skb_get_tunnel_key` failed.
pub const DROP_TUNNEL_KEY: u32 = 20;
/// ARP request we do not answer (not for an endpoint of the network, or not a request).
pub const DROP_ARP_UNANSWERED: u32 = 21;
/// Rewriting the packet failed.
pub const DROP_REWRITE: u32 = 22;

/// Size of the `STATS` array.
pub const MAX: u32 = 32;

/// Human name of a code, for `shoal` output and test messages.
pub fn name(code: u32) -> &'static str {
    match code {
        FORWARD_LOCAL => "forward_local",
        FORWARD_REMOTE => "forward_remote",
        DELIVER_FROM_OVERLAY => "deliver_from_overlay",
        ARP_REPLY => "arp_reply",
        PASS_OTHER => "pass_other",
        DROP_MALFORMED => "drop_malformed",
        DROP_UNKNOWN_INTERFACE => "drop_unknown_interface",
        DROP_NO_ENDPOINT => "drop_no_endpoint",
        DROP_NO_OVERLAY_DEVICE => "drop_no_overlay_device",
        DROP_TUNNEL_KEY => "drop_tunnel_key",
        DROP_ARP_UNANSWERED => "drop_arp_unanswered",
        DROP_REWRITE => "drop_rewrite",
        _ => "unused",
    }
}
