//! Starting and stopping a host's `shoald`, by the PID the lab recorded when it started it.

use std::{
    fs::OpenOptions,
    os::unix::process::CommandExt,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag},
    },
    unistd::Pid,
};

use crate::{netns, Host, Lab, BPF_ROOT};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Starts shoald in `host`'s namespace and waits until its API answers.
pub fn start(lab: &Lab, host: &Host, extra: &[String]) -> Result<u32> {
    if let Some(pid) = running_pid(host) {
        bail!("{}: shoald is already running (pid {pid})", host.name);
    }
    std::fs::create_dir_all(&host.data_root)?;
    let log = OpenOptions::new().create(true).append(true).open(&host.log)?;
    let shoald = lab.bin_dir.join("shoald");
    let argv: Vec<String> = vec![
        shoald.display().to_string(),
        "--node-name".into(),
        host.name.clone(),
        "--advertise-addr".into(),
        host.addr.to_string(),
        "--data-root".into(),
        host.data_root.display().to_string(),
        "--socket".into(),
        host.socket.display().to_string(),
        "--bpf-root".into(),
        format!("{BPF_ROOT}/{}", lab.name),
    ];
    let cgroup = host.cgroup.iter().flat_map(|c| ["--workload-cgroup".to_owned(), c.display().to_string()]);
    let argv: Vec<String> = argv.into_iter().chain(cgroup).chain(extra.iter().cloned()).collect();
    let child = netns::command(&host.netns, &argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env("NO_COLOR", "1")
        // Its own process group: a Ctrl-C at the terminal that ran `lab up` must not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("{}: cannot start {}", host.name, shoald.display()))?;
    // nsenter execs shoald in place, so this is shoald's PID.
    let pid = child.id();
    std::fs::write(&host.pid_file, pid.to_string())?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !alive(pid) {
            bail!("{}: shoald exited during start-up; its log:\n{}", host.name, log_tail(host));
        }
        if host.api().get("/_ping").is_ok_and(|r| r.status == 200) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            stop_pid(pid, STOP_GRACE);
            bail!("{}: shoald did not answer within {READY_TIMEOUT:?}; its log:\n{}", host.name, log_tail(host));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL if it has not exited after a grace period.
pub fn stop(host: &Host) -> Result<()> {
    if let Some(pid) = running_pid(host) {
        if !stop_pid(pid, STOP_GRACE) {
            bail!("{}: shoald (pid {pid}) did not exit even after SIGKILL", host.name);
        }
    }
    let _ = std::fs::remove_file(&host.pid_file);
    Ok(())
}

/// Kills `host`'s shoald at once (SIGKILL: no shutdown, no flush, as a crash or power
/// loss of the process); keeps its data.
pub fn kill_now(host: &Host) -> Result<()> {
    if let Some(pid) = running_pid(host) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        if !wait_gone(pid, KILL_WAIT) {
            bail!("{}: shoald (pid {pid}) did not exit after SIGKILL", host.name);
        }
    }
    let _ = std::fs::remove_file(&host.pid_file);
    Ok(())
}

/// Ends a process the lab started: SIGTERM, then SIGKILL after `grace`. Returns whether it
/// is gone (a process stuck in the kernel may outlive even SIGKILL for a while).
pub fn stop_pid(pid: u32, grace: Duration) -> bool {
    let target = Pid::from_raw(pid as i32);
    let _ = kill(target, Signal::SIGTERM);
    if wait_gone(pid, grace) {
        return true;
    }
    let _ = kill(target, Signal::SIGKILL);
    wait_gone(pid, KILL_WAIT)
}

fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The PID in `host`'s pid file if that process is still a running shoald.
pub fn running_pid(host: &Host) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(&host.pid_file).ok()?.trim().parse().ok()?;
    // Guard against PID reuse: only a shoald counts.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "shoald" && alive(pid)).then_some(pid)
}

/// Whether `pid` exists and has not exited. Reaps it when it is our child and has exited, so
/// a test process does not collect zombies.
pub fn alive(pid: u32) -> bool {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn log_tail(host: &Host) -> String {
    let text = std::fs::read_to_string(&host.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
