//! Packets bigger than the way, and the errors they cause: datagrams past the MTU cross VIPs
//! and the routing mesh as fragments, all balanced with their first and whole again at the
//! far end, both ways; ICMP errors about a balanced flow reach its client (or its backend)
//! with the addresses it knows, so a closed port is refused at once and path MTU discovery
//! works through the mesh.

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use shoal_api::dataplane::{Protocol, PublishMode, PublishedPort};
use shoal_common::stats::{DECAP_BY_DEVICE, ENCAP_BY_DEVICE, INGRESS_RETURN, LB_ICMP_ERROR};
use shoal_lab::{in_netns, BulkServer, Lab, UdpClient, UdpTextServer, Workload};
use shoal_tests::{addr, blue_service, overlay_spec, plain_lab, untracked, workload};

/// The datagram service (answers on 5300) and the one nothing listens behind (5400).
const ECHO_VIP: &str = "10.78.0.100";
const CLOSED_VIP: &str = "10.78.0.101";
const BULK_PORT: u16 = 81;
const BULK_BYTES: usize = 256 << 10;

fn published(protocol: Protocol, published_port: u16, target_port: u16) -> PublishedPort {
    PublishedPort { protocol, published_port, target_port, publish_mode: PublishMode::Ingress }
}

/// mgr1 and wrk1, with backends web1 (on mgr1) and web2 (on wrk1) behind an echo service
/// (VIP :53 and published :5353), a service whose port nobody listens on (VIP :54 and
/// published :5454), and a bulk TCP port (published :8081); and a client workload on mgr1.
fn two_hosts_two_backends(name: &str) -> (Lab, Workload, Vec<Workload>) {
    let lab = plain_lab(name, 1, 1);
    let client = workload(&lab, "mgr1", "client", "10.78.0.2");
    let backends = vec![workload(&lab, "mgr1", "web1", "10.78.0.11"), workload(&lab, "wrk1", "web2", "10.78.0.12")];
    let all: Vec<_> = std::iter::once(&client).chain(backends.iter()).collect();
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &all).unwrap();
    let members = ["10.78.0.11", "10.78.0.12"];
    let mut echo = blue_service("echo", ECHO_VIP, Protocol::Udp, 53, 5300, &members);
    echo.published = vec![published(Protocol::Udp, 5353, 5300), published(Protocol::Tcp, 8081, BULK_PORT)];
    let mut closed = blue_service("closed", CLOSED_VIP, Protocol::Udp, 54, 5400, &members);
    closed.published = vec![published(Protocol::Udp, 5454, 5400)];
    spec.services = vec![echo, closed];
    lab.apply_dataplane(&spec).unwrap();
    (lab, client, backends)
}

/// Sends a datagram far past the MTU from `netns` to `to` on a fresh flow; checks that the
/// answer is whole and from `to`; returns the backend that answered.
fn big_exchange(netns: &str, to: SocketAddr) -> String {
    let message = "f".repeat(4000);
    let socket = UdpClient::open(netns).unwrap();
    let (reply, from) = socket.ask(to, &message).unwrap_or_else(|e| panic!("{to}: {e:#}"));
    assert_eq!(from, to, "the answer must come from where the client sent");
    let (who, echoed) = reply.split_once(' ').unwrap_or_else(|| panic!("reply {reply:?}"));
    assert!(echoed == message, "{to}: {} of 4000 bytes came back", echoed.len());
    who.to_owned()
}

