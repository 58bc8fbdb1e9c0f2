//! The real programs loaded into a scratch pin directory with a small, known network in their
//! maps, run by the kernel on crafted packets (BPF_PROG_TEST_RUN): the setup of the
//! privileged program tests and of the per-program cost benchmark (`shoal-bpf-cost`).
//!
//! Under test_run a packet "arrives" on `lo` (ifindex 1), so `lo` plays the workload's
//! host-side veth (and, for the routing mesh, the underlay interface); redirect helpers only
//! record their target, so the verdict and the rewritten bytes are what can be checked.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
use serde::Serialize;
use shoal_common::{
    lb::{
        Backend, CtEntry, FlowKey, IngressEntry, IngressKey, MaglevLargeTable, MaglevTable, ServiceEntry, ServiceKey,
        MAGLEV_SLOTS, PROTO_TCP, PROTO_UDP,
    },
    maps,
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig, NodeEntry, GATEWAY_NODE, IFACE_OUTBOUND},
    stats::ENCAP_BY_DEVICE,
};

pub use super::packets::*;
use super::{Datapath, BPFFS, FROM_UNDERLAY, FROM_WORKLOAD};
use crate::net::{mirror::Plan, NetError};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const LO: u32 = 1;
pub const VNI: u32 = 4097;
pub const ROUTER_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0xfe];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 2];
/// The workload behind `lo`.
pub const CLIENT: [u8; 4] = [10, 78, 0, 2];
pub const REMOTE: [u8; 4] = [10, 78, 0, 3];
pub const REMOTE_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 3];
pub const LOCAL: [u8; 4] = [10, 78, 0, 4];
pub const LOCAL_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 4];
pub const LOCAL_VETH: u32 = 4242;
pub const LOCAL_VETH_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x04];
pub const VIP: [u8; 4] = [10, 78, 0, 100];
/// The network's gateway (after `set_outbound`).
pub const GATEWAY: [u8; 4] = [10, 78, 0, 1];
/// This node's underlay address.
pub const NODE: [u8; 4] = [10, 77, 0, 11];
/// A client outside the cluster (TEST-NET-1).
pub const OUTSIDE: [u8; 4] = [192, 0, 2, 10];
/// The published port of `with_published_port`.
pub const PUBLISHED: u16 = 8080;
/// The data path (VXLAN) port.
pub const DATA_PATH_PORT: u16 = 4789;
/// The node REMOTE runs on, one of the cluster's nodes.
pub const REMOTE_NODE: [u8; 4] = [10, 77, 2, 1];
/// Another of the cluster's nodes (running no endpoint here).
pub const OTHER_NODE: [u8; 4] = [10, 77, 2, 2];
/// The veth end that is the node's underlay interface after `with_underlay`, and its MAC.
pub const UNDERLAY: &str = "shoal_u0";
pub const UNDERLAY_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x0b];
/// REMOTE_NODE's MAC, and the underlay gateway's (10.77.0.1), as the neighbour table of
/// `with_underlay`'s namespace knows them.
pub const REMOTE_NODE_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0x02, 0x01];
pub const GATEWAY_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x01];
/// `from_overlay` with the tunnel key taken from the test's context (see the program).
pub const FROM_OVERLAY_TEST: &str = "from_overlay_test";
/// A TC program that does nothing: the floor of the per-packet costs.
pub const EMPTY_TC: &str = "empty_tc";

/// A datapath with its own pin directory, removed (with bpffs if we mounted it) on drop.
/// One at a time per process: one may have to mount bpffs and unmount it afterwards.
pub struct Testbed {
    _serial: std::sync::MutexGuard<'static, ()>,
    datapath: Option<Datapath>,
    pin_dir: PathBuf,
    mounted_bpffs: bool,
}

