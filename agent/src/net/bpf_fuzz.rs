//! The programs under BPF_PROG_TEST_RUN on well over 100,000 random and mutated packets
//! (truncated headers, bad IHL, IP options, fragments, odd EtherTypes, VLAN tags, random
//! bytes): every run ends in a verdict the programs may give, and nothing is forwarded
//! where it may not go. Deterministic (a fixed seed), so a failure replays. Needs root.

use shoal_common::stats;

use super::{testbed::*, FROM_UNDERLAY, FROM_WORKLOAD};

/// Packets per program and kind of sender (four in all).
const PACKETS: usize = 40_000;

/// xorshift64*: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// A packet from `seeds`, mutated in one to three ways.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut p = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(3) {
        match rng.below(9) {
            // Random bytes anywhere (headers included).
            0 => {
                for _ in 0..=rng.below(4) {
                    let at = rng.below(p.len());
                    p[at] = rng.byte();
                }
            }
            // Cut short, possibly mid-header (never below an Ethernet header: the kernel
            // refuses to run those).
            1 => p.truncate(14 + rng.below(p.len().saturating_sub(14).max(1))),
            // Any IHL, options or not.
            2 if p.len() > 14 => p[14] = 0x40 | (rng.byte() & 0x0f),
            // IP options that are really there.
            3 if p.len() >= 34 => {
                let words = 1 + rng.below(10);
                let options: Vec<u8> = (0..words * 4)
                    .map(|_| {
                        let any = rng.byte();
                        rng.pick(&[0u8, 1, 7, 68, 130, any])
                    })
                    .collect();
                p.splice(34..34, options);
                p[14] = 0x40 | (5 + words as u8);
            }
            // Fragments: more-fragments, an offset, or both.
            4 if p.len() >= 22 => {
                let offset = rng.below(0x2000) as u16 * rng.below(2) as u16;
                let flags = rng.pick(&[0u16, 0x2000, 0x4000]);
                p[20..22].copy_from_slice(&(flags | offset).to_be_bytes());
            }
            // Another EtherType, or a VLAN tag (one or two) in front of the payload.
            5 => {
                p[12..14].copy_from_slice(&rng.pick(&[0x86ddu16, 0x8100, 0x88a8, 0x0806, 0x0800, 0x1234]).to_be_bytes())
            }
            6 => {
                for _ in 0..=rng.below(2) {
                    let vlan = rng.pick(&[0x8100u16, 0x88a8]).to_be_bytes();
                    p.splice(12..12, [vlan[0], vlan[1], rng.byte() & 0x0f, rng.byte()]);
                }
            }
            // Another protocol, or a lying total length.
            7 if p.len() > 23 => {
                let any = rng.byte();
                p[23] = rng.pick(&[1u8, 6, 17, 47, 50, 132, any]);
            }
            8 if p.len() > 17 => {
                let len = rng.next() as u16;
                p[16..18].copy_from_slice(&len.to_be_bytes());
            }
            _ => p.extend((0..rng.below(64)).map(|_| rng.byte())),
        }
    }
    p
}

fn ipv4_source(p: &[u8]) -> Option<[u8; 4]> {
    (p.len() >= 34 && p[12..14] == [0x08, 0x00]).then(|| p[26..30].try_into().unwrap())
}

