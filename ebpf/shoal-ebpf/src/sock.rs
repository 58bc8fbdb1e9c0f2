//! Socket-level balancing for workloads' own connections (cgroup hooks on the workloads'
//! cgroup): `connect()` to a VIP goes straight to a backend, once per connection, so its
//! packets need no per-packet NAT or conntrack; `getpeername()` still shows the VIP. What the
//! hooks do not see (other cgroups, raw sockets) is caught by the TC path in `lb.rs`.

use aya_ebpf::{
    helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext, EbpfContext,
};
use shoal_common::{
    lb::{FlowKey, NatEntry, ServiceKey, SOCKET_VNI},
    stats::SOCK_LB_CONNECT,
};

use crate::{
    lb::pick,
    maps::{lookup, lookup_lru, SERVICES, SOCK_VIPS},
    stats::count_event,
};

/// Always let the call proceed: the hooks only ever change where it goes.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect(ctx: SockAddrContext) -> i32 {
    let _ = try_connect(&ctx);
    ALLOW
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext) -> Option<()> {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (vip, port, proto) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16, (*addr).protocol as u8) };
    let key = ServiceKey { vni: SOCKET_VNI, vip, port, proto, _pad: 0 };
    let service = lookup(&SERVICES, &key)?;
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The cookie stands for the flow: one choice per socket, spread by Maglev.
    let flow =
        FlowKey { saddr: cookie as u32, daddr: vip, sport: (cookie >> 32) as u16, dport: port, proto, _pad: [0; 3] };
    let backend = pick(service.id, service.backends, &flow).ok()?;
    SOCK_VIPS.insert(cookie, NatEntry { addr: vip, port, flags: 0 }, 0).ok()?;
    // SAFETY: as above; these two fields are writable for connect4.
    unsafe {
        (*addr).user_ip4 = backend.addr;
        (*addr).user_port = u32::from(backend.port);
    }
    count_event(SOCK_LB_CONNECT);
    Some(())
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
