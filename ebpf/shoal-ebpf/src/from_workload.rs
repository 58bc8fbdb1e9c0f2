//! TC ingress on the host side of a workload's veth: everything a workload sends.
//!
//! ARP requests for peers are answered here; IPv4 to a peer on the same overlay network is
//! delivered locally or encapsulated to the peer's node; TCP, UDP and ICMP echo to the
//! gateway or off the network go to the node's stack, except datagrams to the data path
//! port; a backend's replies to a published port's clients (and its ICMP errors about their
//! packets) go back through the mesh. Anything else is dropped: overlays carry IPv4 only,
//! and a workload must not reach the host's stack through its veth with anything the node
//! might take for its own.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use shoal_common::{
    lb::{PROTO_TCP, PROTO_UDP},
    overlay::{EndpointKey, InterfaceEntry, GATEWAY_NODE, IFACE_OUTBOUND},
    stats::{
        DROP_FRAGMENT_UNKNOWN, DROP_IP_OPTIONS, DROP_MALFORMED, DROP_NOT_IPV4, DROP_NO_BACKEND, DROP_NO_ENDPOINT,
        DROP_SPOOFED_SOURCE, DROP_TO_DATA_PATH_PORT, DROP_TO_HOST_PROTOCOL, DROP_UNKNOWN_INTERFACE, FORWARD_HOST,
        FORWARD_LOCAL, FORWARD_REMOTE,
    },
};

use crate::{
    arp,
    forward::{deliver_local, encapsulate, hand_to_workload, node_config},
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_ARP_BE, ETH_P_IP_BE},
    ingress::{self, Client, Hop},
    lb::{self, Member},
    maps::{lookup, ENDPOINTS, INTERFACES},
    stats::{count, drop_packet},
};

#[classifier]
pub fn from_workload(ctx: TcContext) -> i32 {
    match try_from_workload(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(&ctx, reason),
    }
}

