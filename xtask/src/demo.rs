//! `cargo xtask demo`, README's main job: bring up the seeds' 3+3 lab, put one workload per
//! host on an overlay network, show traffic between every pair of hosts going through
//! shoal's BPF programs and VXLAN, then a service balanced on its VIP and published on every
//! node (the routing mesh), reached from a client outside the cluster.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{bail, Result};
use shoal_api::dataplane::{Protocol, PublishMode, PublishedPort, ServicePort, ServiceVip, DEFAULT_OVERLAY_MTU};
use shoal_common::stats;
use shoal_lab::{overlay_spec, ping, tcp_exchange, Lab, LabConfig, TextServer, Workload, DEFAULT_LAB};

use crate::workspace;

const NETWORK: &str = "demo";
const VNI: u32 = 4097;
const PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 100);
/// The service's published port, on every node's address.
const PUBLISHED: u16 = 80;
/// A machine outside the cluster on the lab underlay.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);

pub fn run(keep: bool) -> Result<()> {
    let started = Instant::now();
    workspace::build()?;
    eprintln!("== lab up: 3 managers + 3 workers");
    let lab = Lab::up(&LabConfig::new(DEFAULT_LAB, workspace::bin_dir()))?;
    let lab = if keep { lab } else { lab.teardown_on_drop() };

    eprintln!("== the swarm, as the real docker CLI on mgr2 sees it (docker node ls)");
    let argv: Vec<String> = ["docker", "node", "ls"].map(String::from).to_vec();
    let status = lab.command("mgr2", &argv)?.status()?;
    if !status.success() {
        bail!("docker node ls failed on mgr2");
    }

    eprintln!("== overlay network {NETWORK:?}: VNI {VNI}, 10.78.0.0/24, one workload per host");
    let mut workloads = Vec::new();
    for (i, host) in lab.hosts.iter().enumerate() {
        let addr = Ipv4Addr::new(10, 78, 0, 11 + i as u8);
        let w = lab.add_workload(&host.name, "web", addr, 24, DEFAULT_OVERLAY_MTU)?;
        eprintln!("  {}/web  {addr}  (veth {} on {})", host.name, w.host_iface, host.addr);
        workloads.push((host.name.clone(), w));
    }
    let members: Vec<&Workload> = workloads.iter().map(|(_, w)| w).collect();
    let mut spec = overlay_spec(NETWORK, VNI, "10.78.0.0/24", &members)?;
    spec.services = vec![ServiceVip {
        name: "web".into(),
        network: NETWORK.into(),
        vip: VIP,
        ports: vec![ServicePort { protocol: Protocol::Tcp, port: 80, target_port: PORT }],
        backends: workloads.iter().map(|(_, w)| w.addr).collect(),
        draining: vec![],
        dnsrr: false,
        published: vec![PublishedPort {
            protocol: Protocol::Tcp,
            published_port: PUBLISHED,
            target_port: PORT,
            publish_mode: PublishMode::Ingress,
        }],
    }];
    lab.apply_dataplane(&spec)?;
    let _servers = workloads
        .iter()
        .map(|(host, w)| TextServer::start(&w.netns, PORT, &format!("{host}/web sees {{peer}}:")))
        .collect::<Result<Vec<_>>>()?;

    eprintln!("== traffic between workloads (ping, then a TCP exchange on port {PORT})");
    print!("{:<10}", "from \\ to");
    for (host, _) in &workloads {
        print!("{host:>8}");
    }
    println!();
    let mut failures = Vec::new();
    for (from_host, from) in &workloads {
        print!("{:<10}", format!("{from_host}/web"));
        for (to_host, to) in &workloads {
            if from_host == to_host {
                print!("{:>8}", "-");
                continue;
            }
            let pinged = ping(&from.netns, to.addr, 1)? == 1;
            let reply = tcp_exchange(&from.netns, to.addr, PORT, from_host);
            let talked = reply.as_deref().is_ok_and(|r| r == format!("{to_host}/web sees {}: {from_host}", from.addr));
            print!("{:>8}", if pinged && talked { "ok" } else { "FAIL" });
            if !(pinged && talked) {
                failures.push(format!("{from_host} -> {to_host}: ping {pinged}, tcp {reply:?}"));
            }
        }
        println!();
    }
    let (from_host, from) = &workloads[0];
    let (to_host, to) = &workloads[workloads.len() - 1];
    println!("\n{from_host}/web -> {to_host}/web: {}", tcp_exchange(&from.netns, to.addr, PORT, "are you there?")?);

    eprintln!("== service \"web\": VIP {VIP}:80 balanced (Maglev, BPF) over the six workloads on port {PORT}");
    for (host, w) in &workloads {
        let mut reached = std::collections::BTreeSet::new();
        for i in 0..12 {
            let reply = tcp_exchange(&w.netns, VIP, 80, &format!("{i}"))?;
            reached.insert(reply.split(' ').next().unwrap_or_default().to_owned());
        }
        println!(
            "  from {host}/web, 12 connections to {VIP}:80 reached: {}",
            reached.into_iter().collect::<Vec<_>>().join(" ")
        );
    }

    eprintln!(
        "== routing mesh: port {PUBLISHED} published on every node; a client outside the cluster ({CLIENT}) connects"
    );
    let client = lab.add_client("outside", CLIENT)?;
    for host in &lab.hosts {
        let (mut reached, mut seen_as) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
        for i in 0..12 {
            let reply = tcp_exchange(&client, host.addr, PUBLISHED, &format!("{i}"))?;
            let mut words = reply.split(' ');
            reached.insert(words.next().unwrap_or_default().to_owned());
            seen_as.insert(words.nth(1).unwrap_or_default().trim_end_matches(':').to_owned());
        }
        let seen_as: Vec<_> = seen_as.into_iter().collect();
        println!(
            "  {}:{PUBLISHED} ({}), 12 connections reached: {}; backends saw the client as {}",
            host.addr,
            host.name,
            reached.into_iter().collect::<Vec<_>>().join(" "),
            seen_as.join(" ")
        );
        if seen_as != [CLIENT.to_string()] {
            failures.push(format!("via {}: backends saw the client as {seen_as:?}", host.name));
        }
    }

    eprintln!("== what the BPF programs counted (from each host's pinned stats map)");
    println!(
        "{:<6} {:>10} {:>15} {:>21} {:>14} {:>8} {:>14} {:>8}",
        "HOST",
        "arp_reply",
        "forward_remote",
        "deliver_from_overlay",
        "forward_local",
        "lb_new",
        "ingress_in/out",
        "drops"
    );
    for host in &lab.hosts {
        let counters = host.counters()?;
        let get = |code| counters.iter().find(|c| c.code == code).map_or(0, |c| c.packets);
        let drops: u64 = counters.iter().filter(|c| stats::is_drop(c.code)).map(|c| c.packets).sum();
        let ingress = format!(
            "{}/{}",
            get(stats::INGRESS_LOCAL) + get(stats::INGRESS_REMOTE),
            get(stats::INGRESS_REPLY) + get(stats::INGRESS_RETURN)
        );
        println!(
            "{:<6} {:>10} {:>15} {:>21} {:>14} {:>8} {:>14} {:>8}",
            host.name,
            get(stats::ARP_REPLY),
            get(stats::FORWARD_REMOTE),
            get(stats::DELIVER_FROM_OVERLAY),
            get(stats::FORWARD_LOCAL),
            get(stats::LB_NEW_FLOW),
            ingress,
            drops
        );
    }

    if keep {
        eprintln!(
            "\nthe lab is still up: `cargo xtask lab status`, `cargo xtask lab exec mgr1 -- shoal dataplane stats`,"
        );
        eprintln!("`cargo xtask lab down` to remove it.");
    } else {
        eprintln!("== lab down");
    }
    drop(_servers);
    drop(lab);
    if !failures.is_empty() {
        bail!("{} paths failed:\n{}", failures.len(), failures.join("\n"));
    }
    eprintln!(
        "demo finished in {:.0}s: every workload reached every other host's workload over the overlay, \
         and the service answered on every node's published port",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
