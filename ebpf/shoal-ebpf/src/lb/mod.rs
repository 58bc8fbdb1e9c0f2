//! Per-packet service load balancing (the TC path, Cilium's `lb4` + conntrack + reverse NAT):
//! a packet to a service VIP gets the backend its flow was pinned to, or, for a new flow, the
//! one the service's Maglev table picks; replies get the VIP back as their source where they
//! are delivered; ICMP errors about a balanced flow are translated with it. One concern per
//! file: `flow` (the packet), `conntrack` (the connection table), `maglev` (the choice),
//! `nat` (the rewrites), `icmp` (errors about flows).

mod conntrack;
mod flow;
mod icmp;
mod maglev;
mod nat;

use aya_ebpf::programs::TcContext;
use shoal_common::{
    lb::{CtEntry, FlowKey, NatEntry, ServiceKey, NAT_HAIRPIN, NAT_RETURN_VIA_NODE},
    stats::{LB_ICMP_ERROR, LB_NEW_FLOW, LB_REPICKED, LB_REVERSE_NAT, LB_TRACKED},
};

use self::{
    conntrack::track_hairpin,
    flow::{opens_connection, IP_DADDR, IP_SADDR, L4_DPORT, L4_SPORT},
    icmp::rewrite_error_source,
    nat::rewrite,
};
pub use self::{
    conntrack::{now_seconds, track, tracked, Tracked},
    flow::{flow_of, later_fragment, may_start, reply_of},
    icmp::{error_flow, rewrite_error_destination},
    maglev::pick,
    nat::{rewrite_destination, rewrite_source},
};
use crate::{
    maps::{lookup, lookup_lru, CONNTRACK, SERVICES},
    stats::count,
};

/// What a packet is to a flow: one of its own, or an ICMP error about it (which travels the
/// flow's way, quoting a packet that went the other).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Packet,
    Error,
}

/// The flow the packet belongs to, and how.
#[inline(always)]
pub fn member_of(ctx: &TcContext) -> Result<Option<(FlowKey, Member)>, u32> {
    if let Some(flow) = flow_of(ctx)? {
        return Ok(Some((flow, Member::Packet)));
    }
    Ok(error_flow(ctx)?.map(|flow| (flow, Member::Error)))
}

/// `rewrite_source` for a member of `flow`: the packet's own source, or the address an
/// error quotes.
#[inline(always)]
pub fn rewrite_source_of(ctx: &TcContext, member: Member, flow: &FlowKey, from: &NatEntry) -> Result<(), u32> {
    match member {
        Member::Packet => rewrite_source(ctx, flow, from),
        Member::Error => {
            rewrite_error_source(ctx, flow, from)?;
            count(ctx, LB_ICMP_ERROR);
            Ok(())
        }
    }
}