/// Sends a datagram to `to` from `netns` on a connected socket and returns how the wait for
/// an answer ended.
fn refusal(netns: &str, to: SocketAddr) -> ErrorKind {
    in_netns(netns, move || {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send(b"anyone?")?;
        socket.recv(&mut [0u8; 64]).map(|_| ErrorKind::Other)
    })
    .unwrap()
    .unwrap_or_else(|e| e.kind())
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn fragmented_datagrams_and_icmp_errors_cross_vips_and_the_mesh_translated() {
    let (lab, client, backends) = two_hosts_two_backends("e2ebig");
    let _echo: Vec<UdpTextServer> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| UdpTextServer::start(&b.netns, 5300, &format!("web{}", i + 1)).unwrap())
        .collect();
    let outside = lab.add_client("outside", addr("10.77.3.1")).unwrap();
    let everyone: BTreeSet<String> = ["web1", "web2"].map(String::from).into();

    // Through the mesh, on every host, from a local and a remote backend: 4000 bytes each way,
    // three fragments each way.
    for host in &lab.hosts {
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            seen.insert(big_exchange(&outside, SocketAddr::from((host.addr, 5353))));
            if seen == everyone {
                break;
            }
        }
        assert_eq!(seen, everyone, "not every backend answered whole through {}", host.name);
    }
    // The client's 1500-byte fragments do not fit the underlay once encapsulated: the
    // programs leave those to the kernel's VXLAN device, which fragments the outer packet
    // (its notrack rule keeping them out of connection tracking); the far end's programs
    // leave the outer fragments to its device too.
    for host in &lab.hosts {
        assert!(host.packets(ENCAP_BY_DEVICE).unwrap() >= 1, "{} encapsulated no fragment by its device", host.name);
        assert!(
            host.packets(DECAP_BY_DEVICE).unwrap() >= 1,
            "{} took no outer fragment apart by its device",
            host.name
        );
        assert!(untracked(host, "output").unwrap() >= 1, "{}'s VXLAN packets out were tracked", host.name);
        assert!(untracked(host, "prerouting").unwrap() >= 1, "{}'s VXLAN packets in were tracked", host.name);
    }
    // Through the VIP, from a workload on the TC path (a process outside the workloads'
    // cgroup).
    let mut seen = BTreeSet::new();
    for _ in 0..24 {
        seen.insert(big_exchange(&client.netns, SocketAddr::from((addr(ECHO_VIP), 53))));
        if seen == everyone {
            break;
        }
    }
    assert_eq!(seen, everyone, "not every backend answered whole through the VIP");

    // Nothing listens behind port 5454 or VIP :54: each backend's "port unreachable" comes
    // back translated, so the client's connected socket is refused at once (untranslated, it
    // quotes an address the client never sent to, and the client waits in vain). A few
    // flows per host: a namespace sends only so many errors a second to one address.
    for host in &lab.hosts {
        for flow in 0..3 {
            let kind = refusal(&outside, SocketAddr::from((host.addr, 5454)));
            assert_eq!(kind, ErrorKind::ConnectionRefused, "flow {flow} through {}", host.name);
        }
        assert!(host.packets(LB_ICMP_ERROR).unwrap() >= 1, "{} translated no error", host.name);
    }
    let kind = refusal(&client.netns, SocketAddr::from((addr(CLOSED_VIP), 54)));
    assert_eq!(kind, ErrorKind::ConnectionRefused, "through the VIP");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn path_mtu_discovery_works_through_the_mesh() {
    let (lab, _client, backends) = two_hosts_two_backends("e2epmtu");
    // mgr1 answers by direct server return (wrk1 sends the replies of its backend to the
    // client itself, from mgr1's address: the router's errors still go to mgr1); wrk1 does
    // not.
    lab.stop("mgr1").unwrap();
    lab.start_with("mgr1", &["--mesh-dsr".to_owned()]).unwrap();
    // A backend remembers a path's MTU once told: forgotten before each transfer, so that
    // every one needs its "fragmentation needed" to come through the mesh.
    let forget_path_mtus = || {
        for b in &backends {
            let netns = format!("--net=/run/netns/{}", b.netns);
            shoal_lab::run_ok(&["nsenter", &netns, "sysctl", "-qw", "net.ipv4.route.flush=1"]).unwrap();
        }
    };
    let _bulk: Vec<BulkServer> =
        backends.iter().map(|b| BulkServer::start(&b.netns, BULK_PORT, BULK_BYTES).unwrap()).collect();
    // 1500-byte links at both ends (so the client offers a 1460-byte MSS), a 1280-byte hop
    // between: the backends' full-size segments meet "fragmentation needed" on the way, sent
    // to the node whose address they carry.
    let (far, _) = lab.add_client_behind_router("far", addr("10.77.3.254"), [10, 79, 0], 1280).unwrap();
    // Through each host, flows to its own backend and to the other host's (the error then
    // crosses the overlay to reach it), with and without direct server return.
    for host in &lab.hosts {
        for round in 0..6 {
            forget_path_mtus();
            let got = BulkServer::fetch(&far, SocketAddr::from((host.addr, 8081)))
                .unwrap_or_else(|e| panic!("round {round} through {}: {e:#}", host.name));
            assert_eq!(got, BULK_BYTES, "a transfer through {} came back cut", host.name);
        }
        assert!(
            host.packets(LB_ICMP_ERROR).unwrap() >= 6,
            "{} passed on fewer \"fragmentation needed\" than transfers",
            host.name
        );
    }
    let wrk1 = lab.host("wrk1").unwrap();
    assert_eq!(wrk1.packets(INGRESS_RETURN).unwrap(), 0, "mgr1's clients were not answered directly");
}
