//! The one numbered list of what the programs did with a packet: forwarding outcomes and
//! drop reasons, counted per CPU in the `STATS` map.
//!
//! Once released, codes are never reused: a retired code stays here as `UNUSED_<n>`. Nothing
//! mirrors this list; the agent reports counters with `name`.

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
/// A new flow to a service VIP, balanced to a backend (and tracked).
pub const LB_NEW_FLOW: u32 = 4;
/// A packet of a tracked flow to a VIP, sent to its backend.
pub const LB_TRACKED: u32 = 5;
/// A reply from a backend given the VIP back as its source.
pub const LB_REVERSE_NAT: u32 = 6;
/// Left the overlay: to the gateway, or outbound, through the node's own stack.
pub const FORWARD_HOST: u32 = 7;
/// A workload's connect() to a VIP sent straight to a backend by the socket hook.
pub const SOCK_LB_CONNECT: u32 = 8;
/// Arrived on the underlay for a published port and delivered to a backend on this node.
pub const INGRESS_LOCAL: u32 = 9;
/// Arrived on the underlay for a published port and encapsulated to the backend's node.
pub const INGRESS_REMOTE: u32 = 10;
/// A backend's reply to an ingress client, given the published address back as its source
/// and sent out the underlay.
pub const INGRESS_REPLY: u32 = 11;
/// A backend's reply to an ingress client that came through another node, sent back there.
pub const INGRESS_RETURN: u32 = 12;
/// A workload's datagram to a VIP sent straight to a backend by the `sendmsg` hook.
pub const SOCK_LB_SENDMSG: u32 = 13;
/// A datagram from a backend shown to the workload as coming from the VIP (`recvmsg`).
pub const SOCK_LB_RECVMSG: u32 = 14;
/// A tracked flow balanced again: its backend left the service, or (UDP) it was idle past
/// `UDP_IDLE_SECONDS` (counted instead of `LB_NEW_FLOW`).
pub const LB_REPICKED: u32 = 15;

/// First drop code: codes from here up to `MORE_OUTCOMES_FIRST` are drops (see `is_drop`).
pub const DROP_FIRST: u32 = 16;
/// Frame too short for the headers its EtherType promises, or an ARP that is not
/// Ethernet/IPv4.
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
/// A `bpf_redirect*` helper refused the redirect.
pub const DROP_REDIRECT: u32 = 22;
/// Neither IPv4 nor ARP (IPv6, VLAN tags, ...): overlays carry IPv4 only, and a workload's
/// other traffic must not reach the host's stack through its veth.
pub const DROP_NOT_IPV4: u32 = 23;
/// IPv4 or ARP whose sender address is not the workload's own: no spoofing peers.
pub const DROP_SPOOFED_SOURCE: u32 = 24;
/// A packet to a service VIP whose service has no backend.
pub const DROP_NO_BACKEND: u32 = 25;
/// A packet to a VIP with IP options (not balanced; Docker's IPVS drops them too).
pub const DROP_IP_OPTIONS: u32 = 26;
/// Rewriting addresses or checksums failed.
pub const DROP_NAT: u32 = 27;
/// No underlay interface, or the route lookup for a reply to an ingress client failed.
pub const DROP_FIB: u32 = 28;
/// A workload's datagram to the data path (VXLAN) port, on its way to a node's stack: the
/// node's VXLAN device would take what it carries for another node's overlay traffic.
pub const DROP_TO_DATA_PATH_PORT: u32 = 29;
/// VXLAN from an address that is not one of the cluster's nodes.
pub const DROP_NOT_A_NODE: u32 = 30;
/// A packet about to cross the mesh again with no hops left (its TTL ran out): state on
/// two nodes sending it back and forth cannot make it loop for ever.
pub const DROP_TTL_EXCEEDED: u32 = 31;
/// The route lookup for a reply to an ingress client says there is no way there
/// (unreachable, blackhole or prohibit).
pub const DROP_FIB_UNREACHABLE: u32 = 32;
/// The route lookup for a reply to an ingress client says the node would not forward it
/// (forwarding off, not a forwarding route, an encapsulating route).
pub const DROP_FIB_NOT_FORWARDED: u32 = 33;
/// A reply to an ingress client larger than the way out allows.
pub const DROP_FRAG_NEEDED: u32 = 34;
/// A workload's packet to the node's stack in a protocol other than TCP, UDP and ICMP echo:
/// a tunnel (IP-in-IP, GRE, ...) the node might unwrap, or an ICMP error that could steer
/// the node's own paths.
pub const DROP_TO_HOST_PROTOCOL: u32 = 35;

