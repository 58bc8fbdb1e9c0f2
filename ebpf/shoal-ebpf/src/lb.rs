//! Per-packet service load balancing (the TC path, Cilium's `lb4` + conntrack + reverse NAT):
//! a packet to a service VIP gets the backend its flow was pinned to, or, for a new flow, the
//! one the service's Maglev table picks; replies get the VIP back as their source where they
//! are delivered. Connection state lives in an LRU map; a flow whose backend left its
//! service is balanced again, UDP flows age out, TCP flows never do (see `CtEntry`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use shoal_common::{
    lb::{
        CtEntry, FlowKey, NatEntry, ServiceKey, HAIRPIN_PROBES, MAGLEV_SLOTS, NAT_HAIRPIN, NAT_RETURN_VIA_NODE,
        PROTO_TCP, PROTO_UDP, UDP_IDLE_SECONDS,
    },
    stats::{DROP_MALFORMED, DROP_NAT, DROP_NO_BACKEND, LB_NEW_FLOW, LB_REPICKED, LB_REVERSE_NAT, LB_TRACKED},
};

use crate::{
    headers::{ptr_at, Ipv4Hdr, ETH_HLEN},
    maps::{lookup, lookup_lru, BACKENDS, CONNTRACK, MAGLEV, SERVICES},
    stats::count,
};

/// IPv4 header without options: the only shape balanced (offsets stay constant for the
/// verifier).
const IPV4_PLAIN: u8 = 0x45;
const L4: usize = ETH_HLEN + 20;
/// Offsets in the IPv4 header.
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
/// Offsets of the ports and checksums in the L4 header.
const L4_SPORT: usize = L4;
const L4_DPORT: usize = L4 + 2;
const TCP_FLAGS: usize = L4 + 13;
const TCP_CSUM: usize = L4 + 16;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const UDP_CSUM: usize = L4 + 6;

#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// The flow of the IPv4 TCP/UDP packet in `ctx`, if it is one we can balance.
#[inline(always)]
pub fn flow_of(ctx: &TcContext) -> Result<Option<FlowKey>, u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (version_ihl, proto, saddr, daddr) = unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    if version_ihl != IPV4_PLAIN || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Ok(None);
    }
    let ports: *const Ports = ptr_at(ctx, L4).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (sport, dport) = unsafe { ((*ports).src, (*ports).dst) };
    Ok(Some(FlowKey {
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }))
}

