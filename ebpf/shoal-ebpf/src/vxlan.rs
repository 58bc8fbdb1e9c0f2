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
    lb::{PROTO_TCP, PROTO_UDP},
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
/// `frag_off` bits (network byte order) of a fragment: more follow, or an offset; either.
const IP_MORE_FRAGMENTS_BE: u16 = 0x2000u16.to_be();
const IP_OFFSET_BE: u16 = 0x1fffu16.to_be();
const IP_FRAGMENT_BE: u16 = IP_MORE_FRAGMENTS_BE | IP_OFFSET_BE;
/// Offset of the IPv4 header checksum in the frame.
const IP_CSUM: usize = ETH_HLEN + 10;
/// The outer headers and an inner IPv4 header, all a decapsulation reads.
const DECAP_HEADERS: usize = ETH_HLEN + ENCAP_LEN as usize + 20;
/// The ECN field of the IPv4 TOS byte, and its code points (RFC 3168).
const ECN_MASK: u8 = 0x03;
const ECN_NOT_ECT: u8 = 0x00;
const ECN_ECT0: u8 = 0x02;
const ECN_CE: u8 = 0x03;
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
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (inner_dst, inner_src, version_ihl, tos, protocol, saddr, daddr, frag_off) = unsafe {
        let ip = &*ip;
        ((*eth).dst, (*eth).src, ip.version_ihl, ip.tos, ip.protocol, ip.saddr, ip.daddr, ip.frag_off)
    };
    // The ports only where they are (a fragment's payload would send each fragment its own
    // way).
    let whole = version_ihl == IPV4_PLAIN && frag_off & IP_FRAGMENT_BE == 0;
    // SAFETY: bounds-checked by ptr_at, inside the map_or.
    let ports = if whole { ptr_at::<u32>(ctx, ETH_HLEN + 20).map_or(0, |ports| unsafe { *ports }) } else { 0 };
    let entropy = u32::from_ne_bytes(saddr) ^ u32::from_ne_bytes(daddr) ^ ports;
    let outer_len = ctx.len() - ETH_HLEN as u32 + ENCAP_LEN;
    // What must fit the way to the node: the packet once encapsulated, or for a GSO packet
    // each of the segments it will be cut into.
    // SAFETY: the context pointer is valid for the whole program run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let check_len = if gso_size != 0 { segment_len(ctx, version_ihl, protocol, gso_size)? } else { outer_len };
    let check_len = u16::try_from(check_len).ok()?;
    let route =
        route_to(ctx, config.underlay_ifindex, PROTO_UDP, config.underlay_addr, node.to_be(), check_len).ok()?;
    // With room already made once (a frame that came in over VXLAN and leaves again), the
    // kernel refuses: the device does it.
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS).ok()?;
    let Some(headers) = ptr_at::<Encapsulation>(ctx, ETH_HLEN) else { return Some(Err(DROP_MALFORMED)) };
    let tot_len = u16::try_from(outer_len).unwrap_or(u16::MAX).to_be();
    let (saddr, daddr) = (config.underlay_addr, node.to_be());
    let ip = Ipv4Hdr {
        version_ihl: IPV4_PLAIN,
        tos: outer_ecn(tos),
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

/// The size of an outer packet carrying one segment of `gso_size` bytes of a GSO packet
/// (TCP or UDP, without IP options: any other goes through the device).
#[inline(always)]
fn segment_len(ctx: &TcContext, version_ihl: u8, protocol: u8, gso_size: u32) -> Option<u32> {
    if version_ihl != IPV4_PLAIN {
        return None;
    }
    let l4 = match protocol {
        // SAFETY: bounds-checked by ptr_at.
        PROTO_TCP => u32::from(unsafe { *ptr_at::<u8>(ctx, ETH_HLEN + 20 + 12)? } >> 4) * 4,
        PROTO_UDP => 8,
        _ => return None,
    };
    Some(ENCAP_LEN + 20 + l4 + gso_size)
}

/// The outer header's ECN field for an inner packet of `tos` (RFC 6040's normal mode): the
/// inner's, so a congested hop on the way can mark it; CE itself is sent as ECT(0).
#[inline(always)]
fn outer_ecn(tos: u8) -> u8 {
    match tos & ECN_MASK {
        ECN_CE => ECN_ECT0,
        ecn => ecn,
    }
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
    // Headers a driver left outside the linear part (split headers, page fragments) are
    // pulled in first, for a frame long enough to be VXLAN with an inner IPv4 header.
    if ctx.data() + DECAP_HEADERS > ctx.data_end() && ctx.len() as usize >= DECAP_HEADERS {
        // A failure leaves the frame short, and it passes below.
        let _ = ctx.pull_data(DECAP_HEADERS as u32);
    }
    let Some(headers) = ptr_at::<Encapsulation>(ctx, ETH_HLEN) else { return Ok(None) };
    // SAFETY: bounds-checked by ptr_at just above.
    let (ip, udp, vxlan, inner) = unsafe { (&(*headers).ip, &(*headers).udp, &(*headers).vxlan, &(*headers).inner) };
    // (A later fragment has no UDP header: what lies there is payload.)
    if ip.version_ihl != IPV4_PLAIN
        || ip.protocol != PROTO_UDP
        || u32::from_ne_bytes(ip.daddr) != config.underlay_addr
        || ip.frag_off & IP_OFFSET_BE != 0
        || udp.dport != config.data_path_port
    {
        return Ok(None);
    }
    let sender = u32::from_be_bytes(ip.saddr);
    if lookup(&NODES, &sender).is_none() {
        return Err(DROP_NOT_A_NODE);
    }
    // What the stack would check and this does not is the stack's: a first fragment (to
    // reassemble), a header checksum or lengths that do not add up, flags or reserved bits
    // this does not know.
    // SAFETY: the context pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let tot_len = u16::from_be(ip.tot_len);
    let lengths_agree =
        gso || (u32::from(tot_len) == ctx.len() - ETH_HLEN as u32 && u16::from_be(udp.len) == tot_len.wrapping_sub(20));
    let known = vxlan.flags & !(VXLAN_FLAG_VNI | VXLAN_FLAG_GBP) == 0
        && vxlan.vni[3] == 0
        && (vxlan.flags & VXLAN_FLAG_GBP != 0 || (vxlan.gbp_flags == 0 && vxlan.policy == 0));
    if ip.frag_off & IP_MORE_FRAGMENTS_BE != 0 || ipv4_checksum(ip) != ip.check || !lengths_agree || !known {
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
    let outer_tos = ip.tos;
    let inner_ip = ptr_at::<Ipv4Hdr>(ctx, DECAP_HEADERS - 20).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (inner_tos, inner_daddr) = unsafe { ((*inner_ip).tos, (*inner_ip).daddr) };
    // A hop on the way marked congestion: the inner packet carries it on (RFC 6040), and one
    // that cannot (not ECN-capable) is the device's to drop.
    let congested = outer_tos & ECN_MASK == ECN_CE;
    if congested && inner_tos & ECN_MASK == ECN_NOT_ECT {
        return Ok(Some(to_device(ctx)));
    }
    if gso {
        let to = lookup(&ENDPOINTS, &EndpointKey { vni, addr: u32::from_ne_bytes(inner_daddr) });
        if !to.is_some_and(|to| to.ifindex != 0) {
            return Ok(Some(to_device(ctx)));
        }
    }
    // FIXED_GSO: the inner segments keep their size.
    if ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO)).is_err() {
        return Ok(Some(to_device(ctx)));
    }
    if congested && inner_tos & ECN_MASK != ECN_CE {
        mark_congested(ctx)?;
    }
    from_overlay::arrived(ctx, &Tunnel { sender, vni, policy }).map(Some)
}

/// Marks the (decapsulated) packet's ECN field CE, fixing its header checksum.
#[inline(always)]
fn mark_congested(ctx: &TcContext) -> Result<(), u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, tos) = unsafe { ((*ip).version_ihl, (*ip).tos) };
    // The checksum covers version/IHL and TOS as one 16-bit word.
    let old = u16::from_ne_bytes([version_ihl, tos]);
    let new = u16::from_ne_bytes([version_ihl, tos | ECN_CE]);
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 2).map_err(|_| DROP_MALFORMED)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above (after the helper may have moved the data).
    unsafe { (*ip).tos = tos | ECN_CE };
    Ok(())
}

/// Leaves the packet to the stack, where the VXLAN device takes it (counted).
#[inline(always)]
fn to_device(ctx: &TcContext) -> i32 {
    count(ctx, DECAP_BY_DEVICE);
    TC_ACT_OK
}
