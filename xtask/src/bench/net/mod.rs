//! `cargo xtask bench net`: the data plane measured side by side in one run on one lab, with
//! optimised binaries:
//!
//! - HTTP keep-alive requests/s and new connections/s (wrk, nginx backends) through a direct
//!   routed path (the baseline), shoal's routing mesh (local and remote backend), shoal's VIP
//!   from a workload (socket and TC paths), and kube-proxy-style nftables and iptables
//!   (legacy and nft) DNAT on routers of their own, each at 1, 1,000 and 10,000 services;
//! - the time each of them takes to program those services;
//! - the kernel's time per packet of each BPF program path (`shoal-bpf-cost`);
//! - TCP throughput over the overlay vs the underlay (iperf3).
//!
//! The report goes to `docs/benchmarks/net.md` with a chart in `net.svg`.

mod changes;
mod http;
mod kube;
mod report;
mod server;
mod throughput;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use shoal_api::dataplane::{
    DataplaneSpec, Protocol, PublishMode, PublishedPort, ServicePort, ServiceVip, DEFAULT_OVERLAY_MTU,
};
use shoal_lab::{overlay_spec, Lab, LabConfig, Workload};

use crate::{bootstrap, workspace};
use http::Mode;
use kube::{Balancer, Router};
use report::{CostRow, HttpRow, HttpScale, ProgramRow};
use server::NetnsServer;

const LAB: &str = "benchnet";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);
const MESH_LOCAL_PORT: u16 = 30000;
const MESH_REMOTE_PORT: u16 = 30001;
/// Published on every node, answered through wrk1 by direct server return.
const MESH_DSR_PORT: u16 = 30002;
/// Published ports of the other services start here.
const FILLER_PORTS: u16 = 20000;
/// VIPs of the measured services with a local and with a remote backend.
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 3);
const VIP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 4);

pub struct Options {
    pub runs: usize,
    /// Seconds per wrk run.
    pub seconds: u32,
    pub scales: Vec<usize>,
    /// Seconds per iperf3 run.
    pub iperf_seconds: u32,
    /// Rounds of single changes timed at the largest scale.
    pub change_rounds: usize,
    /// Only the changes at the largest scale, printed, no report.
    pub changes_only: bool,
}

