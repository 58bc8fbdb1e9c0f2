//! Data-plane benchmark, first part: TCP throughput over the overlay (workload to workload
//! on two hosts, through shoal's programs and VXLAN) against the underlay it rides on (host
//! to host), alternating in one run. The load-balancing comparisons (direct vs mesh vs VIP
//! vs nftables vs iptables) and per-program costs come with the routing mesh.

use std::{process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use shoal_api::dataplane::DEFAULT_OVERLAY_MTU;
use shoal_lab::{overlay_spec, Lab, LabConfig};

use crate::workspace;

const LAB: &str = "benchnet";
const IPERF_PORT: &str = "5201";

pub fn run(runs: usize, seconds: u32) -> Result<()> {
    workspace::build()?;
    let lab =
        Lab::up(&LabConfig { managers: 1, workers: 1, swarm: false, ..LabConfig::new(LAB, workspace::bin_dir()) })?
            .teardown_on_drop();
    let a = lab.add_workload("mgr1", "a", "10.78.0.2".parse()?, 24, DEFAULT_OVERLAY_MTU)?;
    let b = lab.add_workload("wrk1", "b", "10.78.0.3".parse()?, 24, DEFAULT_OVERLAY_MTU)?;
    lab.apply_dataplane(&overlay_spec("bench", 4097, "10.78.0.0/24", &[&a, &b])?)?;
    let wrk1 = lab.host("wrk1")?;
    let mgr1 = lab.host("mgr1")?;
    let _overlay_server = Server::start(&b.netns)?;
    let _underlay_server = Server::start(&wrk1.netns)?;

    let (mut overlay, mut underlay) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let o = iperf(&a.netns, &b.addr.to_string(), seconds)?;
        let u = iperf(&mgr1.netns, &wrk1.addr.to_string(), seconds)?;
        eprintln!("  run {run}: overlay {o:.2} Gbit/s, underlay {u:.2} Gbit/s");
        overlay.push(o);
        underlay.push(u);
    }
    let report = report(&overlay, &underlay, seconds);
    let path = workspace::root().join("docs/benchmarks/net-throughput.md");
    std::fs::create_dir_all(path.parent().context("docs dir")?)?;
    std::fs::write(&path, &report)?;
    println!("{report}");
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// An iperf3 server in a namespace, ended (by PID) when dropped.
struct Server(std::process::Child);

impl Server {
    fn start(netns: &str) -> Result<Server> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "iperf3", "-s", "-p", IPERF_PORT])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("iperf3 (cargo xtask bootstrap installs it)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Server(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from `netns` to `server`: receiver throughput in Gbit/s.
fn iperf(netns: &str, server: &str, seconds: u32) -> Result<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", "iperf3", "-J", "-c", server, "-p", IPERF_PORT, "-t", &seconds.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("iperf3 to {server} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("no throughput in iperf3's report")?;
    Ok(bps / 1e9)
}

fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn report(overlay: &[f64], underlay: &[f64], seconds: u32) -> String {
    let (omin, omed, omax) = spread(overlay);
    let (umin, umed, umax) = spread(underlay);
    let ratios: Vec<f64> = overlay.iter().zip(underlay).map(|(o, u)| o / u).collect();
    let (rmin, rmed, rmax) = spread(&ratios);
    format!(
        "# Overlay vs underlay TCP throughput\n\n\
         Measured by `cargo xtask bench net` in one run: iperf3 ({seconds} s per run, one stream) from a\n\
         workload on mgr1 to a workload on wrk1 over shoal's overlay (from_workload -> VXLAN ->\n\
         from_overlay, MTU 1450), alternating with host to host over the same lab underlay (veths\n\
         and a bridge, MTU 1500), {} runs each, on one 2-core VM.\n\n\
         | path | min Gbit/s | median Gbit/s | max Gbit/s |\n\
         |---|---|---|---|\n\
         | overlay (workload -> workload) | {omin:.2} | {omed:.2} | {omax:.2} |\n\
         | underlay (host -> host) | {umin:.2} | {umed:.2} | {umax:.2} |\n\
         | overlay / underlay, same run | {rmin:.2} | {rmed:.2} | {rmax:.2} |\n\n\
         Target: overlay >= 0.9 x underlay. Reference measured by hand on this machine kind: plain\n\
         kernel VXLAN gives 0.79 x of its underlay.\n",
        overlay.len()
    )
}
