//! Overlay traffic between workloads on different hosts goes through shoal's BPF programs
//! and VXLAN, goes on across a restart of shoald, and stops when the programs are detached.
//!
//! ```text
//!   mgr1/a 10.78.0.2        wrk1/b 10.78.0.3        wrk2/c 10.78.0.4
//!      | veth (from_workload)   |                       |
//!   [mgr1] --vxlan/4789--  [ switch br0 ]  --vxlan-- [wrk1]   [wrk2]
//!   10.77.1.1                                        10.77.2.1 10.77.2.2
//! ```

use shoal_common::stats::{self, ARP_REPLY, DECAP_BY_DEVICE, DELIVER_FROM_OVERLAY, ENCAP_BY_DEVICE, FORWARD_REMOTE};
use shoal_lab::{ping, tcp_exchange, Conversation, TextServer};
use std::time::Duration;

use shoal_tests::{addr, docker_ok, eventually, overlay_spec, plain_lab, vxlan_packets, workload};

const PORT: u16 = 7000;

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn overlay_crosses_hosts_survives_restarts_and_stops_when_detached() {
    // Setup: three hosts, a workload on each, one overlay network everywhere.
    let lab = plain_lab("e2eoverlay", 1, 2);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let b = workload(&lab, "wrk1", "b", "10.78.0.3");
    let c = workload(&lab, "wrk2", "c", "10.78.0.4");
    lab.apply_dataplane(&overlay_spec("blue", 4097, "10.78.0.0/24", &[&a, &b, &c]).unwrap()).unwrap();
    let _b_server = TextServer::start(&b.netns, PORT, "b says").unwrap();
    let _c_server = TextServer::start(&c.netns, PORT, "c says").unwrap();
    let (mgr1, wrk1) = (lab.host("mgr1").unwrap(), lab.host("wrk1").unwrap());
    let (vx_tx_before, _) = vxlan_packets(mgr1).unwrap();
    let (_, vx_rx_before) = vxlan_packets(wrk1).unwrap();

    // Run: ping and a TCP exchange across hosts, both ways.
    assert_eq!(ping(&a.netns, b.addr, 5).unwrap(), 5, "mgr1/a -> wrk1/b ping");
    assert_eq!(ping(&c.netns, a.addr, 5).unwrap(), 5, "wrk2/c -> mgr1/a ping");
    assert_eq!(tcp_exchange(&a.netns, b.addr, PORT, "hi").unwrap(), "b says hi");
    assert_eq!(tcp_exchange(&b.netns, c.addr, PORT, "yo").unwrap(), "c says yo");

    // Check: our programs answered ARP and carried the packets, VXLAN and all: the kernel's
    // VXLAN devices neither sent nor received any of them (what the programs leave to the
    // devices, and the connection tracking those skip, `big_packets` checks).
    assert!(mgr1.packets(ARP_REPLY).unwrap() >= 1, "mgr1 answered a's ARP");
    assert!(mgr1.packets(FORWARD_REMOTE).unwrap() >= 10, "mgr1 encapsulated a's packets");
    assert!(wrk1.packets(DELIVER_FROM_OVERLAY).unwrap() >= 10, "wrk1 delivered them to b");
    for host in &lab.hosts {
        let by_device = (host.packets(ENCAP_BY_DEVICE).unwrap(), host.packets(DECAP_BY_DEVICE).unwrap());
        assert_eq!(by_device, (0, 0), "{}'s VXLAN device took packets the programs could have", host.name);
    }
    let (vx_tx_after, _) = vxlan_packets(mgr1).unwrap();
    let (_, vx_rx_after) = vxlan_packets(wrk1).unwrap();
    assert_eq!(vx_tx_after - vx_tx_before, 0, "mgr1's VXLAN device sent packets");
    assert_eq!(vx_rx_after - vx_rx_before, 0, "wrk1's VXLAN device received packets");
    for host in &lab.hosts {
        let drops: u64 = (0..stats::MAX).filter(|c| stats::is_drop(*c)).map(|code| host.packets(code).unwrap()).sum();
        assert_eq!(drops, 0, "{} dropped packets on a healthy overlay", host.name);
    }

    // Restart: a conversation open across hosts goes on while wrk1's shoald is stopped (the
    // programs stay attached, pinned) and after it starts again (it adopts them).
    let mut talk = Conversation::open(&a.netns, b.addr, PORT).unwrap();
    assert_eq!(talk.say("before").unwrap(), "b says before");
    lab.stop("wrk1").unwrap();
    assert_eq!(talk.say("while stopped").unwrap(), "b says while stopped");
    assert_eq!(ping(&a.netns, b.addr, 2).unwrap(), 2, "b unreachable while wrk1's shoald is stopped");
    lab.start("wrk1").unwrap();
    assert_eq!(talk.say("after restart").unwrap(), "b says after restart");

    // Detach: with --detach-on-exit, stopping wrk1's shoald removes its programs, and b
    // becomes unreachable; starting it again brings b back.
    lab.stop("wrk1").unwrap();
    lab.start_with("wrk1", &["--detach-on-exit".to_owned()]).unwrap();
    lab.stop("wrk1").unwrap();
    assert_eq!(ping(&a.netns, b.addr, 3).unwrap(), 0, "b still reachable with wrk1's programs detached");
    assert!(tcp_exchange(&a.netns, b.addr, PORT, "hi").is_err());
    assert_eq!(ping(&a.netns, c.addr, 3).unwrap(), 3, "c is on another host and unaffected");
    lab.start("wrk1").unwrap();
    assert_eq!(ping(&a.netns, b.addr, 3).unwrap(), 3, "b reachable after wrk1's shoald restarted");
    assert_eq!(tcp_exchange(&a.netns, b.addr, PORT, "back").unwrap(), "b says back");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn networks_are_isolated_at_the_ip_level_and_overlapping_ones_refused() {
    use shoal_common::stats::DROP_NO_ENDPOINT;

    let lab = plain_lab("e2eisolation", 1, 1);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let a2 = workload(&lab, "wrk1", "a2", "10.78.0.4");
    let b = workload(&lab, "wrk1", "b", "10.79.0.3");

    // The same subnet on two networks is refused, as Docker does, and changes nothing.
    let mut overlapping = overlay_spec("blue", 4097, "10.78.0.0/24", &[&a]).unwrap();
    overlapping.networks.push(overlay_spec("red", 4098, "10.78.0.0/24", &[]).unwrap().networks.remove(0));
    let mgr1 = lab.host("mgr1").unwrap();
    let refused = mgr1.api().put_json("/shoal/v1/dataplane", &overlapping).unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert!(refused.text().contains("overlapping subnets"), "{}", refused.text());

    // Blue (internal: no way out) and red, side by side.
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &[&a, &a2]).unwrap();
    spec.networks[0].internal = true;
    let red = overlay_spec("red", 4098, "10.79.0.0/24", &[&b]).unwrap();
    spec.networks.extend(red.networks);
    spec.endpoints.extend(red.endpoints);
    lab.apply_dataplane(&spec).unwrap();
    assert_eq!(ping(&a.netns, a2.addr, 2).unwrap(), 2, "blue works across hosts");

    // a sends IPv4 straight at b, past ARP (a static neighbour on its own interface):
    // the packet reaches shoal's program, which has no such endpoint on blue.
    let mac = shoal_api::MacAddr::from_ipv4(b.addr).to_string();
    for argv in [
        vec!["ip", "route", "add", "10.79.0.3/32", "dev", "eth0"],
        vec!["ip", "neigh", "replace", "10.79.0.3", "lladdr", &mac, "dev", "eth0", "nud", "permanent"],
    ] {
        let argv: Vec<String> = argv.into_iter().map(String::from).collect();
        let out = shoal_lab::netns_command(&a.netns, &argv).output().unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let before = mgr1.packets(DROP_NO_ENDPOINT).unwrap();
    assert_eq!(ping(&a.netns, b.addr, 3).unwrap(), 0, "blue reached red");
    assert!(mgr1.packets(DROP_NO_ENDPOINT).unwrap() >= before + 3, "the program dropped them as nobody's on blue");
    assert_eq!(mgr1.packets(FORWARD_REMOTE).unwrap(), 2, "only the blue pings crossed");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_workload_on_two_networks_reaches_both_while_they_stay_apart() {
    let lab = plain_lab("e2etwonets", 1, 1);
    let both_blue = workload(&lab, "mgr1", "m", "10.78.0.2");
    let both_red = lab.attach_workload(&both_blue, "mred", "eth1", addr("10.79.0.2"), 24, 1450).unwrap();
    // Both single-network workloads on one host: not even that host's way out joins them.
    let blue = workload(&lab, "wrk1", "b", "10.78.0.3");
    let red = workload(&lab, "wrk1", "r", "10.79.0.3");
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &[&both_blue, &blue]).unwrap();
    let red_spec = overlay_spec("red", 4098, "10.79.0.0/24", &[&both_red, &red]).unwrap();
    spec.networks.extend(red_spec.networks);
    spec.endpoints.extend(red_spec.endpoints);
    lab.apply_dataplane(&spec).unwrap();

    assert_eq!(ping(&both_blue.netns, blue.addr, 2).unwrap(), 2, "m reaches blue over its blue interface");
    assert_eq!(ping(&both_blue.netns, red.addr, 2).unwrap(), 2, "m reaches red over its red interface");
    assert_eq!(ping(&blue.netns, red.addr, 2).unwrap(), 0, "blue reached red");
    assert_eq!(ping(&red.netns, blue.addr, 2).unwrap(), 0, "red reached blue");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn lab_down_leaves_nothing_behind() {
    let lab = plain_lab("e2ecleanup", 1, 1);
    let w = workload(&lab, "wrk1", "w", "10.78.0.5");
    lab.apply_dataplane(&overlay_spec("blue", 4097, "10.78.0.0/24", &[&w]).unwrap()).unwrap();
    let pids: Vec<u32> =
        lab.hosts.iter().filter_map(|h| std::fs::read_to_string(&h.pid_file).ok()?.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 2);
    drop(lab);

    let namespaces = shoal_lab::run_ok(&["ip", "netns", "list"]).unwrap();
    assert!(!namespaces.contains("e2ecleanup-"), "namespaces left: {namespaces}");
    assert!(!std::path::Path::new("/sys/fs/bpf/shoal-lab/e2ecleanup").exists(), "pins left");
    assert!(!std::path::Path::new("/run/shoal-lab/e2ecleanup").exists(), "state left");
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "shoald {pid} still running");
    }
}

