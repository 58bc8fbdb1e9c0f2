//! The cost of one change with thousands of services programmed: a backend and an endpoint
//! added and removed, each as a batch through the API (`POST /shoal/v1/dataplane/changes`,
//! timed by the client: HTTP, check, plan, map writes, journal fsync), and the two ways a
//! whole state comes back: the source sending it again (a `PUT` of every service with one
//! backend changed) and shoald restarting on its saved state over the maps it left.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use shoal_api::{
    dataplane::{Change, ChangeBatch, ChangeReport, DataplaneSpec, Endpoint},
    MacAddr,
};
use shoal_lab::{Host, Lab};

use crate::bench::stats::summarize;

/// What was measured, per operation.
pub struct ChangeTimes {
    pub services: usize,
    pub rows: Vec<(&'static str, Vec<Duration>)>,
}

/// Measures on `host`, which holds `spec` (`services` services) or `base` (none of them);
/// leaves `spec` programmed.
pub fn measure(
    lab: &Lab,
    host: &str,
    base: &DataplaneSpec,
    spec: &DataplaneSpec,
    services: usize,
    rounds: usize,
) -> Result<ChangeTimes> {
    let node = lab.host(host)?;
    let mut from_none = Vec::new();
    for _ in 0..3 {
        put(node, base)?;
        let started = Instant::now();
        put(node, spec)?;
        from_none.push(started.elapsed());
    }
    let svc = spec.services.last().context("no service to change")?;
    let network = svc.network.clone();
    let extra = Ipv4Addr::new(10, 78, 250, 1);
    let mut with_extra = svc.backends.clone();
    with_extra.push(extra);
    let set = |backends: &[Ipv4Addr]| Change::SetBackends {
        network: network.clone(),
        service: svc.name.clone(),
        backends: backends.to_vec(),
        draining: vec![],
    };
    // An endpoint on another node: its entry, and that node's, are what a task adds.
    let endpoint = Endpoint {
        network: network.clone(),
        addr: Ipv4Addr::new(10, 78, 250, 2),
        mac: MacAddr::from_ipv4(Ipv4Addr::new(10, 78, 250, 2)),
        node_addr: Ipv4Addr::new(10, 77, 0, 250),
        interface: None,
    };
    let remove_endpoint = Change::RemoveEndpoint { network: network.clone(), addr: endpoint.addr };

    let mut rows: Vec<(&'static str, Vec<Duration>)> = vec![
        ("add a backend to a service", Vec::new()),
        ("remove a backend from a service", Vec::new()),
        ("add an endpoint (on another node)", Vec::new()),
        ("remove an endpoint", Vec::new()),
    ];
    let ops = [set(&with_extra), set(&svc.backends), Change::AddEndpoint(endpoint), remove_endpoint];
    for round in 0..rounds {
        for (i, op) in ops.iter().enumerate() {
            rows[i].1.push(timed_change(node, op.clone())?);
        }
        if round % 100 == 99 {
            eprintln!("  {} services: {}/{rounds} rounds of changes", services, round + 1);
        }
    }

    let mut puts = Vec::new();
    let mut changed = spec.clone();
    changed.services.last_mut().context("no service")?.backends.push(extra);
    for _ in 0..3 {
        for state in [&changed, spec] {
            let started = Instant::now();
            put(node, state)?;
            puts.push(started.elapsed());
        }
    }
    rows.push(("PUT the whole state, one backend changed", puts));
    rows.push(("PUT the whole state, from none of its services", from_none));

    let mut restarts = Vec::new();
    for _ in 0..3 {
        lab.stop(host)?;
        let started = Instant::now();
        lab.start(host)?;
        restarts.push(started.elapsed());
    }
    rows.push(("restart: saved state resynced over the pinned maps, until serving", restarts));
    Ok(ChangeTimes { services, rows })
}

fn put(node: &Host, spec: &DataplaneSpec) -> Result<()> {
    let response = node.api().put_json("/shoal/v1/dataplane", spec)?;
    if response.status != 200 {
        bail!("{}: dataplane refused ({}): {}", node.name, response.status, response.text());
    }
    Ok(())
}

/// Sends one change as a batch and times it until the answer; fails unless it applied.
fn timed_change(node: &Host, change: Change) -> Result<Duration> {
    let batch = ChangeBatch { sequence: None, changes: vec![change] };
    let started = Instant::now();
    let response = node.api().post_json("/shoal/v1/dataplane/changes", &batch)?;
    let took = started.elapsed();
    if response.status != 200 {
        bail!("{}: changes refused ({}): {}", node.name, response.status, response.text());
    }
    let report: ChangeReport = response.json()?;
    if let Some(refused) = report.results.iter().find(|r| !r.is_applied()) {
        bail!("{}: a change was refused: {refused:?}", node.name);
    }
    Ok(took)
}

impl ChangeTimes {
    /// The report's section.
    pub fn section(&self) -> String {
        let mut out = format!(
            "## Changing one object with {} services programmed\n\n\
             Each change is one batch `POST /shoal/v1/dataplane/changes` to mgr1's shoald, timed by\n\
             the client until the answer: HTTP over the unix socket, the check against the state,\n\
             the plan of the one object, the map writes (no map read), the journal line fsynced.\n\
             Target: p50 and p99 <= 1 ms each. Below, the two ways a whole state comes back: the\n\
             source sending all of it again (every service checked and compared, one changed,\n\
             the state saved whole), and shoald restarted (SIGTERM, start) on its saved state,\n\
             which it resyncs into the maps it left pinned without emptying them (the time until\n\
             it serves again, process start included).\n\n\
             | operation | n | min ms | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n",
            self.services
        );
        for (what, samples) in &self.rows {
            let s = summarize(samples);
            out.push_str(&format!(
                "| {what} | {} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                s.count, s.min, s.median, s.p99, s.max
            ));
        }
        out
    }
}
