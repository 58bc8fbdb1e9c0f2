//! The packet as the balancer sees it: the flow of an IPv4 TCP/UDP packet without options,
//! whether it may start a flow, and where its fields are.

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{FlowKey, PROTO_TCP, PROTO_UDP},
    stats::DROP_MALFORMED,
};

use crate::headers::{ptr_at, Ipv4Hdr, ETH_HLEN};

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

#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// The flow of the IPv4 TCP/UDP packet in `ctx`, if it is one we can balance.
#[inline(always)]
pub fn flow_of(ctx: &TcContext) -> Result<Option<FlowKey>, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, proto, saddr, daddr) = unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    if version_ihl != IPV4_PLAIN || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(None);
    }
    let ports: *const Ports = ptr_at(ctx, L4).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    Ok(Some(FlowKey {
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }))
}

/// Whether the packet may start a flow: a TCP SYN without ACK, or any UDP datagram (UDP has
/// no first packet to tell apart).
#[inline(always)]
pub fn may_start(ctx: &TcContext, flow: &FlowKey) -> bool {
    flow.proto == PROTO_UDP || opens_connection(ctx, flow)
}

/// Whether the packet is a TCP SYN without ACK.
#[inline(always)]
pub(super) fn opens_connection(ctx: &TcContext, flow: &FlowKey) -> bool {
    if flow.proto != PROTO_TCP {
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
