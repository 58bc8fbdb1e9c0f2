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
            ctx.l3_csum_replace(IP_CSUM, old_addr as u64, new_addr as u64, 4).map_err(|_| DROP_NAT)?;
            let addr: *mut u32 = ptr_at(ctx, addr_off).ok_or(DROP_NAT)?;
            // SAFETY: bounds-checked by ptr_at just above.
            unsafe { addr.write_unaligned(new_addr) };
        }
        return Ok(());
    }
    let (csum_off, mangled) = if proto == PROTO_TCP { (TCP_CSUM, 0) } else { (UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64) };
    if old_addr != new_addr {
        ctx.l4_csum_replace(csum_off, old_addr as u64, new_addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| DROP_NAT)?;
        ctx.l3_csum_replace(IP_CSUM, old_addr as u64, new_addr as u64, 4).map_err(|_| DROP_NAT)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2).map_err(|_| DROP_NAT)?;
    }
    // The fields themselves are written in place, not with `bpf_skb_store_bytes`: the
    // checksum helpers above already made the headers writable, and a helper call per field
    // costs more than the write.
    let addr: *mut u32 = ptr_at(ctx, addr_off).ok_or(DROP_NAT)?;
    let port: *mut u16 = ptr_at(ctx, port_off).ok_or(DROP_NAT)?;
    // SAFETY: both bounds-checked by ptr_at just above (after the helpers moved the data).
    unsafe {
        addr.write_unaligned(new_addr);
        port.write_unaligned(new_port);
    }
    Ok(())
}
