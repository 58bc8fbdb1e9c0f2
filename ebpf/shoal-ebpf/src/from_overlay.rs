//! TC ingress on the node's `vxlan external` device: frames other nodes sent over the overlay,
//! already decapsulated by the kernel, with the VNI in the tunnel metadata.

use aya_ebpf::{
    bindings::bpf_tunnel_key, helpers::generated::bpf_skb_get_tunnel_key, macros::classifier, programs::TcContext,
};
use shoal_common::{
    overlay::EndpointKey,
    stats::{DELIVER_FROM_OVERLAY, DROP_MALFORMED, DROP_NOT_IPV4, DROP_NO_ENDPOINT, DROP_TUNNEL_KEY},
};

use crate::{
    forward::deliver_local,
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_IP_BE},
    maps::{lookup, ENDPOINTS},
    stats::drop_packet,
};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    match try_from_overlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(&ctx, reason),
    }
}

#[inline(always)]
fn try_from_overlay(ctx: &TcContext) -> Result<i32, u32> {
    // SAFETY: bpf_tunnel_key is plain old data; the helper fills it.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` lives on our stack for the call and the size passed is its own.
    let rc = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    if rc != 0 {
        return Err(DROP_TUNNEL_KEY);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    if unsafe { (*eth).proto } != ETH_P_IP_BE {
        return Err(DROP_NOT_IPV4);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let daddr = unsafe { (*ip).daddr };
    let lookup_key = EndpointKey { vni: key.tunnel_id, addr: u32::from_ne_bytes(daddr) };
    match lookup(&ENDPOINTS, &lookup_key) {
        Some(to) if to.ifindex != 0 => deliver_local(ctx, &to, DELIVER_FROM_OVERLAY),
        _ => Err(DROP_NO_ENDPOINT),
    }
}
