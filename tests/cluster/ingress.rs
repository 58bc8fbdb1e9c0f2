//! The routing mesh (north-south): a published port answers on every host's underlay address
//! and reaches backends on any host, keeps the client's address as the source the backend
//! sees, picks the same backend for a flow on every host, and sends replies back through the
//! host the client connected to. Host-mode ports answer only where a backend runs.

use std::{collections::BTreeSet, net::SocketAddr};

use shoal_api::dataplane::{Protocol, PublishMode, PublishedPort};
use shoal_common::stats::{INGRESS_LOCAL, INGRESS_REMOTE, INGRESS_REPLY, INGRESS_RETURN};
use shoal_lab::{tcp_exchange, BulkServer, Conversation, TextServer, UdpClient, UdpTextServer, Workload};
use shoal_tests::{addr, blue_service, overlay_spec, plain_lab, workload};

const CLIENT: &str = "10.77.3.1";

/// Each backend's bulk port: a connection gets `BULK_BYTES` and the end.
const BULK_PORT: u16 = 81;
const BULK_BYTES: usize = 256 << 10;

/// What each backend `web<n>` serves: TCP 80 (`web<n> <client> <message>`), UDP 5300
/// (`web<n> <message>`) and `BULK_BYTES` on `BULK_PORT`.
struct Servers {
    _tcp: Vec<TextServer>,
    _udp: Vec<UdpTextServer>,
    _bulk: Vec<BulkServer>,
}

impl Servers {
    fn start(backends: &[Workload]) -> Servers {
        let named = || backends.iter().enumerate().map(|(i, b)| (format!("web{}", i + 1), &b.netns));
        Servers {
            _tcp: named().map(|(name, ns)| TextServer::start(ns, 80, &format!("{name} {{peer}}")).unwrap()).collect(),
            _udp: named().map(|(name, ns)| UdpTextServer::start(ns, 5300, &name).unwrap()).collect(),
            _bulk: backends.iter().map(|b| BulkServer::start(&b.netns, BULK_PORT, BULK_BYTES).unwrap()).collect(),
        }
    }
}