/// If the packet goes to a service VIP on network `vni`, rewrites its destination to the
/// flow's backend and returns true; the caller then forwards it to the backend.
#[inline(always)]
pub fn balance(ctx: &TcContext, vni: u32) -> Result<bool, u32> {
    let Some(flow) = flow_of(ctx)? else { return Ok(false) };
    let key = ServiceKey { vni, vip: flow.daddr, port: flow.dport, proto: flow.proto, _pad: 0 };
    let Some(service) = lookup(&SERVICES, &key) else {
        if opens_connection(ctx, &flow) {
            // Not to a VIP, but from a port an earlier VIP flow may have used: its reverse
            // NAT state must not rewrite this connection's replies (a socket-balanced
            // connect() goes to a backend's own address, from a recycled port).
            let _ = CONNTRACK.remove(reply_of(&flow));
        }
        return Ok(false);
    };
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
    if entry.backend != 0 {
        match lookup(&BACKENDS, &entry.backend) {
            Some(b) if b.addr == entry.nat.addr && b.port == entry.nat.port => {}
            _ => return Tracked::Stale,
        }
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

/// Seconds of the kernel's monotonic coarse clock.
#[inline(always)]
pub fn now_seconds() -> u32 {
    // SAFETY: plain helper call, no arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Whether the packet may start a flow: a TCP SYN without ACK, or any UDP datagram (UDP has
/// no first packet to tell apart).
#[inline(always)]
pub fn may_start(ctx: &TcContext, flow: &FlowKey) -> bool {
    flow.proto == PROTO_UDP || opens_connection(ctx, flow)
}

/// Whether the packet is a TCP SYN without ACK.
#[inline(always)]
fn opens_connection(ctx: &TcContext, flow: &FlowKey) -> bool {
    if flow.proto != PROTO_TCP {
        return false;
    }
    match ptr_at::<u8>(ctx, TCP_FLAGS) {
        // SAFETY: bounds-checked by ptr_at.
        Some(flags) => (unsafe { *flags }) & (TCP_SYN | TCP_ACK) == TCP_SYN,
        None => false,
    }
}

/// The other direction of `flow`.
#[inline(always)]
pub fn reply_of(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// The backend the service's Maglev table gives this flow, and its ID.
#[inline(always)]
pub fn pick(service: u32, backends: u32, flow: &FlowKey) -> Result<(NatEntry, u32), u32> {
    if backends == 0 {
        return Err(DROP_NO_BACKEND);
    }
    let table = MAGLEV.get_ptr(service).ok_or(DROP_NO_BACKEND)?;
    let first = flow_hash(flow) as usize;
    let mut chosen = None;
    // A client that is itself a backend is not sent to itself on this path: the packet
    // would come back into its own namespace with its own address as source, which the
    // kernel drops as martian. The next slots give another backend (the socket path has no
    // such limit: a connect() to oneself goes over loopback).
    for probe in 0..HAIRPIN_PROBES {
        let slot = (first + probe) & (MAGLEV_SLOTS - 1);
        // SAFETY: the pointer is valid for this program run; `get` bounds the index.
        let Some(backend_id) = (unsafe { (*table).slots.get(slot).copied() }) else { break };
        let Some(backend) = lookup(&BACKENDS, &backend_id) else { break };
        chosen = Some((NatEntry { addr: backend.addr, port: backend.port, flags: 0 }, backend_id));
        if backend.addr != flow.saddr || backends == 1 {
            break;
        }
    }
    chosen.ok_or(DROP_NO_BACKEND)
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
fn track_hairpin(flow: &FlowKey, backend: &NatEntry, backend_id: u32) -> Result<(), u32> {
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

/// Gives a backend's reply the VIP back as its source, if it belongs to a balanced flow.
#[inline(always)]
pub fn reverse_nat(ctx: &TcContext) -> Result<(), u32> {
    let Some(flow) = flow_of(ctx)? else { return Ok(()) };
    let Some(CtEntry { nat: vip, .. }) = lookup_lru(&CONNTRACK, &flow) else { return Ok(()) };
    if vip.flags == NAT_RETURN_VIA_NODE {
        // Another node's ingress flow: that node restores the published address.
        return Ok(());
    }
    rewrite_source(ctx, &flow, &vip)?;
    count(ctx, LB_REVERSE_NAT);
    Ok(())
}

/// Points the packet of `flow` at `to` (DNAT).
#[inline(always)]
pub fn rewrite_destination(ctx: &TcContext, flow: &FlowKey, to: &NatEntry) -> Result<(), u32> {
    rewrite(ctx, flow.proto, IP_DADDR, L4_DPORT, flow.daddr, to.addr, flow.dport, to.port)
}

/// Makes the packet of `flow` come from `from` (reverse NAT).
#[inline(always)]
pub fn rewrite_source(ctx: &TcContext, flow: &FlowKey, from: &NatEntry) -> Result<(), u32> {
    rewrite(ctx, flow.proto, IP_SADDR, L4_SPORT, flow.saddr, from.addr, flow.sport, from.port)
}

/// Replaces an address and a port (both network byte order) and fixes the IP and L4
/// checksums incrementally.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    proto: u8,
    addr_off: usize,
    port_off: usize,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), u32> {
    let (csum_off, mangled) = if proto == PROTO_TCP { (TCP_CSUM, 0) } else { (UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64) };
    if old_addr != new_addr {
        ctx.l4_csum_replace(csum_off, old_addr as u64, new_addr as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
            .map_err(|_| DROP_NAT)?;
        ctx.l3_csum_replace(IP_CSUM, old_addr as u64, new_addr as u64, 4).map_err(|_| DROP_NAT)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2).map_err(|_| DROP_NAT)?;
    }
    // The fields themselves are written in place, not with `bpf_skb_store_bytes`: the
    // checksum helpers above already made the headers writable, and a helper call per field
    // costs more than the write.
    let addr: *mut u32 = ptr_at(ctx, addr_off).ok_or(DROP_NAT)?;
    let port: *mut u16 = ptr_at(ctx, port_off).ok_or(DROP_NAT)?;
    // SAFETY: both bounds-checked by ptr_at just above (after the helpers moved the data).
    unsafe {
        addr.write_unaligned(new_addr);
        port.write_unaligned(new_port);
    }
    Ok(())
}

/// A well-mixed hash of the flow (murmur3's finaliser over the folded tuple). The table it
/// indexes is the same on every node, so a flow hashed the same picks the same backend
/// anywhere (the routing mesh zeroes `daddr`, the one thing that differs between nodes).
#[inline(always)]
fn flow_hash(flow: &FlowKey) -> u32 {
    let mut h =
        flow.saddr ^ flow.daddr.rotate_left(16) ^ ((flow.sport as u32) << 16 | flow.dport as u32) ^ flow.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
