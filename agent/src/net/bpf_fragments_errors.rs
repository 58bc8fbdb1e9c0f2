//! The balancer's packets off the common path, run by the kernel on crafted packets
//! (BPF_PROG_TEST_RUN): fragmented datagrams through VIPs and the mesh, and ICMP errors
//! about balanced flows. Needs root.

use shoal_common::stats;

use super::{
    privileged::{leaves_through_the_underlay, testbed},
    testbed::*,
    FROM_UNDERLAY, FROM_WORKLOAD,
};

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_fragmented_datagram_follows_its_first_fragment_both_ways() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    fx.with_udp_service().unwrap();

    // Client -> VIP:80, 3000 bytes in three fragments: every one goes to the backend, the
    // ports and the datagram's checksum rewritten once, in the first.
    let fragments = udp_fragments(CLIENT, 5000, VIP, 80, 3000, 1400);
    assert_eq!(fragments.len(), 3);
    let mut out = Vec::new();
    for fragment in &fragments {
        let (verdict, packet) = fx.run(FROM_WORKLOAD, fragment).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&packet[30..34], &REMOTE, "every fragment goes to the first one's backend");
        assert_eq!(&packet[0..6], &REMOTE_MAC);
        out.push(packet);
    }
    assert_eq!(&out[0][36..38], &8080u16.to_be_bytes(), "the first fragment's port rewritten");
    assert_eq!(out[1][34..], fragments[1][34..], "a later fragment's payload is left alone");
    assert!(reassembles(&out), "the datagram no longer verifies once reassembled");
    assert_eq!(fx.count(stats::LB_NEW_FLOW).unwrap(), 1);
    assert_eq!(fx.count(stats::LB_TRACKED).unwrap(), 2);

    // A later fragment of a datagram whose first was never seen names no flow: dropped, and
    // said why (it is not balanced by whatever its payload holds where ports would be).
    let stray = udp_fragments(CLIENT, 5001, VIP, 80, 3000, 1400);
    let (verdict, _) = fx.run(FROM_WORKLOAD, &stray[2]).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_FRAGMENT_UNKNOWN).unwrap(), 1);

    // A first fragment too short for its L4 header (RFC 1858) is refused.
    let mut tiny = udp_fragments(CLIENT, 5002, VIP, 80, 3000, 1400).remove(0);
    tiny.truncate(14 + 20 + 4);
    tiny[16..18].copy_from_slice(&24u16.to_be_bytes());
    let (verdict, _) = fx.run(FROM_WORKLOAD, &with_ttl(tiny, 64)).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_MALFORMED).unwrap(), 1);

    // A later fragment follows a live flow or nothing: once its datagram's backend has left,
    // it is dropped, not balanced anew.
    let moved = udp_fragments(CLIENT, 5003, VIP, 80, 3000, 1400);
    fx.run(FROM_WORKLOAD, &moved[0]).unwrap();
    fx.replace_backend(7, 9, 10, LOCAL, 8080).unwrap();
    let (verdict, _) = fx.run(FROM_WORKLOAD, &moved[1]).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_FRAGMENT_UNKNOWN).unwrap(), 2);
    fx.replace_backend(7, 10, 9, REMOTE, 8080).unwrap();

    // The backend's fragmented reply (`lo` now plays its veth) comes from VIP:80 in every
    // fragment.
    fx.set_workload_addr(REMOTE).unwrap();
    fx.set_client_behind_local_veth().unwrap();
    let mut back = Vec::new();
    for fragment in udp_fragments(REMOTE, 8080, CLIENT, 5000, 4000, 1400) {
        let (verdict, packet) = fx.run(FROM_WORKLOAD, &fragment).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&packet[26..30], &VIP, "every fragment of the reply comes from the VIP");
        back.push(packet);
    }
    assert_eq!(&back[0][34..36], &80u16.to_be_bytes());
    assert!(reassembles(&back), "the reply no longer verifies once reassembled");
    assert_eq!(fx.count(stats::LB_REVERSE_NAT).unwrap(), back.len() as u64);
}

