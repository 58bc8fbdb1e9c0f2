//! The routing mesh's connection handling (north-south), shared by the programs that see its
//! packets: balancing a client's flow to a published port, remembering where the backend's
//! replies must go, and sending them there.
//!
//! A flow from client C to node N's published port P goes to backend B, on N or on another
//! node M, with C kept as its source (Swarm's ingress SNATs it away: moby#25526). B's replies
//! go to C, so they must be caught before anything routes them: on N they get N:P back as
//! their source and leave through N's underlay; on M they go back over the overlay to N first
//! (the ingress node is the one that knows the published address, and the one C's flow state
//! in any stateful middlebox between C and N expects). With direct server return
//! (`NODE_MESH_DSR` on N, opt-in) N tells M the published port in the VXLAN header, and M
//! sends B's replies to C itself, from N:P.

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{CtEntry, FlowKey, IngressEntry, IngressKey, NatEntry, NAT_REPLY_TO_UNDERLAY, NAT_RETURN_VIA_NODE},
    overlay::{EndpointEntry, EndpointKey, GATEWAY_NODE, NODE_MESH_DSR},
    stats::{
        DROP_FRAGMENT_UNKNOWN, DROP_NAT, DROP_NO_ENDPOINT, DROP_SPOOFED_SOURCE, INGRESS_LOCAL, INGRESS_REMOTE,
        INGRESS_REPLY, INGRESS_RETURN, LB_ICMP_ERROR, LB_NEW_FLOW, LB_REPICKED, LB_TRACKED,
    },
};

use crate::{
    forward::{encapsulate, encapsulate_with_policy, hand_to_workload, node_config, route_out, send_out, take_hop},
    lb::{
        backend_live, error_flow, later_fragment, may_start, now_seconds, pick, remember_fragment, reply_of,
        rewrite_destination, rewrite_error_destination, rewrite_source_of, track, tracked, FlowError, Member, Tracked,
    },
    maps::{lookup, lookup_lru, CONNTRACK, ENDPOINTS, INGRESS, NODES},
    stats::count,
};

/// Where a client of a published port is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Outside the cluster: it may not carry an address of the overlay network, which the
    /// backend's node would take for one of its endpoints'.
    Outside,
    /// A workload of this node, calling its own node's address.
    Workload,
}

/// If `flow` goes to a port published on this node, sends it to the flow's backend (on this
/// node or over the overlay) and returns the verdict; `None` when no such port is published.
/// The caller has checked that the destination is this node's address.
#[inline(always)]
pub fn enter(ctx: &TcContext, flow: &FlowKey, client: Client) -> Result<Option<i32>, u32> {
    let key = IngressKey { port: flow.dport, proto: flow.proto, _pad: 0 };
    let Some(port) = lookup(&INGRESS, &key) else { return Ok(None) };
    if client == Client::Outside && lookup(&ENDPOINTS, &EndpointKey { vni: port.vni, addr: flow.saddr }).is_some() {
        return Err(DROP_SPOOFED_SOURCE);
    }
    let Some(backend) = balance(ctx, flow, &port)? else { return Ok(None) };
    // Direct server return, where this node asks for it: the backend's node answers the
    // client itself, told the published port (the client is outside: a workload's replies
    // must come back over the overlay).
    let dsr = client == Client::Outside && node_config().is_some_and(|c| c.flags & NODE_MESH_DSR != 0);
    to_backend(ctx, port.vni, &backend, if dsr { u16::from_be(flow.dport) } else { 0 }).map(Some)
}