/// If the ICMP error in `ctx` is about a flow balanced to a backend (its flow pinned in
/// `CONNTRACK`), points it at the backend as `rewrite_error_destination` does and returns
/// true. Never makes state.
#[inline(always)]
pub fn error_to_backend(ctx: &TcContext) -> Result<bool, u32> {
    let Some(flow) = error_flow(ctx)? else { return Ok(false) };
    match lookup_lru(&CONNTRACK, &flow) {
        Some(CtEntry { nat, backend, .. }) if backend != 0 && nat.flags == 0 => {
            rewrite_error_destination(ctx, &flow, &nat)?;
            count(ctx, LB_ICMP_ERROR);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// For a packet not to a VIP: a TCP SYN from a port an earlier VIP flow may have used must
/// not have its replies rewritten by that flow's reverse NAT state (a socket-balanced
/// connect() goes to a backend's own address, from a recycled port), so the state goes.
#[inline(always)]
pub fn forget_reused_port(ctx: &TcContext) -> Result<(), u32> {
    if let Some(flow) = flow_of(ctx)? {
        if opens_connection(ctx, &flow) {
            let _ = CONNTRACK.remove(reply_of(&flow));
        }
    }
    Ok(())
}

/// If the packet goes to a service VIP on network `vni`, rewrites its destination to the
/// flow's backend and returns true; the caller then forwards it to the backend. An ICMP
/// error about a VIP flow's reply goes to that flow's backend.
#[inline(always)]
pub fn balance(ctx: &TcContext, vni: u32) -> Result<bool, u32> {
    let Some(flow) = flow_of(ctx)? else { return error_to_backend(ctx) };
    let key = ServiceKey { vni, vip: flow.daddr, port: flow.dport, proto: flow.proto, _pad: 0 };
    let Some(service) = lookup(&SERVICES, &key) else { return Ok(false) };
    let backend = match tracked(ctx, &flow) {
        Tracked::Live(backend) => {
            count(ctx, LB_TRACKED);
            backend
        }
        Tracked::HairpinReply(vip) => {
            // A reply that happens to go to a port of the VIP's service.
            hairpin_back(ctx, &flow, &vip)?;
            return Ok(true);
        }
        state => {
            let (mut chosen, id) = pick(service.id, service.backends, &flow)?;
            let vip = NatEntry { addr: flow.daddr, port: flow.dport, flags: 0 };
            if chosen.addr == flow.saddr {
                chosen.flags = NAT_HAIRPIN;
                track_hairpin(&flow, &chosen, id)?;
            } else {
                track(&flow, &chosen, id, &vip)?;
            }
            count(ctx, if state == Tracked::Stale { LB_REPICKED } else { LB_NEW_FLOW });
            chosen
        }
    };
    rewrite_destination(ctx, &flow, &backend)?;
    if backend.flags == NAT_HAIRPIN {
        // The source port stays: the reply comes back to it.
        rewrite(ctx, flow.proto, IP_SADDR, L4_SPORT, flow.saddr, flow.daddr, flow.sport, flow.sport)?;
    }
    Ok(true)
}

/// If the packet is the reply of a flow balanced back to its own client, rewrites it (from
/// the VIP port, to the client, which is its own sender) and returns true.
#[inline(always)]
pub fn hairpin_reply(ctx: &TcContext) -> Result<bool, u32> {
    let Some(flow) = flow_of(ctx)? else { return Ok(false) };
    match lookup_lru(&CONNTRACK, &flow) {
        Some(CtEntry { nat, backend: 0, .. }) if nat.flags == NAT_HAIRPIN => {
            hairpin_back(ctx, &flow, &nat)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The reply of a hairpin flow: from `vip` (its address and service port), to the sender
/// itself at the port it sent to.
#[inline(always)]
fn hairpin_back(ctx: &TcContext, flow: &FlowKey, vip: &NatEntry) -> Result<(), u32> {
    rewrite(ctx, flow.proto, IP_DADDR, L4_DPORT, flow.daddr, flow.saddr, flow.dport, flow.dport)?;
    rewrite_source(ctx, flow, vip)?;
    count(ctx, LB_REVERSE_NAT);
    Ok(())
}

/// Gives a backend's reply the VIP back as its source (or, to an ICMP error about a
/// balanced flow, the VIP back where it quotes the backend), if it belongs to a balanced
/// flow.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext) -> Result<(), u32> {
    let Some((flow, member)) = member_of(ctx)? else { return Ok(()) };
    let Some(CtEntry { nat: vip, .. }) = lookup_lru(&CONNTRACK, &flow) else { return Ok(()) };
    if vip.flags == NAT_RETURN_VIA_NODE || (member == Member::Error && vip.flags != 0) {
        // Another node's ingress flow: that node restores the published address. (Errors
        // about hairpin flows are not translated: their client is their backend.)
        return Ok(());
    }
    rewrite_source_of(ctx, member, &flow, &vip)?;
    if member == Member::Packet {
        count(ctx, LB_REVERSE_NAT);
    }
    Ok(())
}
