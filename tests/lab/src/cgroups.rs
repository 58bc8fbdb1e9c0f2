//! The lab's cgroups: one per host for its workloads' processes, under the machine's cgroup2
//! mount, so shoald's socket hooks see only lab workloads and never the machine's own
//! processes.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{cmd::run_ok, shoald::stop_pid};

/// Where this machine mounts cgroup2 (hybrid layout, no systemd).
const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn lab_root(lab: &str) -> PathBuf {
    Path::new(CGROUP2).join("shoal-lab").join(lab)
}

/// Makes `<cgroup2>/shoal-lab/<lab>/<host>`, or `None` when there is no cgroup2 mount.
pub fn create(lab: &str, host: &str) -> Result<Option<PathBuf>> {
    let fs_type = run_ok(&["stat", "-f", "-c", "%T", CGROUP2]).unwrap_or_default();
    if fs_type.trim() != "cgroup2fs" {
        return Ok(None);
    }
    let dir = lab_root(lab).join(host);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Some(dir))
}

/// Removes the lab's cgroups, ending any process still in them (they are the lab's).
pub fn remove(lab: &str) -> Result<()> {
    let root = lab_root(lab);
    let Ok(hosts) = std::fs::read_dir(&root) else { return Ok(()) };
    for host in hosts.filter_map(Result::ok) {
        let procs = std::fs::read_to_string(host.path().join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
            stop_pid(pid, Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir(host.path());
    }
    let _ = std::fs::remove_dir(&root);
    let _ = std::fs::remove_dir(root.parent().unwrap_or(&root));
    Ok(())
}

/// `argv` run in `cgroup` and inside network namespace `netns`: a workload process.
pub fn command(cgroup: &Path, netns: &str, argv: &[String]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && ns="$1" && shift 2 && exec nsenter --net="/run/netns/$ns" -- "$@""#)
        .arg(cgroup)
        .arg(netns)
        .arg("--")
        .args(argv);
    command
}
