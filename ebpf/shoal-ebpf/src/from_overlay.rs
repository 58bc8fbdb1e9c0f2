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
    ingress,
    lb::{flow_of, starts_flow},
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
    let vni = key.tunnel_id;
    match lookup(&ENDPOINTS, &EndpointKey { vni, addr: u32::from_ne_bytes(daddr) }) {
        Some(to) if to.ifindex != 0 => {
            // A flow from an address that is no endpoint of the network comes from a client
            // outside the cluster, through the sending node's published port: its replies go
            // back there. Checked as a flow starts, so the overlay's own packets pay nothing.
            if let Some(flow) = flow_of(ctx)? {
                if starts_flow(ctx, &flow) && lookup(&ENDPOINTS, &EndpointKey { vni, addr: flow.saddr }).is_none() {
                    // SAFETY: the helper filled the key of an IPv4 tunnel: the IPv4 member.
                    let sender = unsafe { key.__bindgen_anon_1.remote_ipv4 };
                    ingress::remember_return(&flow, sender)?;
                }
            }
            deliver_local(ctx, &to, DELIVER_FROM_OVERLAY)
        }
        _ => {
            // A backend's reply to a client that connected to this node's published port.
            let Some(flow) = flow_of(ctx)? else { return Err(DROP_NO_ENDPOINT) };
            ingress::reply(ctx, &flow, vni)?.ok_or(DROP_NO_ENDPOINT)
        }
    }
}
