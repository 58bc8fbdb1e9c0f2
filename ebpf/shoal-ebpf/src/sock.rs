//! Socket-level balancing for workloads' own connections (cgroup hooks on the workloads'
//! cgroup): `connect()` to a VIP goes straight to a backend, once per connection, so its
//! packets need no per-packet NAT or conntrack; `getpeername()` still shows the VIP. Datagrams
//! sent to a VIP without `connect()` (`sendmsg`) go to the backend their socket is pinned to,
//! and `recvmsg()` shows their answers as coming from the VIP. What the hooks do not see
//! (other cgroups, raw sockets) is caught by the TC path in `lb.rs`.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext, EbpfContext,
};
use shoal_common::{
    lb::{FlowKey, NatEntry, ServiceKey, SockPeerKey, PROTO_UDP, SOCKET_VNI},
    stats::{SOCK_LB_CONNECT, SOCK_LB_RECVMSG, SOCK_LB_SENDMSG},
};

use crate::{
    lb::pick,
    maps::{lookup, lookup_lru, SERVICES, SOCK_PEERS, SOCK_VIPS},
    stats::count_event,
};

/// Always let the call proceed: the hooks only ever change where it goes.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect(ctx: SockAddrContext) -> i32 {
    if let Some((cookie, vip)) = to_backend(&ctx) {
        // getpeername() of the socket shows the VIP.
        let _ = SOCK_VIPS.insert(cookie, vip, 0);
        count_event(SOCK_LB_CONNECT);
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg(ctx: SockAddrContext) -> i32 {
    if to_backend(&ctx).is_some() {
        count_event(SOCK_LB_SENDMSG);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(vip) = lookup_lru(&SOCK_VIPS, &cookie) {
        // SAFETY: the context pointer is valid; these fields are writable for getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = vip.addr;
            (*ctx.sock_addr).user_port = u32::from(vip.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg(ctx: SockAddrContext) -> i32 {
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (from, port) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16) };
    let key = SockPeerKey { cookie, addr: from, port, _pad: 0 };
    if let Some(vip) = lookup_lru(&SOCK_PEERS, &key) {
        // SAFETY: as above; these fields are writable for recvmsg4.
        unsafe {
            (*addr).user_ip4 = vip.addr;
            (*addr).user_port = u32::from(vip.port);
        }
        count_event(SOCK_LB_RECVMSG);
    }
    ALLOW
}

/// If the call addresses a VIP, points it at a backend and returns the socket's cookie and
/// the VIP. The cookie stands for the flow: one choice per socket, spread by Maglev. For UDP
/// the backend is remembered as a peer whose datagrams `recvmsg` shows as the VIP's.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext) -> Option<(u64, NatEntry)> {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (vip, port, proto) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16, (*addr).protocol as u8) };
    let service = lookup(&SERVICES, &ServiceKey { vni: SOCKET_VNI, vip, port, proto, _pad: 0 })?;
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow =
        FlowKey { saddr: cookie as u32, daddr: vip, sport: (cookie >> 32) as u16, dport: port, proto, _pad: [0; 3] };
    let (backend, _) = pick(service.id, service.backends, &flow).ok()?;
    let vip = NatEntry { addr: vip, port, flags: 0 };
    if proto == PROTO_UDP {
        let peer = SockPeerKey { cookie, addr: backend.addr, port: backend.port, _pad: 0 };
        SOCK_PEERS.insert(peer, vip, 0).ok()?;
    }
    // SAFETY: as above; these two fields are writable for connect4 and sendmsg4.
    unsafe {
        (*addr).user_ip4 = backend.addr;
        (*addr).user_port = u32::from(backend.port);
    }
    Some((cookie, vip))
}
