//! VXLAN done by the programs themselves, run by the kernel on crafted frames
//! (BPF_PROG_TEST_RUN): the outer headers pushed onto what leaves for another node, taken off
//! what another node sent, and what is left to the kernel's VXLAN device. Needs root; the
//! tests that send need `with_underlay`'s namespace, so the route lookups find a way out.

use shoal_common::{
    lb::{FlowKey, NatEntry, NAT_REPLY_TO_UNDERLAY, PROTO_TCP},
    overlay::{NodeConfig, NODE_MESH_DSR, NODE_VXLAN_BY_DEVICE},
    stats,
};

use super::{privileged::testbed, testbed::*, FROM_UNDERLAY, FROM_WORKLOAD};

/// The outer headers the programs push: Ethernet, IPv4, UDP, VXLAN, and the inner Ethernet.
const OUTER: usize = 14 + 20 + 8 + 8 + 14;

/// Checks that `out` is `inner` inside VXLAN from this node to REMOTE_NODE on VNI with
/// `policy`, sent to REMOTE_NODE's MAC, with `inner_dst` as the inner frame's destination
/// MAC; returns the outer UDP source port.
fn encapsulated(out: &[u8], inner: &[u8], inner_dst: [u8; 6], policy: u16) -> u16 {
    assert_eq!(out.len(), inner.len() + OUTER - 14, "50 bytes of outer headers");
    assert_eq!(&out[0..6], &REMOTE_NODE_MAC, "to the node's MAC, from the neighbour table");
    assert_eq!(&out[6..12], &UNDERLAY_MAC, "from the underlay interface's");
    assert_eq!(&out[12..16], &[0x08, 0x00, 0x45, 0], "IPv4, no options");
    assert_eq!(&out[16..18], &((out.len() - 14) as u16).to_be_bytes(), "outer length");
    assert_eq!(&out[20..24], &[0x40, 0, 64, 17], "don't fragment, TTL 64, UDP");
    assert_eq!((&out[26..30], &out[30..34]), (&NODE[..], &REMOTE_NODE[..]), "node to node");
    assert!(ip_checksum_ok(out), "outer IPv4 checksum");
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!(sport >= 0xc000, "source port {sport} in the dynamic range");
    assert_eq!(&out[36..38], &DATA_PATH_PORT.to_be_bytes(), "to the data path port");
    assert_eq!(&out[38..40], &((out.len() - 34) as u16).to_be_bytes(), "UDP length");
    assert_eq!(&out[40..42], &[0, 0], "no outer UDP checksum");
    let flags = if policy != 0 { 0x88 } else { 0x08 };
    assert_eq!(&out[42..50], &[flags, 0, (policy >> 8) as u8, policy as u8, 0x00, 0x10, 0x01, 0], "VXLAN, VNI 4097");
    assert_eq!(&out[50..56], &inner_dst, "inner destination MAC");
    assert_eq!(&out[62..64], &[0x08, 0x00]);
    sport
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_programs_encapsulate_what_fits_the_underlay_and_leave_the_rest_to_the_device() {
    let mut fx = testbed();
    let ifindex = fx.with_underlay().unwrap();

    // A workload's packet to a peer on another node: inside VXLAN, straight out.
    let inner = tcp(CLIENT, 40000, REMOTE, 80);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &inner).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let sport = encapsulated(&out, &inner, REMOTE_MAC, 0);
    assert_eq!(&out[56..62], &CLIENT_MAC, "inner source MAC kept");
    assert_eq!(out[64..], inner[14..], "the inner packet untouched");
    // One flow, one outer source port (the underlay keeps it in order); flows spread.
    let (_, again) = fx.run(FROM_WORKLOAD, &inner).unwrap();
    assert_eq!(u16::from_be_bytes([again[34], again[35]]), sport);
    let ports: std::collections::BTreeSet<u16> = (0..16)
        .map(|i| {
            let (_, out) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40001 + i, REMOTE, 80)).unwrap();
            u16::from_be_bytes([out[34], out[35]])
        })
        .collect();
    assert!(ports.len() >= 8, "16 flows over {} source ports", ports.len());
    assert_eq!(fx.count(stats::FORWARD_REMOTE).unwrap(), 18);

    // 1450 bytes of IPv4 fit a 1500-byte underlay once encapsulated; 1451 do not, and go to
    // the device untouched (it fragments the outer packet).
    let fits = grown(tcp(CLIENT, 40100, REMOTE, 80), 1450 - 40);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &fits).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    encapsulated(&out, &fits, REMOTE_MAC, 0);
    assert_eq!(fx.count(stats::ENCAP_BY_DEVICE).unwrap(), 0, "nothing left to the device yet");
    let too_big = grown(tcp(CLIENT, 40100, REMOTE, 80), 1451 - 40);
    let (verdict, out) = fx.run(FROM_WORKLOAD, &too_big).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[14..], too_big[14..], "not encapsulated here");
    assert_eq!(fx.count(stats::ENCAP_BY_DEVICE).unwrap(), 1);

    // A client's packet to a published port, with direct server return asked for: the port
    // rides in the group policy ID.
    fx.with_published_port().unwrap();
    fx.configure(NodeConfig {
        vxlan_ifindex: LO,
        underlay_ifindex: ifindex,
        underlay_addr: u32::from_ne_bytes(NODE),
        data_path_port: DATA_PATH_PORT.to_be(),
        flags: NODE_MESH_DSR,
    })
    .unwrap();
    let (verdict, out) = fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    encapsulated(&out, &syn(OUTSIDE, 50000, REMOTE, 80), REMOTE_MAC, PUBLISHED);
    assert_eq!((&out[80..84], &out[86..88]), (&REMOTE[..], &80u16.to_be_bytes()[..]), "to the backend");
    assert_eq!(fx.count(stats::INGRESS_REMOTE).unwrap(), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn vxlan_from_the_clusters_nodes_is_taken_apart_here_and_from_anyone_else_dropped() {
    let mut fx = testbed();
    fx.with_published_port().unwrap();
    fx.with_underlay().unwrap();

    // From REMOTE's node, to a local endpoint: delivered, as the inner frame, with the MACs
    // the workload expects.
    let inner = tcp(REMOTE, 80, LOCAL, 40000);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &vxlan(REMOTE_NODE, VNI, 0, &inner)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), inner.len());
    assert_eq!((&out[0..6], &out[6..12]), (&LOCAL_MAC[..], &LOCAL_VETH_MAC[..]));
    assert_eq!(out[12..], inner[12..]);
    assert_eq!(fx.count(stats::DELIVER_FROM_OVERLAY).unwrap(), 1);

    // Dropped, each by its reason: VXLAN from outside the cluster; an endpoint sent by
    // another node than its own (REMOTE lives on REMOTE_NODE, CLIENT here); no VNI flag;
    // an inner frame that is not IPv4; a network with no such endpoint.
    let mut arp = arp_request(LOCAL);
    arp.resize(64, 0);
    let dropped = [
        (vxlan(OUTSIDE, VNI, 0, &inner), stats::DROP_NOT_A_NODE),
        (vxlan(OTHER_NODE, VNI, 0, &inner), stats::DROP_SPOOFED_SOURCE),
        (vxlan(REMOTE_NODE, VNI, 0, &tcp(CLIENT, 80, LOCAL, 40000)), stats::DROP_SPOOFED_SOURCE),
        (with_vxlan_flags(vxlan(REMOTE_NODE, VNI, 0, &inner), 0), stats::DROP_MALFORMED),
        (vxlan(REMOTE_NODE, VNI, 0, &arp), stats::DROP_NOT_IPV4),
        (vxlan(REMOTE_NODE, VNI + 1, 0, &inner), stats::DROP_NO_ENDPOINT),
    ];
    for (i, (frame, reason)) in dropped.into_iter().enumerate() {
        let before = fx.count(reason).unwrap();
        let (verdict, _) = fx.run(FROM_UNDERLAY, &frame).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT, "case {i}");
        assert_eq!(fx.count(reason).unwrap(), before + 1, "case {i}: not dropped as {}", stats::name(reason).unwrap());
    }

    // Left to the device, untouched: an outer fragment, a flag the programs do not know, an
    // outer length that is not the frame's. Not VXLAN for this node at all: another port.
    let mut fragment = vxlan(REMOTE_NODE, VNI, 0, &inner);
    fragment[20] |= 0x20;
    let mut padded = vxlan(REMOTE_NODE, VNI, 0, &inner);
    padded.extend_from_slice(&[0; 4]);
    let mut other_port = vxlan(REMOTE_NODE, VNI, 0, &inner);
    other_port[36..38].copy_from_slice(&(DATA_PATH_PORT + 1).to_be_bytes());
    let passed = [fragment, with_vxlan_flags(vxlan(REMOTE_NODE, VNI, 0, &inner), 0x0c), padded, other_port];
    for (i, frame) in passed.iter().enumerate() {
        let (verdict, out) = fx.run(FROM_UNDERLAY, frame).unwrap();
        assert_eq!((verdict, &out), (TC_ACT_OK, frame), "case {i}");
    }
    assert_eq!(fx.count(stats::DECAP_BY_DEVICE).unwrap(), 3, "the other port is not the device's either");

    // A client's flow from another node's published port, asking for direct return: the
    // backend's replies are to leave here, from that node's address and port.
    let (verdict, _) =
        fx.run(FROM_UNDERLAY, &vxlan(OTHER_NODE, VNI, PUBLISHED, &syn(OUTSIDE, 50001, LOCAL, 80))).unwrap();
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
    // And the reply does leave here, from there, to the client (through the gateway).
    fx.set_workload_addr(LOCAL).unwrap();
    let (verdict, out) = fx.run(FROM_WORKLOAD, &tcp(LOCAL, 80, OUTSIDE, 50001)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[0..6], &out[6..12]), (&GATEWAY_MAC[..], &UNDERLAY_MAC[..]));
    assert_eq!((&out[26..30], &out[34..36]), (&OTHER_NODE[..], &PUBLISHED.to_be_bytes()[..]));
    assert!(checksums_ok(&out));
    assert_eq!(fx.count(stats::INGRESS_REPLY).unwrap(), 1);
}

