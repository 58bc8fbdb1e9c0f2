//! The ways out for a packet: into a local workload (`bpf_redirect_peer`, which skips the
//! host-side veth's backlog queue), to another node inside VXLAN naming the network (VNI)
//! (and, for the mesh's direct server return, the published port as the group policy ID),
//! encapsulated here (`vxlan`) or by the VXLAN device told by a tunnel key, or out the
//! underlay to a client outside the cluster (a FIB lookup for the next hop, as Cilium's
//! `fib_redirect`).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key, BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE, BPF_FIB_LKUP_RET_UNSUPP_LWT,
        BPF_FIB_LOOKUP_OUTPUT, BPF_F_ZERO_CSUM_TX, TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer, bpf_skb_set_tunnel_key,
        bpf_skb_set_tunnel_opt,
    },
    programs::TcContext,
    EbpfContext,
};
use shoal_common::{
    overlay::{EndpointEntry, NodeConfig, NODE_VXLAN_BY_DEVICE},
    stats::{
        DROP_FIB, DROP_FIB_NOT_FORWARDED, DROP_FIB_UNREACHABLE, DROP_FRAG_NEEDED, DROP_MALFORMED,
        DROP_NO_OVERLAY_DEVICE, DROP_REDIRECT, DROP_TTL_EXCEEDED, DROP_TUNNEL_KEY, ENCAP_BY_DEVICE,
    },
};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN},
    maps::NODE_CONFIG,
    stats::count,
    vxlan,
};

/// Offset of the IPv4 header checksum in the frame.
const IP_CSUM: usize = ETH_HLEN + 10;
const AF_INET: u8 = 2;

/// Hands the frame to a workload on this node, after giving a service backend's reply its
/// VIP back as the source (here, where the client is).
#[inline(always)]
pub fn deliver_local(ctx: &TcContext, to: &EndpointEntry, counter: u32) -> Result<i32, u32> {
    crate::lb::reverse_nat(ctx)?;
    hand_to_workload(ctx, to, counter)
}

/// Hands the frame to a workload on this node as it is, with the MACs it expects to see.
#[inline(always)]
pub fn hand_to_workload(ctx: &TcContext, to: &EndpointEntry, counter: u32) -> Result<i32, u32> {
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
    encapsulate_inner(ctx, to, vni, None, counter)
}

/// The VXLAN group policy extension's metadata (the kernel's `struct vxlan_metadata`).
#[repr(C)]
pub struct VxlanMetadata {
    /// The 16-bit group policy ID (and flags above it).
    pub gbp: u32,
}

/// `encapsulate`, with `policy` as the VXLAN header's group policy ID (0: none): the routing
/// mesh's direct server return carries the published port there.
#[inline(always)]
pub fn encapsulate_with_policy(
    ctx: &TcContext,
    to: &EndpointEntry,
    vni: u32,
    policy: u16,
    counter: u32,
) -> Result<i32, u32> {
    encapsulate_inner(ctx, to, vni, Some(policy), counter)
}

/// `encapsulate`: by the program where it can (`vxlan::encapsulate`), through the VXLAN
/// device otherwise; with a policy, the VXLAN options are set too.
#[inline(always)]
fn encapsulate_inner(
    ctx: &TcContext,
    to: &EndpointEntry,
    vni: u32,
    policy: Option<u16>,
    counter: u32,
) -> Result<i32, u32> {
    let config = node_config().ok_or(DROP_NO_OVERLAY_DEVICE)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    unsafe { (*eth).dst = to.mac };
    if config.underlay_ifindex != 0 && config.flags & NODE_VXLAN_BY_DEVICE == 0 {
        if let Some(verdict) = vxlan::encapsulate(ctx, &config, to.node_addr, vni, policy.unwrap_or(0), counter) {
            return verdict;
        }
    }
    through_device(ctx, &config, to, vni, policy, counter)
}

