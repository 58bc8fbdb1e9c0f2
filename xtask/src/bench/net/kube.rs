//! The comparison points: plain routers on the lab underlay, each with a backend of its own
//! behind it, and the service load balancing of kube-proxy's nftables mode (a service
//! verdict map, a chain per service, `numgen random`) and of its iptables mode, which is also
//! Docker's shape (a rule per service, `statistic random`), programmed with
//! `iptables-legacy` or `iptables-nft`. One router has no rules: the direct baseline.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use shoal_lab::{run_ok, Lab};

/// How a router balances its services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    /// No rules, no conntrack: packets are routed to a backend's own address.
    Direct,
    Nftables,
    IptablesLegacy,
    IptablesNft,
}

impl Balancer {
    pub const ALL: [Balancer; 4] =
        [Balancer::Direct, Balancer::Nftables, Balancer::IptablesLegacy, Balancer::IptablesNft];

    /// Index 1..=4: the router's address and its subnets are numbered by it.
    fn index(self) -> u8 {
        self as u8 + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Balancer::Direct => "direct",
            Balancer::Nftables => "nftables",
            Balancer::IptablesLegacy => "iptables-legacy",
            Balancer::IptablesNft => "iptables-nft",
        }
    }
}

/// A router namespace on the lab switch with a backend namespace behind it that holds both
/// of the services' endpoint addresses (`a` and `b`) and runs one nginx for them: every
/// path of the benchmark ends in the same single nginx worker, however many endpoints its
/// balancer spreads over.
pub struct Router {
    pub balancer: Balancer,
    pub netns: String,
    pub backend: String,
}

impl Router {
    /// Builds the router for `balancer` and routes the client's traffic for its backends and
    /// services through it.
    pub fn build(lab: &Lab, client: &str, balancer: Balancer) -> Result<Router> {
        let k = balancer.index();
        let netns = lab.add_client(&format!("router{k}"), Ipv4Addr::new(10, 77, 4, k))?;
        let in_router = format!("--net=/run/netns/{netns}");
        run_ok(&["nsenter", &in_router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        let backend = format!("{netns}backend");
        run_ok(&["ip", "netns", "add", &backend])?;
        run_ok(&["ip", "-n", &backend, "link", "set", "lo", "up"])?;
        run_ok(&[
            "ip", "-n", &netns, "link", "add", "backend", "type", "veth", "peer", "name", "eth0", "netns", &backend,
        ])?;
        run_ok(&["ip", "-n", &netns, "addr", "add", &format!("10.{}.1.1/24", 80 + k), "dev", "backend"])?;
        run_ok(&["ip", "-n", &netns, "link", "set", "backend", "up"])?;
        for endpoint in ENDPOINTS {
            run_ok(&["ip", "-n", &backend, "addr", "add", &format!("10.{}.1.{endpoint}/24", 80 + k), "dev", "eth0"])?;
        }
        run_ok(&["ip", "-n", &backend, "link", "set", "eth0", "up"])?;
        run_ok(&["ip", "-n", &backend, "route", "add", "default", "via", &format!("10.{}.1.1", 80 + k)])?;
        let via = format!("10.77.4.{k}");
        for net in [80 + k, 90 + k] {
            run_ok(&["ip", "-n", client, "route", "add", &format!("10.{net}.0.0/16"), "via", &via])?;
        }
        Ok(Router { balancer, netns, backend })
    }

    /// Endpoint `a`'s address: where the direct path goes.
    pub fn backend_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 80 + self.balancer.index(), 1, ENDPOINTS[0])
    }

    /// The address of service `i` (of this router's services).
    pub fn service_addr(&self, i: usize) -> Ipv4Addr {
        service_addr(self.balancer.index(), i)
    }

    /// Replaces the router's rules with `services` services; returns the time the tool took
    /// to load them. The direct router takes none.
    pub fn program(&self, services: usize) -> Result<Duration> {
        let k = self.balancer.index();
        let (tool, script): (&[&str], String) = match self.balancer {
            Balancer::Direct => return Ok(Duration::ZERO),
            Balancer::Nftables => (&["nft", "-f", "-"], nftables(k, services)),
            Balancer::IptablesLegacy => (&["iptables-legacy-restore"], iptables(k, services)),
            Balancer::IptablesNft => (&["iptables-nft-restore"], iptables(k, services)),
        };
        let started = Instant::now();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .args(tool)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", tool[0]))?;
        child.stdin.take().context("stdin")?.write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!("{} failed: {}", tool[0], String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    }
}

/// Last octets of the two endpoint addresses of every service (10.(80+k).1.x).
const ENDPOINTS: [u8; 2] = [2, 3];

/// Service `i` of router `k`: 10.(90+k).x.y, 250 to a /24.
fn service_addr(k: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 90 + k, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// kube-proxy's nftables mode for `services` services of router `k`, each balanced over the
/// router's two backends, replacing the table in one transaction.
pub fn nftables(k: u8, services: usize) -> String {
    let mut s = String::from("table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n");
    s.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if services > 0 {
        s.push_str("    elements = {\n");
        for i in 0..services {
            let _ = writeln!(s, "      {} . tcp . 80 : goto service-{i},", service_addr(k, i));
        }
        s.push_str("    }\n");
    }
    s.push_str("  }\n");
    s.push_str(
        "  chain nat-prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @service-ips\n  }\n",
    );
    for i in 0..services {
        let _ = writeln!(
            s,
            "  chain service-{i} {{\n    numgen random mod 2 vmap {{ 0 : goto endpoint-{i}-a, 1 : goto endpoint-{i}-b }}\n  }}"
        );
        for (side, n) in [("a", ENDPOINTS[0]), ("b", ENDPOINTS[1])] {
            let _ = writeln!(
                s,
                "  chain endpoint-{i}-{side} {{\n    meta l4proto tcp dnat to 10.{}.1.{n}:80\n  }}",
                80 + k
            );
        }
    }
    s.push_str("}\n");
    s
}

/// kube-proxy's iptables mode (Docker's rule-per-service shape) for `services` services of
/// router `k`, as an `iptables-restore` file replacing the nat table.
pub fn iptables(k: u8, services: usize) -> String {
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    s.push_str(":POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..services {
        let _ = writeln!(s, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i}-A - [0:0]\n:KUBE-SEP-{i}-B - [0:0]");
    }
    s.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 0..services {
        let _ = writeln!(s, "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}", service_addr(k, i));
    }
    for i in 0..services {
        let _ = writeln!(
            s,
            "-A KUBE-SVC-{i} -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-{i}-A\n\
             -A KUBE-SVC-{i} -j KUBE-SEP-{i}-B"
        );
        for (side, n) in [("A", ENDPOINTS[0]), ("B", ENDPOINTS[1])] {
            let _ = writeln!(s, "-A KUBE-SEP-{i}-{side} -p tcp -m tcp -j DNAT --to-destination 10.{}.1.{n}:80", 80 + k);
        }
    }
    s.push_str("COMMIT\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_every_service_and_both_backends() {
        let nft = nftables(2, 3);
        assert!(nft.contains("10.92.0.3 . tcp . 80 : goto service-2,"));
        assert!(nft.contains("dnat to 10.82.1.3:80"));
        let ipt = iptables(3, 251);
        assert!(ipt.contains("-A KUBE-SERVICES -d 10.93.1.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-250"));
        assert_eq!(ipt.matches("statistic").count(), 251);
    }
}
