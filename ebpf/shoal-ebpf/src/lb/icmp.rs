//! ICMP errors about balanced flows (destination unreachable, "fragmentation needed" among
//! them, time exceeded, parameter problem): the flow an error is about, and rewriting the
//! error as that flow's packets are rewritten, so whoever sent the packet it quotes finds it
//! by the addresses it used (Cilium's reverse NAT of related ICMP; path MTU discovery
//! through the mesh and VIPs depends on it).
//!
//! An error travels against the packet it quotes: the quoted packet went A -> B, the error
//! goes to A. So it belongs to the flow `reply_of(quoted)` and gets the rewrite a packet of
//! that flow would get: a source rewrite (reverse NAT) lands on the quoted destination (and
//! on the error's own source when the quoted destination sent it), a destination rewrite
//! (DNAT) on the quoted source and the error's destination.
//!
//! The quoted L4 checksum is left as it was: it covers a datagram the error does not carry
//! whole, and receivers do not check it.

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{FlowKey, NatEntry, PROTO_TCP, PROTO_UDP},
    stats::DROP_NAT,
};

use super::{
    flow::{reply_of, IP_DADDR, IP_SADDR},
    nat::{checksum_replace_u32, set_ip_address},
};
use crate::headers::{ptr_at, Ipv4Hdr, ETH_HLEN};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// IPv4 without options, the only shape translated (outer and quoted): fixed offsets.
const IPV4_PLAIN: u8 = 0x45;
/// `frag_off` bits (host order) of a fragment: more follow, or not the first.
const IP_FRAGMENT: u16 = 0x3fff;
/// `frag_off` bits (host order) of a fragment after the first.
const IP_OFFSET_MASK: u16 = 0x1fff;

/// Where things are in an error (outer IPv4 without options).
const ICMP: usize = ETH_HLEN + 20;
const ICMP_CSUM: usize = ICMP + 2;
const QUOTED: usize = ICMP + 8;
const QUOTED_CSUM: usize = QUOTED + 10;
const QUOTED_SADDR: usize = QUOTED + 12;
const QUOTED_DADDR: usize = QUOTED + 16;
const QUOTED_SPORT: usize = QUOTED + 20;
const QUOTED_DPORT: usize = QUOTED + 22;

/// The quoted packet: its IPv4 header and its ports.
#[repr(C)]
struct Quoted {
    ip: Ipv4Hdr,
    sport: u16,
    dport: u16,
}

/// An ICMP error about a flow: the flow it travels with, who sent it and to whom (its own
/// addresses, which need not be the flow's: a router on the way sends from its own).
#[derive(Clone, Copy)]
pub struct FlowError {
    pub flow: FlowKey,
    pub sender: u32,
    pub to: u32,
}

/// The ICMP error in `ctx`, with the flow it travels with: the other direction of the TCP
/// or UDP packet it quotes. `None` for anything else (an error with options, a fragment of
/// one, a quoted packet with options, of another protocol, or a later fragment, whose
/// "ports" are payload).
#[inline(always)]
pub fn error_flow(ctx: &TcContext) -> Result<Option<FlowError>, u32> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else { return Ok(None) };
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, protocol, frag_off, sender, to) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).frag_off, (*ip).saddr, (*ip).daddr) };
    if version_ihl != IPV4_PLAIN || protocol != PROTO_ICMP || u16::from_be(frag_off) & IP_FRAGMENT != 0 {
        return Ok(None);
    }
    let Some(icmp_type) = ptr_at::<u8>(ctx, ICMP) else { return Ok(None) };
    // SAFETY: bounds-checked by ptr_at just above.
    if !matches!(unsafe { *icmp_type }, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
        return Ok(None);
    }
    let Some(quoted) = ptr_at::<Quoted>(ctx, QUOTED) else { return Ok(None) };
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, proto, quoted_frag_off, saddr, daddr, sport, dport) = unsafe {
        let q = &*quoted;
        (q.ip.version_ihl, q.ip.protocol, q.ip.frag_off, q.ip.saddr, q.ip.daddr, q.sport, q.dport)
    };
    if version_ihl != IPV4_PLAIN
        || (proto != PROTO_TCP && proto != PROTO_UDP)
        || u16::from_be(quoted_frag_off) & IP_OFFSET_MASK != 0
    {
        return Ok(None);
    }
    let quoted = FlowKey {
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    Ok(Some(FlowError { flow: reply_of(&quoted), sender: u32::from_ne_bytes(sender), to: u32::from_ne_bytes(to) }))
}