/// Sends the frame to `to`'s node through the node's VXLAN device, told where by a tunnel
/// key (and, with a policy, the VXLAN options).
#[inline(always)]
fn through_device(
    ctx: &TcContext,
    config: &NodeConfig,
    to: &EndpointEntry,
    vni: u32,
    policy: Option<u16>,
    counter: u32,
) -> Result<i32, u32> {
    if config.vxlan_ifindex == 0 {
        return Err(DROP_NO_OVERLAY_DEVICE);
    }
    // The node's address as the source only where an interface holds it: the kernel
    // refuses to send from an address that is not local.
    let source = if config.underlay_ifindex != 0 { u32::from_be(config.underlay_addr) } else { 0 };
    // SAFETY: bpf_tunnel_key is plain old data; all-zero is its "no options" value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = to.node_addr;
    // From the node's own address, whatever the route would pick on a node with several:
    // the receiver takes VXLAN from the cluster's node addresses only.
    key.__bindgen_anon_3.local_ipv4 = source;
    key.tunnel_ttl = vxlan::TUNNEL_TTL;
    // No outer UDP checksum (RFC 7348 allows it over IPv4, and the kernel's own VXLAN
    // devices default to it): the inner packet carries its own, and the sender skips a pass
    // over every byte.
    let flags = BPF_F_ZERO_CSUM_TX as u64;
    // SAFETY: `key` lives on our stack for the call and the size passed is its own.
    let rc =
        unsafe { bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, core::mem::size_of::<bpf_tunnel_key>() as u32, flags) };
    if rc != 0 {
        return Err(DROP_TUNNEL_KEY);
    }
    if let Some(policy) = policy {
        // After the key, which resets the options. Set even when 0: a VXLAN device with the
        // group policy extension builds the header from the options, and without any it
        // would read a policy it never had (an uninitialised stack word on some kernels),
        // which the receiving node would take for a direct-return request.
        let mut metadata = VxlanMetadata { gbp: u32::from(policy) };
        let size = core::mem::size_of::<VxlanMetadata>() as u32;
        // SAFETY: `metadata` lives on our stack for the call and the size passed is its own.
        let rc = unsafe { bpf_skb_set_tunnel_opt(ctx.skb.skb, (&raw mut metadata).cast(), size) };
        if rc != 0 {
            return Err(DROP_TUNNEL_KEY);
        }
    }
    count(ctx, counter);
    count(ctx, ENCAP_BY_DEVICE);
    // SAFETY: plain helper call; egress redirect to the VXLAN device, which reads the key.
    redirect_verdict(unsafe { bpf_redirect(config.vxlan_ifindex, 0) })
}

/// The way out of the node's underlay interface for the packet's destination, as the
/// node's own routing table says (`bpf_fib_lookup`, as Cilium's `fib_redirect`): the
/// lookup's result, to send with `send_out` (the lookup does not depend on the source, so
/// a rewrite may come between), or a drop reason when it gives no way out. A next hop whose
/// MAC is not known yet is left to the kernel (`bpf_redirect_neigh` resolves it).
#[inline(always)]
pub fn route_out(ctx: &TcContext) -> Result<Route, u32> {
    let ifindex = match node_config() {
        Some(config) if config.underlay_ifindex != 0 => config.underlay_ifindex,
        _ => return Err(DROP_FIB),
    };
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (protocol, saddr, daddr) = unsafe { ((*ip).protocol, (*ip).saddr, (*ip).daddr) };
    // No length: with one the kernel checks it against the route's MTU, and a GSO/GRO
    // packet's length is far past it (the stack segments those); without, it checks the
    // packet as the stack would forward it.
    route_to(ctx, ifindex, protocol, u32::from_ne_bytes(saddr), u32::from_ne_bytes(daddr), 0)
}

