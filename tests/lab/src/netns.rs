//! Namespaces and links of the lab: the switch, the hosts, and running code inside them.

use std::{fs::File, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{cmd::run_ok, Host, UNDERLAY_PREFIX};

/// Name of the bridge inside the switch namespace.
const BRIDGE: &str = "br0";
/// Marker left in the state root when the lab mounted bpffs itself (so `down` unmounts it).
pub const BPFFS_MARKER: &str = "bpffs-mounted-by-lab";
pub const BPFFS: &str = "/sys/fs/bpf";

pub fn switch_netns(lab: &str) -> String {
    format!("{lab}-switch")
}

/// Mounts bpffs where shoald pins maps, if the machine has not (no systemd here to do it).
/// `shoald` runs under `nsenter --net`, in the machine's mount namespace, so its pins are
/// visible to `down` (`ip netns exec` would give it a private /sys).
pub fn ensure_bpffs(state_root: &Path) -> Result<()> {
    let fs_type = run_ok(&["stat", "-f", "-c", "%T", BPFFS])?;
    if fs_type.trim() != "bpf_fs" {
        run_ok(&["mount", "-t", "bpf", "bpf", BPFFS])?;
        std::fs::create_dir_all(state_root)?;
        std::fs::write(state_root.join(BPFFS_MARKER), b"")?;
    }
    Ok(())
}

pub fn create_switch(lab: &str) -> Result<()> {
    let ns = switch_netns(lab);
    run_ok(&["ip", "netns", "add", &ns])?;
    run_ok(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    run_ok(&["ip", "-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
    run_ok(&["ip", "-n", &ns, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// A host namespace whose `eth0` is plugged into the switch as port `<host name>`.
pub fn create_host(lab: &str, host: &Host) -> Result<()> {
    create_plugged(lab, &host.netns, &host.name, host.addr)
}

/// A namespace `ns` whose `eth0`, at `addr` on the underlay, is plugged into the switch as
/// port `port`.
pub fn create_plugged(lab: &str, ns: &str, port: &str, addr: std::net::Ipv4Addr) -> Result<()> {
    let sw = switch_netns(lab);
    run_ok(&["ip", "netns", "add", ns])?;
    run_ok(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    run_ok(&["ip", "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
    run_ok(&["ip", "-n", &sw, "link", "set", port, "master", BRIDGE, "up"])?;
    let cidr = format!("{addr}/{UNDERLAY_PREFIX}");
    run_ok(&["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
    run_ok(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    Ok(())
}

/// `argv` to run inside network namespace `netns` only (the mount namespace stays the
/// machine's, unlike `ip netns exec`).
pub fn command(netns: &str, argv: &[String]) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{netns}")).arg("--").args(argv);
    command
}

/// Runs `f` on a thread that has joined network namespace `netns`: sockets it opens live
/// there. The thread ends with `f`, so the caller's namespace never changes.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("no namespace {netns}"))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}

/// nftables table (bridge family, in the switch namespace) that holds a partition.
const PARTITION_TABLE: &str = "shoal_partition";

/// Cuts the switch ports of `hosts` off from the other ports: frames between the two sides
/// are dropped by the switch, while each side still reaches itself. (This kernel has no
/// bridge VLAN filtering, so the cut is an nftables bridge-family rule.)
pub fn partition(lab: &str, hosts: &[&str]) -> Result<()> {
    let sw = switch_netns(lab);
    heal(lab)?;
    let ports = format!("{{ {} }}", hosts.join(", "));
    let ruleset = format!(
        "table bridge {PARTITION_TABLE} {{\n\
           chain forward {{\n\
             type filter hook forward priority 0; policy accept;\n\
             iifname {ports} oifname != {ports} drop\n\
             oifname {ports} iifname != {ports} drop\n\
           }}\n\
         }}\n"
    );
    crate::cmd::run_with_stdin(&["ip", "netns", "exec", &sw, "nft", "-f", "-"], &ruleset)?;
    Ok(())
}

/// Removes any partition.
pub fn heal(lab: &str) -> Result<()> {
    let sw = switch_netns(lab);
    // Absent table: nothing to heal.
    let _ = crate::cmd::run(&["ip", "netns", "exec", &sw, "nft", "delete", "table", "bridge", PARTITION_TABLE]);
    Ok(())
}