/// If the ICMP error in `ctx` is about a reply of a flow to a port published on this node
/// at `node` (a hop on the way to the client could not take it: "fragmentation needed",
/// say), sends it to the flow's backend, translated, and returns the verdict. Never makes
/// state.
#[inline(always)]
pub fn enter_error(ctx: &TcContext, node: u32) -> Result<Option<i32>, u32> {
    let Some(FlowError { flow, sender, to }) = error_flow(ctx)? else { return Ok(None) };
    // To this node, about a packet this node sent.
    if to != node || flow.daddr != node {
        return Ok(None);
    }
    let key = IngressKey { port: flow.dport, proto: flow.proto, _pad: 0 };
    let Some(port) = lookup(&INGRESS, &key) else { return Ok(None) };
    // As for the flow's own packets: from outside, no overlay address.
    if lookup(&ENDPOINTS, &EndpointKey { vni: port.vni, addr: sender }).is_some() {
        return Err(DROP_SPOOFED_SOURCE);
    }
    match lookup_lru(&CONNTRACK, &flow) {
        Some(entry) if entry.backend != 0 && entry.nat.flags == 0 && backend_live(&entry) => {
            rewrite_error_destination(ctx, &flow, &entry.nat)?;
            count(ctx, LB_ICMP_ERROR);
            to_backend(ctx, port.vni, &entry.nat, 0).map(Some)
        }
        _ => Ok(None),
    }
}

/// Sends a packet of a published port's flow to its backend on network `vni`; to another
/// node with `dsr_port` (when not 0) as the published port its replies come from.
#[inline(always)]
fn to_backend(ctx: &TcContext, vni: u32, backend: &NatEntry, dsr_port: u16) -> Result<i32, u32> {
    let to = lookup(&ENDPOINTS, &EndpointKey { vni, addr: backend.addr }).ok_or(DROP_NO_ENDPOINT)?;
    if to.ifindex != 0 {
        hand_to_workload(ctx, &to, INGRESS_LOCAL)
    } else if to.node_addr == 0 || to.node_addr == GATEWAY_NODE {
        // A VIP or a gateway named as a backend: no workload there.
        Err(DROP_NO_ENDPOINT)
    } else {
        encapsulate_with_policy(ctx, &to, vni, dsr_port, INGRESS_REMOTE)
    }
}

/// Points a client's packet to a published port at the flow's backend: the one it was
/// pinned to, or for a new flow the one Maglev gives it. The hash leaves out the node's
/// address, so every node picks the same backend for the same client flow. Only a TCP SYN
/// (or a UDP datagram) makes a flow: other TCP without state is `None`, left to the node's
/// stack — it may be the node's own connection, which must keep its replies.
#[inline(always)]
pub fn balance(ctx: &TcContext, flow: &FlowKey, port: &IngressEntry) -> Result<Option<NatEntry>, u32> {
    let backend = match tracked(ctx, flow) {
        Tracked::Live(backend) => {
            count(ctx, LB_TRACKED);
            backend
        }
        Tracked::Untracked if !may_start(ctx, flow) => return Ok(None),
        // A later fragment follows its datagram's live flow, or nothing: it never makes one.
        _ if later_fragment(ctx) => return Err(DROP_FRAGMENT_UNKNOWN),
        state => {
            // A flow whose backend left gets another (a TCP one is then reset by it, rather
            // than left to time out against a task that is gone).
            let (chosen, id) = pick(port.id, port.backends, &FlowKey { daddr: 0, ..*flow })?;
            let published = NatEntry { addr: flow.daddr, port: flow.dport, flags: NAT_REPLY_TO_UNDERLAY };
            track(flow, &chosen, id, &published)?;
            count(ctx, if state == Tracked::Stale { LB_REPICKED } else { LB_NEW_FLOW });
            chosen
        }
    };
    remember_fragment(ctx, flow)?;
    rewrite_destination(ctx, flow, &backend)?;
    Ok(Some(backend))
}