/// `swarm init --data-path-port` moves every member's overlay to that UDP port: the
/// manager's at once, a worker's when it joins, and it stays there across a restart.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn overlays_use_the_swarms_data_path_port() {
    let lab = plain_lab("e2edpport", 1, 1);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let b = workload(&lab, "wrk1", "b", "10.78.0.3");
    lab.apply_dataplane(&overlay_spec("blue", 4097, "10.78.0.0/24", &[&a, &b]).unwrap()).unwrap();
    let port_of = |host: &str| vxlan_port(lab.host(host).unwrap());
    // The agent follows the swarm's port shortly after the call returns.
    let moves_to = |host: &str, port: u64| {
        eventually(&format!("{host}'s VXLAN device on port {port}"), Duration::from_secs(10), || {
            (port_of(host) == Some(port)).then_some(())
        })
    };
    assert_eq!((port_of("mgr1"), port_of("wrk1")), (Some(4789), Some(4789)), "outside a swarm: --vxlan-port");

    docker_ok(&lab, "mgr1", &["swarm", "init", "--advertise-addr", "10.77.1.1", "--data-path-port", "7789"]);
    moves_to("mgr1", 7789);
    let token = docker_ok(&lab, "mgr1", &["swarm", "join-token", "-q", "worker"]);
    docker_ok(&lab, "wrk1", &["swarm", "join", "--token", token.trim(), "10.77.1.1:2377"]);
    moves_to("wrk1", 7789);

    // wrk1's programs take VXLAN apart only on the port they were told, and leave any other
    // to the stack, where the device (now on 7789 too) would not take 4789 either: b's
    // replies prove the packets crossed on the swarm's port.
    let wrk1 = lab.host("wrk1").unwrap();
    let delivered_before = wrk1.packets(DELIVER_FROM_OVERLAY).unwrap();
    assert_eq!(ping(&a.netns, b.addr, 3).unwrap(), 3, "overlay traffic on the swarm's port");
    let delivered = wrk1.packets(DELIVER_FROM_OVERLAY).unwrap() - delivered_before;
    assert!(delivered >= 3, "wrk1 delivered {delivered} packets from the overlay");
    assert_eq!(wrk1.packets(DECAP_BY_DEVICE).unwrap(), 0, "wrk1's VXLAN device took packets");

    lab.stop("wrk1").unwrap();
    lab.start("wrk1").unwrap();
    assert_eq!(port_of("wrk1"), Some(7789), "a restarted member keeps the swarm's port");
    assert_eq!(ping(&a.netns, b.addr, 3).unwrap(), 3, "overlay traffic after the restart");
}

