//! The real programs run by the kernel on crafted packets (BPF_PROG_TEST_RUN), in
//! Cilium's setup -> run -> check shape, on the `testbed` network. Needs root (loads
//! programs, pins maps).

use shoal_common::stats;

use super::{testbed::*, FROM_OVERLAY, FROM_UNDERLAY, FROM_WORKLOAD};

/// The testbed, or a clear failure when not root.
pub(super) fn testbed() -> Testbed {
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
    leaves_through_the_underlay(&fx, verdict);
    assert_eq!(&reply[26..30], &NODE, "source given back as the node's address");
    assert_eq!(&reply[34..36], &8080u16.to_be_bytes(), "source port given back as the published port");
    assert_eq!(&reply[30..34], &OUTSIDE);
    assert!(checksums_ok(&reply), "checksums broken by the reverse rewrite");
}

/// Checks that a reply was sent out the underlay: under BPF_PROG_TEST_RUN the route lookup
/// for it never forwards (the frame arrives on `lo`), so the last step is a drop that says
/// so, after every rewrite (the lab's ingress tests send real replies).
pub(super) fn leaves_through_the_underlay(fx: &Testbed, verdict: u32) {
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(
        fx.count(stats::DROP_FIB_NOT_FORWARDED).unwrap(),
        1,
        "the route lookup, and nothing before it, stopped it"
    );
    assert_eq!(fx.count(stats::INGRESS_REPLY).unwrap(), 0);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_workloads_datagram_to_the_data_path_port_never_reaches_the_node() {
    let mut fx = testbed();
    fx.set_outbound().unwrap();

    // To the gateway (the node itself) and off the network (masqueraded to any node): the
    // VXLAN device there would take the payload for another node's overlay traffic.
    for dst in [GATEWAY, [192, 0, 2, 99]] {
        let (verdict, _) = fx.run(FROM_WORKLOAD, &udp(CLIENT, 40000, dst, DATA_PATH_PORT)).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT, "to {dst:?}");
    }
    // With IP options the UDP header sits further on; it is found there too.
    let mut with_options = udp(CLIENT, 40000, GATEWAY, DATA_PATH_PORT);
    with_options.splice(34..34, [1, 1, 1, 1]); // four NOP options
    with_options[14] = 0x46;
    with_options[17] = 32;
    let (verdict, _) = fx.run(FROM_WORKLOAD, &with_options).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "IP options do not hide the port");
    assert_eq!(fx.count(stats::DROP_TO_DATA_PATH_PORT).unwrap(), 3);

    // Other ports to the node, and the data path port between workloads on the overlay,
    // go as before.
    let (verdict, _) = fx.run(FROM_WORKLOAD, &udp(CLIENT, 40000, GATEWAY, 53)).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(fx.count(stats::FORWARD_HOST).unwrap(), 1);
    let (verdict, _) = fx.run(FROM_WORKLOAD, &udp(CLIENT, 40000, REMOTE, DATA_PATH_PORT)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(fx.count(stats::FORWARD_REMOTE).unwrap(), 1);
    assert_eq!(fx.count(stats::DROP_TO_DATA_PATH_PORT).unwrap(), 3, "nothing else was dropped as such");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn from_overlay_takes_vxlan_from_the_clusters_nodes_and_endpoints_from_their_own_node() {
    let fx = testbed();

    let (verdict, _) = fx.run_from_overlay(VNI, [10, 77, 9, 9], &udp(REMOTE, 40000, LOCAL, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "VXLAN from an address that is no node of the cluster");
    assert_eq!(fx.count(stats::DROP_NOT_A_NODE).unwrap(), 1);

    let (verdict, out) = fx.run_from_overlay(VNI, REMOTE_NODE, &udp(REMOTE, 40000, LOCAL, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT, "an endpoint, from its own node");
    assert_eq!(&out[0..6], &LOCAL_MAC);
    assert_eq!(fx.count(stats::DELIVER_FROM_OVERLAY).unwrap(), 1);

    let (verdict, _) = fx.run_from_overlay(VNI, OTHER_NODE, &udp(REMOTE, 40000, LOCAL, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "an endpoint's address sent by another node");
    let (verdict, _) = fx.run_from_overlay(VNI, REMOTE_NODE, &udp(LOCAL, 40000, LOCAL, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "this node's own endpoint's address, from elsewhere");
    assert_eq!(fx.count(stats::DROP_SPOOFED_SOURCE).unwrap(), 2);

    // A client outside the cluster, through the sending node's published port.
    for packet in [syn(OUTSIDE, 50000, LOCAL, 80), tcp(OUTSIDE, 50000, LOCAL, 80)] {
        let (verdict, _) = fx.run_from_overlay(VNI, OTHER_NODE, &packet).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    assert_eq!(fx.count(stats::DELIVER_FROM_OVERLAY).unwrap(), 3);
    let (verdict, _) = fx.run_from_overlay(VNI, OTHER_NODE, &syn(OUTSIDE, 50000, REMOTE, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "a client's packet only ever comes to an endpoint here");
    assert_eq!(fx.count(stats::DROP_NO_ENDPOINT).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_reply_crossing_the_mesh_again_takes_a_hop_and_cannot_loop() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    let (verdict, _) = fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT, "the client's flow went to REMOTE, on REMOTE_NODE");

    // REMOTE's reply comes back over the overlay and leaves through the underlay.
    let reply = tcp(REMOTE, 80, OUTSIDE, 50000);
    let (verdict, out) = fx.run_from_overlay(VNI, REMOTE_NODE, &reply).unwrap();
    leaves_through_the_underlay(&fx, verdict);
    assert_eq!(out[22], 63, "one hop taken");
    assert_eq!(&out[26..30], &NODE, "the published address as its source");
    assert!(checksums_ok(&out), "checksums broken by the hop or the rewrite");

    let (verdict, _) = fx.run_from_overlay(VNI, REMOTE_NODE, &with_ttl(reply, 1)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT, "no hop left");
    assert_eq!(fx.count(stats::DROP_TTL_EXCEEDED).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn only_tcp_udp_and_icmp_echo_reach_the_node_from_a_workload() {
    let mut fx = testbed();
    fx.set_outbound().unwrap();
    let with_protocol = |protocol: u8, first_payload_byte: u8| {
        let mut p = udp(CLIENT, 40000, GATEWAY, 9);
        p[23] = protocol;
        p[34] = first_payload_byte;
        p
    };
    for (what, packet, verdict) in [
        ("UDP", udp(CLIENT, 40000, GATEWAY, 9), TC_ACT_OK),
        ("TCP", syn(CLIENT, 40000, GATEWAY, 22), TC_ACT_OK),
        ("ICMP echo request", with_protocol(1, 8), TC_ACT_OK),
        ("ICMP echo reply", with_protocol(1, 0), TC_ACT_OK),
        ("ICMP fragmentation needed", with_protocol(1, 3), TC_ACT_SHOT),
        ("IP-in-IP", with_protocol(4, 0x45), TC_ACT_SHOT),
        ("GRE", with_protocol(47, 0), TC_ACT_SHOT),
    ] {
        let (got, _) = fx.run(FROM_WORKLOAD, &packet).unwrap();
        assert_eq!(got, verdict, "{what}");
    }
    assert_eq!(fx.count(stats::DROP_TO_HOST_PROTOCOL).unwrap(), 3);
    assert_eq!(fx.count(stats::FORWARD_HOST).unwrap(), 4);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_client_outside_may_not_carry_an_overlay_address() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    for source in [REMOTE, LOCAL, CLIENT] {
        let (verdict, _) = fx.run(FROM_UNDERLAY, &syn(source, 50000, NODE, PUBLISHED)).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT, "a client claiming {source:?}");
    }
    assert_eq!(fx.count(stats::DROP_SPOOFED_SOURCE).unwrap(), 3);
    assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 0, "no state made for them");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn each_refusal_is_counted_under_its_own_reason() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    let drops = |fx: &Testbed| -> Vec<(u32, u64)> {
        (0..stats::MAX)
            .filter(|c| stats::is_drop(*c))
            .map(|c| (c, fx.count(c).unwrap()))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    let expect = |fx: &mut Testbed, packet: Vec<u8>, reason: u32| {
        let before = drops(fx);
        let (verdict, _) = fx.run(FROM_WORKLOAD, &packet).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT, "{:?}", stats::name(reason));
        let after = drops(fx);
        let grew: Vec<u32> = after
            .iter()
            .filter(|(c, n)| before.iter().find(|(b, _)| b == c).map_or(0, |(_, m)| *m) < *n)
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(grew, [reason], "counted under {:?} alone", stats::name(reason));
    };

    // A VIP on a port its service does not have; with IP options on its own port.
    expect(&mut fx, syn(CLIENT, 40000, VIP, 81), stats::DROP_NO_BACKEND);
    let mut with_options = syn(CLIENT, 40000, VIP, 80);
    with_options.splice(34..34, [1, 1, 1, 1]);
    with_options[14] = 0x46;
    with_options[17] += 4;
    expect(&mut fx, with_options, stats::DROP_IP_OPTIONS);
    // No VXLAN device yet.
    fx.configure(shoal_common::overlay::NodeConfig::default()).unwrap();
    expect(&mut fx, ipv4_to(REMOTE), stats::DROP_NO_OVERLAY_DEVICE);
    // A veth the agent never registered.
    fx.forget_interface().unwrap();
    expect(&mut fx, ipv4_to(REMOTE), stats::DROP_UNKNOWN_INTERFACE);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn only_a_syn_makes_a_published_ports_flow() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    // A TCP segment with no flow behind it may be the node's own connection's: left to it.
    let stray = tcp(OUTSIDE, 50000, NODE, PUBLISHED);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &stray).unwrap();
    assert_eq!((verdict, out), (TC_ACT_OK, stray.clone()));
    assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 0);
    // A SYN makes the flow; its later segments follow it.
    let (verdict, _) = fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &stray).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &REMOTE);
    assert_eq!((fx.count(stats::LB_NEW_FLOW).unwrap(), fx.count(stats::LB_TRACKED).unwrap()), (1, 1));
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_flow_whose_backend_left_is_balanced_again_and_only_udp_flows_age() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    fx.with_udp_service().unwrap();
    let (_, first) = fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(&first[30..34], &REMOTE);
    let (_, datagram) = fx.run(FROM_WORKLOAD, &udp(CLIENT, 5000, VIP, 80)).unwrap();
    assert_eq!(&datagram[30..34], &REMOTE);
    assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 2);

    // Quiet since the clock's zero: the UDP flow is balanced again, the TCP one is not.
    fx.age_flows().unwrap();
    let (_, still) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(&still[30..34], &REMOTE, "an idle TCP flow keeps its backend");
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 1);
    let (_, again) = fx.run(FROM_WORKLOAD, &udp(CLIENT, 5000, VIP, 80)).unwrap();
    assert_eq!(&again[30..34], &REMOTE, "the only backend, chosen afresh");
    assert_eq!(fx.count(stats::LB_REPICKED).unwrap(), 1, "an idle UDP flow is balanced again");

    // The backend leaves its service; LOCAL takes its place: the open TCP flow's next
    // segment goes to LOCAL (which resets it) rather than to a task that is gone.
    fx.replace_backend(7, 9, 10, LOCAL, 8080).unwrap();
    let (verdict, moved) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&moved[30..34], &LOCAL, "balanced again from the current table");
    assert!(checksums_ok(&moved));
    assert_eq!(fx.count(stats::LB_REPICKED).unwrap(), 2);
    let (_, kept) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(&kept[30..34], &LOCAL, "and pinned there");
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_only_backend_calling_its_own_vip_reaches_itself_from_the_vip() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    // The service's only backend is the caller itself.
    fx.replace_backend(7, 9, 11, CLIENT, 8080).unwrap();

    // Forward: client -> VIP:80 becomes VIP:40000 -> client:8080 (not from its own
    // address, which the kernel would drop as martian), handed back to the client.
    let (verdict, out) = fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[26..30], &out[30..34]), (&VIP[..], &CLIENT[..]), "source the VIP, destination the client");
    assert_eq!((&out[34..36], &out[36..38]), (&40000u16.to_be_bytes()[..], &8080u16.to_be_bytes()[..]));
    assert_eq!(&out[0..6], &CLIENT_MAC, "handed to the client's own interface");
    assert!(checksums_ok(&out));

    // Reply: client:8080 -> VIP:40000 becomes VIP:80 -> client:40000, back to the client.
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 8080, VIP, 40000)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&reply[26..30], &reply[30..34]), (&VIP[..], &CLIENT[..]));
    assert_eq!((&reply[34..36], &reply[36..38]), (&80u16.to_be_bytes()[..], &40000u16.to_be_bytes()[..]));
    assert!(checksums_ok(&reply));
    assert_eq!(fx.count(stats::LB_REVERSE_NAT).unwrap(), 1);

    // The connection's next segment keeps the hairpin.
    let (_, again) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80)).unwrap();
    assert_eq!(again[26..38], out[26..38]);
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_older_versions_tracked_flows_are_carried_over() {
    use shoal_common::lb::{FlowKey, PROTO_TCP};
    let flow = |sport: u16| FlowKey {
        saddr: u32::from_ne_bytes(CLIENT),
        daddr: u32::from_ne_bytes(VIP),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool").args(args).output().map_err(crate::net::NetError::Io)?;
        match out.status.success() {
            true => Ok(()),
            false => Err(crate::net::NetError::Kernel(String::from_utf8_lossy(&out.stderr).into_owned())),
        }
    };
    // An old flow CLIENT:sport -> VIP:80 pinned to REMOTE:8080, as the old map held it.
    let track_old = |old: &str, sport: u16| {
        let key: Vec<String> = [CLIENT, VIP]
            .concat()
            .iter()
            .chain(&sport.to_be_bytes())
            .chain(&[0, 80, 6, 0, 0, 0])
            .map(|b| b.to_string())
            .collect();
        let value: Vec<String> = REMOTE.iter().chain(&[0x1f, 0x90, 0, 0]).map(|b| b.to_string()).collect();
        let mut update = vec!["map", "update", "pinned", old, "key"];
        update.extend(key.iter().map(String::as_str));
        update.push("value");
        update.extend(value.iter().map(String::as_str));
        bpftool(&update)
    };
    // The conntrack map as shoald pinned it before it kept backend IDs: 8-byte values.
    let mut fx = Testbed::with_pins(|dir| {
        let old = dir.join("SHOAL_CONNTRACK");
        let old = old.to_str().unwrap();
        bpftool(&[
            "map",
            "create",
            old,
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "SHOAL_CONNTRACK",
        ])?;
        track_old(old, 40000)
    })
    .unwrap();
    let carried = fx.tracked(&flow(40000)).unwrap().expect("the old flow was not carried over at load");
    assert_eq!((carried.nat.addr, u16::from_be(carried.nat.port)), (u32::from_ne_bytes(REMOTE), 8080));

    // The old programs go on tracking until ours are attached: a flow they tracked since is
    // carried over when the restore ends, with the ID of its backend; then the old map goes.
    fx.with_service().unwrap();
    let old = fx.pin_dir().join("SHOAL_CONNTRACK");
    track_old(old.to_str().unwrap(), 40001).unwrap();
    fx.retire_old_conntrack();
    assert!(!old.exists(), "the old map's pin stayed");
    let late = fx.tracked(&flow(40001)).unwrap().expect("a flow tracked after the load was lost");
    assert_eq!(late.backend, 9, "the backend at its address and port");
    assert_eq!(fx.tracked(&flow(40000)).unwrap(), Some(carried), "a carried flow is not written twice");

    // Both are still followed: their next segments go to the backend they had.
    for sport in [40000, 40001] {
        let (_, out) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, sport, VIP, 80)).unwrap();
        assert_eq!(&out[30..34], &REMOTE);
    }
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn with_direct_server_return_the_backends_node_answers_the_client_itself() {
    use shoal_common::{
        lb::{FlowKey, NatEntry, NAT_REPLY_TO_UNDERLAY, PROTO_TCP},
        overlay::{NodeConfig, NODE_MESH_DSR},
    };
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    fx.configure(NodeConfig {
        vxlan_ifindex: LO,
        underlay_ifindex: LO,
        underlay_addr: u32::from_ne_bytes(NODE),
        data_path_port: DATA_PATH_PORT.to_be(),
        flags: NODE_MESH_DSR,
    })
    .unwrap();
    // The ingress node still balances and sends the client's flow over the overlay (the
    // port rides in the VXLAN header, which test_run cannot show).
    let (verdict, out) = fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &REMOTE);

    // On the backend's node: a client's packet from OTHER_NODE's ingress, asking for direct
    // return from port 8080. The backend's replies are to leave here, from OTHER_NODE:8080.
    let (verdict, _) =
        fx.run_from_overlay_with_policy(VNI, OTHER_NODE, PUBLISHED, &syn(OUTSIDE, 50001, LOCAL, 80)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let reverse = FlowKey {
        saddr: u32::from_ne_bytes(LOCAL),
        daddr: u32::from_ne_bytes(OUTSIDE),
        sport: 80u16.to_be(),
        dport: 50001u16.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let entry = fx.tracked(&reverse).unwrap().expect("the reply's way remembered");
    let from = NatEntry { addr: u32::from_ne_bytes(OTHER_NODE), port: PUBLISHED.to_be(), flags: NAT_REPLY_TO_UNDERLAY };
    assert_eq!(entry.nat, from);
    // Under test_run the route lookup never finds a way out (the frame arrives on `lo`): with
    // no route to the client, the reply goes back through the ingress node after all,
    // untouched.
    fx.set_workload_addr(LOCAL).unwrap();
    let reply = tcp(LOCAL, 80, OUTSIDE, 50001);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &reply).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[14..], reply[14..], "sent back as it is");
    assert_eq!(fx.count(stats::INGRESS_RETURN).unwrap(), 1);

    // Without the request, with a port not published on the network, or for a client that is
    // a node of the cluster, the replies go back through the ingress node.
    let via_node = |fx: &mut Testbed, policy: u16, client: [u8; 4], port: u16| {
        fx.run_from_overlay_with_policy(VNI, OTHER_NODE, policy, &syn(client, port, LOCAL, 80)).unwrap();
        let key = FlowKey { daddr: u32::from_ne_bytes(client), dport: port.to_be(), ..reverse };
        fx.tracked(&key).unwrap().unwrap().nat.flags == shoal_common::lb::NAT_RETURN_VIA_NODE
    };
    assert!(via_node(&mut fx, 0, OUTSIDE, 50002), "no request");
    assert!(via_node(&mut fx, 22, OUTSIDE, 50003), "a port not published");
    assert!(via_node(&mut fx, DATA_PATH_PORT, OUTSIDE, 50004), "the data path port");
    assert!(via_node(&mut fx, PUBLISHED, REMOTE_NODE, 50005), "a node as the client");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_service_with_many_backends_balances_over_its_large_table() {
    // As the agent writes it, and as an entry that does not say (an older version's, or
    // one read just before its table moved map): the table is found either way.
    for (round, flagged) in [true, false].into_iter().enumerate() {
        let mut fx = testbed();
        fx.with_service().unwrap();
        let addrs = fx.with_many_backends(40, flagged).unwrap();
        let mut chosen = std::collections::BTreeSet::new();
        for sport in 0..400u16 {
            let (verdict, out) = fx.run(FROM_WORKLOAD, &syn(CLIENT, 20000 + sport, VIP, 80)).unwrap();
            assert_eq!(verdict, TC_ACT_REDIRECT, "round {round}, flow {sport}");
            let backend: [u8; 4] = out[30..34].try_into().unwrap();
            assert!(addrs.contains(&backend), "flow {sport} went to {backend:?}");
            assert!(checksums_ok(&out));
            chosen.insert(backend);
        }
        // 400 flows over 40 backends of even shares: every one of them all but surely.
        assert!(chosen.len() >= 36, "only {} of 40 backends chosen", chosen.len());
        assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 400);
        drop(fx);
    }
}