fn published(protocol: Protocol, published_port: u16, target_port: u16, mode: PublishMode) -> PublishedPort {
    PublishedPort { protocol, published_port, target_port, publish_mode: mode }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_published_port_answers_on_every_host_from_every_backend_with_the_client_address_kept() {
    let lab = plain_lab("e2eingress", 1, 2);
    let hosts = ["mgr1", "wrk1", "wrk2"];
    let backends: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| workload(&lab, h, &format!("web{}", i + 1), &format!("10.78.0.1{}", i + 1)))
        .collect();
    let _servers = Servers::start(&backends);
    // A workload that calls the published port too, as containers call a node's address.
    let caller = workload(&lab, "mgr1", "caller", "10.78.0.2");
    let all: Vec<_> = backends.iter().chain([&caller]).collect();
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &all).unwrap();
    let mut web =
        blue_service("web", "10.78.0.100", Protocol::Tcp, 80, 80, &["10.78.0.11", "10.78.0.12", "10.78.0.13"]);
    web.published = vec![
        published(Protocol::Tcp, 8080, 80, PublishMode::Ingress),
        published(Protocol::Udp, 5353, 5300, PublishMode::Ingress),
        published(Protocol::Tcp, 8081, BULK_PORT, PublishMode::Ingress),
    ];
    let mut local = blue_service("local", "10.78.0.101", Protocol::Tcp, 80, 80, &["10.78.0.12"]);
    local.published = vec![published(Protocol::Tcp, 9090, 80, PublishMode::Host)];
    spec.services = vec![web, local];
    lab.apply_dataplane(&spec).unwrap();
    let client = lab.add_client("outside", addr(CLIENT)).unwrap();

    // Every host answers, from every backend, and every backend sees the client's address.
    let everyone: BTreeSet<String> = ["web1", "web2", "web3"].map(String::from).into();
    for host in &lab.hosts {
        let mut seen = BTreeSet::new();
        for i in 0..60 {
            let reply = tcp_exchange(&client, host.addr, 8080, &format!("hello{i}"))
                .unwrap_or_else(|e| panic!("{}:8080 did not answer: {e:#}", host.addr));
            let words: Vec<&str> = reply.split(' ').collect();
            assert_eq!(words[1..], [CLIENT, &format!("hello{i}")], "via {}: {reply}", host.name);
            seen.insert(words[0].to_owned());
            if seen == everyone {
                break;
            }
        }
        assert_eq!(seen, everyone, "not every backend answered through {}", host.name);
        // Replies far bigger than a packet (the stack segments them; GSO/GRO packets are
        // far past the MTU on the way) come back whole, from local and remote backends.
        for _ in 0..6 {
            let got = BulkServer::fetch(&client, SocketAddr::from((host.addr, 8081))).unwrap();
            assert_eq!(got, BULK_BYTES, "a bulk reply through {} came back cut", host.name);
        }
        // Local and remote backends both served, and every reply left through this host.
        assert!(host.packets(INGRESS_LOCAL).unwrap() >= 1, "{} delivered nothing locally", host.name);
        assert!(host.packets(INGRESS_REMOTE).unwrap() >= 1, "{} sent nothing to other hosts", host.name);
        assert!(host.packets(INGRESS_REPLY).unwrap() >= 3, "{} sent no replies out", host.name);
    }
    for host in &lab.hosts {
        assert!(host.packets(INGRESS_RETURN).unwrap() >= 1, "{} returned no reply to an ingress host", host.name);
    }

    // UDP: the same client flow gets the same backend whichever host it enters, and the
    // answer comes from the address and port the client sent to.
    let mut chosen = BTreeSet::new();
    for flow in 0..12 {
        let socket = UdpClient::open(&client).unwrap();
        let mut names = BTreeSet::new();
        for host in &lab.hosts {
            let to = SocketAddr::from((host.addr, 5353));
            let (reply, from) = socket.ask(to, "q").unwrap();
            assert_eq!(from, to, "the answer must come from the published address");
            names.insert(reply.split(' ').next().unwrap().to_owned());
        }
        assert_eq!(names.len(), 1, "flow {flow} got different backends on different hosts: {names:?}");
        chosen.extend(names);
    }
    assert!(chosen.len() >= 2, "twelve flows all went to {chosen:?}: the hash does not spread");

    // From a workload: its own node's published port is the mesh too (the backend sees the
    // workload's address); another node's is reached through the way out (masqueraded).
    let mgr1 = lab.host("mgr1").unwrap();
    let reply = tcp_exchange(&caller.netns, mgr1.addr, 8080, "own").unwrap();
    assert!(reply.ends_with(" 10.78.0.2 own"), "via its own node: {reply}");
    let reply = tcp_exchange(&caller.netns, lab.host("wrk2").unwrap().addr, 8080, "other").unwrap();
    assert!(reply.ends_with(&format!(" {} other", mgr1.addr)), "via another node: {reply}");

    // Host mode: only wrk1 runs the service's task, so only wrk1 answers, with its own task.
    let wrk1 = lab.host("wrk1").unwrap();
    let reply = tcp_exchange(&client, wrk1.addr, 9090, "hi").unwrap();
    assert_eq!(reply, format!("web2 {CLIENT} hi"));
    for host in lab.hosts.iter().filter(|h| h.name != "wrk1") {
        assert!(tcp_exchange(&client, host.addr, 9090, "hi").is_err(), "{} answered a host-mode port", host.name);
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn an_ingress_connection_survives_restarts_and_a_drained_backend_keeps_it() {
    let lab = plain_lab("e2eingressrs", 1, 1);
    let backends = [workload(&lab, "mgr1", "web1", "10.78.0.11"), workload(&lab, "wrk1", "web2", "10.78.0.12")];
    let _servers: Vec<TextServer> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| TextServer::start(&b.netns, 80, &format!("web{}", i + 1)).unwrap())
        .collect();
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &[&backends[0], &backends[1]]).unwrap();
    let service = |members: &[&str]| {
        let mut web = blue_service("web", "10.78.0.100", Protocol::Tcp, 80, 80, members);
        web.published = vec![published(Protocol::Tcp, 8080, 80, PublishMode::Ingress)];
        web
    };
    spec.services = vec![service(&["10.78.0.11", "10.78.0.12"])];
    lab.apply_dataplane(&spec).unwrap();
    let client = lab.add_client("outside", addr(CLIENT)).unwrap();
    let mgr1 = lab.host("mgr1").unwrap();

    // A connection through mgr1 goes on while each host's shoald restarts: stopped, then
    // killed (SIGKILL: nothing tidied up on the way out).
    let mut talk = Conversation::open(&client, mgr1.addr, 8080).unwrap();
    let pinned = talk.say("one").unwrap().split_once(' ').unwrap().0.to_owned();
    for (host, kill) in [("mgr1", false), ("wrk1", false), ("mgr1", true), ("wrk1", true)] {
        match kill {
            true => lab.kill(host).unwrap(),
            false => lab.stop(host).unwrap(),
        }
        assert_eq!(talk.say("while stopped").unwrap(), format!("{pinned} while stopped"), "{host} stopped");
        lab.start(host).unwrap();
        assert_eq!(talk.say("restarted").unwrap(), format!("{pinned} restarted"), "{host} restarted");
    }

    // Draining its backend: the open connection goes on; new ones go to the other backend.
    let (other, other_name) = if pinned == "web1" { ("10.78.0.12", "web2") } else { ("10.78.0.11", "web1") };
    let drained = if pinned == "web1" { "10.78.0.11" } else { "10.78.0.12" };
    let mut draining = service(&[other]);
    draining.draining = vec![addr(drained)];
    spec.services = vec![draining];
    lab.apply_dataplane(&spec).unwrap();
    assert_eq!(talk.say("drained").unwrap(), format!("{pinned} drained"));
    for i in 0..10 {
        let reply = tcp_exchange(&client, mgr1.addr, 8080, &format!("new{i}")).unwrap();
        assert_eq!(reply, format!("{other_name} new{i}"), "not the remaining backend's reply");
    }

    // Gone: the open connection is balanced again on the ingress node, to the remaining
    // backend, which resets it (rather than the client waiting on a task that is gone).
    let repicked = || mgr1.packets(shoal_common::stats::LB_REPICKED).unwrap();
    let before = repicked();
    spec.services = vec![service(&[other])];
    lab.apply_dataplane(&spec).unwrap();
    assert!(talk.say("gone").is_err(), "the connection to a gone backend went on");
    assert!(repicked() > before, "not counted as re-picked");
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn with_direct_server_return_the_backends_node_answers_the_client_itself() {
    let lab = plain_lab("e2edsr", 1, 1);
    // mgr1 asks for direct server return; wrk1 does not.
    lab.stop("mgr1").unwrap();
    lab.start_with("mgr1", &["--mesh-dsr".to_owned()]).unwrap();
    let backends = [workload(&lab, "mgr1", "web1", "10.78.0.11"), workload(&lab, "wrk1", "web2", "10.78.0.12")];
    let _servers = Servers::start(&backends);
    // A workload on wrk1 calling mgr1's published port: masqueraded to wrk1's address, a node
    // of the cluster, which wrk1 cannot answer straight.
    let caller = workload(&lab, "wrk1", "caller", "10.78.0.2");
    let all: Vec<_> = backends.iter().chain([&caller]).collect();
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &all).unwrap();
    let mut web = blue_service("web", "10.78.0.100", Protocol::Tcp, 80, 80, &["10.78.0.11", "10.78.0.12"]);
    web.published = vec![
        published(Protocol::Tcp, 8080, 80, PublishMode::Ingress),
        published(Protocol::Udp, 5353, 5300, PublishMode::Ingress),
        published(Protocol::Tcp, 8081, BULK_PORT, PublishMode::Ingress),
    ];
    spec.services = vec![web];
    lab.apply_dataplane(&spec).unwrap();
    let client = lab.add_client("outside", addr(CLIENT)).unwrap();
    let (mgr1, wrk1) = (lab.host("mgr1").unwrap(), lab.host("wrk1").unwrap());

    // Through mgr1, both backends answer, with the client's address kept, and the answers
    // come from the address and port the client used (or its connection would not take
    // them): wrk1 sends web2's straight to the client, never back through mgr1.
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let reply = tcp_exchange(&client, mgr1.addr, 8080, &format!("hello{i}")).unwrap();
        let words: Vec<&str> = reply.split(' ').collect();
        assert_eq!(words[1..], [CLIENT, &format!("hello{i}")], "{reply}");
        seen.insert(words[0].to_owned());
    }
    assert_eq!(seen, BTreeSet::from(["web1".to_owned(), "web2".to_owned()]));
    for _ in 0..6 {
        let got = BulkServer::fetch(&client, SocketAddr::from((mgr1.addr, 8081))).unwrap();
        assert_eq!(got, BULK_BYTES, "a bulk reply came back cut");
    }
    for _ in 0..8 {
        let socket = UdpClient::open(&client).unwrap();
        let to = SocketAddr::from((mgr1.addr, 5353));
        let (_, from) = socket.ask(to, "q").unwrap();
        assert_eq!(from, to, "the answer must come from the published address");
    }
    assert!(wrk1.packets(INGRESS_REPLY).unwrap() >= 1, "wrk1 sent no reply to the client itself");
    assert_eq!(wrk1.packets(INGRESS_RETURN).unwrap(), 0, "wrk1 sent replies back through mgr1");

    // The caller on wrk1 gets its answers from both backends, web2's back through mgr1.
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let reply = tcp_exchange(&caller.netns, mgr1.addr, 8080, &format!("own{i}")).unwrap();
        seen.insert(reply.split(' ').next().unwrap().to_owned());
    }
    assert_eq!(seen, BTreeSet::from(["web1".to_owned(), "web2".to_owned()]), "through mgr1 from wrk1");
    assert!(wrk1.packets(INGRESS_RETURN).unwrap() >= 1, "a node's call was answered straight");

    // Through wrk1, which did not ask: web1's replies go back through wrk1, as without.
    for i in 0..20 {
        tcp_exchange(&client, wrk1.addr, 8080, &format!("via{i}")).unwrap();
    }
    assert!(mgr1.packets(INGRESS_RETURN).unwrap() >= 1, "mgr1 answered wrk1's client itself");
}
