//! `down`: removes everything a lab made, found by its name prefix, so it also cleans up
//! after a crash or a killed test. Idempotent.

use std::{
    fs::{File, OpenOptions},
    path::Path,
    time::Duration,
};

use anyhow::Result;
use nix::fcntl::{Flock, FlockArg};

use crate::{
    cmd::{run, run_ok},
    netns::{switch_netns, BPFFS, BPFFS_MARKER},
    shoald::stop_pid,
    BPF_ROOT, STATE_ROOT,
};

/// Files the kernel itself shows in every bpffs mount (the preloaded iterators).
const KERNEL_BPFFS_FILES: &[&str] = &["maps.debug", "progs.debug"];

/// Tears down lab `name`: processes in its namespaces, the namespaces (and with them every
/// link inside), its pinned maps and its state directory.
pub fn down(name: &str) -> Result<()> {
    crate::check_name(name)?;
    let _lock = lock()?;
    down_locked(name)
}

/// Serialises `up` and `down` of all labs on this machine, so one lab's teardown never
/// unmounts bpffs or removes shared directories while another is being built.
pub(crate) fn lock() -> Result<Flock<File>> {
    std::fs::create_dir_all(STATE_ROOT)?;
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(Path::new(STATE_ROOT).join("lock"))?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| anyhow::anyhow!("locking {STATE_ROOT}/lock: {e}"))
}

pub(crate) fn down_locked(name: &str) -> Result<()> {
    let prefix = format!("{name}-");
    let listing = run_ok(&["ip", "netns", "list"])?;
    let namespaces: Vec<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    // Every process inside a lab namespace was started by the lab (shoald, workload servers).
    for ns in &namespaces {
        let pids = run(&["ip", "netns", "pids", ns])?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                if !stop_pid(pid, Duration::from_secs(5)) {
                    eprintln!("lab {name}: pid {pid} in {ns} survived SIGKILL; its namespace goes when it exits");
                }
            }
        }
    }
    // Hosts before the switch, so no veth end is left dangling in between.
    let switch = switch_netns(name);
    for ns in namespaces.iter().filter(|ns| **ns != switch).chain(namespaces.iter().filter(|ns| **ns == switch)) {
        run_ok(&["ip", "netns", "del", ns])?;
    }
    remove_dir_all_if_present(&Path::new(BPF_ROOT).join(name))?;
    crate::cgroups::remove(name)?;
    remove_dir_all_if_present(&Path::new(STATE_ROOT).join(name))?;
    release_shared(Path::new(STATE_ROOT))?;
    Ok(())
}

/// Once no lab is left: removes the shared bpffs directory, and unmounts bpffs if the lab
/// mounted it and nothing else is pinned there. The state root itself stays (it holds the
/// lock).
fn release_shared(state_root: &Path) -> Result<()> {
    let is_empty = |p: &Path| {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter_map(Result::ok).all(|e| KERNEL_BPFFS_FILES.contains(&e.file_name().to_string_lossy().as_ref()))
            })
            .unwrap_or(false)
    };
    if is_empty(Path::new(BPF_ROOT)) {
        std::fs::remove_dir(BPF_ROOT)?;
    }
    let labs_left =
        std::fs::read_dir(state_root).map(|d| d.filter_map(Result::ok).any(|e| e.path().is_dir())).unwrap_or(false);
    if labs_left {
        return Ok(());
    }
    let marker = state_root.join(BPFFS_MARKER);
    if marker.exists() && is_empty(Path::new(BPFFS)) {
        run_ok(&["umount", BPFFS])?;
        std::fs::remove_file(marker)?;
    }
    Ok(())
}

fn remove_dir_all_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
