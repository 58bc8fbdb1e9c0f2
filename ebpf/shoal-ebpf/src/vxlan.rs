//! VXLAN in the programs themselves: the outer headers pushed onto a frame bound for another
//! node and sent straight out of the underlay interface, and taken off a frame from another
//! node as it comes in there, so neither pays for the kernel's VXLAN device (its route
//! lookup, netfilter on the outer packet, the UDP socket, its GRO cells and a second pass
//! through the receive path).
//!
//! The device stays, and takes what this module leaves to it: a packet too large for the
//! underlay once encapsulated (the device fragments the outer packet), a destination with no
//! route from here, a packet that already had its headers pushed once, outer fragments, VXLAN
//! with flags this module does not know, and a GSO packet that is not for a workload of this
//! node (taking its outer headers off would leave it marked as a tunnel packet for whoever
//! segments it). On the wire both ways are the same, so nodes of either kind interoperate.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK,
    },
    programs::TcContext,
};
use shoal_common::{
    lb::PROTO_UDP,
    overlay::{EndpointKey, NodeConfig},
    stats::{DECAP_BY_DEVICE, DROP_MALFORMED, DROP_NOT_A_NODE, DROP_NOT_IPV4},
};

use crate::{
    forward::{route_to, send_out},
    from_overlay::{self, Tunnel},
    headers::{ptr_at, EthHdr, Ipv4Hdr, UdpHdr, VxlanHdr, ETH_HLEN, ETH_P_IP_BE, VXLAN_FLAG_GBP, VXLAN_FLAG_VNI},
    maps::{lookup, ENDPOINTS, NODES},
    stats::count,
};

/// What goes between the outer Ethernet header and the inner frame's IPv4 header.
#[repr(C)]
struct Encapsulation {
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner: EthHdr,
}

const ENCAP_LEN: u32 = core::mem::size_of::<Encapsulation>() as u32;
const _: () = assert!(ENCAP_LEN == 50);
/// Pushed after the MAC header; the kernel learns where the inner headers are (for GSO, the
/// packet becomes a UDP tunnel packet) and that the inner frame is Ethernet of 14 bytes.
/// FIXED_GSO: the workloads' MTU already leaves room for the outer headers, so the segment
/// size stays what the inner TCP chose.
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ((ETH_HLEN as u64) << 56);
const IPV4_PLAIN: u8 = 0x45;
/// `frag_off` (network byte order): don't fragment. The outer packet always fits the route's
/// MTU (what does not goes through the device), so a smaller hop further on says so.
const IP_DONT_FRAGMENT_BE: u16 = 0x4000u16.to_be();
/// `frag_off` bits of a fragment (more follow, or an offset), network byte order.
const IP_FRAGMENT_BE: u16 = 0x3fffu16.to_be();
/// TTL of the outer IPv4 header of encapsulated packets.
pub const TUNNEL_TTL: u8 = 64;

/// Sends the frame to node `node` (host byte order) inside VXLAN with `vni` and the group
/// policy `policy` (0: none), straight out of the underlay interface. `None` when it must
/// go through the VXLAN device instead (the frame is then untouched); otherwise the verdict,
/// counted under `counter`.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    config: &NodeConfig,
    node: u32,
    vni: u32,
    policy: u16,
    counter: u32,
) -> Option<Result<i32, u32>> {
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let outer_len = ctx.len() - ETH_HLEN as u32 + ENCAP_LEN;
    // A GSO packet is checked segment by segment (by its size as it is: FIXED_GSO keeps the
    // segments' sizes); any other, by its size once encapsulated.
    let check_len = if gso { 0 } else { u16::try_from(outer_len).ok()? };
    let route =
        route_to(ctx, config.underlay_ifindex, PROTO_UDP, config.underlay_addr, node.to_be(), check_len).ok()?;
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (inner_dst, inner_src, entropy) = unsafe {
        let ports: u32 = ptr_at::<u32>(ctx, ETH_HLEN + 20).map_or(0, |ports| *ports);
        ((*eth).dst, (*eth).src, u32::from_ne_bytes((*ip).saddr) ^ u32::from_ne_bytes((*ip).daddr) ^ ports)
    };
    // With room already made once (a frame that came in over VXLAN and leaves again), the
    // kernel refuses: the device does it.
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS).ok()?;
    let Some(headers) = ptr_at::<Encapsulation>(ctx, ETH_HLEN) else { return Some(Err(DROP_MALFORMED)) };
    let tot_len = u16::try_from(outer_len).unwrap_or(u16::MAX).to_be();
    let (saddr, daddr) = (config.underlay_addr, node.to_be());
    let ip = Ipv4Hdr {
        version_ihl: IPV4_PLAIN,
        tos: 0,
        tot_len,
        id: 0,
        frag_off: IP_DONT_FRAGMENT_BE,
        ttl: TUNNEL_TTL,
        protocol: PROTO_UDP,
        check: 0,
        saddr: saddr.to_ne_bytes(),
        daddr: daddr.to_ne_bytes(),
    };
    let check = ipv4_checksum(&ip);
    let vni = vni.to_be_bytes();
    // SAFETY: bounds-checked by ptr_at above, after the room was made.
    unsafe {
        (*headers).ip = Ipv4Hdr { check, ..ip };
        (*headers).udp = UdpHdr {
            sport: source_port(entropy).to_be(),
            dport: config.data_path_port,
            len: u16::from_be(tot_len).saturating_sub(20).to_be(),
            // None over IPv4 (RFC 7348 allows it; the kernel's VXLAN devices default to it):
            // the inner packet carries its own, and no pass over every byte.
            check: 0,
        };
        (*headers).vxlan = VxlanHdr {
            flags: if policy != 0 { VXLAN_FLAG_VNI | VXLAN_FLAG_GBP } else { VXLAN_FLAG_VNI },
            gbp_flags: 0,
            policy: policy.to_be(),
            vni: [vni[1], vni[2], vni[3], 0],
        };
        (*headers).inner = EthHdr { dst: inner_dst, src: inner_src, proto: ETH_P_IP_BE };
    }
    Some(send_out(ctx, &route, counter))
}