impl Testbed {
    /// `lo` is a workload interface (CLIENT) on VNI 4097, with one remote peer (REMOTE) and
    /// one local peer (LOCAL); the node's VXLAN device is `lo` too.
    pub fn new() -> Result<Testbed, NetError> {
        Testbed::with_pins(|_| Ok(()))
    }

    /// Like `new`, with `prepare` run on the pin directory (made, on bpffs) before the
    /// programs load: what an earlier version left pinned.
    pub fn with_pins(prepare: impl FnOnce(&Path) -> Result<(), NetError>) -> Result<Testbed, NetError> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mounted_bpffs = !statfs(Path::new(BPFFS)).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
        let pin_dir = PathBuf::from(format!("{BPFFS}/shoal-testbed-{}", std::process::id()));
        let mut testbed = Testbed { _serial: serial, datapath: None, pin_dir, mounted_bpffs };
        super::ensure_bpffs(&testbed.pin_dir)?;
        prepare(&testbed.pin_dir)?;
        let mut datapath = Datapath::load(&testbed.pin_dir)?;
        let key = |a: [u8; 4]| EndpointKey { vni: VNI, addr: u32::from_ne_bytes(a) };
        let plan = Plan {
            endpoints: [
                (
                    key(REMOTE),
                    EndpointEntry {
                        ifindex: 0,
                        node_addr: u32::from_be_bytes(REMOTE_NODE),
                        mac: REMOTE_MAC,
                        router_mac: [0; 6],
                    },
                ),
                (
                    key(LOCAL),
                    EndpointEntry { ifindex: LOCAL_VETH, node_addr: 0, mac: LOCAL_MAC, router_mac: LOCAL_VETH_MAC },
                ),
                (key(VIP), EndpointEntry { ifindex: 0, node_addr: 0, mac: [0; 6], router_mac: [0; 6] }),
                (key(CLIENT), EndpointEntry { ifindex: LO, node_addr: 0, mac: CLIENT_MAC, router_mac: ROUTER_MAC }),
            ]
            .into_iter()
            .collect(),
            interfaces: [(
                LO,
                InterfaceEntry {
                    vni: VNI,
                    addr: u32::from_ne_bytes(CLIENT),
                    mac: ROUTER_MAC,
                    _pad: [0; 2],
                    subnet: u32::from_ne_bytes([10, 78, 0, 0]),
                    mask: u32::from_ne_bytes([255, 255, 255, 0]),
                    flags: 0,
                },
            )]
            .into_iter()
            .collect(),
            nodes: [REMOTE_NODE, OTHER_NODE]
                .map(|n| (u32::from_be_bytes(n), NodeEntry::default()))
                .into_iter()
                .collect(),
            ..Default::default()
        };
        datapath.sync(&plan)?;
        datapath.configure(NodeConfig {
            vxlan_ifindex: LO,
            data_path_port: DATA_PATH_PORT.to_be(),
            ..Default::default()
        })?;
        for program in [FROM_OVERLAY_TEST, EMPTY_TC] {
            super::classifier(&mut datapath.ebpf, program)?
                .load()
                .map_err(|source| NetError::Program { program, source })?;
        }
        testbed.datapath = Some(datapath);
        Ok(testbed)
    }

    fn datapath(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("present until drop")
    }

    /// Runs `program` once on `packet`; returns the verdict and the packet as it left.
    pub fn run(&self, program: &'static str, packet: &[u8]) -> Result<(u32, Vec<u8>), NetError> {
        self.run_with(program, packet, None)
    }

    /// Runs `from_overlay` once on `packet` as if node `sender` sent it over VXLAN on `vni`.
    pub fn run_from_overlay(&self, vni: u32, sender: [u8; 4], packet: &[u8]) -> Result<(u32, Vec<u8>), NetError> {
        self.run_from_overlay_with_policy(vni, sender, 0, packet)
    }

    /// `run_from_overlay` with `policy` as the VXLAN group policy ID (a published port the
    /// sending node asks this one to answer from: direct server return).
    pub fn run_from_overlay_with_policy(
        &self,
        vni: u32,
        sender: [u8; 4],
        policy: u16,
        packet: &[u8],
    ) -> Result<(u32, Vec<u8>), NetError> {
        // `__sk_buff` up to its `cb` (offset 48, five u32): the rest the kernel zeroes.
        let mut skb = [0u8; 68];
        skb[48..52].copy_from_slice(&vni.to_ne_bytes());
        skb[52..56].copy_from_slice(&u32::from_be_bytes(sender).to_ne_bytes());
        skb[56..60].copy_from_slice(&u32::from(policy).to_ne_bytes());
        self.run_with(FROM_OVERLAY_TEST, packet, Some(&skb))
    }

    /// Runs `program` once on `packet` as a GSO packet of `gso_size`-byte segments (what a
    /// TCP socket or GRO hands on as one).
    pub fn run_gso(&self, program: &'static str, packet: &[u8], gso_size: u32) -> Result<(u32, Vec<u8>), NetError> {
        // `__sk_buff` up to its `gso_size` (offset 176); `gso_segs` is at 164.
        let mut skb = [0u8; 180];
        skb[164..168].copy_from_slice(&2u32.to_ne_bytes());
        skb[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        self.run_with(program, packet, Some(&skb))
    }

    fn run_with(&self, program: &'static str, packet: &[u8], ctx: Option<&[u8]>) -> Result<(u32, Vec<u8>), NetError> {
        let mut out = vec![0u8; packet.len() + 64];
        let (verdict, size, _) = self.test_run(program, packet, Some(&mut out), 1, ctx)?;
        out.truncate(size);
        Ok((verdict, out))
    }

    /// Runs `program` on `packet` `repeat` times in the kernel; returns the verdict and the
    /// kernel's average time per run.
    pub fn time(&self, program: &'static str, packet: &[u8], repeat: u32) -> Result<(u32, Duration), NetError> {
        let (verdict, _, duration) = self.test_run(program, packet, None, repeat, None)?;
        Ok((verdict, duration))
    }

    fn test_run(
        &self,
        program: &'static str,
        packet: &[u8],
        out: Option<&mut [u8]>,
        repeat: u32,
        ctx: Option<&[u8]>,
    ) -> Result<(u32, usize, Duration), NetError> {
        let datapath = self.datapath.as_ref().expect("present until drop");
        let prog: &SchedClassifier = datapath
            .ebpf
            .program(program)
            .ok_or(NetError::Program { program, source: aya::programs::ProgramError::UnexpectedProgramType })?
            .try_into()
            .map_err(|source| NetError::Program { program, source })?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: out,
                ctx_in: ctx,
                repeat,
                ..TestRunOptions::new()
            })
            .map_err(|source| NetError::Program { program, source })?;
        Ok((result.return_value, result.data_size_out as usize, result.duration))
    }

    /// Packets counted under `code` so far.
    pub fn count(&self, code: u32) -> Result<u64, NetError> {
        let counters = self.datapath.as_ref().expect("present until drop").counters()?;
        Ok(counters.iter().find(|c| c.code == code).map_or(0, |c| c.packets))
    }

    /// Adds VIP:80/udp to the service of `with_service` (the same table).
    pub fn with_udp_service(&mut self) -> Result<(), NetError> {
        let key = ServiceKey { vni: VNI, vip: u32::from_ne_bytes(VIP), port: 80u16.to_be(), proto: PROTO_UDP, _pad: 0 };
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> = self.datapath().map_mut(maps::SERVICES)?;
        services.insert(key, ServiceEntry { id: 7, backends: 1 }, 0).map_err(|e| map_error(maps::SERVICES, e))
    }

    /// Takes backend `gone` out of table `table` and the backends, and puts `addr:port` in
    /// as backend `new` (a task replaced).
    pub fn replace_backend(
        &mut self,
        table: u32,
        gone: u32,
        new: u32,
        addr: [u8; 4],
        port: u16,
    ) -> Result<(), NetError> {
        add_table(self.datapath(), table, new, addr, port)?;
        let mut backends: HashMap<&mut MapData, u32, Backend> = self.datapath().map_mut(maps::BACKENDS)?;
        backends.remove(&gone).map_err(|e| map_error(maps::BACKENDS, e))
    }

    /// The pin directory (an older version's pins go there before `with_pins` loads).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `Datapath::retire_old_conntrack`, as a restore ends it.
    pub fn retire_old_conntrack(&mut self) {
        let pin_dir = self.pin_dir.clone();
        self.datapath().retire_old_conntrack(&pin_dir);
    }

    /// The tracked state of `flow`, if any.
    pub fn tracked(&mut self, flow: &FlowKey) -> Result<Option<CtEntry>, NetError> {
        let flows: HashMap<&mut MapData, FlowKey, CtEntry> = self.datapath().map_mut(maps::CONNTRACK)?;
        match flows.get(flow, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(maps::CONNTRACK, e)),
        }
    }

    /// Makes every tracked flow look idle since the clock's zero.
    pub fn age_flows(&mut self) -> Result<(), NetError> {
        let mut flows: HashMap<&mut MapData, FlowKey, CtEntry> = self.datapath().map_mut(maps::CONNTRACK)?;
        let keys: Vec<FlowKey> = flows.keys().collect::<Result<_, _>>().map_err(|e| map_error(maps::CONNTRACK, e))?;
        for key in keys {
            let entry = flows.get(&key, 0).map_err(|e| map_error(maps::CONNTRACK, e))?;
            flows.insert(key, CtEntry { seen: 0, ..entry }, 0).map_err(|e| map_error(maps::CONNTRACK, e))?;
        }
        Ok(())
    }

    /// Adds a service VIP:80/tcp on VNI 4097 balanced to REMOTE:8080.
    pub fn with_service(&mut self) -> Result<(), NetError> {
        let datapath = self.datapath();
        let key = ServiceKey { vni: VNI, vip: u32::from_ne_bytes(VIP), port: 80u16.to_be(), proto: PROTO_TCP, _pad: 0 };
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> = datapath.map_mut(maps::SERVICES)?;
        services.insert(key, ServiceEntry { id: 7, backends: 1 }, 0).map_err(|e| map_error(maps::SERVICES, e))?;
        add_table(datapath, 7, 9, REMOTE, 8080)
    }

    /// Makes VIP:80/tcp a service of `count` backends, 10.78.1.1:8080 and on, on REMOTE's
    /// node, with the table the agent builds for them (a large one past
    /// `LARGE_TABLE_BACKENDS`), its entry saying so when `flagged` (not: as an older
    /// version's entry, or one read just before its table moved); returns the backends'
    /// addresses.
    pub fn with_many_backends(&mut self, count: u8, flagged: bool) -> Result<Vec<[u8; 4]>, NetError> {
        let addrs: Vec<[u8; 4]> = (1..=count).map(|i| [10, 78, 1, i]).collect();
        let datapath = self.datapath();
        let mut backends: HashMap<&mut MapData, u32, Backend> = datapath.map_mut(maps::BACKENDS)?;
        let mut members = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = 100 + i as u32;
            let entry = Backend { addr: u32::from_ne_bytes(*addr), port: 8080u16.to_be(), _pad: 0 };
            backends.insert(id, entry, 0).map_err(|e| map_error(maps::BACKENDS, e))?;
            members.push((format!("{}:8080", std::net::Ipv4Addr::from(*addr)), id));
        }
        let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> = datapath.map_mut(maps::ENDPOINTS)?;
        for addr in &addrs {
            let key = EndpointKey { vni: VNI, addr: u32::from_ne_bytes(*addr) };
            let entry = EndpointEntry {
                ifindex: 0,
                node_addr: u32::from_be_bytes(REMOTE_NODE),
                mac: REMOTE_MAC,
                router_mac: [0; 6],
            };
            endpoints.insert(key, entry, 0).map_err(|e| map_error(maps::ENDPOINTS, e))?;
        }
        let table = crate::net::lb::maglev(&members);
        let large = matches!(table, crate::net::lb::Table::Large(_));
        match table {
            crate::net::lb::Table::Small(table) => {
                let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = datapath.map_mut(maps::MAGLEV)?;
                maglev.insert(20, *table, 0).map_err(|e| map_error(maps::MAGLEV, e))?;
            }
            crate::net::lb::Table::Large(table) => {
                let mut maglev: HashMap<&mut MapData, u32, MaglevLargeTable> = datapath.map_mut(maps::MAGLEV_LARGE)?;
                maglev.insert(20, *table, 0).map_err(|e| map_error(maps::MAGLEV_LARGE, e))?;
            }
        }
        let key = ServiceKey { vni: VNI, vip: u32::from_ne_bytes(VIP), port: 80u16.to_be(), proto: PROTO_TCP, _pad: 0 };
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> = datapath.map_mut(maps::SERVICES)?;
        let flag = if large && flagged { shoal_common::lb::LARGE_TABLE } else { 0 };
        let entry = ServiceEntry { id: 20, backends: u32::from(count) | flag };
        services.insert(key, entry, 0).map_err(|e| map_error(maps::SERVICES, e))?;
        Ok(addrs)
    }

    /// Makes `lo` this node's underlay interface at NODE, publishing TCP PUBLISHED, balanced
    /// to REMOTE:80.
    pub fn with_published_port(&mut self) -> Result<(), NetError> {
        let datapath = self.datapath();
        datapath.configure(NodeConfig {
            vxlan_ifindex: LO,
            underlay_ifindex: LO,
            underlay_addr: u32::from_ne_bytes(NODE),
            data_path_port: DATA_PATH_PORT.to_be(),
            flags: 0,
        })?;
        let key = IngressKey { port: PUBLISHED.to_be(), proto: PROTO_TCP, _pad: 0 };
        let mut ingress: HashMap<&mut MapData, IngressKey, IngressEntry> = datapath.map_mut(maps::INGRESS)?;
        ingress
            .insert(key, IngressEntry { id: 11, backends: 1, vni: VNI }, 0)
            .map_err(|e| map_error(maps::INGRESS, e))?;
        add_table(datapath, 11, 12, REMOTE, 80)
    }

    /// Moves the calling thread into a network namespace of its own, where the veth
    /// `UNDERLAY` holds NODE on 10.77.0.0/16 (REMOTE_NODE's MAC known, a default route
    /// through 10.77.0.1), and makes it the node's underlay interface (the node's other
    /// settings as `with_published_port` leaves them): the programs' route lookups then find
    /// their way out, so they encapsulate VXLAN themselves and send replies to clients.
    /// Returns its ifindex. The namespace, and all in it, goes with the thread: call this
    /// only on a thread of its own (each test runs on one; the benchmark is one).
    pub fn with_underlay(&mut self) -> Result<u32, NetError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Kernel(format!("unshare(CLONE_NEWNET): {e}")))?;
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        let (underlay_mac, remote_mac, gateway_mac) = (mac(UNDERLAY_MAC), mac(REMOTE_NODE_MAC), mac(GATEWAY_MAC));
        let node = format!("{}/16", std::net::Ipv4Addr::from(NODE));
        let remote = std::net::Ipv4Addr::from(REMOTE_NODE).to_string();
        let steps: [&[&str]; 8] = [
            &["link", "set", "lo", "up"],
            &["link", "add", UNDERLAY, "address", &underlay_mac, "type", "veth", "peer", "name", "shoal_u1"],
            &["addr", "add", &node, "dev", UNDERLAY],
            &["link", "set", UNDERLAY, "up"],
            &["link", "set", "shoal_u1", "up"],
            &["neigh", "replace", &remote, "lladdr", &remote_mac, "nud", "permanent", "dev", UNDERLAY],
            &["neigh", "replace", "10.77.0.1", "lladdr", &gateway_mac, "nud", "permanent", "dev", UNDERLAY],
            &["route", "add", "default", "via", "10.77.0.1", "dev", UNDERLAY],
        ];
        for args in steps {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| NetError::Kernel(format!("ip {}: {e}", args.join(" "))))?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr);
                return Err(NetError::Kernel(format!("ip {}: {}", args.join(" "), stderr.trim())));
            }
        }
        // The route lookups the programs make are for forwarding, refused where it is off.
        // (/proc/sys/net is the namespace of the thread that opens it: this one's, now.)
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", b"1")
            .map_err(|e| NetError::Kernel(format!("forwarding on in the underlay's namespace: {e}")))?;
        let ifindex = nix::net::if_::if_nametoindex(UNDERLAY)
            .map_err(|e| NetError::Kernel(format!("ifindex of {UNDERLAY}: {e}")))?;
        self.datapath().configure(NodeConfig {
            vxlan_ifindex: LO,
            underlay_ifindex: ifindex,
            underlay_addr: u32::from_ne_bytes(NODE),
            data_path_port: DATA_PATH_PORT.to_be(),
            flags: 0,
        })?;
        Ok(ifindex)
    }

    /// Publishes UDP PUBLISHED too (after `with_published_port`), to the same backend.
    pub fn with_udp_published_port(&mut self) -> Result<(), NetError> {
        let key = IngressKey { port: PUBLISHED.to_be(), proto: PROTO_UDP, _pad: 0 };
        let mut ingress: HashMap<&mut MapData, IngressKey, IngressEntry> = self.datapath().map_mut(maps::INGRESS)?;
        ingress.insert(key, IngressEntry { id: 11, backends: 1, vni: VNI }, 0).map_err(|e| map_error(maps::INGRESS, e))
    }

    /// Replaces the node's settings (`NODE_CONFIG`).
    pub fn configure(&mut self, config: NodeConfig) -> Result<(), NetError> {
        self.datapath().configure(config)
    }

    /// Forgets `lo` as a workload interface.
    pub fn forget_interface(&mut self) -> Result<(), NetError> {
        let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = self.datapath().map_mut(maps::INTERFACES)?;
        interfaces.remove(&LO).map_err(|e| map_error(maps::INTERFACES, e))
    }

    /// Gives the network of `lo`'s workload a way out (the node masquerades), and 10.78.0.1
    /// as its gateway.
    pub fn set_outbound(&mut self) -> Result<(), NetError> {
        let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = self.datapath().map_mut(maps::INTERFACES)?;
        let current = interfaces.get(&LO, 0).map_err(|e| map_error(maps::INTERFACES, e))?;
        let entry = InterfaceEntry { flags: current.flags | IFACE_OUTBOUND, ..current };
        interfaces.insert(LO, entry, 0).map_err(|e| map_error(maps::INTERFACES, e))?;
        let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> =
            self.datapath().map_mut(maps::ENDPOINTS)?;
        let key = EndpointKey { vni: VNI, addr: u32::from_ne_bytes(GATEWAY) };
        let entry = EndpointEntry { ifindex: 0, node_addr: GATEWAY_NODE, mac: ROUTER_MAC, router_mac: [0; 6] };
        endpoints.insert(key, entry, 0).map_err(|e| map_error(maps::ENDPOINTS, e))
    }

    /// Makes the workload behind `lo` the one at `addr` (so `lo` can play a backend's veth).
    pub fn set_workload_addr(&mut self, addr: [u8; 4]) -> Result<(), NetError> {
        let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = self.datapath().map_mut(maps::INTERFACES)?;
        let current = interfaces.get(&LO, 0).map_err(|e| map_error(maps::INTERFACES, e))?;
        let entry = InterfaceEntry { addr: u32::from_ne_bytes(addr), ..current };
        interfaces.insert(LO, entry, 0).map_err(|e| map_error(maps::INTERFACES, e))
    }

    /// Makes CLIENT a local endpoint behind LOCAL_VETH, so that `lo` can play a backend
    /// that answers it.
    pub fn set_client_behind_local_veth(&mut self) -> Result<(), NetError> {
        let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> =
            self.datapath().map_mut(maps::ENDPOINTS)?;
        let key = EndpointKey { vni: VNI, addr: u32::from_ne_bytes(CLIENT) };
        let entry = EndpointEntry { ifindex: LOCAL_VETH, node_addr: 0, mac: CLIENT_MAC, router_mac: LOCAL_VETH_MAC };
        endpoints.insert(key, entry, 0).map_err(|e| map_error(maps::ENDPOINTS, e))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        drop(self.datapath.take());
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if self.mounted_bpffs {
            let _ = nix::mount::umount(BPFFS);
        }
    }
}

