//! The packet as the balancer sees it: the flow of an IPv4 TCP/UDP packet without options
//! (a fragmented datagram's later fragments take their ports from its first), whether it may
//! start a flow, and where its fields are.

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{FlowKey, FragmentKey, FragmentPorts, PROTO_TCP, PROTO_UDP},
    stats::{DROP_FRAGMENT_UNKNOWN, DROP_MALFORMED},
};

use crate::{
    headers::{ptr_at, Ipv4Hdr, ETH_HLEN},
    maps::{lookup_lru, FRAGMENTS},
};

/// IPv4 header without options: the only shape balanced (offsets stay constant for the
/// verifier).
const IPV4_PLAIN: u8 = 0x45;
const L4: usize = ETH_HLEN + 20;
/// Offsets in the IPv4 header.
pub(super) const IP_CSUM: usize = ETH_HLEN + 10;
pub(super) const IP_SADDR: usize = ETH_HLEN + 12;
pub(super) const IP_DADDR: usize = ETH_HLEN + 16;
/// Offsets of the ports and checksums in the L4 header.
pub(super) const L4_SPORT: usize = L4;
pub(super) const L4_DPORT: usize = L4 + 2;
const TCP_FLAGS: usize = L4 + 13;
pub(super) const TCP_CSUM: usize = L4 + 16;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
pub(super) const UDP_CSUM: usize = L4 + 6;
/// `frag_off` bits (host order): more fragments follow; where this one starts.
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;

#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// The flow of the IPv4 TCP/UDP packet in `ctx`, if it is one we can balance. A first
/// fragment's ports are remembered for the later ones, which carry none; a later fragment
/// whose first was not seen here has no flow.
#[inline(always)]
pub fn flow_of(ctx: &TcContext) -> Result<Option<FlowKey>, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, proto, saddr, daddr, id, frag_off) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr, (*ip).id, (*ip).frag_off) };
    if version_ihl != IPV4_PLAIN || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(None);
    }
    let (saddr, daddr) = (u32::from_ne_bytes(saddr), u32::from_ne_bytes(daddr));
    let fragment = FragmentKey { saddr, daddr, id, proto, _pad: 0 };
    let frag_off = u16::from_be(frag_off);
    let (sport, dport) = if frag_off & IP_OFFSET_MASK != 0 {
        match lookup_lru(&FRAGMENTS, &fragment) {
            Some(ports) => (ports.sport, ports.dport),
            None => return Ok(None),
        }
    } else {
        let ports: *const Ports = ptr_at(ctx, L4).ok_or(DROP_MALFORMED)?;
        // SAFETY: bounds-checked by ptr_at just above.
        let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
        if frag_off & IP_MORE_FRAGMENTS != 0 {
            // Written for each program that looks (the same value): a datagram is
            // fragmented only when it is bigger than the way, which is rare, and each
            // program must find it where it runs.
            FRAGMENTS.insert(fragment, FragmentPorts { sport, dport }, 0).map_err(|_| DROP_FRAGMENT_UNKNOWN)?;
        }
        (sport, dport)
    };
    Ok(Some(FlowKey { saddr, daddr, sport, dport, proto, _pad: [0; 3] }))
}

/// Whether the packet is a fragment after the first: it has no L4 header (its "ports" are
/// payload), so only its IP header may be rewritten.
#[inline(always)]
pub fn later_fragment(ctx: &TcContext) -> bool {
    match ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) {
        // SAFETY: bounds-checked by ptr_at.
        Some(ip) => u16::from_be(unsafe { (*ip).frag_off }) & IP_OFFSET_MASK != 0,
        None => false,
    }
}

/// Whether the packet may start a flow: a TCP SYN without ACK, or any UDP datagram (UDP has
/// no first packet to tell apart).
#[inline(always)]
pub fn may_start(ctx: &TcContext, flow: &FlowKey) -> bool {
    flow.proto == PROTO_UDP || opens_connection(ctx, flow)
}

/// Whether the packet is a TCP SYN without ACK (never a later fragment: what stands where
/// its flags would be is payload).
#[inline(always)]
pub(super) fn opens_connection(ctx: &TcContext, flow: &FlowKey) -> bool {
    if flow.proto != PROTO_TCP || later_fragment(ctx) {
        return false;
    }
    match ptr_at::<u8>(ctx, TCP_FLAGS) {
        // SAFETY: bounds-checked by ptr_at.
        Some(flags) => (unsafe { *flags }) & (TCP_SYN | TCP_ACK) == TCP_SYN,
        None => false,
    }
}

/// The other direction of `flow`.
#[inline(always)]
pub fn reply_of(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}