/// ICMP "destination unreachable", and its codes used here.
const ICMP_UNREACHABLE: u8 = 3;
const PORT_UNREACHABLE: u8 = 3;
const FRAGMENTATION_NEEDED: u8 = 4;
/// A router between the node and a client outside (TEST-NET-2).
const ROUTER: [u8; 4] = [198, 51, 100, 1];

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_icmp_error_about_a_vip_flow_is_translated_both_ways() {
    let mut fx = testbed();
    fx.with_service().unwrap();
    fx.run(FROM_WORKLOAD, &syn(CLIENT, 40000, VIP, 80)).unwrap();

    // The client's error about a reply it got from VIP:80 goes to the backend, quoting the
    // backend's own address and port.
    let reply_seen = tcp(VIP, 80, CLIENT, 40000);
    let error = icmp_error(CLIENT, VIP, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &reply_seen);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &error).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[26..30], &out[30..34]), (&CLIENT[..], &REMOTE[..]), "to the backend, from the client");
    assert_eq!((&out[54..58], &out[62..64]), (&REMOTE[..], &8080u16.to_be_bytes()[..]), "quoting the backend");
    assert_eq!(&out[0..6], &REMOTE_MAC);
    assert!(icmp_checksums_ok(&out), "checksums broken by the translation");
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 1);

    // The backend's error about the client's packet (`lo` now plays its veth) reaches the
    // client from the VIP, quoting VIP:80, as if the VIP had sent it.
    fx.set_workload_addr(REMOTE).unwrap();
    fx.set_client_behind_local_veth().unwrap();
    let packet_seen = tcp(CLIENT, 40000, REMOTE, 8080);
    let error = icmp_error(REMOTE, CLIENT, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &packet_seen);
    let (verdict, back) = fx.run(FROM_WORKLOAD, &error).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&back[26..30], &back[30..34]), (&VIP[..], &CLIENT[..]), "from the VIP, to the client");
    assert_eq!((&back[58..62], &back[64..66]), (&VIP[..], &80u16.to_be_bytes()[..]), "quoting VIP:80");
    assert_eq!((&back[54..58], &back[62..64]), (&CLIENT[..], &40000u16.to_be_bytes()[..]));
    assert!(icmp_checksums_ok(&back), "checksums broken by the translation");
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 2);

    // A client's error may only speak for its own flows: quoting another's, it goes nowhere.
    fx.set_workload_addr(LOCAL).unwrap();
    fx.run(FROM_WORKLOAD, &syn(LOCAL, 40000, VIP, 80)).unwrap();
    fx.set_workload_addr(CLIENT).unwrap();
    let other_flow = icmp_error(CLIENT, VIP, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &tcp(VIP, 80, LOCAL, 40000));
    let (verdict, _) = fx.run(FROM_WORKLOAD, &other_flow).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    // Nor may anyone but the backend speak for its flow to the client.
    fx.set_workload_addr(LOCAL).unwrap();
    let forged = icmp_error(LOCAL, CLIENT, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &packet_seen);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &forged).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the client as it is");
    assert_eq!(out[14..], forged[14..], "untranslated");
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 2);
    fx.set_workload_addr(REMOTE).unwrap();

    // An error about no balanced flow is delivered as it is.
    let other = icmp_error(REMOTE, CLIENT, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &tcp(CLIENT, 40001, REMOTE, 8080));
    let (verdict, out) = fx.run(FROM_WORKLOAD, &other).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[14..], other[14..]);
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn fragmentation_needed_for_a_mesh_reply_reaches_its_backend() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();

    // A router on the way to the client could not take a reply (NODE:8080 -> client): its
    // error reaches the backend, still from the router, quoting the backend's address.
    let reply_sent = tcp(NODE, PUBLISHED, OUTSIDE, 50000);
    let error = icmp_error(ROUTER, NODE, ICMP_UNREACHABLE, FRAGMENTATION_NEEDED, 1280, &reply_sent);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &error).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[26..30], &out[30..34]), (&ROUTER[..], &REMOTE[..]), "to the backend, from the router");
    assert_eq!((&out[54..58], &out[62..64]), (&REMOTE[..], &80u16.to_be_bytes()[..]), "quoting the backend");
    assert_eq!(&out[40..42], &1280u16.to_be_bytes(), "the MTU it reports kept");
    assert_eq!(&out[0..6], &REMOTE_MAC, "over the overlay to the backend");
    assert!(icmp_checksums_ok(&out), "checksums broken by the translation");
    assert_eq!((fx.count(stats::LB_ICMP_ERROR).unwrap(), fx.count(stats::INGRESS_REMOTE).unwrap()), (1, 2));

    // From an address of the overlay: nobody outside may send as a workload.
    let spoofed = icmp_error(LOCAL, NODE, ICMP_UNREACHABLE, FRAGMENTATION_NEEDED, 1280, &reply_sent);
    let (verdict, _) = fx.run(FROM_UNDERLAY, &spoofed).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_SPOOFED_SOURCE).unwrap(), 1);

    // About a flow the mesh does not know: the node's own business, passed untouched.
    let unknown =
        icmp_error(ROUTER, NODE, ICMP_UNREACHABLE, FRAGMENTATION_NEEDED, 1280, &tcp(NODE, 22, OUTSIDE, 50000));
    let (verdict, out) = fx.run(FROM_UNDERLAY, &unknown).unwrap();
    assert_eq!((verdict, out), (TC_ACT_OK, unknown));

    // A workload that is not the flow's backend cannot send the client an error through the
    // mesh (it would leave the node through the underlay, past every rule of the way out).
    let forged = icmp_error(CLIENT, OUTSIDE, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &tcp(OUTSIDE, 50000, REMOTE, 80));
    let (verdict, _) = fx.run(FROM_WORKLOAD, &forged).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 1, "translated for a workload that is not the backend");

    // The backend's own error about the client's packet (`lo` plays its veth) leaves
    // through the underlay from NODE, quoting NODE:8080.
    fx.set_workload_addr(REMOTE).unwrap();
    let packet_seen = tcp(OUTSIDE, 50000, REMOTE, 80);
    let error = icmp_error(REMOTE, OUTSIDE, ICMP_UNREACHABLE, PORT_UNREACHABLE, 0, &packet_seen);
    let (verdict, back) = fx.run(FROM_WORKLOAD, &error).unwrap();
    leaves_through_the_underlay(&fx, verdict);
    assert_eq!((&back[26..30], &back[30..34]), (&NODE[..], &OUTSIDE[..]), "from the node, to the client");
    assert_eq!((&back[58..62], &back[64..66]), (&NODE[..], &PUBLISHED.to_be_bytes()[..]), "quoting NODE:8080");
    assert!(icmp_checksums_ok(&back), "checksums broken by the translation");
    assert_eq!(fx.count(stats::LB_ICMP_ERROR).unwrap(), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_fragmented_datagram_crosses_the_mesh_with_its_first_fragment_both_ways() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    fx.with_udp_published_port().unwrap();

    // In: every fragment of the client's datagram to NODE:8080 goes to the backend.
    let fragments = udp_fragments(OUTSIDE, 50000, NODE, PUBLISHED, 3000, 1400);
    let mut out = Vec::new();
    for fragment in &fragments {
        let (verdict, packet) = fx.run(FROM_UNDERLAY, fragment).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&packet[30..34], &REMOTE, "every fragment goes to the first one's backend");
        out.push(packet);
    }
    assert_eq!(&out[0][36..38], &80u16.to_be_bytes());
    assert!(reassembles(&out), "the datagram no longer verifies once reassembled");
    assert_eq!(fx.count(stats::INGRESS_REMOTE).unwrap(), 3);

    // A later fragment whose first never came is not the mesh's: the node's stack gets it
    // as it is (and drops it when it times out reassembling).
    let stray = udp_fragments(OUTSIDE, 50001, NODE, PUBLISHED, 3000, 1400);
    let (verdict, packet) = fx.run(FROM_UNDERLAY, &stray[1]).unwrap();
    assert_eq!((verdict, &packet), (TC_ACT_OK, &stray[1]));

    // On the backend's node, the same fragments arrive over the overlay: all delivered, and
    // the flow's way back remembered once, from the first.
    let to_local: Vec<Vec<u8>> = udp_fragments(OUTSIDE, 50002, LOCAL, 80, 3000, 1400);
    for fragment in &to_local {
        let (verdict, _) = fx.run_from_overlay(VNI, OTHER_NODE, fragment).unwrap();
        assert_eq!(verdict, TC_ACT_REDIRECT);
    }
    let reverse = shoal_common::lb::FlowKey {
        saddr: u32::from_ne_bytes(LOCAL),
        daddr: u32::from_ne_bytes(OUTSIDE),
        sport: 80u16.to_be(),
        dport: 50002u16.to_be(),
        proto: shoal_common::lb::PROTO_UDP,
        _pad: [0; 3],
    };
    let entry = fx.tracked(&reverse).unwrap().expect("the way back remembered");
    assert_eq!(entry.nat.flags, shoal_common::lb::NAT_RETURN_VIA_NODE);

    // Out: the backend's fragmented reply (`lo` plays its veth) comes from NODE:8080 in
    // every fragment (under test_run the route lookup then stops it: see
    // `leaves_through_the_underlay`).
    fx.set_workload_addr(REMOTE).unwrap();
    let mut back = Vec::new();
    for fragment in udp_fragments(REMOTE, 80, OUTSIDE, 50000, 4000, 1400) {
        let (verdict, packet) = fx.run(FROM_WORKLOAD, &fragment).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(&packet[26..30], &NODE, "every fragment of the reply comes from the node");
        back.push(packet);
    }
    assert_eq!(&back[0][34..36], &PUBLISHED.to_be_bytes());
    assert!(reassembles(&back), "the reply no longer verifies once reassembled");
    assert_eq!(fx.count(stats::DROP_FIB_NOT_FORWARDED).unwrap(), back.len() as u64);
}