/// A one-backend Maglev table `id` whose every slot is backend `backend` at `addr:port`.
fn add_table(datapath: &mut Datapath, id: u32, backend: u32, addr: [u8; 4], port: u16) -> Result<(), NetError> {
    let mut backends: HashMap<&mut MapData, u32, Backend> = datapath.map_mut(maps::BACKENDS)?;
    let entry = Backend { addr: u32::from_ne_bytes(addr), port: port.to_be(), _pad: 0 };
    backends.insert(backend, entry, 0).map_err(|e| map_error(maps::BACKENDS, e))?;
    let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = datapath.map_mut(maps::MAGLEV)?;
    maglev.insert(id, MaglevTable { slots: [backend; MAGLEV_SLOTS] }, 0).map_err(|e| map_error(maps::MAGLEV, e))
}

fn map_error(map: &'static str, source: aya::maps::MapError) -> NetError {
    NetError::Map { map, source }
}

/// The kernel's time for one program on one kind of packet.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramCost {
    pub program: &'static str,
    /// `FLOOR`, `FORWARDING`, `NAT` or `OTHER`.
    pub kind: &'static str,
    pub case: &'static str,
    pub verdict: u32,
    /// Nanoseconds per packet, one value per round.
    pub rounds_ns: Vec<f64>,
}

