//! A workload reaches addresses outside the overlay through its node, masqueraded to the
//! node's address; an internal network has no way out.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener},
    time::Duration,
};

use shoal_common::stats::FORWARD_HOST;
use shoal_lab::in_netns;
use shoal_tests::{overlay_spec, plain_lab, workload};

/// A server in `netns` that answers one line with the address the connection came from.
fn whoami_server(netns: &str, addr: Ipv4Addr, port: u16) -> std::thread::JoinHandle<()> {
    let listener = in_netns(netns, move || TcpListener::bind((addr, port)).unwrap()).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2).flatten() {
            let peer = stream.peer_addr().unwrap().ip();
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = writeln!(&stream, "{peer}");
        }
    })
}

fn ask(netns: &str, addr: Ipv4Addr, port: u16) -> std::io::Result<String> {
    in_netns(netns, move || -> std::io::Result<String> {
        let stream = std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        writeln!(&stream, "who am i")?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply)?;
        Ok(reply.trim().to_owned())
    })
    .unwrap()
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn workloads_reach_the_underlay_masqueraded_and_internal_networks_do_not() {
    let lab = plain_lab("e2eoutbound", 1, 1);
    let a = workload(&lab, "mgr1", "a", "10.78.0.2");
    let wrk1 = lab.host("wrk1").unwrap();
    let _server = whoami_server(&wrk1.netns, wrk1.addr, 9000);

    lab.apply_dataplane(&overlay_spec("blue", 4097, "10.78.0.0/24", &[&a]).unwrap()).unwrap();
    let seen = ask(&a.netns, wrk1.addr, 9000).expect("the workload reaches another host's underlay address");
    assert_eq!(seen, "10.77.1.1", "the server sees the workload's node, not its overlay address");
    assert!(lab.host("mgr1").unwrap().packets(FORWARD_HOST).unwrap() > 0);

    let mut internal = overlay_spec("blue", 4097, "10.78.0.0/24", &[&a]).unwrap();
    internal.networks[0].internal = true;
    lab.apply_dataplane(&internal).unwrap();
    assert!(ask(&a.netns, wrk1.addr, 9000).is_err(), "an internal network let traffic out");
}
