//! The connection table (`CONNTRACK`, LRU): what it says of a flow (pinned to a live
//! backend, stale, untracked, a hairpin's reply) and remembering a flow both ways. A flow
//! whose backend left its service is stale (balanced again); UDP flows age out, TCP flows
//! never do (see `CtEntry`).

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, programs::TcContext};
use shoal_common::{
    lb::{CtEntry, FlowKey, NatEntry, NAT_HAIRPIN, PROTO_UDP, UDP_IDLE_SECONDS},
    stats::DROP_NAT,
};

use super::flow::{opens_connection, reply_of};
use crate::maps::{lookup, lookup_lru, BACKENDS, CONNTRACK};

/// What the connection table says of a flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// Pinned to this backend, which is still in its service.
    Live(NatEntry),
    /// Tracked, but its backend left the service (its ID is gone or names another backend
    /// now) or, for UDP, it was idle too long: to be balanced again.
    Stale,
    /// Not tracked, or a new TCP connection (a client reuses a port long before any old
    /// state would go, and a new connection must get a fresh choice).
    Untracked,
    /// The reply of a flow balanced back to its own client (`NAT_HAIRPIN`): to come from
    /// this VIP port.
    HairpinReply(NatEntry),
}

/// The flow's tracked state. A live UDP flow's last-seen time is refreshed (at most once a
/// second, so a busy flow costs one map update a second, not one a packet).
#[inline(always)]
pub fn tracked(ctx: &TcContext, flow: &FlowKey) -> Tracked {
    if opens_connection(ctx, flow) {
        return Tracked::Untracked;
    }
    let Some(entry) = lookup_lru(&CONNTRACK, flow) else { return Tracked::Untracked };
    if entry.backend == 0 && entry.nat.flags == NAT_HAIRPIN {
        return Tracked::HairpinReply(entry.nat);
    }
    if entry.backend != 0 && !backend_live(&entry) {
        return Tracked::Stale;
    }
    if flow.proto == PROTO_UDP {
        let now = now_seconds();
        if now.wrapping_sub(entry.seen) > UDP_IDLE_SECONDS {
            return Tracked::Stale;
        }
        if now != entry.seen {
            // In place, not by an update (which would allocate an element, push out another
            // flow under pressure, and could write back a stale copy over a re-pick). A store
            // into an element recycled meanwhile only touches another flow's idle time.
            if let Some(live) = CONNTRACK.get_ptr_mut(flow) {
                // SAFETY: the pointer is valid for this program run; a 4-byte aligned store.
                unsafe { (*live).seen = now };
            }
        }
    }
    Tracked::Live(entry.nat)
}

/// Whether the backend a forward entry names is still in its service: its ID still names
/// the same address and port in `BACKENDS`.
#[inline(always)]
pub fn backend_live(entry: &CtEntry) -> bool {
    matches!(lookup(&BACKENDS, &entry.backend), Some(b) if b.addr == entry.nat.addr && b.port == entry.nat.port)
}

/// Seconds of the kernel's monotonic coarse clock.
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: plain helper call, no arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Remembers the flow both ways: forward to its backend (ID `backend_id`), and the reverse
/// (the backend's replies) to `reverse`: where they must appear to come from, and how they
/// leave.
#[inline(always)]
pub fn track(flow: &FlowKey, backend: &NatEntry, backend_id: u32, reverse_nat: &NatEntry) -> Result<(), u32> {
    let reverse = reply_of(&FlowKey { daddr: backend.addr, dport: backend.port, ..*flow });
    let seen = now_seconds();
    CONNTRACK.insert(reverse, CtEntry { nat: *reverse_nat, backend: 0, seen }, 0).map_err(|_| DROP_NAT)?;
    CONNTRACK.insert(flow, CtEntry { nat: *backend, backend: backend_id, seen }, 0).map_err(|_| DROP_NAT)?;
    Ok(())
}

/// Remembers a flow balanced back to its own client: forward to the backend (with the VIP
/// as source), and the reply (backend -> VIP at the client's port) back from the VIP port.
#[inline(always)]
pub(super) fn track_hairpin(flow: &FlowKey, backend: &NatEntry, backend_id: u32) -> Result<(), u32> {
    let reply = FlowKey {
        saddr: backend.addr,
        daddr: flow.daddr,
        sport: backend.port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let seen = now_seconds();
    let vip = NatEntry { addr: flow.daddr, port: flow.dport, flags: NAT_HAIRPIN };
    CONNTRACK.insert(reply, CtEntry { nat: vip, backend: 0, seen }, 0).map_err(|_| DROP_NAT)?;
    CONNTRACK.insert(flow, CtEntry { nat: *backend, backend: backend_id, seen }, 0).map_err(|_| DROP_NAT)?;
    Ok(())
}