/// The source rewrite of the error's flow (reverse NAT): `flow`'s source, the quoted
/// packet's destination, becomes `to`.
#[inline(always)]
pub fn rewrite_error_source(ctx: &TcContext, flow: &FlowKey, to: &NatEntry) -> Result<(), u32> {
    rewrite_quoted(ctx, IP_SADDR, QUOTED_DADDR, QUOTED_DPORT, (flow.saddr, to.addr), (flow.sport, to.port))
}

/// The destination rewrite of the error's flow (DNAT): `flow`'s destination, the quoted
/// packet's source, becomes `to`.
#[inline(always)]
pub fn rewrite_error_destination(ctx: &TcContext, flow: &FlowKey, to: &NatEntry) -> Result<(), u32> {
    rewrite_quoted(ctx, IP_DADDR, QUOTED_SADDR, QUOTED_SPORT, (flow.daddr, to.addr), (flow.dport, to.port))
}

/// Replaces an address (old, new) in the quoted header and, where it stands there too, in
/// the error's own header at `outer_off` (an error from a router on the way keeps the
/// router's), and a port (old, new) in the quoted header; fixes the three checksums.
#[inline(always)]
fn rewrite_quoted(
    ctx: &TcContext,
    outer_off: usize,
    quoted_addr_off: usize,
    quoted_port_off: usize,
    (old_addr, new_addr): (u32, u32),
    (old_port, new_port): (u16, u16),
) -> Result<(), u32> {
    let outer: *mut u32 = ptr_at(ctx, outer_off).ok_or(DROP_NAT)?;
    // SAFETY: bounds-checked by ptr_at just above.
    if unsafe { outer.read_unaligned() } == old_addr && old_addr != new_addr {
        set_ip_address(ctx, outer_off, old_addr, new_addr)?;
    }
    let quoted_csum: *mut u16 = ptr_at(ctx, QUOTED_CSUM).ok_or(DROP_NAT)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let old_csum = unsafe { quoted_csum.read_unaligned() };
    let new_csum = checksum_replace_u32(old_csum, old_addr, new_addr);
    // The ICMP checksum covers the whole message, quoted packet included (no pseudo
    // header): every word changed in it is folded in.
    ctx.l4_csum_replace(ICMP_CSUM, old_addr as u64, new_addr as u64, 4).map_err(|_| DROP_NAT)?;
    ctx.l4_csum_replace(ICMP_CSUM, old_csum as u64, new_csum as u64, 2).map_err(|_| DROP_NAT)?;
    ctx.l4_csum_replace(ICMP_CSUM, old_port as u64, new_port as u64, 2).map_err(|_| DROP_NAT)?;
    let addr: *mut u32 = ptr_at(ctx, quoted_addr_off).ok_or(DROP_NAT)?;
    let csum: *mut u16 = ptr_at(ctx, QUOTED_CSUM).ok_or(DROP_NAT)?;
    let port: *mut u16 = ptr_at(ctx, quoted_port_off).ok_or(DROP_NAT)?;
    // SAFETY: all bounds-checked by ptr_at just above (after the helpers moved the data).
    unsafe {
        addr.write_unaligned(new_addr);
        csum.write_unaligned(new_csum);
        port.write_unaligned(new_port);
    }
    Ok(())
}