/// The UDP port of `host`'s VXLAN device, from the kernel (`None` while it is being made).
fn vxlan_port(host: &shoal_lab::Host) -> Option<u64> {
    let out = shoal_lab::run_ok(&["ip", "-n", &host.netns, "-d", "-j", "link", "show", "shoal_vxlan"]).ok()?;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json[0]["linkinfo"]["info_data"]["port"].as_u64()
}

/// A VXLAN frame carrying an IPv4/UDP datagram `src -> dst:dport` on `vni`, to the MAC
/// `dst_mac`: what a node's VXLAN device takes for another node's overlay traffic.
fn forged_vxlan(vni: u32, src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, dst_mac: [u8; 6], dport: u16) -> Vec<u8> {
    let payload = b"forged";
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&dst_mac);
    p.extend_from_slice(&[0x02, 0x42, 0, 0, 0, 0x99, 0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&12345u16.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Sends one UDP datagram `payload` from `netns` to `to`.
fn send_udp(netns: &str, to: std::net::SocketAddrV4, payload: &[u8]) {
    let payload = payload.to_vec();
    shoal_lab::in_netns(netns, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(&payload, to).map(|_| ())
    })
    .unwrap()
    .unwrap();
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn vxlan_from_a_workload_or_a_stranger_never_reaches_a_workload() {
    use shoal_common::stats::{DROP_NOT_A_NODE, DROP_TO_DATA_PATH_PORT};
    use std::net::SocketAddrV4;

    const VNI: u32 = 4097;
    const LISTEN: u16 = 9999;
    let lab = plain_lab("e2evxlan", 1, 1);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let b = workload(&lab, "wrk1", "b", "10.78.0.3");
    lab.apply_dataplane(&overlay_spec("blue", VNI, "10.78.0.0/24", &[&a, &b]).unwrap()).unwrap();
    let (mgr1, wrk1) = (lab.host("mgr1").unwrap(), lab.host("wrk1").unwrap());
    let stranger = lab.add_client("stranger", addr("10.77.3.9")).unwrap();
    let inbox = shoal_lab::in_netns(&b.netns, || std::net::UdpSocket::bind(("0.0.0.0", LISTEN))).unwrap().unwrap();
    inbox.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    // A frame for b, as if a had sent it from mgr1.
    let b_mac = shoal_api::MacAddr::from_ipv4(b.addr).0;
    let forged = forged_vxlan(VNI, a.addr, b.addr, b_mac, LISTEN);

    // A machine that is no node of the cluster sends it to wrk1's VXLAN port.
    send_udp(&stranger, SocketAddrV4::new(wrk1.addr, 4789), &forged);
    eventually("wrk1 counts VXLAN from a stranger as such", Duration::from_secs(5), || {
        (wrk1.packets(DROP_NOT_A_NODE).unwrap() >= 1).then_some(())
    });

    // A workload sends it to a node's VXLAN port: to wrk1's address (it would leave mgr1
    // masqueraded as mgr1, a node) and to its gateway (mgr1 itself).
    send_udp(&a.netns, SocketAddrV4::new(wrk1.addr, 4789), &forged);
    send_udp(&a.netns, SocketAddrV4::new(addr("10.78.0.1"), 4789), &forged);
    eventually("mgr1 drops a workload's datagrams to the data path port", Duration::from_secs(5), || {
        (mgr1.packets(DROP_TO_DATA_PATH_PORT).unwrap() >= 2).then_some(())
    });
    let mut buf = [0u8; 64];
    assert!(inbox.recv_from(&mut buf).is_err(), "a forged frame reached b");

    // A stranger routing through wrk1 straight to b's data path port: the node's untracked
    // data path is its own address only, so the isolation rules still stop this.
    let data_path = shoal_lab::in_netns(&b.netns, || std::net::UdpSocket::bind(("0.0.0.0", 4789))).unwrap().unwrap();
    data_path.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    shoal_lab::run_ok(&["ip", "-n", &stranger, "route", "add", "10.78.0.0/24", "via", &wrk1.addr.to_string()]).unwrap();
    send_udp(&stranger, SocketAddrV4::new(b.addr, 4789), b"through");
    assert!(data_path.recv_from(&mut buf).is_err(), "a stranger reached b's port 4789 through its node");

    // The overlay itself still carries a's datagrams to b.
    send_udp(&a.netns, SocketAddrV4::new(b.addr, LISTEN), b"real");
    let (len, from) = inbox.recv_from(&mut buf).expect("a's datagram over the overlay");
    assert_eq!((&buf[..len], from.ip()), (&b"real"[..], std::net::IpAddr::V4(a.addr)));
    assert_eq!(wrk1.packets(shoal_common::stats::DROP_SPOOFED_SOURCE).unwrap(), 0);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn bulk_tcp_crosses_in_bpf_and_through_the_device_where_the_underlay_is_smaller() {
    use shoal_lab::BulkServer;
    const BYTES: usize = 4 << 20;

    let lab = plain_lab("e2ebulk", 1, 1);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let b = workload(&lab, "wrk1", "b", "10.78.0.3");
    lab.apply_dataplane(&overlay_spec("blue", 4097, "10.78.0.0/24", &[&a, &b]).unwrap()).unwrap();
    let _bulk = BulkServer::start(&b.netns, PORT, BYTES).unwrap();
    let (mgr1, wrk1) = (lab.host("mgr1").unwrap(), lab.host("wrk1").unwrap());
    let to_b = std::net::SocketAddr::from((b.addr, PORT));

    // 4 MiB from b to a: GSO packets of 64 KiB, pushed into VXLAN and taken out of it by the
    // programs, none by the devices.
    assert_eq!(BulkServer::fetch(&a.netns, to_b).unwrap(), BYTES);
    for host in [mgr1, wrk1] {
        let by_device = (host.packets(ENCAP_BY_DEVICE).unwrap(), host.packets(DECAP_BY_DEVICE).unwrap());
        assert_eq!(by_device, (0, 0), "{}'s VXLAN device took packets the programs could have", host.name);
    }

    // An underlay of 1400 bytes: the workloads' 1450-byte segments no longer fit once
    // encapsulated, so the programs leave them to the device, which fragments the outer
    // packets (as the kernel's VXLAN does), and the transfer still completes whole.
    for host in [mgr1, wrk1] {
        shoal_lab::run_ok(&["ip", "-n", &host.netns, "link", "set", "eth0", "mtu", "1400"]).unwrap();
    }
    assert_eq!(BulkServer::fetch(&a.netns, to_b).unwrap(), BYTES);
    // Most of the 4 MiB went through the device (counted packets may be GSO packets of up to
    // 64 KiB each, or single segments).
    let bytes =
        |host: &shoal_lab::Host, code| host.counters().unwrap().iter().find(|c| c.code == code).map_or(0, |c| c.bytes);
    let by_device = bytes(wrk1, ENCAP_BY_DEVICE);
    assert!(by_device >= BYTES as u64 / 2, "wrk1 left {by_device} bytes to its device");
    assert!(mgr1.packets(DECAP_BY_DEVICE).unwrap() > 0, "mgr1 left the outer fragments to its device");
}