/// A later fragment of a datagram to a VIP whose first fragment was not seen here (it
/// carries no ports, so nothing says which backend its datagram went to).
pub const DROP_FRAGMENT_UNKNOWN: u32 = 36;

/// First code of the second run of outcomes (the first, below `DROP_FIRST`, is full).
pub const MORE_OUTCOMES_FIRST: u32 = 48;
/// An ICMP error about a balanced flow (port unreachable, fragmentation needed, time
/// exceeded), translated as that flow's packets are: to the client with the VIP or the
/// published address in it, or to the backend with the backend's.
pub const LB_ICMP_ERROR: u32 = 48;
/// Encapsulated by the kernel's VXLAN device rather than by the program: too large for the
/// underlay once encapsulated (the device fragments the outer packet), no route to the node
/// from the program's lookup, or encapsulated once already.
pub const ENCAP_BY_DEVICE: u32 = 49;
/// VXLAN to this node left to the kernel's VXLAN device rather than taken apart by the
/// program: an outer fragment, flags the program does not know, an outer length that is not
/// the packet's, or a GSO packet for somewhere other than a local workload.
pub const DECAP_BY_DEVICE: u32 = 50;

/// Size of the `STATS` array.
pub const MAX: u32 = 64;

/// Whether `code` counts a dropped packet.
pub fn is_drop(code: u32) -> bool {
    (DROP_FIRST..MORE_OUTCOMES_FIRST).contains(&code)
}

/// Human name of a code, for `shoal` output and test messages; `None` for codes not in use.
pub fn name(code: u32) -> Option<&'static str> {
    Some(match code {
        FORWARD_LOCAL => "forward_local",
        FORWARD_REMOTE => "forward_remote",
        DELIVER_FROM_OVERLAY => "deliver_from_overlay",
        ARP_REPLY => "arp_reply",
        LB_NEW_FLOW => "lb_new_flow",
        LB_TRACKED => "lb_tracked",
        LB_REVERSE_NAT => "lb_reverse_nat",
        FORWARD_HOST => "forward_host",
        SOCK_LB_CONNECT => "sock_lb_connect",
        INGRESS_LOCAL => "ingress_local",
        INGRESS_REMOTE => "ingress_remote",
        INGRESS_REPLY => "ingress_reply",
        INGRESS_RETURN => "ingress_return",
        SOCK_LB_SENDMSG => "sock_lb_sendmsg",
        SOCK_LB_RECVMSG => "sock_lb_recvmsg",
        LB_REPICKED => "lb_repicked",
        DROP_MALFORMED => "drop_malformed",
        DROP_UNKNOWN_INTERFACE => "drop_unknown_interface",
        DROP_NO_ENDPOINT => "drop_no_endpoint",
        DROP_NO_OVERLAY_DEVICE => "drop_no_overlay_device",
        DROP_TUNNEL_KEY => "drop_tunnel_key",
        DROP_ARP_UNANSWERED => "drop_arp_unanswered",
        DROP_REDIRECT => "drop_redirect",
        DROP_NOT_IPV4 => "drop_not_ipv4",
        DROP_SPOOFED_SOURCE => "drop_spoofed_source",
        DROP_NO_BACKEND => "drop_no_backend",
        DROP_IP_OPTIONS => "drop_ip_options",
        DROP_NAT => "drop_nat",
        DROP_FIB => "drop_fib",
        DROP_TO_DATA_PATH_PORT => "drop_to_data_path_port",
        DROP_NOT_A_NODE => "drop_not_a_node",
        DROP_TTL_EXCEEDED => "drop_ttl_exceeded",
        DROP_FIB_UNREACHABLE => "drop_fib_unreachable",
        DROP_FIB_NOT_FORWARDED => "drop_fib_not_forwarded",
        DROP_FRAG_NEEDED => "drop_frag_needed",
        DROP_TO_HOST_PROTOCOL => "drop_to_host_protocol",
        DROP_FRAGMENT_UNKNOWN => "drop_fragment_unknown",
        LB_ICMP_ERROR => "lb_icmp_error",
        ENCAP_BY_DEVICE => "encap_by_device",
        DECAP_BY_DEVICE => "decap_by_device",
        _ => return None,
    })
}
