//! Answering a workload's ARP requests, so an overlay behaves like one flat layer-2 network
//! without a bridge or flooding: every known peer on the workload's network resolves to the
//! host-side veth's MAC, and all the workload's traffic comes to `from_workload`.

use aya_ebpf::{helpers::generated::bpf_redirect, programs::TcContext};
use shoal_common::{
    overlay::{EndpointKey, InterfaceEntry},
    stats::{ARP_REPLY, DROP_ARP_UNANSWERED, DROP_MALFORMED, DROP_SPOOFED_SOURCE},
};

use crate::{
    forward::redirect_verdict,
    headers::{ptr_at, ArpHdr, EthHdr, ARP_HTYPE_ETHER_BE, ARP_OP_REPLY_BE, ARP_OP_REQUEST_BE, ETH_HLEN, ETH_P_IP_BE},
    maps::{lookup, ENDPOINTS},
    stats::count,
};

/// Turns an ARP request for a known endpoint into the reply and sends it back out of the
/// interface it came in on. Returns the TC verdict, or the drop code.
#[inline(always)]
pub fn answer(ctx: &TcContext, ifindex: u32, iface: &InterfaceEntry) -> Result<i32, u32> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    let arp: *mut ArpHdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: both pointers were bounds-checked against data_end by ptr_at just above, and
    // nothing since has changed the packet.
    let (sender, target) = unsafe {
        if (*arp).htype != ARP_HTYPE_ETHER_BE || (*arp).ptype != ETH_P_IP_BE || (*arp).hlen != 6 || (*arp).plen != 4 {
            return Err(DROP_MALFORMED);
        }
        if (*arp).op != ARP_OP_REQUEST_BE {
            return Err(DROP_ARP_UNANSWERED);
        }
        ((*arp).spa, (*arp).tpa)
    };
    // A probe (sender 0.0.0.0, duplicate address detection) may come before the workload's
    // address is configured; anything else must come from the workload's own address.
    let sender_addr = u32::from_ne_bytes(sender);
    if sender_addr != 0 && sender_addr != iface.addr {
        return Err(DROP_SPOOFED_SOURCE);
    }
    let key = EndpointKey { vni: iface.vni, addr: u32::from_ne_bytes(target) };
    let entry = lookup(&ENDPOINTS, &key).ok_or(DROP_ARP_UNANSWERED)?;
    // Probes and announcements for the workload's own address must not hear that someone
    // else holds it.
    if entry.ifindex == ifindex || sender_addr == 0 {
        return Err(DROP_ARP_UNANSWERED);
    }
    // SAFETY: the same bounds-checked pointers; no helper has changed the packet since.
    unsafe {
        (*arp).op = ARP_OP_REPLY_BE;
        (*arp).tha = (*arp).sha;
        (*arp).tpa = sender;
        (*arp).sha = iface.mac;
        (*arp).spa = target;
        (*eth).dst = (*eth).src;
        (*eth).src = iface.mac;
    }
    count(ctx, ARP_REPLY);
    // SAFETY: plain helper call; flags 0 redirects to the egress of `ifindex`, the interface
    // the request arrived on, so the reply goes back into the workload.
    redirect_verdict(unsafe { bpf_redirect(ifindex, 0) })
}