/// `frame` (from `vxlan`) with its VXLAN flags byte set to `flags`.
fn with_vxlan_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    frame[42] = flags;
    frame
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn gso_packets_and_congestion_marks_cross_and_what_only_the_stack_checks_goes_to_the_device() {
    let mut fx = testbed();
    let ifindex = fx.with_underlay().unwrap();

    // GSO: each segment must fit once encapsulated (1411 bytes of TCP payload make 1501).
    // (test_run cannot give a packet its GSO type, without which the kernel refuses to push
    // headers onto it: segments that fit are the lab's to show, `overlay.rs`.)
    let inner = tcp(CLIENT, 40000, REMOTE, 80);
    let (verdict, out) = fx.run_gso(FROM_WORKLOAD, &inner, 1411).unwrap();
    assert_eq!((verdict, &out[14..]), (TC_ACT_REDIRECT, &inner[14..]), "segments too large: the device's");
    assert_eq!(fx.count(stats::ENCAP_BY_DEVICE).unwrap(), 1);

    // The inner packet's ECN field goes outside, so a congested hop can mark it; CE itself
    // as ECT(0).
    for (inner_tos, outer_tos) in [(0x00, 0x00), (0x01, 0x01), (0xb8 | 0x02, 0x02), (0x03, 0x02)] {
        let (_, out) = fx.run(FROM_WORKLOAD, &with_tos(tcp(CLIENT, 40000, REMOTE, 80), inner_tos)).unwrap();
        assert_eq!(out[15], outer_tos, "inner TOS {inner_tos:#x}");
        assert!(ip_checksum_ok(&out));
    }

    // In: a congestion mark on the outer header reaches the inner one (ECN-capable), with
    // its checksum right; an inner packet that cannot carry it is the device's to drop.
    let marked = |tos| with_tos(vxlan(REMOTE_NODE, VNI, 0, &with_tos(tcp(REMOTE, 80, LOCAL, 40000), tos)), 0x03);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &marked(0x02)).unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[15] & 0x03, 0x03, "CE carried on");
    assert!(checksums_ok(&out));
    let (verdict, out) = fx.run(FROM_UNDERLAY, &marked(0x00)).unwrap();
    assert_eq!((verdict, out), (TC_ACT_OK, marked(0x00)));

    // GSO in, for anywhere but a local workload: the device's (a tunnel GSO packet would
    // leave marked as one). (For a local one, as above: the lab's.)
    let onward = vxlan(REMOTE_NODE, VNI, 0, &tcp(REMOTE, 80, OUTSIDE, 50000));
    let (verdict, out) = fx.run_gso(FROM_UNDERLAY, &onward, 1400).unwrap();
    assert_eq!((verdict, out), (TC_ACT_OK, onward));
    assert_eq!(fx.count(stats::DECAP_BY_DEVICE).unwrap(), 2, "the unmarkable one and the GSO one");

    // What the stack would check and the programs do not: a bad outer checksum, a UDP length
    // that lies, reserved bits set. All the device's, untouched.
    let plain = vxlan(REMOTE_NODE, VNI, 0, &tcp(REMOTE, 80, LOCAL, 40000));
    let mut bad_checksum = plain.clone();
    bad_checksum[24] ^= 0xff;
    let mut udp_len_lies = plain.clone();
    udp_len_lies[39] -= 1;
    let mut reserved_byte = plain.clone();
    reserved_byte[49] = 1;
    let mut policy_without_flag = plain.clone();
    policy_without_flag[45] = 80;
    for (i, frame) in [bad_checksum, udp_len_lies, reserved_byte, policy_without_flag].into_iter().enumerate() {
        let (verdict, out) = fx.run(FROM_UNDERLAY, &frame).unwrap();
        assert_eq!((verdict, out), (TC_ACT_OK, frame), "case {i}");
    }
    assert_eq!(fx.count(stats::DECAP_BY_DEVICE).unwrap(), 6);

    // A later fragment has no UDP header: a client's whose payload happens to read as the
    // data path port is not VXLAN from a stranger.
    let mut later = grown(udp(OUTSIDE, 12345, NODE, 9999), 64);
    later[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    later[36..38].copy_from_slice(&DATA_PATH_PORT.to_be_bytes());
    let later = with_ttl(later, 64);
    let (verdict, _) = fx.run(FROM_UNDERLAY, &later).unwrap();
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(fx.count(stats::DROP_NOT_A_NODE).unwrap(), 0);

    // A node told to leave VXLAN to its device (`shoald --vxlan-by-device`) does, both ways.
    fx.configure(NodeConfig {
        vxlan_ifindex: LO,
        underlay_ifindex: ifindex,
        underlay_addr: u32::from_ne_bytes(NODE),
        data_path_port: DATA_PATH_PORT.to_be(),
        flags: NODE_VXLAN_BY_DEVICE,
    })
    .unwrap();
    let (verdict, out) = fx.run(FROM_WORKLOAD, &inner).unwrap();
    assert_eq!((verdict, &out[14..]), (TC_ACT_REDIRECT, &inner[14..]));
    assert_eq!(fx.count(stats::ENCAP_BY_DEVICE).unwrap(), 2);
    let (verdict, out) = fx.run(FROM_UNDERLAY, &plain).unwrap();
    assert_eq!((verdict, out), (TC_ACT_OK, plain));
}
