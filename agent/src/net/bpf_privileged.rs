//! The real BPF programs run by the kernel on crafted packets (BPF_PROG_TEST_RUN), in
//! Cilium's setup -> run -> check shape. Needs root (loads programs, pins maps).
//!
//! Under test_run the packet "arrives" on `lo` (ifindex 1), so `lo` plays the workload's
//! host-side veth; redirect helpers only record their target, so the verdict and the
//! rewritten bytes are what we check.

use std::path::PathBuf;

use aya::programs::{TestRun, TestRunOptions};
use shoal_common::{
    overlay::{EndpointEntry, EndpointKey, InterfaceEntry, NodeConfig},
    stats,
};

use super::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const LO: u32 = 1;
const VNI: u32 = 4097;
const ROUTER_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0xfe];
const CLIENT_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 2];
const CLIENT: [u8; 4] = [10, 78, 0, 2];
const REMOTE: [u8; 4] = [10, 78, 0, 3];
const REMOTE_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 3];
const LOCAL: [u8; 4] = [10, 78, 0, 4];
const LOCAL_MAC: [u8; 6] = [0x02, 0x42, 10, 78, 0, 4];
const LOCAL_VETH: u32 = 4242;
const LOCAL_VETH_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x04];

/// A datapath with its own pin directory, removed (with bpffs if we mounted it) on drop.
struct Fixture {
    /// Fixtures run one at a time: one may have to mount bpffs and unmount it afterwards.
    _serial: std::sync::MutexGuard<'static, ()>,
    datapath: Option<Datapath>,
    pin_dir: PathBuf,
    mounted_bpffs: bool,
}

