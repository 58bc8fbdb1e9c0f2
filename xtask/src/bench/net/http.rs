//! The HTTP load: nginx as every backend (one worker, a tiny fixed answer, no logging) and
//! wrk as every client, with wrk's figures parsed.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::server::NetnsServer;

/// wrk's connections, as in the reference measurement (`wrk -c32`).
const CONNECTIONS: &str = "32";

/// Installs nginx if missing, without letting the package start it on the machine (the
/// image's `policy-rc.d` already forbids service starts; one is put in place if absent).
pub fn ensure_nginx() -> Result<()> {
    if Path::new("/usr/sbin/nginx").exists() {
        return Ok(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = if policy.exists() {
        false
    } else {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        true
    };
    eprintln!("bench: installing nginx (the HTTP backends)");
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    if !installed?.success() {
        bail!("apt-get install nginx failed");
    }
    Ok(())
}

/// nginx serving `GET /` with a 3-byte answer on port 80 inside `netns`; ended (by PID) when
/// dropped. Its files live in `dir`, which the lab removes.
pub fn start_nginx(netns: &str, dir: &Path) -> Result<NetnsServer> {
    let prefix: PathBuf = dir.join(format!("nginx-{netns}"));
    std::fs::create_dir_all(&prefix)?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 600s;\n\
                 \x20 server {{ listen 80 backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            pid = prefix.join("nginx.pid").display(),
            err = prefix.join("error.log").display(),
        ),
    )?;
    let argv =
        [OsStr::new("/usr/sbin/nginx"), OsStr::new("-p"), prefix.as_os_str(), OsStr::new("-c"), conf.as_os_str()];
    NetnsServer::start(netns, &argv, Duration::from_millis(200))
}

/// How wrk's connections behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One connection per client slot for the whole run: requests per second.
    KeepAlive,
    /// `Connection: close`: every request on a new connection: connections per second.
    NewConnections,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub per_second: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Socket errors wrk counted (connect, read, write, timeout).
    pub errors: u64,
}

/// The argv of a wrk run against `url` for `seconds`.
pub fn wrk_argv(url: &str, mode: Mode, seconds: u32) -> Vec<String> {
    let mut argv: Vec<String> = ["wrk", "-t1", "-c", CONNECTIONS, "--latency", "-d"].map(String::from).to_vec();
    argv.push(format!("{seconds}s"));
    if mode == Mode::NewConnections {
        argv.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    argv.push(url.to_owned());
    argv
}

/// Runs a prepared wrk command and reads its figures; a run with socket errors beyond
/// wrk's own closing of connections, or without a single answer, fails.
pub fn run_wrk(mut command: Command) -> Result<Sample> {
    let out = command.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Result<Sample> {
    let mut sample = Sample::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            sample.per_second = rest.trim().parse().context("Requests/sec")?;
        } else if let Some(rest) = line.strip_prefix("50%") {
            sample.p50_us = micros(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            sample.p99_us = micros(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            sample.errors =
                rest.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum();
        } else if line.starts_with("Non-2xx") {
            bail!("wrk saw failed requests: {text}");
        }
    }
    if sample.per_second == 0.0 {
        bail!("wrk measured nothing: {text}");
    }
    Ok(sample)
}

/// `1.23ms`, `456.00us`, `1.00s` -> microseconds.
fn micros(value: &str) -> Result<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic()).context("latency without a unit")?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().context("latency")?;
    Ok(match unit {
        "us" => number,
        "ms" => number * 1e3,
        "s" => number * 1e6,
        other => bail!("latency unit {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrks_report() {
        let text = "Running 2s test @ http://10.81.1.2/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  251.00us\n     75%  300.00us\n     90%  400.00us\n     99%    1.20ms\n  200000 requests in 2.00s, 30.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 5\nRequests/sec: 100000.50\nTransfer/sec:     15.00MB\n";
        let s = parse_wrk(text).unwrap();
        assert_eq!((s.per_second, s.p50_us, s.p99_us, s.errors), (100000.5, 251.0, 1200.0, 7));
    }
}