/// `route_out` for a packet from `saddr` to `daddr` (network byte order) of IPv4 length
/// `tot_len`, checked against the route's MTU (0: the kernel checks the packet as it is
/// against the device's MTU instead, and lets any GSO packet through).
#[inline(always)]
pub fn route_to(
    ctx: &TcContext,
    ifindex: u32,
    protocol: u8,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Result<Route, u32> {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid start.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.ifindex = ifindex;
    fib.l4_protocol = protocol;
    fib.__bindgen_anon_1.tot_len = tot_len;
    // The union fields written are the IPv4 ones.
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    // SAFETY: `fib` lives on our stack for the call and the size passed is its own.
    let rc = unsafe {
        fib_lookup(ctx.as_ptr(), &mut fib, core::mem::size_of::<bpf_fib_lookup>() as i32, BPF_FIB_LOOKUP_OUTPUT)
    };
    let rc = u32::try_from(rc).map_err(|_| DROP_FIB)?;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Route { fib, resolved: true }),
        // An IPv4 route through an IPv6 next hop: not a way out shoal takes.
        BPF_FIB_LKUP_RET_NO_NEIGH if fib.family != AF_INET => Err(DROP_FIB_NOT_FORWARDED),
        // The lookup filled in the interface and the next hop; the kernel resolves its MAC.
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Route { fib, resolved: false }),
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Err(DROP_FIB_UNREACHABLE)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(DROP_FRAG_NEEDED),
        BPF_FIB_LKUP_RET_NOT_FWDED | BPF_FIB_LKUP_RET_FWD_DISABLED | BPF_FIB_LKUP_RET_UNSUPP_LWT => {
            Err(DROP_FIB_NOT_FORWARDED)
        }
        _ => Err(DROP_FIB),
    }
}

/// A way out of the underlay (`route_out`): the lookup, and whether it knew the next hop's
/// MAC.
pub struct Route {
    fib: bpf_fib_lookup,
    resolved: bool,
}

/// Sends the packet the way `route` says.
#[inline(always)]
pub fn send_out(ctx: &TcContext, route: &Route, counter: u32) -> Result<i32, u32> {
    let fib = &route.fib;
    if !route.resolved {
        // SAFETY: plain old data; the IPv4 member of the union is the one written.
        let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        next_hop.nh_family = u32::from(AF_INET);
        // SAFETY: the lookup wrote the IPv4 member of its destination union.
        next_hop.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        count(ctx, counter);
        // SAFETY: `next_hop` lives on our stack for the call and the size passed is its own.
        let rc = unsafe {
            bpf_redirect_neigh(fib.ifindex, &mut next_hop, core::mem::size_of::<bpf_redir_neigh>() as i32, 0)
        };
        return redirect_verdict(rc);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    count(ctx, counter);
    // SAFETY: plain helper call; egress redirect to the interface the route names.
    redirect_verdict(unsafe { bpf_redirect(fib.ifindex, 0) })
}

/// Takes one hop off the packet's TTL before it crosses the mesh again; one with none left
/// is dropped, so state on two nodes that sends a packet back and forth cannot loop it for
/// ever.
#[inline(always)]
pub fn take_hop(ctx: &TcContext) -> Result<(), u32> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above.
    let (ttl, protocol) = unsafe { ((*ip).ttl, (*ip).protocol) };
    if ttl <= 1 {
        return Err(DROP_TTL_EXCEEDED);
    }
    // The checksum covers TTL and protocol as one 16-bit word.
    let old = u16::from_ne_bytes([ttl, protocol]);
    let new = u16::from_ne_bytes([ttl - 1, protocol]);
    ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 2).map_err(|_| DROP_MALFORMED)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DROP_MALFORMED)?;
    // SAFETY: bounds-checked by ptr_at just above (after the helper may have moved the data).
    unsafe { (*ip).ttl = ttl - 1 };
    Ok(())
}

/// The node's settings, copied out of `NODE_CONFIG`.
#[inline(always)]
pub fn node_config() -> Option<NodeConfig> {
    NODE_CONFIG.get(0).copied()
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