impl Fixture {
    /// Setup: lo is a workload interface on VNI 4097; one remote peer, one local peer.
    fn new() -> Fixture {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        assert!(nix::unistd::geteuid().is_root(), "BPF program tests load programs: run as root");
        let mounted_bpffs = !statfs(Path::new(BPFFS)).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
        let pin_dir = PathBuf::from(format!("{BPFFS}/shoal-unit-{}", std::process::id()));
        let mut fixture = Fixture { _serial: serial, datapath: None, pin_dir, mounted_bpffs };
        let mut datapath = Datapath::load(&fixture.pin_dir).expect("load programs");
        let key = |a: [u8; 4]| EndpointKey { vni: VNI, addr: u32::from_ne_bytes(a) };
        let plan = Plan {
            endpoints: [
                (
                    key(REMOTE),
                    EndpointEntry { ifindex: 0, node_addr: 0x0a4d_0201, mac: REMOTE_MAC, router_mac: [0; 6] },
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
            attach: BTreeMap::new(),
            ..Default::default()
        };
        datapath.apply(&plan).expect("fill maps");
        let mut config: Array<&mut MapData, NodeConfig> = datapath.map_mut(maps::NODE_CONFIG).unwrap();
        config.set(0, NodeConfig { vxlan_ifindex: LO, ..Default::default() }, 0).unwrap();
        fixture.datapath = Some(datapath);
        fixture
    }

    /// Run: the program on one packet; returns the verdict and the packet as it left.
    fn run(&self, program: &'static str, packet: &[u8]) -> (u32, Vec<u8>) {
        let datapath = self.datapath.as_ref().unwrap();
        let prog: &SchedClassifier = datapath.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 64];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {program} on {} bytes: {e}", packet.len()));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn count(&self, code: u32) -> u64 {
        let counters = self.datapath.as_ref().unwrap().counters().unwrap();
        counters.iter().find(|c| c.code == code).map_or(0, |c| c.packets)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.datapath.take());
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if self.mounted_bpffs {
            let _ = nix::mount::umount(BPFFS);
        }
    }
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
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

fn ipv4_to(dst: [u8; 4]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&CLIENT);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0x30, 0x39, 0x1f, 0x40, 0, 8, 0, 0]);
    p
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn from_workload_answers_arp_for_peers_only() {
    let fx = Fixture::new();

    let (verdict, reply) = fx.run(FROM_WORKLOAD, &arp_request(REMOTE));
    assert_eq!(verdict, TC_ACT_REDIRECT, "reply is sent back out of the veth");
    assert_eq!(&reply[0..6], &CLIENT_MAC, "eth dst: the asker");
    assert_eq!(&reply[6..12], &ROUTER_MAC, "eth src: the veth");
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
    assert_eq!(&reply[22..28], &ROUTER_MAC, "sender hw: the veth");
    assert_eq!(&reply[28..32], &REMOTE, "sender ip: the peer asked for");
    assert_eq!(&reply[32..38], &CLIENT_MAC);
    assert_eq!(&reply[38..42], &CLIENT);
    assert_eq!(fx.count(stats::ARP_REPLY), 1);

    let (verdict, _) = fx.run(FROM_WORKLOAD, &arp_request([10, 78, 0, 99]));
    assert_eq!(verdict, TC_ACT_SHOT, "no answer for a non-endpoint");
    let (verdict, _) = fx.run(FROM_WORKLOAD, &arp_request(CLIENT));
    assert_eq!(verdict, TC_ACT_SHOT, "no answer to a probe for the asker's own address");
    assert_eq!(fx.count(stats::DROP_ARP_UNANSWERED), 2);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn from_workload_encapsulates_remote_and_delivers_local() {
    let fx = Fixture::new();

    let (verdict, out) = fx.run(FROM_WORKLOAD, &ipv4_to(REMOTE));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &REMOTE_MAC, "inner eth dst: the remote endpoint");
    assert_eq!(fx.count(stats::FORWARD_REMOTE), 1);

    let (verdict, out) = fx.run(FROM_WORKLOAD, &ipv4_to(LOCAL));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &LOCAL_MAC, "eth dst: the local endpoint");
    assert_eq!(&out[6..12], &LOCAL_VETH_MAC, "eth src: its veth");
    assert_eq!(fx.count(stats::FORWARD_LOCAL), 1);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn every_failure_is_a_counted_drop() {
    let fx = Fixture::new();

    let (verdict, _) = fx.run(FROM_WORKLOAD, &ipv4_to([10, 78, 0, 99]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_NO_ENDPOINT), 1);

    // The kernel refuses to test-run an IPv4 frame shorter than its header, so the short
    // frame is an ARP one.
    let truncated = &arp_request(REMOTE)[..24];
    let (verdict, _) = fx.run(FROM_WORKLOAD, truncated);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(fx.count(stats::DROP_MALFORMED), 1);

    let mut spoofed = ipv4_to(REMOTE);
    spoofed[26..30].copy_from_slice(&LOCAL);
    let (verdict, _) = fx.run(FROM_WORKLOAD, &spoofed);
    assert_eq!(verdict, TC_ACT_SHOT, "a workload may only send from its own address");
    assert_eq!(fx.count(stats::DROP_SPOOFED_SOURCE), 1);

    let mut ipv6 = ipv4_to(REMOTE);
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    ipv6[14] = 0x60;
    ipv6.resize(14 + 40 + 8, 0); // the kernel refuses a test frame shorter than its header
    let (verdict, _) = fx.run(FROM_WORKLOAD, &ipv6);
    assert_eq!(verdict, TC_ACT_SHOT, "only IPv4 and ARP leave a workload");
    assert_eq!(fx.count(stats::DROP_NOT_IPV4), 1);

    let (verdict, _) = fx.run(FROM_OVERLAY, &ipv4_to(LOCAL));
    assert_eq!(verdict, TC_ACT_SHOT, "a frame without tunnel metadata is not from the overlay");
    assert_eq!(fx.count(stats::DROP_TUNNEL_KEY), 1);
}

const VIP: [u8; 4] = [10, 78, 0, 100];

/// A TCP segment `src:sport -> dst:dport` with correct IPv4 and TCP checksums.
fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&ROUTER_MAC);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x00]);
    p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
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

/// Whether the IPv4 and TCP checksums of `p` verify.
fn checksums_ok(p: &[u8]) -> bool {
    checksum(&p[14..34], 0) == 0 && checksum(&p[34..], pseudo(p)) == 0
}

