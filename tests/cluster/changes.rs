//! The data plane taken one change at a time (`POST /shoal/v1/dataplane/changes`): each
//! change applies on its own, a bad one is refused alone with Docker's status, batches are
//! numbered, and what was acknowledged survives a SIGKILL of shoald with the flows open.

use std::collections::BTreeSet;

use shoal_api::dataplane::{Change, ChangeBatch, ChangeReport, DataplaneSpec, OverlayNetwork, Protocol, Sequence};
use shoal_common::stats::LB_REPICKED;
use shoal_lab::{tcp_exchange, Conversation, Lab, TextServer};
use shoal_tests::{addr, blue_service, plain_lab, workload};

const VIP: &str = "10.78.0.100";

/// Which backend answered `rounds` new connections to the VIP from `netns`; an empty or
/// garbled reply fails.
fn answers(netns: &str, rounds: usize) -> Vec<String> {
    (0..rounds)
        .map(|i| {
            let reply = tcp_exchange(netns, addr(VIP), 80, &format!("n{i}")).unwrap();
            let (who, echoed) = reply.split_once(' ').unwrap_or_else(|| panic!("reply {reply:?}"));
            assert_eq!(echoed, format!("n{i}"));
            who.to_owned()
        })
        .collect()
}

fn statuses(reports: &[ChangeReport]) -> Vec<Vec<u16>> {
    reports.iter().map(|r| r.results.iter().map(|c| c.status).collect()).collect()
}