/// The outer UDP source port: the same for every packet of an inner flow (so the underlay
/// keeps them in order on one path, as RFC 7348 asks), spread over the dynamic port range.
#[inline(always)]
fn source_port(entropy: u32) -> u16 {
    // Fibonacci hashing: the high bits of the product depend on all of the input's.
    let hash = entropy.wrapping_mul(0x9e37_79b1);
    0xc000 | (hash >> 18) as u16
}

/// The header checksum of an IPv4 header without options (its `check` field taken as 0).
#[inline(always)]
fn ipv4_checksum(ip: &Ipv4Hdr) -> u16 {
    // A ones' complement sum does not depend on byte order: each 16-bit word is summed as it
    // lies in memory, and the result is stored the same way.
    let word = |bytes: [u8; 2]| u32::from(u16::from_ne_bytes(bytes));
    let [s0, s1, s2, s3] = ip.saddr;
    let [d0, d1, d2, d3] = ip.daddr;
    let sum = word([ip.version_ihl, ip.tos])
        + u32::from(ip.tot_len)
        + u32::from(ip.id)
        + u32::from(ip.frag_off)
        + word([ip.ttl, ip.protocol])
        + word([s0, s1])
        + word([s2, s3])
        + word([d0, d1])
        + word([d2, d3]);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// If the packet is VXLAN to this node, takes its outer headers off and handles the inner
/// frame as `from_overlay` would; `None` for any other packet. A packet from an address that
/// is not one of the cluster's nodes is dropped; one this module leaves to the VXLAN device
/// passes to the stack.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext, config: &NodeConfig) -> Result<Option<i32>, u32> {
    let Some(headers) = ptr_at::<Encapsulation>(ctx, ETH_HLEN) else { return Ok(None) };
    // SAFETY: bounds-checked by ptr_at just above.
    let (ip, udp, vxlan, inner) = unsafe { (&(*headers).ip, &(*headers).udp, &(*headers).vxlan, &(*headers).inner) };
    if ip.version_ihl != IPV4_PLAIN
        || ip.protocol != PROTO_UDP
        || u32::from_ne_bytes(ip.daddr) != config.underlay_addr
        || udp.dport != config.data_path_port
    {
        return Ok(None);
    }
    let sender = u32::from_be_bytes(ip.saddr);
    if lookup(&NODES, &sender).is_none() {
        return Err(DROP_NOT_A_NODE);
    }
    if ip.frag_off & IP_FRAGMENT_BE != 0 || vxlan.flags & !(VXLAN_FLAG_VNI | VXLAN_FLAG_GBP) != 0 {
        return Ok(Some(to_device(ctx)));
    }
    if vxlan.flags & VXLAN_FLAG_VNI == 0 {
        return Err(DROP_MALFORMED);
    }
    if inner.proto != ETH_P_IP_BE {
        return Err(DROP_NOT_IPV4);
    }
    let vni = u32::from_be_bytes([0, vxlan.vni[0], vxlan.vni[1], vxlan.vni[2]]);
    let policy = if vxlan.flags & VXLAN_FLAG_GBP != 0 { u16::from_be(vxlan.policy) } else { 0 };
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso {
        let Some(inner_ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN + ENCAP_LEN as usize) else { return Err(DROP_MALFORMED) };
        // SAFETY: bounds-checked by ptr_at just above.
        let daddr = u32::from_ne_bytes(unsafe { (*inner_ip).daddr });
        if !lookup(&ENDPOINTS, &EndpointKey { vni, addr: daddr }).is_some_and(|to| to.ifindex != 0) {
            return Ok(Some(to_device(ctx)));
        }
    } else if u32::from(u16::from_be(ip.tot_len)) != ctx.len() - ETH_HLEN as u32 {
        // Padded or cut short: the stack's checks and trimming apply.
        return Ok(Some(to_device(ctx)));
    }
    // FIXED_GSO: the inner segments keep their size.
    if ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO)).is_err() {
        return Ok(Some(to_device(ctx)));
    }
    from_overlay::arrived(ctx, &Tunnel { sender, vni, policy }).map(Some)
}

/// Leaves the packet to the stack, where the VXLAN device takes it (counted).
#[inline(always)]
fn to_device(ctx: &TcContext) -> i32 {
    count(ctx, DECAP_BY_DEVICE);
    TC_ACT_OK
}
