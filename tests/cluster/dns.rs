//! The embedded DNS: a workload asks its gateway and gets its network's service VIPs,
//! `tasks.<service>` addresses and DNS-round-robin services' tasks; other names are
//! forwarded upstream.

use std::{
    net::{Ipv4Addr, UdpSocket},
    str::FromStr,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{rdata::A, Name, RData, Record, RecordType},
};
use shoal_api::dataplane::{Protocol, ServiceVip};
use shoal_lab::in_netns;
use shoal_tests::{addr, blue_service, overlay_spec, plain_lab, workload};

/// Asks `server:53`-style `server` for `name`'s A records from inside `netns`.
fn lookup(netns: &str, server: (Ipv4Addr, u16), name: &str) -> (ResponseCode, Vec<Ipv4Addr>) {
    let mut query = Message::new();
    query.set_id(7).set_recursion_desired(true).add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let bytes = query.to_vec().unwrap();
    let reply = in_netns(netns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        socket.send_to(&bytes, server).unwrap();
        let mut buf = [0u8; 1500];
        let (len, _) = socket.recv_from(&mut buf).expect("a DNS answer");
        buf[..len].to_vec()
    })
    .unwrap();
    let message = Message::from_vec(&reply).unwrap();
    let mut addrs: Vec<Ipv4Addr> = message
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            Some(RData::A(a)) => Some(a.0),
            _ => None,
        })
        .collect();
    addrs.sort();
    (message.response_code(), addrs)
}

/// A stand-in upstream resolver in `netns` that answers every A query with 192.0.2.7.
fn upstream(netns: &str, at: (Ipv4Addr, u16)) {
    let socket = in_netns(netns, move || UdpSocket::bind(at).unwrap()).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((len, from)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
            let mut reply = Message::new();
            reply.set_id(query.id()).set_message_type(MessageType::Response);
            for q in query.queries() {
                reply.add_query(q.clone());
                reply.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A::new(192, 0, 2, 7))));
            }
            let _ = socket.send_to(&reply.to_vec().unwrap(), from);
        }
    });
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn workloads_resolve_services_tasks_and_the_outside_world() {
    let lab = plain_lab("e2edns", 1, 1);
    let wrk1 = lab.host("wrk1").unwrap();
    upstream(&wrk1.netns, (wrk1.addr, 5353));
    lab.stop("mgr1").unwrap();
    lab.start_with("mgr1", &["--dns-upstream".to_owned(), format!("{}:5353", wrk1.addr)]).unwrap();

    let client = workload(&lab, "mgr1", "client", "10.78.0.2");
    let task1 = workload(&lab, "wrk1", "task1", "10.78.0.11");
    let task2 = workload(&lab, "mgr1", "task2", "10.78.0.12");
    let mut spec = overlay_spec("blue", 4097, "10.78.0.0/24", &[&client, &task1, &task2]).unwrap();
    let service = |name: &str, vip: &str, dnsrr: bool| ServiceVip {
        dnsrr,
        published: vec![],
        ..blue_service(name, vip, Protocol::Tcp, 80, 80, &["10.78.0.11", "10.78.0.12"])
    };
    spec.services = vec![service("web", "10.78.0.100", false), service("db", "10.78.0.101", true)];
    lab.apply_dataplane(&spec).unwrap();

    let gateway = (addr("10.78.0.1"), 53);
    let tasks = vec![addr("10.78.0.11"), addr("10.78.0.12")];
    assert_eq!(lookup(&client.netns, gateway, "web."), (ResponseCode::NoError, vec![addr("10.78.0.100")]));
    assert_eq!(lookup(&client.netns, gateway, "tasks.web."), (ResponseCode::NoError, tasks.clone()));
    assert_eq!(lookup(&client.netns, gateway, "db."), (ResponseCode::NoError, tasks), "dnsrr answers with the tasks");
    assert_eq!(
        lookup(&client.netns, gateway, "example.test."),
        (ResponseCode::NoError, vec![addr("192.0.2.7")]),
        "forwarded upstream"
    );
}
