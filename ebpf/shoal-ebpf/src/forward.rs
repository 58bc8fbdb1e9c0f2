//! The two ways out for an overlay packet: into a local workload (`bpf_redirect_peer`, which
//! skips the host-side veth's backlog queue) or to another node through the VXLAN device with
//! a tunnel key naming the network (VNI) and the node.

use aya_ebpf::{
    bindings::{bpf_tunnel_key, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use shoal_common::{
    overlay::EndpointEntry,
    stats::{DROP_MALFORMED, DROP_NO_OVERLAY_DEVICE, DROP_REDIRECT, DROP_TUNNEL_KEY},
};

use crate::{
    headers::{ptr_at, EthHdr},
    maps::NODE_CONFIG,
    stats::count,
};

/// TTL of the outer IPv4 header of encapsulated packets.
const TUNNEL_TTL: u8 = 64;

/// Hands the frame to a workload on this node, with the MACs it expects to see.
#[inline(always)]
pub fn deliver_local(ctx: &TcContext, to: &EndpointEntry, counter: u32) -> Result<i32, u32> {
    // A reply from a service backend regains the VIP as its source here, where the client is.
    crate::lb::reverse_nat(ctx)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    unsafe {
        (*eth).dst = to.mac;
        (*eth).src = to.router_mac;
    }
    count(ctx, counter);
    // SAFETY: plain helper call; the kernel checks that `ifindex` is a veth with a peer.
    redirect_verdict(unsafe { bpf_redirect_peer(to.ifindex, 0) })
}

/// Sends the frame to the node running `to`, inside VXLAN with `vni`.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, to: &EndpointEntry, vni: u32, counter: u32) -> Result<i32, u32> {
    let vxlan_ifindex = match NODE_CONFIG.get(0) {
        Some(config) if config.vxlan_ifindex != 0 => config.vxlan_ifindex,
        _ => return Err(DROP_NO_OVERLAY_DEVICE),
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    unsafe { (*eth).dst = to.mac };

    // SAFETY: bpf_tunnel_key is plain old data; all-zero is its "no options" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = to.node_addr;
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: `key` lives on our stack for the call and the size passed is its own.
    let rc = unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    if rc != 0 {
        return Err(DROP_TUNNEL_KEY);
    }
    count(ctx, counter);
    // SAFETY: plain helper call; egress redirect to the VXLAN device, which reads the key.
    redirect_verdict(unsafe { bpf_redirect(vxlan_ifindex, 0) })
}

/// The verdict of a `bpf_redirect*` call: redirect on success, a counted drop otherwise.
#[inline(always)]
pub fn redirect_verdict(rc: i64) -> Result<i32, u32> {
    if rc == i64::from(TC_ACT_REDIRECT) {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(DROP_REDIRECT)
    }
}