/// Setup: a service VIP:80 on VNI 4097 balanced to REMOTE:8080.
fn with_service(fx: &mut Fixture) {
    use shoal_common::lb::{Backend, MaglevTable, ServiceEntry, ServiceKey, MAGLEV_SLOTS, PROTO_TCP};
    let datapath = fx.datapath.as_mut().unwrap();
    let key = ServiceKey { vni: VNI, vip: u32::from_ne_bytes(VIP), port: 80u16.to_be(), proto: PROTO_TCP, _pad: 0 };
    let mut services: HashMap<&mut MapData, ServiceKey, ServiceEntry> = datapath.map_mut(maps::SERVICES).unwrap();
    services.insert(key, ServiceEntry { id: 7, backends: 1 }, 0).unwrap();
    let mut backends: HashMap<&mut MapData, u32, Backend> = datapath.map_mut(maps::BACKENDS).unwrap();
    backends.insert(9, Backend { addr: u32::from_ne_bytes(REMOTE), port: 8080u16.to_be(), _pad: 0 }, 0).unwrap();
    let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = datapath.map_mut(maps::MAGLEV).unwrap();
    maglev.insert(7, MaglevTable { slots: [9; MAGLEV_SLOTS] }, 0).unwrap();
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_connection_to_a_vip_goes_to_its_backend_and_the_reply_comes_from_the_vip() {
    let mut fx = Fixture::new();
    with_service(&mut fx);

    // Forward: client -> VIP:80 becomes client -> backend:8080, checksums still right.
    let (verdict, out) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[30..34], &REMOTE, "destination rewritten to the backend");
    assert_eq!(&out[36..38], &8080u16.to_be_bytes(), "port rewritten to the target port");
    assert_eq!(&out[0..6], &REMOTE_MAC, "then forwarded to the backend's endpoint");
    assert!(checksums_ok(&out), "checksums broken by the rewrite");
    assert_eq!(fx.count(stats::LB_NEW_FLOW), 1);
    let (_, again) = fx.run(FROM_WORKLOAD, &tcp(CLIENT, 40000, VIP, 80));
    assert_eq!(again, out, "the tracked flow keeps its backend");
    assert_eq!(fx.count(stats::LB_TRACKED), 1);

    // Reverse: the backend's reply, delivered to the client, comes from VIP:80. Here `lo`
    // plays the backend's veth and the client is a local endpoint.
    let datapath = fx.datapath.as_mut().unwrap();
    let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = datapath.map_mut(maps::INTERFACES).unwrap();
    let backend_iface = InterfaceEntry { addr: u32::from_ne_bytes(REMOTE), ..interfaces.get(&LO, 0).unwrap() };
    interfaces.insert(LO, backend_iface, 0).unwrap();
    let mut endpoints: HashMap<&mut MapData, EndpointKey, EndpointEntry> = datapath.map_mut(maps::ENDPOINTS).unwrap();
    let client = EndpointEntry { ifindex: LOCAL_VETH, node_addr: 0, mac: CLIENT_MAC, router_mac: LOCAL_VETH_MAC };
    endpoints.insert(EndpointKey { vni: VNI, addr: u32::from_ne_bytes(CLIENT) }, client, 0).unwrap();
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 8080, CLIENT, 40000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&reply[26..30], &VIP, "source given back as the VIP");
    assert_eq!(&reply[34..36], &80u16.to_be_bytes(), "source port given back as the service port");
    assert!(checksums_ok(&reply), "checksums broken by the reverse rewrite");
    assert_eq!(fx.count(stats::LB_REVERSE_NAT), 1);

    // A VIP port the service does not have is refused and counted.
    let (verdict, _) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 8080, VIP, 81));
    assert_eq!(verdict, TC_ACT_SHOT);
}

const NODE: [u8; 4] = [10, 77, 0, 11];
/// A client outside the cluster (TEST-NET-1).
const OUTSIDE: [u8; 4] = [192, 0, 2, 10];