pub fn run(options: Options) -> Result<()> {
    if options.runs == 0 || options.scales.contains(&0) {
        bail!("need at least one run and at least one service per scale");
    }
    let started = Instant::now();
    let bin_dir = workspace::build_release()?;
    bootstrap::ensure_packages(&[("iptables", "kube-proxy's iptables modes (legacy and nft), compared with shoal")])?;
    http::ensure_nginx()?;
    let lab = Lab::up(&LabConfig { managers: 1, workers: 1, swarm: false, ..LabConfig::new(LAB, &bin_dir) })?
        .teardown_on_drop();
    let rig = Rig::build(&lab)?;
    let largest = options.scales.iter().copied().max().unwrap_or(1);
    if options.changes_only {
        let times = changes::measure(&lab, "mgr1", &rig.base, &rig.spec(largest), largest, options.change_rounds)?;
        println!("{}", times.section());
        return Ok(());
    }

    let mut scales = Vec::new();
    let mut load_times: Vec<ProgramRow> = ["shoal (PUT /shoal/v1/dataplane, one node)"]
        .into_iter()
        .chain(Balancer::ALL[1..].iter().map(|b| b.name()))
        .map(|who| ProgramRow { who, times: Vec::new() })
        .collect();
    for &services in &options.scales {
        eprintln!("== {services} services: programming each balancer {} times", options.runs);
        let times = rig.program(&lab, services, options.runs)?;
        for (row, times) in load_times.iter_mut().zip(times) {
            row.times.push((services, times));
        }
        let targets = rig.targets(services);
        warm_up(&targets)?;
        let keep_alive = measure(&targets, services, Mode::KeepAlive, &options)?;
        let new_connections = measure(&targets, services, Mode::NewConnections, &options)?;
        scales.push(HttpScale { services, keep_alive, new_connections });
    }
    // mgr1 is the DSR path's backend node and the ingress node of every other mesh path: a
    // reply it sent back through wrk1 would mean that row did not measure what it says.
    let returned = lab.host("mgr1")?.packets(shoal_common::stats::INGRESS_RETURN)?;
    if returned != 0 {
        bail!("mgr1 sent {returned} replies back through wrk1: the DSR path was not direct");
    }

    eprintln!("== single changes at {largest} services ({} rounds)", options.change_rounds);
    let changes = changes::measure(&lab, "mgr1", &rig.base, &rig.spec(largest), largest, options.change_rounds)?;

    eprintln!("== BPF program costs (BPF_PROG_TEST_RUN)");
    let costs = program_costs(&bin_dir, options.runs)?;

    eprintln!("== TCP throughput, overlay vs underlay");
    let mgr1 = lab.host("mgr1")?;
    let wrk1 = lab.host("wrk1")?;
    let throughput = throughput::measure(
        throughput::Path { from: &rig.vip_client.netns, to: &rig.remote.netns, addr: rig.remote.addr },
        throughput::Path { from: &mgr1.netns, to: &wrk1.netns, addr: wrk1.addr },
        options.runs,
        options.iperf_seconds,
    )?;

    let dir = workspace::root().join("docs/benchmarks");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("net.svg"), report::chart(&scales))?;
    let text = render(&options, &scales, &load_times, &changes.section(), &costs, &throughput.section());
    std::fs::write(dir.join("net.md"), &text)?;
    println!("{text}");
    eprintln!("report written to {} in {:.0}s", dir.join("net.md").display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything the measurements run against, built once on the lab.
struct Rig {
    client: String,
    /// wrk1's address: it answers its published ports' clients by direct server return.
    dsr_ingress: Ipv4Addr,
    routers: Vec<Router>,
    /// Backends on mgr1 (local to the ingress node) and wrk1.
    local: Workload,
    /// A backend of its own on mgr1 for the mesh with DSR (through wrk1): a backend shared
    /// with another path would see the client's recycled ports still in TIME_WAIT from it.
    dsr_backend: Workload,
    remote: Workload,
    /// A workload on mgr1 that connects to the VIP.
    vip_client: Workload,
    /// mgr1's workloads' cgroup (socket-level balancing).
    cgroup: PathBuf,
    base: DataplaneSpec,
    _servers: Vec<NetnsServer>,
}

impl Rig {
    fn build(lab: &Lab) -> Result<Rig> {
        eprintln!("== rig: a client, 4 routers with an nginx backend each, 3 nginx workloads, a VIP client");
        // wrk1 answers its clients by direct server return (mgr1, the other paths' ingress
        // node, does not): the mesh with DSR, measured beside the mesh without.
        lab.stop("wrk1")?;
        lab.start_with("wrk1", &["--mesh-dsr".to_owned()])?;
        let dsr_ingress = lab.host("wrk1")?.addr;
        let client = lab.add_client("client", CLIENT)?;
        let routers = Balancer::ALL.iter().map(|b| Router::build(lab, &client, *b)).collect::<Result<Vec<_>>>()?;
        let local = lab.add_workload("mgr1", "web1", Ipv4Addr::new(10, 78, 0, 11), 16, DEFAULT_OVERLAY_MTU)?;
        let remote = lab.add_workload("wrk1", "web2", Ipv4Addr::new(10, 78, 0, 12), 16, DEFAULT_OVERLAY_MTU)?;
        let vip_client = lab.add_workload("mgr1", "vc", Ipv4Addr::new(10, 78, 0, 2), 16, DEFAULT_OVERLAY_MTU)?;
        let dsr_backend = lab.add_workload("mgr1", "web3", Ipv4Addr::new(10, 78, 0, 13), 16, DEFAULT_OVERLAY_MTU)?;
        let cgroup = lab.host("mgr1")?.cgroup.clone().context("this machine has no cgroup2 mount")?;
        let base = overlay_spec("bench", 4097, "10.78.0.0/16", &[&local, &remote, &vip_client, &dsr_backend])?;
        lab.apply_dataplane(&base)?;
        let dir = Path::new(shoal_lab::STATE_ROOT).join(LAB);
        let mut servers = vec![
            http::start_nginx(&local.netns, &dir)?,
            http::start_nginx(&remote.netns, &dir)?,
            http::start_nginx(&dsr_backend.netns, &dir)?,
        ];
        for router in &routers {
            servers.push(http::start_nginx(&router.backend, &dir)?);
        }
        Ok(Rig {
            client,
            dsr_ingress,
            routers,
            local,
            dsr_backend,
            remote,
            vip_client,
            cgroup,
            base,
            _servers: servers,
        })
    }

    /// Programs `services` services into shoal (on mgr1, timed, from a state without
    /// services) and into each router, `runs` times; leaves everything programmed. Returns
    /// the times in `load_times` row order.
    fn program(&self, lab: &Lab, services: usize, runs: usize) -> Result<Vec<Vec<Duration>>> {
        let spec = self.spec(services);
        let mgr1 = lab.host("mgr1")?;
        // shoal, then every router but the direct one.
        let mut times = vec![Vec::new(); self.routers.len()];
        for run in 1..=runs {
            put(mgr1, &self.base)?;
            let started = Instant::now();
            put(mgr1, &spec)?;
            times[0].push(started.elapsed());
            for (i, router) in self.routers.iter().filter(|r| r.balancer != Balancer::Direct).enumerate() {
                times[i + 1].push(router.program(services)?);
            }
            let line: Vec<String> = times.iter().map(|t| format!("{:.2}s", t[run - 1].as_secs_f64())).collect();
            eprintln!("  run {run}/{runs}: shoal, nftables, iptables-legacy, iptables-nft: {}", line.join(", "));
        }
        put(lab.host("wrk1")?, &spec)?;
        Ok(times)
    }

    /// The measured services and `services - 1` others, each with a VIP and a published port.
    fn spec(&self, services: usize) -> DataplaneSpec {
        let service = |name: String, vip: Ipv4Addr, backends: Vec<Ipv4Addr>, published: Option<u16>| ServiceVip {
            name,
            network: "bench".into(),
            vip,
            ports: vec![ServicePort { protocol: Protocol::Tcp, port: 80, target_port: 80 }],
            backends,
            draining: vec![],
            dnsrr: false,
            published: published
                .map(|port| PublishedPort {
                    protocol: Protocol::Tcp,
                    published_port: port,
                    target_port: 80,
                    publish_mode: PublishMode::Ingress,
                })
                .into_iter()
                .collect(),
        };
        let both = vec![self.local.addr, self.remote.addr];
        let mut spec = self.base.clone();
        spec.services = vec![
            service("local".into(), Ipv4Addr::new(10, 78, 1, 1), vec![self.local.addr], Some(MESH_LOCAL_PORT)),
            service("remote".into(), Ipv4Addr::new(10, 78, 1, 2), vec![self.remote.addr], Some(MESH_REMOTE_PORT)),
            service("dsr".into(), Ipv4Addr::new(10, 78, 1, 5), vec![self.dsr_backend.addr], Some(MESH_DSR_PORT)),
            service("viplocal".into(), VIP_LOCAL, vec![self.local.addr], None),
            service("vipremote".into(), VIP_REMOTE, vec![self.remote.addr], None),
        ];
        for i in 0..services - 1 {
            let vip = Ipv4Addr::new(10, 78, 10 + (i / 250) as u8, (i % 250 + 1) as u8);
            spec.services.push(service(format!("svc{i}"), vip, both.clone(), Some(FILLER_PORTS + i as u16)));
        }
        spec
    }

    /// What wrk runs against at this scale, in report order; the first is the baseline.
    fn targets(&self, services: usize) -> Vec<Target> {
        let from_client =
            |path: &'static str, url: String| Target { path, netns: self.client.clone(), cgroup: None, url };
        let mut targets = vec![
            from_client("direct", format!("http://{}/", self.routers[0].backend_addr())),
            from_client("mesh, local backend", format!("http://10.77.1.1:{MESH_LOCAL_PORT}/")),
            from_client("mesh, remote backend", format!("http://10.77.1.1:{MESH_REMOTE_PORT}/")),
            // Through wrk1 to the backend on mgr1: remote, answered by direct server return.
            from_client("mesh, remote backend, DSR", format!("http://{}:{MESH_DSR_PORT}/", self.dsr_ingress)),
            self.in_workload("VIP, socket LB, local backend", true, VIP_LOCAL),
            self.in_workload("VIP, socket LB, remote backend", true, VIP_REMOTE),
            self.in_workload("VIP, TC path, remote backend", false, VIP_REMOTE),
        ];
        for router in &self.routers[1..] {
            // The last service: the worst case for rule lists walked in order.
            let url = format!("http://{}/", router.service_addr(services - 1));
            targets.push(from_client(router.balancer.name(), url));
        }
        targets
    }
}

impl Rig {
    /// wrk in the VIP client workload, in the workloads' cgroup (socket LB) or outside it.
    fn in_workload(&self, path: &'static str, in_cgroup: bool, vip: Ipv4Addr) -> Target {
        Target {
            path,
            netns: self.vip_client.netns.clone(),
            cgroup: in_cgroup.then(|| self.cgroup.clone()),
            url: format!("http://{vip}/"),
        }
    }
}

/// Where one wrk runs and what it asks for.
struct Target {
    path: &'static str,
    netns: String,
    cgroup: Option<PathBuf>,
    url: String,
}

impl Target {
    fn wrk(&self, mode: Mode, seconds: u32) -> Result<http::Sample> {
        let argv = http::wrk_argv(&self.url, mode, seconds);
        let command = match &self.cgroup {
            Some(cgroup) => shoal_lab::cgroup_command(cgroup, &self.netns, &argv),
            None => shoal_lab::netns_command(&self.netns, &argv),
        };
        http::run_wrk(command).with_context(|| format!("{} ({})", self.path, self.url))
    }
}

fn warm_up(targets: &[Target]) -> Result<()> {
    for target in targets {
        target.wrk(Mode::KeepAlive, 1)?;
    }
    Ok(())
}

/// `runs` rounds; each round runs every target once, so ratios compare neighbours in time.
fn measure(targets: &[Target], services: usize, mode: Mode, options: &Options) -> Result<Vec<HttpRow>> {
    let mut rows: Vec<HttpRow> = targets.iter().map(|t| HttpRow { path: t.path, samples: Vec::new() }).collect();
    for round in 1..=options.runs {
        let mut line = Vec::new();
        for (target, row) in targets.iter().zip(rows.iter_mut()) {
            let sample = target.wrk(mode, options.seconds)?;
            line.push(format!("{} {:.1}k", target.path, sample.per_second / 1000.0));
            row.samples.push(sample);
        }
        eprintln!("  {services} services, {mode:?}, round {round}/{}: {}", options.runs, line.join(", "));
    }
    Ok(rows)
}

fn put(host: &shoal_lab::Host, spec: &DataplaneSpec) -> Result<()> {
    let response = host.api().put_json("/shoal/v1/dataplane", spec)?;
    if response.status != 200 {
        bail!("{}: dataplane refused ({}): {}", host.name, response.status, response.text());
    }
    Ok(())
}

fn program_costs(bin_dir: &Path, rounds: usize) -> Result<Vec<CostRow>> {
    let out = Command::new(bin_dir.join("shoal-bpf-cost"))
        .args(["--repeat", "1000000", "--rounds", &rounds.to_string()])
        .output()
        .context("running shoal-bpf-cost")?;
    if !out.status.success() {
        bail!("shoal-bpf-cost failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let costs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    costs
        .iter()
        .map(|c| {
            Ok(CostRow {
                program: c["program"].as_str().context("program")?.to_owned(),
                kind: c["kind"].as_str().context("kind")?.to_owned(),
                case: c["case"].as_str().context("case")?.to_owned(),
                rounds_ns: c["rounds_ns"].as_array().context("rounds")?.iter().filter_map(|v| v.as_f64()).collect(),
            })
        })
        .collect()
}

fn render(
    options: &Options,
    scales: &[HttpScale],
    load_times: &[ProgramRow],
    changes: &str,
    costs: &[CostRow],
    throughput: &str,
) -> String {
    let mut out = format!(
        "# Data plane benchmarks\n\n\
         Written by `cargo xtask bench net` (release build) in one run on one lab, on one 2-core VM;\n\
         {runs} runs of everything, min / median / max. Ratios to the direct path are taken run by run:\n\
         each round runs every path once, one after the other.\n\n\
         **The lab.** Hosts mgr1 and wrk1 run shoald (network namespaces on a bridge). A client\n\
         namespace on the same bridge runs wrk (`-t1 -c32`, {secs} s per run, `--latency`); every backend is\n\
         nginx with one worker answering `GET /` with 3 bytes, and every path ends in one such worker.\n\
         Four more namespaces on the bridge are plain routers, each with a backend namespace of its own\n\
         behind it holding two endpoint addresses: one without rules (**direct**: the client addresses\n\
         an endpoint, routed, no load balancing, no conntrack), one with kube-proxy's\n\
         nftables rules (service verdict map, a chain per service, `numgen random`), and two with\n\
         kube-proxy's iptables rules (a rule per service in `KUBE-SERVICES`, `statistic random`;\n\
         Docker's shape too) loaded by `iptables-legacy-restore` and `iptables-nft-restore`; wrk asks for\n\
         the last service, the worst case for rules walked in order. **shoal's mesh**: the client\n\
         connects to mgr1's published port; the backend is on mgr1 (local) or wrk1 (remote, over\n\
         VXLAN, replies back through mgr1); **with DSR** it connects to wrk1's (started with\n\
         `--mesh-dsr`), whose backend (one of its own) is on mgr1, which answers the client itself. **shoal's VIP**: a workload on mgr1 connects to a service VIP whose backend is on mgr1\n\
         or on wrk1, as a process in the workloads' cgroup (socket LB) and outside it (per-packet TC\n\
         path, conntrack and reverse NAT in BPF).\n\
         At each scale shoal holds the measured services plus N - 1 others, each with a VIP and a\n\
         published port (so 10,000 services mean ~20,000 Maglev tables); the routers hold N services.\n\n\
         ![requests and connections per second](net.svg)\n\n\
         ## Every path against the direct one (median of the per-round ratios)\n\n{summary}\n",
        runs = options.runs,
        secs = options.seconds,
        summary = report::ratio_summary(scales),
    );
    for scale in scales {
        out.push_str(&format!(
            "## {} services: HTTP keep-alive\n\n{}\n## {} services: new connections (`Connection: close`)\n\n{}\n",
            scale.services,
            report::http_table(scale, Mode::KeepAlive),
            scale.services,
            report::http_table(scale, Mode::NewConnections)
        ));
    }
    out.push_str(&format!(
        "## Time to program the services\n\n\
         shoal: a `PUT /shoal/v1/dataplane` of the whole state to mgr1's shoald, from a state without\n\
         services, until it answers (validated, planned, maps written, state fsynced). Routers: the\n\
         restore tool loading the whole rule set in one transaction.\n\n{}\n{changes}\n\
         ## Per-packet cost of each BPF program\n\n\
         `shoal-bpf-cost`: the programs on a testbed network, {} rounds; each figure is the median of\n\
         20,000 single `BPF_PROG_TEST_RUN`s on a fresh packet less the timing overhead of a single run\n\
         (repeat mode would run later iterations on the packet the first one rewrote). The testbed\n\
         has an underlay of its own (a veth in a namespace of its own, the next hops' MACs known),\n\
         so the programs encapsulate VXLAN themselves and replies find their way out, as on a node;\n\
         the kernel's work after a redirect is not in these figures. The cgroup socket hooks cannot\n\
         be test-run.\n\n{}\n{throughput}",
        report::program_table(load_times),
        options.runs,
        report::cost_table(costs),
    ));
    out.push_str(
        "\n## Targets\n\n\
         Local paths >= 0.95 x direct; remote paths >= 0.9 x direct on keep-alive and >= 0.75 x on new\n\
         connections (the mesh with DSR); every path flat from 1 to 10k services; 10k services\n\
         programmed in <= 1 s; overlay TCP >= 0.9 x underlay; per packet, the NAT paths at most 1.5 x\n\
         plain forwarding above the empty program. Reference measured by hand on this machine kind (wrk -c32, median of 5): direct\n\
         118k keep-alive req/s and 15.9k new conn/s; nftables 0.83x and 0.81x of that, flat in\n\
         services, but 38-66 s to load 10k services; iptables-nft new connections fall to 0.18x at\n\
         10k services. The tables above are what this run measured, against those targets.\n",
    );
    out
}
