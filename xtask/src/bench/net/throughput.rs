//! TCP throughput over the overlay (workload to workload on two hosts, through shoal's
//! programs and VXLAN) against the underlay it rides on (host to host), alternating in one
//! run (iperf3, one stream).

use std::{net::Ipv4Addr, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use super::{report::spread, server::NetnsServer};

const IPERF_PORT: &str = "5201";

/// One path: iperf3 client in `from`, server in `to` at `addr`.
pub struct Path<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub addr: Ipv4Addr,
}

/// Gbit/s of each run, per path.
pub struct Throughput {
    pub overlay: Vec<f64>,
    pub underlay: Vec<f64>,
    pub seconds: u32,
}

pub fn measure(overlay: Path, underlay: Path, runs: usize, seconds: u32) -> Result<Throughput> {
    let iperf_server = ["iperf3", "-s", "-p", IPERF_PORT];
    let _overlay_server = NetnsServer::start(overlay.to, &iperf_server, Duration::from_millis(300))?;
    let _underlay_server = NetnsServer::start(underlay.to, &iperf_server, Duration::from_millis(300))?;
    let mut result = Throughput { overlay: Vec::new(), underlay: Vec::new(), seconds };
    for run in 1..=runs {
        let o = iperf(overlay.from, overlay.addr, seconds)?;
        let u = iperf(underlay.from, underlay.addr, seconds)?;
        eprintln!("  run {run}/{runs}: overlay {o:.2} Gbit/s, underlay {u:.2} Gbit/s");
        result.overlay.push(o);
        result.underlay.push(u);
    }
    Ok(result)
}

/// One iperf3 run from `netns` to `server`: receiver throughput in Gbit/s.
fn iperf(netns: &str, server: Ipv4Addr, seconds: u32) -> Result<f64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["--", "iperf3", "-J", "-c", &server.to_string(), "-p", IPERF_PORT, "-t", &seconds.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("iperf3 to {server} failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64().context("no throughput in iperf3's report")?;
    Ok(bps / 1e9)
}

impl Throughput {
    /// The report's section.
    pub fn section(&self) -> String {
        let (omin, omed, omax) = spread(&self.overlay);
        let (umin, umed, umax) = spread(&self.underlay);
        let ratios: Vec<f64> = self.overlay.iter().zip(&self.underlay).map(|(o, u)| o / u).collect();
        let (rmin, rmed, rmax) = spread(&ratios);
        format!(
            "## TCP throughput: overlay vs underlay\n\n\
             iperf3 ({} s per run, one stream) from a workload on mgr1 to a workload on wrk1 over\n\
             shoal's overlay (from_workload pushes VXLAN, from_underlay takes it off, MTU 1450), alternating with\n\
             host to host over the same lab underlay (veths and a bridge, MTU 1500), {} runs each.\n\n\
             | path | min Gbit/s | median Gbit/s | max Gbit/s |\n\
             |---|---|---|---|\n\
             | overlay (workload -> workload) | {omin:.2} | {omed:.2} | {omax:.2} |\n\
             | underlay (host -> host) | {umin:.2} | {umed:.2} | {umax:.2} |\n\
             | overlay / underlay, same run | {rmin:.2} | {rmed:.2} | {rmax:.2} |\n\n\
             Target: overlay >= 0.9 x underlay. Reference measured by hand on this machine kind: plain\n\
             kernel VXLAN gives 0.79 x of its underlay.\n",
            self.seconds,
            self.overlay.len()
        )
    }
}