#[inline(always)]
fn try_from_workload(ctx: &TcContext) -> Result<i32, u32> {
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let iface: InterfaceEntry = lookup(&INTERFACES, &ifindex).ok_or(DROP_UNKNOWN_INTERFACE)?;
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_ARP_BE {
        return arp::answer(ctx, ifindex, &iface);
    }
    if proto != ETH_P_IP_BE {
        return Err(DROP_NOT_IPV4);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
    if u32::from_ne_bytes(saddr) != iface.addr {
        return Err(DROP_SPOOFED_SOURCE);
    }
    let mut dst = u32::from_ne_bytes(daddr);
    let mut to = lookup(&ENDPOINTS, &EndpointKey { vni: iface.vni, addr: dst });
    match to {
        // A service VIP (an endpoint with no interface and no node): the destination
        // becomes the flow's backend before forwarding. Services are looked up for VIPs
        // only, so plain forwarding pays for one lookup.
        Some(vip) if vip.ifindex == 0 && vip.node_addr == 0 => {
            if lb::balance(ctx, iface.vni)? {
                dst = u32::from_ne_bytes(current_daddr(ctx)?);
                to = lookup(&ENDPOINTS, &EndpointKey { vni: iface.vni, addr: dst });
            }
        }
        _ => lb::forget_reused_port(ctx)?,
    }
    let Some(to) = to else {
        if let Some((flow, member)) = lb::member_of(ctx)? {
            // A backend's reply to a client of a published port (or its error about the
            // client's packet), on its way back.
            if let Some(verdict) = ingress::reply(ctx, &flow, member, iface.vni, Hop::First)? {
                return Ok(verdict);
            }
            // A published port on this node's own address: the mesh, as for a client outside
            // (the node's stack would only find nothing listening there).
            if member == Member::Packet && node_config().is_some_and(|config| config.underlay_addr == dst) {
                if let Some(verdict) = ingress::enter(ctx, &flow, Client::Workload)? {
                    return Ok(verdict);
                }
            }
        }
        // Off the overlay: out through this node's stack (it masquerades), if the network
        // has a way out; an unknown address inside the subnet is nobody.
        if dst & iface.mask != iface.subnet && iface.flags & IFACE_OUTBOUND != 0 {
            return to_host(ctx);
        }
        return Err(DROP_NO_ENDPOINT);
    };
    if to.ifindex == 0 && to.node_addr == GATEWAY_NODE {
        return to_host(ctx);
    }
    if to.ifindex == 0 && to.node_addr == 0 {
        // The reply of a flow balanced back to its own client goes to the VIP at the
        // client's port: it goes back to its sender, from the VIP's service port.
        if lb::hairpin_reply(ctx)? {
            let me = lookup(&ENDPOINTS, &EndpointKey { vni: iface.vni, addr: iface.addr }).ok_or(DROP_NO_ENDPOINT)?;
            return hand_to_workload(ctx, &me, FORWARD_LOCAL);
        }
        // A VIP not balanced: with IP options (never balanced, as IPVS does not), a later
        // fragment whose first was not seen, or not on a port of its service (or not
        // TCP/UDP): nothing answers there.
        return Err(if has_ip_options(ctx)? {
            DROP_IP_OPTIONS
        } else if lb::later_fragment(ctx) {
            DROP_FRAGMENT_UNKNOWN
        } else {
            DROP_NO_BACKEND
        });
    }
    if to.ifindex != 0 {
        deliver_local(ctx, &to, FORWARD_LOCAL)
    } else {
        encapsulate(ctx, &to, iface.vni, FORWARD_REMOTE)
    }
}

/// Hands the packet to this node's stack (the gateway, or the way out) if it is TCP, UDP or
/// ICMP echo, and not a datagram to the data path port: the node's VXLAN device (or,
/// masqueraded, another node's) would take what it carries for a node's overlay traffic,
/// and a tunnel the node might unwrap could carry the same.
#[inline(always)]
fn to_host(ctx: &TcContext) -> Result<i32, u32> {
    if !host_may_take(ctx)? {
        return Err(DROP_TO_HOST_PROTOCOL);
    }
    let port = node_config().map_or(0, |config| config.data_path_port);
    if udp_dport(ctx)? == Some(port) {
        return Err(DROP_TO_DATA_PATH_PORT);
    }
    count(ctx, FORWARD_HOST);
    Ok(TC_ACT_OK)
}

/// Whether the packet is TCP, UDP or an ICMP echo request or reply (a non-first fragment
/// of one carries no header to tell: the kernel reassembles it with its first or drops it).
#[inline(always)]
fn host_may_take(ctx: &TcContext) -> Result<bool, u32> {
    match l4_of(ctx)? {
        (PROTO_TCP | PROTO_UDP, _) | (PROTO_ICMP, None) => Ok(true),
        (PROTO_ICMP, Some(offset)) => {
            let icmp_type: *const u8 = ptr_at(ctx, offset).ok_or(DROP_MALFORMED)?;
            // SAFETY: bounds-checked by ptr_at just above.
            Ok(matches!(unsafe { *icmp_type }, ICMP_ECHO_REPLY | ICMP_ECHO_REQUEST))
        }
        _ => Ok(false),
    }
}

/// The destination port of a UDP datagram (with or without IP options); `None` for other
/// packets and for fragments after the first.
#[inline(always)]
fn udp_dport(ctx: &TcContext) -> Result<Option<u16>, u32> {
    let (PROTO_UDP, Some(offset)) = l4_of(ctx)? else { return Ok(None) };
    let dport: *const u16 = ptr_at(ctx, offset + 2).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    Ok(Some(unsafe { dport.read_unaligned() }))
}

/// The IPv4 packet's protocol and where its L4 header starts in the frame (past any IP
/// options); no offset for a fragment after the first, which carries no L4 header.
#[inline(always)]
fn l4_of(ctx: &TcContext) -> Result<(u8, Option<usize>), u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, protocol, frag_off) = unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).frag_off) };
    if u16::from_be(frag_off) & IP_OFFSET_MASK != 0 {
        return Ok((protocol, None));
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if header_len < 20 {
        return Err(DROP_MALFORMED);
    }
    Ok((protocol, Some(ETH_HLEN + header_len)))
}

/// Fragment offset bits of the IPv4 `frag_off` field (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// Whether the IPv4 header carries options.
#[inline(always)]
fn has_ip_options(ctx: &TcContext) -> Result<bool, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    Ok(unsafe { (*ip).version_ihl } & 0x0f != 5)
}

/// The destination address as it is now (after a rewrite moved the packet's bytes).
#[inline(always)]
fn current_daddr(ctx: &TcContext) -> Result<[u8; 4], u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    Ok(unsafe { (*ip).daddr })
}
