//! TC ingress on the node's underlay interface: the routing mesh's way in, and the
//! overlay's (VXLAN from the other nodes comes off here, `vxlan::decapsulate`).
//!
//! A TCP or UDP packet to a port published on this node's address goes to the flow's backend,
//! on this node or over the overlay to the backend's node, with the client's address kept as
//! its source; an ICMP error about a reply the mesh sent (a hop towards the client could not
//! take it) goes to that flow's backend, translated. Everything else (the node's own
//! traffic, VXLAN left to the device, the control plane) passes to the stack untouched; a packet the mesh cannot
//! parse is not its business, so it passes too.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use shoal_common::{lb::PROTO_UDP, overlay::NODE_VXLAN_BY_DEVICE};

use crate::{
    forward::node_config,
    headers::{ptr_at, EthHdr, ETH_P_IP_BE},
    ingress::{self, Client},
    lb::flow_of,
    stats::drop_packet,
    vxlan,
};

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    match try_from_underlay(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => drop_packet(&ctx, reason),
    }
}

#[inline(always)]
fn try_from_underlay(ctx: &TcContext) -> Result<i32, u32> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Ok(TC_ACT_OK) };
    // SAFETY: bounds-checked by ptr_at just above.
    if unsafe { (*eth).proto } != ETH_P_IP_BE {
        return Ok(TC_ACT_OK);
    }
    let Some(config) = node_config() else { return Ok(TC_ACT_OK) };
    if config.flags & NODE_VXLAN_BY_DEVICE == 0 {
        if let Some(verdict) = vxlan::decapsulate(ctx, &config)? {
            return Ok(verdict);
        }
    }
    let Ok(Some(flow)) = flow_of(ctx) else {
        // An ICMP error about a reply the mesh sent out: the backend must hear of it.
        return Ok(ingress::enter_error(ctx, config.underlay_addr)?.unwrap_or(TC_ACT_OK));
    };
    // The data path port is the overlay's, whatever a published port says; and a client
    // "at" it would have the replies sent to another node's VXLAN socket.
    if flow.daddr != config.underlay_addr
        || (flow.proto == PROTO_UDP && (flow.dport == config.data_path_port || flow.sport == config.data_path_port))
    {
        return Ok(TC_ACT_OK);
    }
    Ok(ingress::enter(ctx, &flow, Client::Outside)?.unwrap_or(TC_ACT_OK))
}