/// What a measured path is to the report: the floor (the empty program), the plain
/// forwarding path the NAT paths are compared with, a NAT path, or another.
pub const FLOOR: &str = "floor";
pub const FORWARDING: &str = "forwarding";
pub const NAT: &str = "nat";
pub const OTHER: &str = "other";

/// How a measured path ends, which shows it was the path named.
#[derive(Debug, Clone, Copy)]
enum Ends {
    Pass,
    Redirect,
}

/// Single runs per round: their median is the round's figure.
const SAMPLES: usize = 20_000;

/// Times each program on the packets of its common paths, `rounds` times.
///
/// Repeat mode runs a program again and again on the same buffer, so a packet the program
/// rewrites (DNAT, an ARP request turned into its reply) would be measured on its rewritten
/// self from the second run on. So each figure is the median of single runs on the fresh
/// packet, less the timing overhead of a single run: the median single run of a path that
/// leaves the packet alone minus that path's repeat-mode average (over `repeat` runs).
/// Each packet runs once first, so a balanced flow is measured as tracked (the steady state).
pub fn program_costs(repeat: u32, rounds: usize) -> Result<Vec<ProgramCost>, NetError> {
    let mut bed = Testbed::new()?;
    bed.with_service()?;
    bed.with_published_port()?;
    // The programs' route lookups find their way out: VXLAN is the programs' own, and replies
    // to clients leave, as on a node.
    bed.with_underlay()?;
    let pass = tcp(OUTSIDE, 50000, NODE, 22);
    // Flows are opened first (the mesh tracks a flow from its SYN only), so the tracked
    // cases measure what they say.
    bed.run(FROM_UNDERLAY, &syn(OUTSIDE, 50000, NODE, PUBLISHED))?;
    bed.run(FROM_WORKLOAD, &syn(CLIENT, 40001, VIP, 80))?;
    // (program, kind, path, packet, the outcome that shows the path was taken)
    let cases = [
        (EMPTY_TC, FLOOR, "nothing (the floor every TC program pays)", pass.clone(), Ends::Pass),
        (FROM_UNDERLAY, OTHER, "not a published port (pass)", pass.clone(), Ends::Pass),
        (
            FROM_UNDERLAY,
            NAT,
            "published port, tracked flow (DNAT + encapsulate)",
            tcp(OUTSIDE, 50000, NODE, PUBLISHED),
            Ends::Redirect,
        ),
        (FROM_WORKLOAD, OTHER, "ARP request answered", arp_request(REMOTE), Ends::Redirect),
        (
            FROM_WORKLOAD,
            FORWARDING,
            "to a remote endpoint (encapsulate)",
            tcp(CLIENT, 40000, REMOTE, 80),
            Ends::Redirect,
        ),
        (FROM_WORKLOAD, OTHER, "to a local endpoint (redirect_peer)", tcp(CLIENT, 40000, LOCAL, 80), Ends::Redirect),
        (
            FROM_WORKLOAD,
            NAT,
            "to a VIP, tracked flow (DNAT + encapsulate)",
            tcp(CLIENT, 40001, VIP, 80),
            Ends::Redirect,
        ),
        (
            FROM_UNDERLAY,
            OTHER,
            "VXLAN from a node to a local endpoint (decapsulate)",
            vxlan(REMOTE_NODE, VNI, 0, &tcp(REMOTE, 80, LOCAL, 40000)),
            Ends::Redirect,
        ),
        // Last: `lo` then plays the backend's veth.
        (
            FROM_WORKLOAD,
            NAT,
            "ingress reply (reverse NAT + FIB lookup)",
            tcp(REMOTE, 80, OUTSIDE, 50000),
            Ends::Redirect,
        ),
    ];
    let mut costs = Vec::new();
    for (program, kind, case, packet, expected) in cases {
        if case.starts_with("ingress reply") {
            bed.set_workload_addr(REMOTE)?;
        }
        let (verdict, _) = bed.run(program, &packet)?;
        // Each path as named: its verdict, and VXLAN (where there is any) by the programs.
        let as_named = match expected {
            Ends::Pass => verdict == TC_ACT_OK,
            Ends::Redirect => verdict == TC_ACT_REDIRECT,
        } && bed.count(ENCAP_BY_DEVICE)? == 0;
        if !as_named {
            return Err(NetError::Kernel(format!(
                "{program}, {case}: verdict {verdict}, not {expected:?}: the path measured is not the one named"
            )));
        }
        let mut rounds_ns = Vec::new();
        for _ in 0..rounds {
            let overhead = bed.single_run_median(FROM_UNDERLAY, &pass)?
                - bed.time(FROM_UNDERLAY, &pass, repeat)?.1.as_secs_f64() * 1e9;
            rounds_ns.push(bed.single_run_median(program, &packet)? - overhead);
        }
        costs.push(ProgramCost { program, kind, case, verdict, rounds_ns });
    }
    Ok(costs)
}

impl Testbed {
    /// The median of the kernel's time for `SAMPLES` single runs of `program` on `packet`.
    fn single_run_median(&self, program: &'static str, packet: &[u8]) -> Result<f64, NetError> {
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            samples.push(self.time(program, packet, 1)?.1.as_nanos() as f64);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[SAMPLES / 2])
    }
}
