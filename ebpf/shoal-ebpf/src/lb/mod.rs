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
    stats::{DROP_FRAGMENT_UNKNOWN, LB_ICMP_ERROR, LB_NEW_FLOW, LB_REPICKED, LB_REVERSE_NAT, LB_TRACKED},
};

use self::{
    conntrack::track_hairpin,
    flow::{opens_connection, IP_DADDR, IP_SADDR, L4_DPORT, L4_SPORT},
    icmp::rewrite_error_source,
    nat::rewrite,
};
pub use self::{
    conntrack::{backend_live, now_seconds, track, tracked, Tracked},
    flow::{flow_of, later_fragment, may_start, remember_fragment, reply_of},
    icmp::{error_flow, rewrite_error_destination, FlowError},
    maglev::pick,
    nat::{rewrite_destination, rewrite_source},
};
use crate::{
    maps::{lookup, lookup_lru, CONNTRACK, SERVICES},
    stats::count,
};

/// What a packet is to a flow: one of its own, or an ICMP error about it (which travels the
/// flow's way, quoting a packet that went the other), from `sender`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Packet,
    Error { sender: u32 },
}

impl Member {
    /// Whether the packet may speak for `flow` where its source is not rewritten by anyone
    /// else: a packet always (its source was checked where it entered), an error only from
    /// the flow's own source (the peer the quoted packet went to; a stack sends errors about
    /// its own packets from that address). Anyone else's error would carry what it likes,
    /// translated, wherever the flow goes.
    #[inline(always)]
    pub fn speaks_for(self, flow: &FlowKey) -> bool {
        match self {
            Member::Packet => true,
            Member::Error { sender } => sender == flow.saddr,
        }
    }
}

/// The flow the packet belongs to, and how.
#[inline(always)]
pub fn member_of(ctx: &TcContext) -> Result<Option<(FlowKey, Member)>, u32> {
    if let Some(flow) = flow_of(ctx)? {
        return Ok(Some((flow, Member::Packet)));
    }
    Ok(error_flow(ctx)?.map(|error| (error.flow, Member::Error { sender: error.sender })))
}

/// `rewrite_source` for a member of `flow`: the packet's own source, or the address an
/// error quotes.
#[inline(always)]
pub fn rewrite_source_of(ctx: &TcContext, member: Member, flow: &FlowKey, from: &NatEntry) -> Result<(), u32> {
    match member {
        Member::Packet => rewrite_source(ctx, flow, from),
        Member::Error { .. } => {
            rewrite_error_source(ctx, flow, from)?;
            count(ctx, LB_ICMP_ERROR);
            Ok(())
        }
    }
}

/// If the ICMP error in `ctx` is a client's about a reply it had from a VIP of network `vni`
/// (to that VIP, quoting the client itself), and the client's flow is pinned to a backend
/// still in its service, points it at the backend as `rewrite_error_destination` does and
/// returns true. Never makes state. The caller has checked the error's source.
#[inline(always)]
pub fn error_to_backend(ctx: &TcContext, vni: u32) -> Result<bool, u32> {
    let Some(FlowError { flow, sender, to }) = error_flow(ctx)? else { return Ok(false) };
    let key = ServiceKey { vni, vip: flow.daddr, port: flow.dport, proto: flow.proto, _pad: 0 };
    if sender != flow.saddr || to != flow.daddr || lookup(&SERVICES, &key).is_none() {
        return Ok(false);
    }
    match lookup_lru(&CONNTRACK, &flow) {
        Some(entry) if entry.backend != 0 && entry.nat.flags == 0 && backend_live(&entry) => {
            rewrite_error_destination(ctx, &flow, &entry.nat)?;
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
    let Some(flow) = flow_of(ctx)? else { return error_to_backend(ctx, vni) };
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
        // A later fragment follows its datagram's live flow, or nothing: it never makes one.
        _ if later_fragment(ctx) => return Err(DROP_FRAGMENT_UNKNOWN),
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
    remember_fragment(ctx, &flow)?;
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
    if vip.flags == NAT_RETURN_VIA_NODE || !member.speaks_for(&flow) {
        // Another node's ingress flow: that node restores the published address.
        return Ok(());
    }
    if member == Member::Packet {
        remember_fragment(ctx, &flow)?;
    } else if vip.flags == NAT_HAIRPIN {
        // Errors about hairpin flows are not translated: their client is their backend.
        return Ok(());
    }
    rewrite_source_of(ctx, member, &flow, &vip)?;
    if member == Member::Packet {
        count(ctx, LB_REVERSE_NAT);
    }
    Ok(())
}
