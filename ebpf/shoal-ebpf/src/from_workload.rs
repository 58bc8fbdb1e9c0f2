//! TC ingress on the host side of a workload's veth: everything a workload sends.
//!
//! ARP requests for peers are answered here; IPv4 to a peer on the same overlay network is
//! delivered locally or encapsulated to the peer's node; anything else goes to the stack.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use shoal_common::{
    overlay::EndpointKey,
    stats::{
        DROP_MALFORMED, DROP_NO_ENDPOINT, DROP_UNKNOWN_INTERFACE, FORWARD_LOCAL, FORWARD_REMOTE,
        PASS_OTHER,
    },
};

use crate::{
    arp,
    forward::{deliver_local, encapsulate},
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_ARP_BE, ETH_P_IP_BE},
    maps::{ENDPOINTS, INTERFACES},
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
    // SAFETY: read-only use of a value the agent only replaces whole.
    let iface = unsafe { INTERFACES.get(ifindex) }.ok_or(DROP_UNKNOWN_INTERFACE)?;
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_ARP_BE {
        return arp::answer(ctx, ifindex, iface);
    }
    if proto != ETH_P_IP_BE {
        count(ctx, PASS_OTHER);
        return Ok(TC_ACT_OK);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let daddr = unsafe { (*ip).daddr };
    let key = EndpointKey {
        vni: iface.vni,
        addr: u32::from_ne_bytes(daddr),
    };
    // SAFETY: read-only use of a value the agent only replaces whole.
    let to = unsafe { ENDPOINTS.get(key) }.ok_or(DROP_NO_ENDPOINT)?;
    if to.ifindex != 0 {
        deliver_local(ctx, to, FORWARD_LOCAL)
    } else {
        encapsulate(ctx, to, iface.vni, FORWARD_REMOTE)
    }
}