fn sequence(lab: &Lab, host: &str) -> u64 {
    lab.host(host).unwrap().api().get("/shoal/v1/dataplane/sequence").unwrap().json::<Sequence>().unwrap().sequence
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn changes_apply_one_by_one_refuse_alone_and_survive_a_kill() {
    let lab = plain_lab("e2echg", 1, 1);
    let client = workload(&lab, "mgr1", "client", "10.78.0.2");
    let webs = [
        workload(&lab, "mgr1", "web1", "10.78.0.11"),
        workload(&lab, "wrk1", "web2", "10.78.0.12"),
        workload(&lab, "wrk1", "web3", "10.78.0.13"),
    ];
    let _servers: Vec<TextServer> = webs
        .iter()
        .enumerate()
        .map(|(i, w)| TextServer::start(&w.netns, 7000, &format!("web{}", i + 1)).unwrap())
        .collect();
    let service = |members: &[&str]| blue_service("web", VIP, Protocol::Tcp, 80, 7000, members);
    let nodes = lab.hosts.iter().map(|h| Change::AddNode { addr: h.addr });

    // One backend, built from nothing by changes (no sequence given: the next one).
    let mut first = vec![
        Change::AddNetwork(OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())),
        Change::AddEndpoint(client.endpoint("blue")),
        Change::AddEndpoint(webs[0].endpoint("blue")),
        Change::SetService(service(&["10.78.0.11"])),
    ];
    first.extend(nodes);
    let reports = lab.apply_changes(&ChangeBatch { sequence: None, changes: first }).unwrap();
    assert!(reports.iter().all(|r| r.sequence == 1 && r.results.iter().all(|c| c.is_applied())), "{reports:?}");
    assert_eq!(answers(&client.netns, 5), ["web1"; 5]);

    // Two backends more, with bad changes among them: each bad one is refused alone, with
    // the status Docker gives, and the rest applies.
    let mut stranger = webs[1].endpoint("blue");
    stranger.network = "red".into();
    let mut at_the_vip = webs[2].endpoint("blue");
    at_the_vip.addr = addr(VIP);
    let second = ChangeBatch {
        sequence: Some(10),
        changes: vec![
            Change::AddEndpoint(webs[1].endpoint("blue")),
            Change::AddEndpoint(stranger),
            Change::AddEndpoint(webs[2].endpoint("blue")),
            Change::AddEndpoint(at_the_vip),
            Change::SetBackends { network: "blue".into(), service: "api".into(), backends: vec![], draining: vec![] },
            Change::SetBackends {
                network: "blue".into(),
                service: "web".into(),
                backends: ["10.78.0.11", "10.78.0.12", "10.78.0.13"].map(addr).to_vec(),
                draining: vec![],
            },
            Change::RemoveNetwork { name: "blue".into() },
        ],
    };
    let reports = lab.apply_changes(&second).unwrap();
    assert_eq!(statuses(&reports), vec![vec![200, 404, 200, 409, 404, 200, 409]; 2], "{reports:?}");
    assert!(reports[0].results[1].message.as_deref().unwrap().contains("\"red\" is not declared"), "{reports:?}");
    assert_eq!(sequence(&lab, "wrk1"), 10);
    let seen: BTreeSet<String> = answers(&client.netns, 30).into_iter().collect();
    assert_eq!(seen, ["web1", "web2", "web3"].map(String::from).into(), "new connections spread over all three");

    // A batch at or below the applied sequence is refused whole (a resend, or out of order),
    // even when its changes would apply.
    let spec_now =
        || -> DataplaneSpec { lab.host("mgr1").unwrap().api().get("/shoal/v1/dataplane").unwrap().json().unwrap() };
    let before = spec_now();
    let stale = ChangeBatch { sequence: Some(10), changes: vec![Change::AddNode { addr: addr("10.77.9.9") }] };
    let response = lab.host("mgr1").unwrap().api().post_json("/shoal/v1/dataplane/changes", &stale).unwrap();
    assert_eq!(response.status, 409, "{}", response.text());
    assert_eq!((spec_now(), sequence(&lab, "mgr1")), (before.clone(), 10), "a stale batch changed something");

    // SIGKILL: what was acknowledged comes back (state and sequence), and the pinned maps
    // are never emptied: the open connection goes on with its backend, and new connections
    // are answered all along, while shoald is dead and while it starts and resyncs.
    let mut talk = Conversation::open(&client.netns, addr(VIP), 80).unwrap();
    let pinned = talk.say("one").unwrap().split_once(' ').unwrap().0.to_owned();
    lab.kill("mgr1").unwrap();
    assert_eq!(talk.say("killed").unwrap(), format!("{pinned} killed"));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (done, netns) = (done.clone(), client.netns.clone());
        std::thread::spawn(move || {
            let mut tries = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = tcp_exchange(&netns, addr(VIP), 80, "probe");
                assert!(reply.as_deref().is_ok_and(|r| r.ends_with(" probe")), "new connection {tries}: {reply:?}");
                tries += 1;
            }
            tries
        })
    };
    lab.start("mgr1").unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(prober.join().expect("a new connection failed during the restart") > 0);
    assert_eq!(talk.say("back").unwrap(), format!("{pinned} back"));
    assert_eq!(spec_now(), before, "the acknowledged state after SIGKILL");
    assert_eq!(sequence(&lab, "mgr1"), 10);

    // Drain the pinned backend by a change: its connection stays, every new one gets a
    // reply from a remaining backend.
    let all = ["10.78.0.11", "10.78.0.12", "10.78.0.13"].into_iter().zip(["web1", "web2", "web3"]);
    let remaining: Vec<&str> = all.clone().filter(|(_, n)| *n != pinned).map(|(a, _)| a).collect();
    let drained = all.clone().find(|(_, n)| *n == pinned).unwrap().0;
    let names: BTreeSet<String> =
        ["web1", "web2", "web3"].into_iter().filter(|n| *n != pinned).map(String::from).collect();
    let drain = ChangeBatch {
        sequence: Some(11),
        changes: vec![Change::SetBackends {
            network: "blue".into(),
            service: "web".into(),
            backends: remaining.iter().map(|a| addr(a)).collect(),
            draining: vec![addr(drained)],
        }],
    };
    assert!(lab.apply_changes(&drain).unwrap().iter().all(|r| r.results[0].is_applied()));
    assert_eq!(talk.say("drained").unwrap(), format!("{pinned} drained"));
    for who in answers(&client.netns, 20) {
        assert!(names.contains(&who), "a new connection reached {who}, not a remaining backend");
    }
    // A restart keeps every backend's ID (conntrack pins flows by ID): the draining one's
    // connection goes on, not balanced again as if its backend had left.
    let repicked = lab.host("mgr1").unwrap().packets(LB_REPICKED).unwrap();
    lab.kill("mgr1").unwrap();
    lab.start("mgr1").unwrap();
    assert_eq!(talk.say("restarted").unwrap(), format!("{pinned} restarted"));
    assert_eq!(lab.host("mgr1").unwrap().packets(LB_REPICKED).unwrap(), repicked, "flows re-picked by a restart");

    // Gone (its task stopped): the open connection's next packet is balanced again, to a
    // remaining backend, which has no such connection and resets it: the client learns at
    // once instead of waiting on a task that no longer exists.
    let repicked_before = lab.host("mgr1").unwrap().packets(LB_REPICKED).unwrap();
    let gone = ChangeBatch {
        sequence: Some(12),
        changes: vec![Change::SetBackends {
            network: "blue".into(),
            service: "web".into(),
            backends: remaining.iter().map(|a| addr(a)).collect(),
            draining: vec![],
        }],
    };
    assert!(lab.apply_changes(&gone).unwrap().iter().all(|r| r.results[0].is_applied()));
    assert!(talk.say("gone").is_err(), "the connection to a gone backend went on");
    assert!(lab.host("mgr1").unwrap().packets(LB_REPICKED).unwrap() > repicked_before, "not counted as re-picked");
    for who in answers(&client.netns, 10) {
        assert!(names.contains(&who), "a new connection reached {who}, not a remaining backend");
    }

    // A workload whose veth vanished while shoald was down is left out at the restart, said
    // as such; the rest is restored.
    let web4 = workload(&lab, "mgr1", "web4", "10.78.0.14");
    let add = ChangeBatch { sequence: Some(13), changes: vec![Change::AddEndpoint(web4.endpoint("blue"))] };
    assert!(lab.apply_changes(&add).unwrap().iter().all(|r| r.results[0].is_applied()));
    lab.stop("mgr1").unwrap();
    shoal_lab::run_ok(&["ip", "-n", &lab.host("mgr1").unwrap().netns, "link", "del", &web4.host_iface]).unwrap();
    lab.start("mgr1").unwrap();
    let now: Sequence = lab.host("mgr1").unwrap().api().get("/shoal/v1/dataplane/sequence").unwrap().json().unwrap();
    assert_eq!(now.sequence, 13);
    assert!(now.left_out.len() == 1 && now.left_out[0].contains("10.78.0.14"), "{now:?}");
    assert!(spec_now().endpoints.iter().all(|ep| ep.addr != web4.addr));
    for who in answers(&client.netns, 10) {
        assert!(names.contains(&who), "after the restart, {who} answered");
    }
}

