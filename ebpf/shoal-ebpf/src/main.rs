//! shoal's BPF programs, one file per attach point, over shared helpers:
//!
//! - `from_workload`: TC ingress on the host side of a workload's veth (what the workload sends).
//! - `from_underlay`: TC ingress on the node's underlay interface (clients of published ports,
//!   and what other nodes send over VXLAN, taken apart there).
//! - `from_overlay`: TC ingress on the node's `vxlan external` device (what other nodes send
//!   that the program above leaves to the device).
//! - `sock_connect`, `sock_getpeername`: cgroup socket hooks of the workloads (VIPs per socket).
//! - `empty_tc`: nothing, the floor the per-packet cost benchmark measures beside the others.
//!
//! All maps are declared in `maps.rs`; packet layouts in `headers.rs`; shared steps (ARP
//! answers, delivery, VXLAN, counters) in modules of their own, as in Cilium's `bpf/lib`.
#![no_std]
#![no_main]

mod arp;
mod baseline;
mod forward;
mod from_overlay;
mod from_underlay;
mod from_workload;
mod headers;
mod ingress;
mod lb;
mod maps;
mod sock;
mod stats;
mod vxlan;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that could get here.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
