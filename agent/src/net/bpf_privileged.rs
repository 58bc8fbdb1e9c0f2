//! The real programs run by the kernel on crafted packets (BPF_PROG_TEST_RUN), in
//! Cilium's setup -> run -> check shape, on the `testbed` network. Needs root (loads
//! programs, pins maps).

use shoal_common::stats;

use super::{testbed::*, FROM_OVERLAY, FROM_UNDERLAY, FROM_WORKLOAD};

/// The testbed, or a clear failure when not root.
fn testbed() -> Testbed {
    assert!(nix::unistd::geteuid().is_root(), "BPF program tests load programs: run as root");
    Testbed::new().expect("load the programs into a testbed")
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn from_workload_answers_arp_for_peers_only() {
    let fx = testbed();

    let (verdict, reply) = fx.run(FROM_WORKLOAD, &arp_request(REMOTE)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT, "reply is sent back out of the veth");
    assert_eq!(&reply[0..6], &CLIENT_MAC, "eth dst: the asker");
    assert_eq!(&reply[6..12], &ROUTER_MAC, "eth src: the veth");
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
    assert_eq!(&reply[22..28], &ROUTER_MAC, "sender hw: the veth");
    assert_eq!(&reply[28..32], &REMOTE, "sender ip: the peer asked for");
    assert_eq!(&reply[32..38], &CLIENT_MAC);
    assert_eq!(&reply[38..42], &CLIENT);
    assert_eq!(fx.count(stats::ARP_REPLY).unwrap(), 1);

    let (verdict, _) = fx.run(FROM_WORKLOAD, &arp_request([10, 78, 0, 99])).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "no answer for a non-endpoint");
    let (verdict, _) = fx.run(FROM_WORKLOAD, &arp_request(CLIENT)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "no answer to a probe for the asker's own address");
    assert_eq!(fx.count(stats::DROP_ARP_UNANSWERED).unwrap(), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn from_workload_encapsulates_remote_and_delivers_local() {
    let fx = testbed();

    let (verdict, out) = fx.run(FROM_WORKLOAD, &ipv4_to(REMOTE)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &REMOTE_MAC, "inner eth dst: the remote endpoint");
    assert_eq!(fx.count(stats::FORWARD_REMOTE).unwrap(), 1);

    let (verdict, out) = fx.run(FROM_WORKLOAD, &ipv4_to(LOCAL)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &LOCAL_MAC, "eth dst: the local endpoint");
    assert_eq!(&out[6..12], &LOCAL_VETH_MAC, "eth src: its veth");
    assert_eq!(fx.count(stats::FORWARD_LOCAL).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_failure_is_a_counted_drop() {
    let fx = testbed();

    let (verdict, _) = fx.run(FROM_WORKLOAD, &ipv4_to([10, 78, 0, 99])).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_NO_ENDPOINT).unwrap(), 1);

    // The kernel refuses to test-run an IPv4 frame shorter than its header, so the short
    // frame is an ARP one.
    let truncated = &arp_request(REMOTE)[..24];
    let (verdict, _) = fx.run(FROM_WORKLOAD, truncated).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_MALFORMED).unwrap(), 1);

    let mut spoofed = ipv4_to(REMOTE);
    spoofed[26..30].copy_from_slice(&LOCAL);
    let (verdict, _) = fx.run(FROM_WORKLOAD, &spoofed).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "a workload may only send from its own address");
    assert_eq!(fx.count(stats::DROP_SPOOFED_SOURCE).unwrap(), 1);

    let mut ipv6 = ipv4_to(REMOTE);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    ipv6[14] = 0x60;
    ipv6.resize(14 + 40 + 8, 0); // the kernel refuses a test frame shorter than its header
    let (verdict, _) = fx.run(FROM_WORKLOAD, &ipv6).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "only IPv4 and ARP leave a workload");
    assert_eq!(fx.count(stats::DROP_NOT_IPV4).unwrap(), 1);

    let (verdict, _) = fx.run(FROM_OVERLAY, &ipv4_to(LOCAL)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "a frame without tunnel metadata is not from the overlay");
    assert_eq!(fx.count(stats::DROP_TUNNEL_KEY).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_connection_to_a_vip_goes_to_its_backend_and_the_reply_comes_from_the_vip() {
    let mut fx = testbed();
    fx.with_service().unwrap();

    // Forward: client -> VIP:80 becomes client -> backend:8080, checksums still right.
    let (verdict, out) = fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &REMOTE, "destination rewritten to the backend");
    assert_eq!(&out[36..38], &8080u16.to_be_bytes(), "port rewritten to the target port");
    assert_eq!(&out[0..6], &REMOTE_MAC, "then forwarded to the backend's endpoint");
    assert!(checksums_ok(&out), "checksums broken by the rewrite");
    assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 1);
    let (_, again) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(again[26..38], out[26..38], "the tracked flow keeps its backend");
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 1);

    // Reverse: the backend's reply, delivered to the client, comes from VIP:80. Here `lo`
    // plays the backend's veth and the client is a local endpoint.
    fx.set_workload_addr(REMOTE).unwrap();
    fx.set_client_behind_local_veth().unwrap();
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 8080, CLIENT, 40000)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&reply[26..30], &VIP, "source given back as the VIP");
    assert_eq!(&reply[34..36], &80u16.to_be_bytes(), "source port given back as the service port");
    assert!(checksums_ok(&reply), "checksums broken by the reverse rewrite");
    assert_eq!(fx.count(stats::LB_REVERSE_NAT).unwrap(), 1);

    // A VIP port the service does not have is refused and counted.
    let (verdict, _) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 8080, VIP, 81)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_new_connection_from_a_port_a_vip_flow_used_keeps_its_replies_as_they_are() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, VIP, 80)).unwrap();

    // The client's next connection from that port goes straight to the backend (as the
    // socket hook sends it).
    let (verdict, out) = fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, REMOTE, 8080)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &REMOTE);

    // Its replies reach the client unchanged: `lo` now plays the backend's veth and the
    // client is a local endpoint.
    fx.set_workload_addr(REMOTE).unwrap();
    fx.set_client_behind_local_veth().unwrap();
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 8080, CLIENT, 40000)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&reply[26..30], &REMOTE, "the old VIP flow's state rewrote a direct connection's reply");
    assert_eq!(fx.count(stats::LB_REVERSE_NAT).unwrap(), 0);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_published_port_reaches_its_backend_with_the_client_source_kept() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();

    // In: client -> NODE:8080 becomes client -> backend:80, encapsulated to the backend's node.
    let (verdict, out) = fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, 8080)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[26..30], &OUTSIDE, "the client's address is kept as the source");
    assert_eq!(&out[30..34], &REMOTE, "destination rewritten to the backend");
    assert_eq!(&out[36..38], &80u16.to_be_bytes(), "port rewritten to the target port");
    assert_eq!(&out[0..6], &REMOTE_MAC, "sent to the backend's endpoint");
    assert!(checksums_ok(&out), "checksums broken by the rewrite");
    assert_eq!((fx.count(stats::INGRESS_REMOTE).unwrap(), fx.count(stats::LB_NEW_FLOW).unwrap()), (1, 1));

    // Not the mesh's: another port, another address, the node's own traffic pass untouched.
    for packet in [tcp(OUTSIDE, 50000, NODE, 8081), tcp(OUTSIDE, 50000, [10, 77, 0, 12], 8080), ipv4_to(NODE)] {
        let (verdict, out) = fx.run(FROM_UNDERLAY, &packet).unwrap();
        assert_eq!((verdict, out), (TC_ACT_OK, packet));
    }

    // Out: the backend's reply (here `lo` plays its veth) gets NODE:8080 back as its source
    // and leaves through the underlay.
    fx.set_workload_addr(REMOTE).unwrap();
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 80, OUTSIDE, 50000)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&reply[26..30], &NODE, "source given back as the node's address");
    assert_eq!(&reply[34..36], &8080u16.to_be_bytes(), "source port given back as the published port");
    assert_eq!(&reply[30..34], &OUTSIDE);
    assert!(checksums_ok(&reply), "checksums broken by the reverse rewrite");
    assert_eq!(fx.count(stats::INGRESS_REPLY).unwrap(), 1);
}