/// The IDs of the tables `map` (a Maglev map pinned on `host`) holds.
fn tables_in(lab: &Lab, host: &str, map: &str) -> BTreeSet<u32> {
    let path = format!("{}/{}/{host}/{map}", shoal_lab::BPF_ROOT, lab.name);
    let dump: serde_json::Value =
        serde_json::from_str(&shoal_lab::run_ok(&["bpftool", "-j", "map", "dump", "pinned", &path]).unwrap()).unwrap();
    dump.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
                .collect();
            u32::from_ne_bytes(bytes.try_into().unwrap())
        })
        .collect()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_service_past_32_backends_gets_a_large_table_and_back() {
    use shoal_common::maps::{MAGLEV, MAGLEV_LARGE};
    let lab = plain_lab("e2emaglev", 1, 0);
    let client = workload(&lab, "mgr1", "client", "10.78.0.2");
    let webs = [workload(&lab, "mgr1", "web1", "10.78.0.11"), workload(&lab, "mgr1", "web2", "10.78.0.12")];
    let _servers: Vec<TextServer> = webs
        .iter()
        .enumerate()
        .map(|(i, w)| TextServer::start(&w.netns, 7000, &format!("web{}", i + 1)).unwrap())
        .collect();
    let real = ["10.78.0.11", "10.78.0.12"];
    let spec = DataplaneSpec {
        networks: vec![OverlayNetwork::new("blue", 4097, "10.78.0.0/24".parse().unwrap())],
        endpoints: [&client, &webs[0], &webs[1]].iter().map(|w| w.endpoint("blue")).collect(),
        services: vec![blue_service("web", VIP, Protocol::Tcp, 80, 7000, &real)],
        ..Default::default()
    };
    lab.apply_dataplane(&spec).unwrap();
    let small = tables_in(&lab, "mgr1", MAGLEV);
    assert_eq!((small.len(), tables_in(&lab, "mgr1", MAGLEV_LARGE).len()), (1, 0));

    // 40 backends (38 of them addresses nobody answers on: only the table is looked at): the
    // table keeps its ID and moves to the large map.
    let many: Vec<std::net::Ipv4Addr> =
        real.iter().map(|a| addr(a)).chain((50..88).map(|i| addr(&format!("10.78.0.{i}")))).collect();
    let set = |backends: Vec<std::net::Ipv4Addr>| ChangeBatch {
        sequence: None,
        changes: vec![Change::SetBackends {
            network: "blue".into(),
            service: "web".into(),
            backends,
            draining: vec![],
        }],
    };
    let reports = lab.apply_changes(&set(many)).unwrap();
    assert_eq!(statuses(&reports), [[200]], "{reports:?}");
    assert_eq!(tables_in(&lab, "mgr1", MAGLEV_LARGE), small, "the table moved to the large map");
    assert!(tables_in(&lab, "mgr1", MAGLEV).is_empty(), "its small copy went");
    // Connections are balanced over it (most to addresses nobody has, where they are
    // dropped), and none finds no table.
    let mgr1 = lab.host("mgr1").unwrap();
    let new_flows = || mgr1.packets(shoal_common::stats::LB_NEW_FLOW).unwrap();
    let before = new_flows();
    for _ in 0..20 {
        let to = std::net::SocketAddr::from((addr(VIP), 80));
        let _ = shoal_lab::in_netns(&client.netns, move || {
            std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(100))
        });
    }
    assert!(new_flows() - before >= 20, "the connections were not balanced");
    assert_eq!(mgr1.packets(shoal_common::stats::DROP_NO_BACKEND).unwrap(), 0);

    // And survives a restart (resynced into the maps it left).
    lab.kill("mgr1").unwrap();
    lab.start("mgr1").unwrap();
    assert_eq!(tables_in(&lab, "mgr1", MAGLEV_LARGE), small);
    assert!(tables_in(&lab, "mgr1", MAGLEV).is_empty());

    // Back to the two real backends: the small map again, and both answer.
    let reports = lab.apply_changes(&set(real.iter().map(|a| addr(a)).collect())).unwrap();
    assert_eq!(statuses(&reports), [[200]], "{reports:?}");
    assert_eq!(tables_in(&lab, "mgr1", MAGLEV), small);
    assert!(tables_in(&lab, "mgr1", MAGLEV_LARGE).is_empty());
    let seen: BTreeSet<String> = answers(&client.netns, 20).into_iter().collect();
    assert_eq!(seen, BTreeSet::from(["web1".to_owned(), "web2".to_owned()]));
    assert_eq!(mgr1.packets(shoal_common::stats::DROP_NO_BACKEND).unwrap(), 0);
}
