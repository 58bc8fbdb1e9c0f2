//! Forming the lab's swarm the way a user would: `swarm init` on the first manager, then
//! `swarm join` with the manager or worker token on every other host, over the real API.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use shoal_api::{
    node::{Node, NodeState},
    swarm::{InitRequest, JoinRequest, Swarm},
};

use crate::{Host, Lab};

/// Swarm's cluster port.
const PORT: u16 = 2377;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn form(lab: &Lab, managers: usize) -> Result<()> {
    let first = &lab.hosts[0];
    let t = Instant::now();
    let init = InitRequest {
        listen_addr: format!("{}:{PORT}", first.addr),
        advertise_addr: first.addr.to_string(),
        ..Default::default()
    };
    let response = first.api().post_json("/swarm/init", &init)?;
    if response.status != 200 {
        bail!("{}: swarm init failed: {}", first.name, response.text());
    }
    eprintln!("  {:<5} swarm initialized in {:.2}s", first.name, t.elapsed().as_secs_f64());
    let swarm: Swarm = first.api().get("/swarm")?.json()?;
    for (i, host) in lab.hosts.iter().enumerate().skip(1) {
        let (token, role) =
            if i < managers { (&swarm.join_tokens.manager, "manager") } else { (&swarm.join_tokens.worker, "worker") };
        join(host, first, token)?;
        eprintln!("  {:<5} joined as {role}", host.name);
    }
    // Every manager, not just the first, must see the whole swarm before the lab is "up".
    for manager in &lab.hosts[..managers] {
        wait_ready(manager, lab.hosts.len())?;
    }
    Ok(())
}

fn join(host: &Host, via: &Host, token: &str) -> Result<()> {
    let t = Instant::now();
    let request = JoinRequest {
        listen_addr: format!("{}:{PORT}", host.addr),
        advertise_addr: host.addr.to_string(),
        remote_addrs: vec![format!("{}:{PORT}", via.addr)],
        join_token: token.to_owned(),
        ..Default::default()
    };
    let response = host.api().post_json("/swarm/join", &request)?;
    if response.status != 200 {
        bail!("{}: swarm join failed after {:.1}s: {}", host.name, t.elapsed().as_secs_f64(), response.text());
    }
    Ok(())
}

/// Waits until `manager` lists `count` nodes, all Ready.
fn wait_ready(manager: &Host, count: usize) -> Result<()> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let nodes: Vec<Node> = manager.api().get("/nodes")?.json().context("listing nodes")?;
        let ready = nodes.iter().filter(|n| n.status.state == NodeState::Ready).count();
        if nodes.len() == count && ready == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the swarm did not converge on {}: {ready} of {count} nodes ready", manager.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
