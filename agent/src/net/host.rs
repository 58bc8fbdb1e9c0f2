//! The node's own stack as the overlay's way out (Docker's `docker_gwbridge`, without the
//! bridge): IP forwarding, masquerade of the overlay subnets to the node's address
//! (nftables), and on the way back a host route and a static neighbour to each local
//! workload, so replies reach it without the host ever ARPing into the workload.

use std::{io::Write, net::Ipv4Addr, process::Stdio};

use ipnet::Ipv4Net;

use crate::net::NetError;

/// nftables table that holds the masquerade rules (the whole table is ours).
const NAT_TABLE: &str = "shoal_nat";

/// Turns on IPv4 forwarding in this network namespace (as Docker does).
pub fn enable_forwarding() -> Result<(), NetError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(NetError::Io)
}

/// Makes the NAT table masquerade exactly `subnets`' traffic leaving them, and send DNS
/// queries to any of `gateways` to this node's DNS server at `dns`. The node's stack lets
/// into `subnets` only replies to the workloads' own connections: the way out must not be a
/// way from one network into another (Docker's `DOCKER-ISOLATION` chains).
pub fn sync_nat(
    subnets: &[Ipv4Net],
    gateways: &[Ipv4Addr],
    dns: Option<std::net::SocketAddrV4>,
) -> Result<(), NetError> {
    let rules: String = subnets.iter().map(|s| format!("    ip saddr {s} ip daddr != {s} masquerade\n")).collect();
    let dns_rules: String = match dns {
        Some(dns) => gateways.iter().map(|g| format!("    ip daddr {g} udp dport 53 dnat to {dns}\n")).collect(),
        None => String::new(),
    };
    let isolation = match subnets {
        [] => String::new(),
        _ => {
            let set = subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            // Untracked packets too: nothing but replies goes in.
            format!("    ip daddr {{ {set} }} ct state != {{ established, related }} drop\n")
        }
    };
    // Create-then-delete makes the delete safe when the table is absent; all in one
    // transaction, so the rules never disappear in between.
    let mut script = format!("table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\n");
    if !subnets.is_empty() || !dns_rules.is_empty() {
        script.push_str(&format!(
            "table ip {NAT_TABLE} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{dns_rules}  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{isolation}  }}\n}}\n"
        ));
    }
    nft(&script)
}

/// Removes the NAT table and the data path's notrack rules (a clean exit).
pub fn remove_host_rules() -> Result<(), NetError> {
    nft(&format!(
        "table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\ntable ip {RAW_TABLE}\ndelete table ip {RAW_TABLE}\n"
    ))
}

/// nftables table of the data path's notrack rules (the whole table is ours).
const RAW_TABLE: &str = "shoal_raw";

/// Keeps the overlay's own packets (VXLAN on UDP `port` to and from the node's address
/// `node`, in and out) out of connection tracking: every packet of every overlay flow would
/// otherwise be looked up, and its entries fill the table, on both nodes, for traffic the
/// node never NATs or filters. Only the node's own address: UDP to that port for anyone else
/// (a workload, through the node) stays tracked, so the isolation rules still see it.
pub fn untrack_data_path(port: u16, node: Ipv4Addr) -> Result<(), NetError> {
    let chain = |name: &str, hook: &str, match_addr: &str| {
        format!("  chain {name} {{\n    type filter hook {hook} priority raw; policy accept;\n    ip {match_addr} {node} udp dport {port} counter notrack\n  }}\n")
    };
    nft(&format!(
        "table ip {RAW_TABLE}\ndelete table ip {RAW_TABLE}\ntable ip {RAW_TABLE} {{\n{}{}}}\n",
        chain("prerouting", "prerouting", "daddr"),
        chain("output", "output", "saddr")
    ))
}

fn nft(script: &str) -> Result<(), NetError> {
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Host(format!("cannot run nft: {e}")))?;
    child.stdin.take().ok_or_else(|| NetError::Host("nft stdin".into()))?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NetError::Host(format!("nft: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// Keeps the ports published on this node out of its ephemeral range
/// (`ip_local_reserved_ports`, per network namespace): a connection the node itself opens
/// from a published port would have its replies taken by the mesh to a backend. Ports
/// reserved by someone else are left as they are.
#[derive(Debug, Default)]
pub struct ReservedLocalPorts {
    /// The ports this agent added (reserved by nobody before it).
    added: std::collections::BTreeSet<u16>,
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

impl ReservedLocalPorts {
    /// Makes the kernel reserve `published` as well as whatever others reserved.
    pub fn sync(&mut self, published: &std::collections::BTreeSet<u16>) -> Result<(), NetError> {
        let current = parse_port_list(&std::fs::read_to_string(RESERVED_PORTS)?)?;
        let others: std::collections::BTreeSet<u16> = current.difference(&self.added).copied().collect();
        let want: std::collections::BTreeSet<u16> = others.union(published).copied().collect();
        if want != current {
            std::fs::write(RESERVED_PORTS, format_port_list(&want))?;
        }
        self.added = published.difference(&others).copied().collect();
        Ok(())
    }
}

/// `8080,9000-9002` -> {8080, 9000, 9001, 9002}.
fn parse_port_list(text: &str) -> Result<std::collections::BTreeSet<u16>, NetError> {
    let bad = || NetError::Host(format!("{RESERVED_PORTS}: cannot read {:?}", text.trim()));
    let mut ports = std::collections::BTreeSet::new();
    for item in text.trim().split(',').filter(|s| !s.is_empty()) {
        let (first, last) = item.split_once('-').unwrap_or((item, item));
        let (first, last): (u16, u16) = (first.parse().map_err(|_| bad())?, last.parse().map_err(|_| bad())?);
        ports.extend(first..=last);
    }
    Ok(ports)
}

/// The kernel's list syntax, ranges folded.
fn format_port_list(ports: &std::collections::BTreeSet<u16>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut iter = ports.iter().copied().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last.wrapping_add(1))) && last != u16::MAX {
            last = iter.next().expect("peeked");
        }
        out.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
    }
    // An empty write clears the list; the kernel wants at least a newline.
    format!("{}\n", out.join(","))
}

/// A local workload as the host's stack must know it to send replies back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostRoute {
    pub addr: Ipv4Addr,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_read_and_write_as_the_kernel_does() {
        let ports = parse_port_list("8080,9000-9002\n").unwrap();
        assert_eq!(ports.iter().copied().collect::<Vec<_>>(), [8080, 9000, 9001, 9002]);
        assert_eq!(format_port_list(&ports), "8080,9000-9002\n");
        assert_eq!(format_port_list(&Default::default()), "\n");
        assert!(parse_port_list("\n").unwrap().is_empty());
        assert!(parse_port_list("80-x").is_err());
    }
}
