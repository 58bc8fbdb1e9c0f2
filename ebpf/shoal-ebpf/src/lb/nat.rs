//! Rewriting a packet's addresses and ports with incremental checksum updates (DNAT, and
//! the reverse NAT of replies).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use shoal_common::{
    lb::{FlowKey, NatEntry, PROTO_TCP},
    stats::DROP_NAT,
};

use super::flow::{later_fragment, IP_CSUM, IP_DADDR, IP_SADDR, L4_DPORT, L4_SPORT, TCP_CSUM, UDP_CSUM};
use crate::headers::ptr_at;

/// Points the packet of `flow` at `to` (DNAT).
#[inline(always)]
pub fn rewrite_destination(ctx: &TcContext, flow: &FlowKey, to: &NatEntry) -> Result<(), u32> {
    rewrite(ctx, flow.proto, IP_DADDR, L4_DPORT, flow.daddr, to.addr, flow.dport, to.port)
}

/// Makes the packet of `flow` come from `from` (reverse NAT).
#[inline(always)]
pub fn rewrite_source(ctx: &TcContext, flow: &FlowKey, from: &NatEntry) -> Result<(), u32> {
    rewrite(ctx, flow.proto, IP_SADDR, L4_SPORT, flow.saddr, from.addr, flow.sport, from.port)
}

/// Replaces an address and a port (both network byte order) and fixes the IP and L4
/// checksums incrementally. A later fragment has no L4 header: only its address changes (the
/// datagram's L4 checksum, in its first fragment, took the whole change).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn rewrite(
    ctx: &TcContext,
    proto: u8,
    addr_off: usize,
    port_off: usize,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), u32> {
    if later_fragment(ctx) {
        if old_addr != new_addr {
            set_ip_address(ctx, addr_off, old_addr, new_addr)?;
        }
        return Ok(());
    }
    let (csum_off, mangled) = if proto == PROTO_TCP { (TCP_CSUM, 0) } else { (UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64) };
    if old_addr != new_addr {
        ctx.l4_csum_replace(csum_off, old_addr as u64, new_addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| DROP_NAT)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2).map_err(|_| DROP_NAT)?;
    }
    // The fields themselves are written in place, not with `bpf_skb_store_bytes`: a helper
    // call per field costs more than the write (a program that writes packets directly has
    // them made writable before it starts).
    if old_addr != new_addr {
        set_ip_address(ctx, addr_off, old_addr, new_addr)?;
    }
    let port: *mut u16 = ptr_at(ctx, port_off).ok_or(DROP_NAT)?;
    // SAFETY: bounds-checked by ptr_at just above (after the helpers moved the data).
    unsafe { port.write_unaligned(new_port) };
    Ok(())
}

/// Writes `new` over the IPv4 address at `addr_off` (now `old`) and fixes the header
/// checksum by hand: it covers the header only, which is never offloaded, so the arithmetic
/// is all there is to it (`bpf_l3_csum_replace` does the same behind a helper call).
#[inline(always)]
pub(super) fn set_ip_address(ctx: &TcContext, addr_off: usize, old: u32, new: u32) -> Result<(), u32> {
    let csum: *mut u16 = ptr_at(ctx, IP_CSUM).ok_or(DROP_NAT)?;
    let addr: *mut u32 = ptr_at(ctx, addr_off).ok_or(DROP_NAT)?;
    // SAFETY: both bounds-checked by ptr_at just above.
    unsafe {
        csum.write_unaligned(checksum_replace_u32(csum.read_unaligned(), old, new));
        addr.write_unaligned(new);
    }
    Ok(())
}

/// The Internet checksum `check` after a 32-bit word of what it covers went from `old` to
/// `new` (RFC 1624: HC' = ~(~HC + ~m + m')). All three as they lie in the packet.
#[inline(always)]
pub(super) fn checksum_replace_u32(check: u16, old: u32, new: u32) -> u16 {
    // One's complement sums are the same in either byte order, so the words are added as
    // they lie in memory.
    let (old_hi, old_lo) = ((old >> 16) as u16, old as u16);
    let (new_hi, new_lo) = ((new >> 16) as u16, new as u16);
    let mut sum = u32::from(!check) + u32::from(!old_hi) + u32::from(!old_lo) + u32::from(new_hi) + u32::from(new_lo);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
