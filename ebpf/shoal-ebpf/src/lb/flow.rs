//! The packet as the balancer sees it: the flow of an IPv4 TCP/UDP packet without options
//! (a fragmented datagram's later fragments take their ports from its first, remembered
//! where it was balanced), whether it may start a flow, and where its fields are.

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{FlowKey, FragmentKey, FragmentPorts, FRAGMENT_SECONDS, PROTO_TCP, PROTO_UDP},
    stats::DROP_MALFORMED,
};

use super::conntrack::now_seconds;
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
/// The whole L4 header a first fragment must carry (TCP without options, UDP).
const TCP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// The flow of the IPv4 TCP/UDP packet in `ctx`, if it is one we can balance. A later
/// fragment takes its ports from its first (`remember_fragment`); one whose first was not
/// remembered here has no flow. A first fragment too short for its whole L4 header is
/// malformed (RFC 1858's tiny fragments: its flags or checksum would be in the next one).
#[inline(always)]
pub fn flow_of(ctx: &TcContext) -> Result<Option<FlowKey>, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, proto, saddr, daddr, frag_off) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr, (*ip).frag_off) };
    if version_ihl != IPV4_PLAIN || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(None);
    }
    let (saddr, daddr) = (u32::from_ne_bytes(saddr), u32::from_ne_bytes(daddr));
    let frag_off = u16::from_be(frag_off);
    let (sport, dport) = if frag_off & IP_OFFSET_MASK != 0 {
        match lookup_lru(&FRAGMENTS, &fragment_key(ctx, saddr, daddr, proto)?) {
            Some(ports) if now_seconds().wrapping_sub(ports.seen) <= FRAGMENT_SECONDS => (ports.sport, ports.dport),
            _ => return Ok(None),
        }
    } else {
        if frag_off & IP_MORE_FRAGMENTS != 0 {
            let whole = if proto == PROTO_TCP { TCP_HEADER } else { UDP_HEADER };
            // Against the whole packet (its L4 header may lie past the linear part).
            if (ctx.len() as usize) < L4 + whole {
                return Err(DROP_MALFORMED);
            }
        }
        let ports: *const Ports = ptr_at(ctx, L4).ok_or(DROP_MALFORMED)?;
        // SAFETY: bounds-checked by ptr_at just above.
        unsafe { ((*ports).src, (*ports).dst) }
    };
    Ok(Some(FlowKey { saddr, daddr, sport, dport, proto, _pad: [0; 3] }))
}

/// Remembers a first fragment's ports for the datagram's later fragments, arriving on the
/// same interface. Called only where the datagram is balanced or translated (never for what
/// merely passes, which anyone could send to fill the map).
#[inline(always)]
pub fn remember_fragment(ctx: &TcContext, flow: &FlowKey) -> Result<(), u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let frag_off = u16::from_be(unsafe { (*ip).frag_off });
    if frag_off & IP_MORE_FRAGMENTS != 0 && frag_off & IP_OFFSET_MASK == 0 {
        let key = fragment_key(ctx, flow.saddr, flow.daddr, flow.proto)?;
        let ports = FragmentPorts { sport: flow.sport, dport: flow.dport, seen: now_seconds() };
        // A failure leaves the later fragments unknown: they are dropped and counted then.
        let _ = FRAGMENTS.insert(key, ports, 0);
    }
    Ok(())
}

/// The `FRAGMENTS` key of the packet in `ctx` (its addresses as they are now).
#[inline(always)]
fn fragment_key(ctx: &TcContext, saddr: u32, daddr: u32, proto: u8) -> Result<FragmentKey, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above; the context is valid for the run.
    let (id, ifindex) = unsafe { ((*ip).id, (*ctx.skb.skb).ifindex) };
    Ok(FragmentKey { saddr, daddr, ifindex, id, proto, _pad: 0 })
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