/// Setup: this node (NODE, underlay on `lo`) publishes TCP 8080, balanced to REMOTE:80.
fn with_published_port(fx: &mut Fixture) {
    use shoal_common::lb::{Backend, IngressEntry, IngressKey, MaglevTable, MAGLEV_SLOTS, PROTO_TCP};
    let datapath = fx.datapath.as_mut().unwrap();
    let mut config: Array<&mut MapData, NodeConfig> = datapath.map_mut(maps::NODE_CONFIG).unwrap();
    let node = NodeConfig { vxlan_ifindex: LO, underlay_ifindex: LO, underlay_addr: u32::from_ne_bytes(NODE) };
    config.set(0, node, 0).unwrap();
    let key = IngressKey { port: 8080u16.to_be(), proto: PROTO_TCP, _pad: 0 };
    let mut ingress: HashMap<&mut MapData, IngressKey, IngressEntry> = datapath.map_mut(maps::INGRESS).unwrap();
    ingress.insert(key, IngressEntry { id: 11, backends: 1, vni: VNI }, 0).unwrap();
    let mut backends: HashMap<&mut MapData, u32, Backend> = datapath.map_mut(maps::BACKENDS).unwrap();
    backends.insert(12, Backend { addr: u32::from_ne_bytes(REMOTE), port: 80u16.to_be(), _pad: 0 }, 0).unwrap();
    let mut maglev: HashMap<&mut MapData, u32, MaglevTable> = datapath.map_mut(maps::MAGLEV).unwrap();
    maglev.insert(11, MaglevTable { slots: [12; MAGLEV_SLOTS] }, 0).unwrap();
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_published_port_reaches_its_backend_with_the_client_source_kept() {
    let mut fx = Fixture::new();
    with_published_port(&mut fx);

    // In: client -> NODE:8080 becomes client -> backend:80, encapsulated to the backend's node.
    let (verdict, out) = fx.run(FROM_UNDERLAY, &tcp(OUTSIDE, 50000, NODE, 8080));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[26..30], &OUTSIDE, "the client's address is kept as the source");
    assert_eq!(&out[30..34], &REMOTE, "destination rewritten to the backend");
    assert_eq!(&out[36..38], &80u16.to_be_bytes(), "port rewritten to the target port");
    assert_eq!(&out[0..6], &REMOTE_MAC, "sent to the backend's endpoint");
    assert!(checksums_ok(&out), "checksums broken by the rewrite");
    assert_eq!((fx.count(stats::INGRESS_REMOTE), fx.count(stats::LB_NEW_FLOW)), (1, 1));

    // Not the mesh's: another port, another address, the node's own traffic pass untouched.
    for packet in [tcp(OUTSIDE, 50000, NODE, 8081), tcp(OUTSIDE, 50000, [10, 77, 0, 12], 8080), ipv4_to(NODE)] {
        let (verdict, out) = fx.run(FROM_UNDERLAY, &packet);
        assert_eq!((verdict, out), (TC_ACT_OK, packet));
    }

    // Out: the backend's reply (here `lo` plays its veth) gets NODE:8080 back as its source
    // and leaves through the underlay.
    let datapath = fx.datapath.as_mut().unwrap();
    let mut interfaces: HashMap<&mut MapData, u32, InterfaceEntry> = datapath.map_mut(maps::INTERFACES).unwrap();
    let backend_iface = InterfaceEntry { addr: u32::from_ne_bytes(REMOTE), ..interfaces.get(&LO, 0).unwrap() };
    interfaces.insert(LO, backend_iface, 0).unwrap();
    let (verdict, reply) = fx.run(FROM_WORKLOAD, &tcp(REMOTE, 80, OUTSIDE, 50000));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&reply[26..30], &NODE, "source given back as the node's address");
    assert_eq!(&reply[34..36], &8080u16.to_be_bytes(), "source port given back as the published port");
    assert_eq!(&reply[30..34], &OUTSIDE);
    assert!(checksums_ok(&reply), "checksums broken by the reverse rewrite");
    assert_eq!(fx.count(stats::INGRESS_REPLY), 1);
}