/// On a backend's node: remembers where replies of `flow` (a client's packet that another
/// node's ingress, `ingress_node` (host byte order), sent here) go: back to that node, or
/// with `dsr_port` (the published port, host order; 0 for none) straight to the client,
/// from that node's address and the port.
#[inline(always)]
pub fn remember_return(flow: &FlowKey, ingress_node: u32, dsr_port: u16) -> Result<(), u32> {
    let reply = reply_of(flow);
    // Never straight to a node of the cluster (a workload's call masqueraded to its node's
    // address, this node's own included): a node's address is not one this node can send
    // to from another's, and its replies must come back the way the call went.
    let client_is_a_node = lookup(&NODES, &u32::from_be(flow.saddr)).is_some()
        || node_config().is_some_and(|config| config.underlay_addr == flow.saddr);
    let via = if dsr_port != 0 && !client_is_a_node {
        NatEntry { addr: ingress_node.to_be(), port: dsr_port.to_be(), flags: NAT_REPLY_TO_UNDERLAY }
    } else {
        NatEntry { addr: ingress_node, port: 0, flags: NAT_RETURN_VIA_NODE }
    };
    // Written once per flow, not per packet: an unchanged entry is left alone.
    if lookup_lru(&CONNTRACK, &reply).map(|e| e.nat) != Some(via) {
        let entry = CtEntry { nat: via, backend: 0, seen: now_seconds() };
        CONNTRACK.insert(reply, entry, 0).map_err(|_| DROP_NAT)?;
    }
    Ok(())
}

/// Whether a packet crosses the mesh for the first time (from its workload) or again (it
/// came over the overlay): a packet crossing again takes a hop off its TTL.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    First,
    Again,
}

/// If the packet is a backend's reply to an ingress client (or an ICMP error about the
/// client's flow), sends it on its way (out the underlay with the published address as its
/// source, or back to the ingress node over network `vni`) and returns the verdict; `None`
/// for any other packet.
#[inline(always)]
pub fn reply(ctx: &TcContext, flow: &FlowKey, member: Member, vni: u32, hop: Hop) -> Result<Option<i32>, u32> {
    let Some(CtEntry { nat: entry, .. }) = lookup_lru(&CONNTRACK, flow) else { return Ok(None) };
    if entry.flags != NAT_REPLY_TO_UNDERLAY && entry.flags != NAT_RETURN_VIA_NODE {
        return Ok(None);
    }
    if !member.speaks_for(flow) {
        // An error about the flow from anyone but its backend: not the mesh's to carry.
        return Ok(None);
    }
    if member == Member::Packet {
        remember_fragment(ctx, flow)?;
    }
    if hop == Hop::Again {
        take_hop(ctx)?;
    }
    let own_address = node_config().map_or(0, |config| config.underlay_addr);
    match entry.flags {
        NAT_REPLY_TO_UNDERLAY if entry.addr == own_address || hop == Hop::Again => {
            rewrite_source_of(ctx, member, flow, &entry)?;
            let route = route_out(ctx)?;
            send_out(ctx, &route, INGRESS_REPLY).map(Some)
        }
        // Direct server return: the published address is another node's. The way out is
        // found first: with none to the client from here, the reply goes back through the
        // ingress node after all (it received the client's packets), untouched.
        NAT_REPLY_TO_UNDERLAY => match route_out(ctx) {
            Ok(route) => {
                rewrite_source_of(ctx, member, flow, &entry)?;
                send_out(ctx, &route, INGRESS_REPLY).map(Some)
            }
            Err(_) => return_via(ctx, u32::from_be(entry.addr), vni).map(Some),
        },
        NAT_RETURN_VIA_NODE => return_via(ctx, entry.addr, vni).map(Some),
        _ => Ok(None),
    }
}

/// Sends a backend's reply back over network `vni` to the ingress node `node` (host byte
/// order), which gives it the published address and sends it to the client.
#[inline(always)]
fn return_via(ctx: &TcContext, node: u32, vni: u32) -> Result<i32, u32> {
    let node = EndpointEntry { ifindex: 0, node_addr: node, mac: [0; 6], router_mac: [0; 6] };
    encapsulate(ctx, &node, vni, INGRESS_RETURN)
}
