//! TC ingress on the node's `vxlan external` device: frames other nodes sent over the overlay,
//! already decapsulated by the kernel, with the VNI and the sender in the tunnel metadata;
//! and what happens to such a frame (`arrived`), wherever its outer headers came off (most
//! come off in `from_underlay`, by `vxlan::decapsulate`, and never reach the device).
//!
//! Trust: VXLAN counts only from the cluster's nodes (`NODES`); an inner source that is an
//! endpoint of the network must be one on the sending node; any other inner source is a
//! client of the sending node's published port, allowed to reach local endpoints only (and
//! answered straight, when that node asked for direct server return).

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    helpers::generated::{
        bpf_skb_get_tunnel_key, bpf_skb_get_tunnel_opt, bpf_skb_set_tunnel_key, bpf_skb_set_tunnel_opt,
    },
    macros::classifier,
    programs::TcContext,
};
use shoal_common::{
    lb::{FlowKey, IngressKey},
    overlay::EndpointKey,
    stats::{
        DELIVER_FROM_OVERLAY, DROP_MALFORMED, DROP_NOT_A_NODE, DROP_NOT_IPV4, DROP_NO_ENDPOINT, DROP_SPOOFED_SOURCE,
        DROP_TUNNEL_KEY,
    },
};

use crate::{
    forward::{deliver_local, node_config, VxlanMetadata},
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN, ETH_P_IP_BE},
    ingress::{self, Hop},
    lb::{flow_of, later_fragment, member_of},
    maps::{lookup, ENDPOINTS, INGRESS, NODES},
    stats::drop_packet,
};

#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    match try_from_overlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(&ctx, reason),
    }
}

/// `from_overlay` as BPF_PROG_TEST_RUN can run it: a test frame has no tunnel metadata, so
/// this sets it first, from the test's `cb[0]` (VNI), `cb[1]` (the sending node, host byte
/// order) and `cb[2]` (the group policy ID, when not 0). Loaded by the program tests only,
/// never attached.
#[classifier]
pub fn from_overlay_test(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let (vni, sender, policy) = unsafe { ((*ctx.skb.skb).cb[0], (*ctx.skb.skb).cb[1], (*ctx.skb.skb).cb[2]) };
    // SAFETY: bpf_tunnel_key is plain old data; all-zero is its "no options" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // What the kernel reads back as the remote end of a received frame is the local end of
    // the key set here (a key set is for sending).
    key.__bindgen_anon_3.local_ipv4 = sender;
    // SAFETY: `key` lives on our stack for the call and the size passed is its own.
    let rc = unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, 0) };
    if rc != 0 {
        return drop_packet(&ctx, DROP_TUNNEL_KEY);
    }
    if policy != 0 {
        let mut metadata = VxlanMetadata { gbp: policy };
        let size = core::mem::size_of::<VxlanMetadata>() as u32;
        // SAFETY: `metadata` lives on our stack for the call and the size passed is its own.
        if unsafe { bpf_skb_set_tunnel_opt(ctx.skb.skb, (&raw mut metadata).cast(), size) } != 0 {
            return drop_packet(&ctx, DROP_TUNNEL_KEY);
        }
    }
    match try_from_overlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(&ctx, reason),
    }
}

/// Where an overlay frame came from: the sending node (host byte order), the network, and
/// the VXLAN group policy ID (0: none).
#[derive(Clone, Copy)]
pub struct Tunnel {
    pub sender: u32,
    pub vni: u32,
    pub policy: u16,
}

/// The published port a mesh flow's ingress node asked this node to answer `flow` from (the
/// VXLAN group policy ID; 0 when there is none: replies go back through that node). Only a
/// port published on network `vni` for the flow's protocol, and never the data path port:
/// the node answers from another's address only as that node would.
#[inline(always)]
fn dsr_port(policy: u16, flow: &FlowKey, vni: u32) -> u16 {
    if policy == 0 || node_config().is_some_and(|config| config.data_path_port == policy.to_be()) {
        return 0;
    }
    match lookup(&INGRESS, &IngressKey { port: policy.to_be(), proto: flow.proto, _pad: 0 }) {
        Some(published) if published.vni == vni => policy,
        _ => 0,
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
    let mut metadata = VxlanMetadata { gbp: 0 };
    let size = core::mem::size_of::<VxlanMetadata>() as u32;
    // SAFETY: `metadata` lives on our stack for the call and the size passed is its own.
    let rc = unsafe { bpf_skb_get_tunnel_opt(ctx.skb.skb, (&raw mut metadata).cast(), size) };
    // The low 16 bits are the policy ID; the bits above, the kernel's flags.
    let policy = if rc < 0 { 0 } else { metadata.gbp as u16 };
    // SAFETY: the helper filled the key of an IPv4 tunnel: the IPv4 member.
    let sender = unsafe { key.__bindgen_anon_1.remote_ipv4 };
    arrived(ctx, &Tunnel { sender, vni: key.tunnel_id, policy })
}

/// Delivers a frame that came over the overlay as `tunnel` says (its outer headers already
/// off), by the trust rules above.
#[inline(always)]
pub fn arrived(ctx: &TcContext, tunnel: &Tunnel) -> Result<i32, u32> {
    let Tunnel { sender, vni, policy } = *tunnel;
    if lookup(&NODES, &sender).is_none() {
        return Err(DROP_NOT_A_NODE);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    if unsafe { (*eth).proto } != ETH_P_IP_BE {
        return Err(DROP_NOT_IPV4);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
    let from_client = match lookup(&ENDPOINTS, &EndpointKey { vni, addr: u32::from_ne_bytes(saddr) }) {
        // An endpoint of the network sends from its own node, and from nowhere else.
        Some(from) if from.ifindex == 0 && from.node_addr == sender => false,
        Some(_) => return Err(DROP_SPOOFED_SOURCE),
        // No endpoint: a client outside the cluster, through the sending node's published
        // port (the mesh keeps the client's address).
        None => true,
    };
    match lookup(&ENDPOINTS, &EndpointKey { vni, addr: u32::from_ne_bytes(daddr) }) {
        Some(to) if to.ifindex != 0 => {
            // (A later fragment's flow is its first's, already remembered.)
            if from_client && !later_fragment(ctx) {
                if let Some(flow) = flow_of(ctx)? {
                    // Its replies go back to the sending node, or with direct server return
                    // straight to the client. Kept up on every packet (a lookup when
                    // nothing changed), so a flow whose entry the LRU evicted here gets it
                    // back with its next packet.
                    ingress::remember_return(&flow, sender, dsr_port(policy, &flow, vni))?;
                }
            }
            deliver_local(ctx, &to, DELIVER_FROM_OVERLAY)
        }
        // A backend's reply to a client that connected to this node's published port,
        // crossing the mesh once more.
        _ if !from_client => {
            let Some((flow, member)) = member_of(ctx)? else { return Err(DROP_NO_ENDPOINT) };
            ingress::reply(ctx, &flow, member, vni, Hop::Again)?.ok_or(DROP_NO_ENDPOINT)
        }
        _ => Err(DROP_NO_ENDPOINT),
    }
}