/// Runs `program` on `PACKETS` mutations of `seeds`; `check(input, verdict, output)` holds
/// each time. Returns how many runs the kernel took (it refuses some malformed frames).
fn fuzz(
    fx: &Testbed,
    rng: &mut Rng,
    seeds: &[Vec<u8>],
    mut run: impl FnMut(&Testbed, &mut Rng, &[u8]) -> Option<(u32, Vec<u8>)>,
    check: impl Fn(&[u8], u32, &[u8]),
) -> usize {
    let mut ran = 0;
    for _ in 0..PACKETS {
        let packet = mutate(rng, seeds);
        let Some((verdict, out)) = run(fx, rng, &packet) else { continue };
        assert!([TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict), "verdict {verdict} for {packet:02x?}");
        check(&packet, verdict, &out);
        ran += 1;
    }
    ran
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_program_survives_hostile_packets_and_forwards_only_what_it_may() {
    assert!(nix::unistd::geteuid().is_root(), "BPF program tests load programs: run as root");
    let mut fx = Testbed::new().expect("load the programs into a testbed");
    fx.with_service().unwrap();
    fx.with_published_port().unwrap();
    fx.set_outbound().unwrap();
    let mut rng = Rng(0x005e_ed0f_5a0a_u64);

    // What a workload sends: nothing leaves unless it carries the workload's own address,
    // and nothing reaches the node's stack addressed to the data path port.
    let workload_seeds = vec![
        ipv4_to(REMOTE),
        ipv4_to(LOCAL),
        udp(CLIENT, 40000, GATEWAY, DATA_PATH_PORT),
        udp(CLIENT, 40000, [192, 0, 2, 99], DATA_PATH_PORT),
        syn(CLIENT, 40000, VIP, 80),
        tcp(CLIENT, 40000, REMOTE, 80),
        syn(CLIENT, 40000, NODE, PUBLISHED),
        arp_request(REMOTE),
        icmp_error(CLIENT, VIP, 3, 3, 0, &tcp(VIP, 80, CLIENT, 40000)),
        // An error about an outside client's flow through the mesh, whose backend (REMOTE)
        // this workload is not.
        icmp_error(CLIENT, OUTSIDE, 3, 4, 1280, &tcp(OUTSIDE, 50000, REMOTE, 80)),
    ];
    // That flow, opened from outside; nothing the workload sends may reply for it.
    fx.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED)).unwrap();
    let replies_before = fx.count(stats::INGRESS_REPLY).unwrap();
    let workload_seeds: Vec<Vec<u8>> =
        workload_seeds.into_iter().chain(udp_fragments(CLIENT, 40000, VIP, 80, 3000, 1400)).collect();
    let from_workload = fuzz(
        &fx,
        &mut rng,
        &workload_seeds,
        |fx, _, p| fx.run(FROM_WORKLOAD, p).ok(),
        |input, verdict, _| {
            if verdict == TC_ACT_SHOT {
                return;
            }
            let ethertype = [input[12], input[13]];
            assert!(ethertype == [0x08, 0x00] || ethertype == [0x08, 0x06], "non-IPv4/ARP let through: {input:02x?}");
            if let Some(source) = ipv4_source(input) {
                assert_eq!(source, CLIENT, "a spoofed source let through: {input:02x?}");
            }
            if ethertype == [0x08, 0x06] {
                assert_eq!(&input[28..32], &CLIENT, "an ARP for a spoofed sender answered: {input:02x?}");
            }
            if verdict == TC_ACT_OK {
                assert!([1, 6, 17].contains(&input[23]), "a protocol the node's stack may not take: {input:02x?}");
            }
        },
    );
    assert_eq!(
        fx.count(stats::INGRESS_REPLY).unwrap(),
        replies_before,
        "a workload that is no flow's backend sent a reply out through the mesh"
    );

    // What the underlay brings: only TCP/UDP to the published port on the node's address
    // is taken; everything else passes untouched.
    let underlay_seeds = vec![
        syn(OUTSIDE, 50000, NODE, PUBLISHED),
        tcp(OUTSIDE, 50000, NODE, PUBLISHED),
        udp(OUTSIDE, 50000, NODE, PUBLISHED),
        tcp(OUTSIDE, 50000, NODE, 22),
        udp(OUTSIDE, 50000, NODE, DATA_PATH_PORT),
        icmp_error([198, 51, 100, 1], NODE, 3, 4, 1280, &tcp(NODE, PUBLISHED, OUTSIDE, 50000)),
    ];
    let from_underlay = fuzz(
        &fx,
        &mut rng,
        &underlay_seeds,
        |fx, _, p| fx.run(FROM_UNDERLAY, p).ok(),
        |input, verdict, out| match verdict {
            TC_ACT_OK => assert_eq!(out, input, "a packet the mesh does not own was changed"),
            TC_ACT_REDIRECT => {
                assert!(input.len() >= 34 && input[12..14] == [0x08, 0x00], "{input:02x?}");
                assert_eq!(&input[30..34], &NODE, "taken for another address: {input:02x?}");
                if input[23] == 1 {
                    // An ICMP error: about a reply the mesh sent from the published port.
                    assert!(input.len() >= 66, "{input:02x?}");
                    assert_eq!(&input[54..58], &NODE, "an error about another address: {input:02x?}");
                    assert_eq!(&input[62..64], &PUBLISHED.to_be_bytes(), "about another port: {input:02x?}");
                } else if u16::from_be_bytes([input[20], input[21]]) & 0x1fff == 0 {
                    // (A later fragment carries no port: it goes where its first went.)
                    assert!(input.len() >= 38, "{input:02x?}");
                    assert_eq!(&input[36..38], &PUBLISHED.to_be_bytes(), "taken for another port: {input:02x?}");
                }
            }
            _ => {}
        },
    );

    // What comes over VXLAN, from nodes and from strangers: nothing from a stranger, and
    // no endpoint's address from a node it does not run on.
    let overlay_seeds =
        vec![udp(REMOTE, 40000, LOCAL, 80), syn(OUTSIDE, 50000, LOCAL, 80), tcp(REMOTE, 80, OUTSIDE, 50000)];
    let senders = [REMOTE_NODE, OTHER_NODE, [10, 77, 9, 9], [0, 0, 0, 0]];
    let stranger_runs = std::cell::Cell::new(0);
    let from_overlay = fuzz(
        &fx,
        &mut rng,
        &overlay_seeds,
        |fx, rng, p| {
            let sender = rng.pick(&senders);
            let (verdict, out) = fx.run_from_overlay(VNI, sender, p).ok()?;
            let mut marked = out;
            // The sender travels with the output, for `check`.
            marked.extend_from_slice(&sender);
            Some((verdict, marked))
        },
        |input, verdict, out| {
            let sender: [u8; 4] = out[out.len() - 4..].try_into().unwrap();
            let from_node = sender == REMOTE_NODE || sender == OTHER_NODE;
            if !from_node {
                stranger_runs.set(stranger_runs.get() + 1);
                assert_eq!(verdict, TC_ACT_SHOT, "VXLAN from a stranger taken: {input:02x?}");
            }
            if verdict == TC_ACT_REDIRECT {
                if let Some(source) = ipv4_source(input) {
                    assert_ne!(source, LOCAL, "this node's endpoint's address from elsewhere: {input:02x?}");
                    assert!(source != REMOTE || sender == REMOTE_NODE, "REMOTE's address from another node");
                }
            }
        },
    );
    assert!(stranger_runs.get() > PACKETS / 4, "strangers were tried");

    // The same, as it really arrives: VXLAN on the underlay, taken apart by `from_underlay`,
    // the inner frame mutated and, one time in three, the outer headers too.
    let group_policies = [0, PUBLISHED, 22, DATA_PATH_PORT];
    let delivered = std::cell::Cell::new(0);
    let vxlan_runs = fuzz(
        &fx,
        &mut rng,
        &overlay_seeds,
        |fx, rng, inner| {
            let mut frame = vxlan(rng.pick(&senders), VNI, rng.pick(&group_policies), inner);
            if rng.below(3) == 0 {
                for _ in 0..=rng.below(3) {
                    let at = 14 + rng.below(50);
                    frame[at] = rng.byte();
                }
            }
            let (verdict, out) = fx.run(FROM_UNDERLAY, &frame).ok()?;
            // The frame sent travels in front of the output, for `check` (given the inner).
            Some((verdict, [&(frame.len() as u16).to_be_bytes()[..], &frame, &out].concat()))
        },
        |_, verdict, both| {
            let (frame, out) = both[2..].split_at(usize::from(u16::from_be_bytes([both[0], both[1]])));
            match verdict {
                TC_ACT_OK => assert_eq!(out, frame, "a packet passed on changed: {frame:02x?}"),
                TC_ACT_REDIRECT if frame[23] == 17 && frame[36..38] == DATA_PATH_PORT.to_be_bytes() => {
                    delivered.set(delivered.get() + 1);
                    assert_eq!(&frame[30..34], &NODE, "VXLAN to another address taken: {frame:02x?}");
                    assert_eq!(frame[42] & 0x08, 0x08, "VXLAN without its VNI flag taken: {frame:02x?}");
                    let sender: [u8; 4] = frame[26..30].try_into().unwrap();
                    assert!(sender == REMOTE_NODE || sender == OTHER_NODE, "VXLAN from a stranger taken: {frame:02x?}");
                    let inner_source = ipv4_source(&frame[50..]);
                    assert_ne!(inner_source, Some(LOCAL), "this node's endpoint's address from elsewhere");
                    assert!(
                        inner_source != Some(REMOTE) || sender == REMOTE_NODE,
                        "REMOTE's address from another node"
                    );
                }
                _ => {}
            }
        },
    );

    // (Most are mutated out of shape, or sent by strangers, or leave as a mesh reply: a few
    // thousand make it whole to a workload.)
    assert!(delivered.get() > PACKETS / 20, "only {} VXLAN frames were taken apart", delivered.get());

    let total = from_workload + from_underlay + from_overlay + vxlan_runs;
    assert!(
        total >= 100_000,
        "only {total} packets ran ({from_workload} + {from_underlay} + {from_overlay} + {vxlan_runs})"
    );
    // The hostile mix was seen as such: the drops that say why are all there.
    for code in [
        stats::DROP_MALFORMED,
        stats::DROP_NOT_IPV4,
        stats::DROP_SPOOFED_SOURCE,
        stats::DROP_TO_DATA_PATH_PORT,
        stats::DROP_NOT_A_NODE,
    ] {
        assert!(fx.count(code).unwrap() > 0, "no {:?}", stats::name(code));
    }
}
