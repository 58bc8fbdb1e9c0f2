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
};

use super::{Datapath, BPFFS, FROM_OVERLAY, FROM_UNDERLAY, FROM_WORKLOAD};
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

/// An ARP request from CLIENT for `target`.
pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&CLIENT);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    p
}

/// A small UDP datagram from CLIENT to `dst` (port 8000).
pub fn ipv4_to(dst: [u8; 4]) -> Vec<u8> {
    udp(CLIENT, 12345, dst, 8000)
}

/// A small UDP datagram `src:sport -> dst:dport` (no UDP checksum).
pub fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 8, 0, 0]);
    let ip = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&ip.to_be_bytes());
    p
}

/// A UDP datagram `src:sport -> dst:dport` with `payload` bytes (checksummed), cut into IPv4
/// fragments of at most `mtu` bytes of IP packet each, as a sender's stack cuts it.
pub fn udp_fragments(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: usize, mtu: usize) -> Vec<Vec<u8>> {
    let mut datagram = Vec::new();
    datagram.extend_from_slice(&sport.to_be_bytes());
    datagram.extend_from_slice(&dport.to_be_bytes());
    datagram.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend((0..payload).map(|i| i as u8));
    let sum = checksum(&datagram, udp_pseudo(&src, &dst, datagram.len()));
    datagram[6..8].copy_from_slice(&sum.to_be_bytes());
    let step = (mtu - 20) / 8 * 8;
    datagram
        .chunks(step)
        .enumerate()
        .map(|(i, chunk)| {
            let more = (i + 1) * step < datagram.len();
            let frag_off = ((i * step / 8) as u16) | if more { 0x2000 } else { 0 };
            let mut p = Vec::new();
            p.extend_from_slice(&ROUTER_MAC);
            p.extend_from_slice(&CLIENT_MAC);
            p.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            p.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            // Its own identification per source port, so two datagrams' fragments differ.
            p.extend_from_slice(&sport.to_be_bytes());
            p.extend_from_slice(&frag_off.to_be_bytes());
            p.extend_from_slice(&[64, 17, 0, 0]);
            p.extend_from_slice(&src);
            p.extend_from_slice(&dst);
            p.extend_from_slice(chunk);
            let ip = checksum(&p[14..34], 0);
            p[24..26].copy_from_slice(&ip.to_be_bytes());
            p
        })
        .collect()
}

/// Whether `fragments` (in order) reassemble into a UDP datagram whose checksum verifies
/// against the addresses they now carry, all of them with verifying IPv4 headers.
pub fn reassembles(fragments: &[Vec<u8>]) -> bool {
    let same_addresses = fragments.iter().all(|f| f[26..34] == fragments[0][26..34]);
    let datagram: Vec<u8> = fragments.iter().flat_map(|f| f[34..].to_vec()).collect();
    same_addresses
        && fragments.iter().all(|f| ip_checksum_ok(f))
        && checksum(&datagram, udp_pseudo(&fragments[0][26..30], &fragments[0][30..34], datagram.len())) == 0
}

/// An ICMP error (`icmp_type`, `code`) from `src` to `dst` quoting `packet` (a frame from
/// the builders here): its IPv4 header and the first 8 bytes after it, as RFC 792 asks.
/// For "fragmentation needed" the next hop's MTU goes in `mtu`.
pub fn icmp_error(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, mtu: u16, packet: &[u8]) -> Vec<u8> {
    let quoted = &packet[14..42];
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    p.extend_from_slice(&((20 + 8 + quoted.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0]);
    p.extend_from_slice(&mtu.to_be_bytes());
    p.extend_from_slice(quoted);
    let ip = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&ip.to_be_bytes());
    let icmp = checksum(&p[34..], 0);
    p[36..38].copy_from_slice(&icmp.to_be_bytes());
    p
}

/// Whether an ICMP error's IPv4, ICMP and quoted IPv4 checksums all verify.
pub fn icmp_checksums_ok(p: &[u8]) -> bool {
    ip_checksum_ok(p) && checksum(&p[34..], 0) == 0 && checksum(&p[42..62], 0) == 0
}

/// The sum of a UDP datagram's pseudo-header (addresses, protocol, length) for `checksum`.
fn udp_pseudo(src: &[u8], dst: &[u8], len: usize) -> u32 {
    let words: u32 = src.chunks(2).chain(dst.chunks(2)).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    words + 17 + len as u32
}

/// Sets the IPv4 TTL of `p` (fixing the header checksum).
pub fn with_ttl(mut p: Vec<u8>, ttl: u8) -> Vec<u8> {
    p[22] = ttl;
    p[24..26].copy_from_slice(&[0, 0]);
    let ip = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&ip.to_be_bytes());
    p
}

/// A TCP SYN `src:sport -> dst:dport` (a connection's first packet).
pub fn syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp_with_flags(src, sport, dst, dport, TCP_SYN)
}

/// A TCP ACK `src:sport -> dst:dport` (any later packet of a connection).
pub fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    tcp_with_flags(src, sport, dst, dport, TCP_ACK)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A TCP segment `src:sport -> dst:dport` with `flags` and correct IPv4 and TCP checksums.
fn tcp_with_flags(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let ip = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&ip.to_be_bytes());
    let l4 = checksum(&p[34..], pseudo(&p));
    p[50..52].copy_from_slice(&l4.to_be_bytes());
    p
}

fn pseudo(p: &[u8]) -> u32 {
    let words = |b: &[u8]| b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum::<u32>();
    words(&p[26..34]) + 6 + (p.len() as u32 - 34)
}

fn checksum(bytes: &[u8], start: u32) -> u16 {
    let mut sum = start;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the IPv4 header checksum of `p` verifies.
pub fn ip_checksum_ok(p: &[u8]) -> bool {
    checksum(&p[14..34], 0) == 0
}

/// Whether the IPv4 and TCP checksums of `p` verify.
pub fn checksums_ok(p: &[u8]) -> bool {
    checksum(&p[14..34], 0) == 0 && checksum(&p[34..], pseudo(p)) == 0
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
    /// Dropped, counted under this reason.
    Drop(u32),
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
            FROM_OVERLAY,
            OTHER,
            "no tunnel metadata (drop; test_run cannot set any)",
            tcp(REMOTE, 80, CLIENT, 40000),
            Ends::Drop(shoal_common::stats::DROP_TUNNEL_KEY),
        ),
        // Last: `lo` then plays the backend's veth. Under test_run the route lookup never
        // forwards (the frame arrives on `lo`), so the path ends in a drop after every step.
        (
            FROM_WORKLOAD,
            NAT,
            "ingress reply (reverse NAT + FIB lookup)",
            tcp(REMOTE, 80, OUTSIDE, 50000),
            Ends::Drop(shoal_common::stats::DROP_FIB_NOT_FORWARDED),
        ),
    ];
    let mut costs = Vec::new();
    for (program, kind, case, packet, expected) in cases {
        if case.starts_with("ingress reply") {
            bed.set_workload_addr(REMOTE)?;
        }
        let dropped_before = match expected {
            Ends::Drop(reason) => bed.count(reason)?,
            _ => 0,
        };
        let (verdict, _) = bed.run(program, &packet)?;
        let as_named = match expected {
            Ends::Pass => verdict == TC_ACT_OK,
            Ends::Redirect => verdict == TC_ACT_REDIRECT,
            // A path that ends in a drop must end in its own: the one test_run imposes.
            Ends::Drop(reason) => verdict == TC_ACT_SHOT && bed.count(reason)? == dropped_before + 1,
        };
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
