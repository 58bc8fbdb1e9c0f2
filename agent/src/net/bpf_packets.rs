//! Frames for the program tests and the cost benchmark, built byte by byte as a workload,
//! a client or another node would send them, and checks on what the programs made of them.

use super::testbed::{CLIENT, CLIENT_MAC, DATA_PATH_PORT, NODE, REMOTE_NODE_MAC, ROUTER_MAC, UNDERLAY_MAC};

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

/// Sets the IPv4 TOS byte of `p` (DSCP and ECN; fixing the header checksum).
pub fn with_tos(mut p: Vec<u8>, tos: u8) -> Vec<u8> {
    p[15] = tos;
    let ttl = p[22];
    with_ttl(p, ttl)
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

/// `inner` (a frame from the builders here) inside VXLAN from node `sender` to this node
/// (NODE, on the data path port), on network `vni`, with the group policy ID `policy` when
/// not 0, as another node's programs or its VXLAN device send it.
pub fn vxlan(sender: [u8; 4], vni: u32, policy: u16, inner: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&UNDERLAY_MAC);
    p.extend_from_slice(&REMOTE_NODE_MAC);
    p.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    p.extend_from_slice(&((20 + 8 + 8 + inner.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&sender);
    p.extend_from_slice(&NODE);
    p.extend_from_slice(&50000u16.to_be_bytes());
    p.extend_from_slice(&DATA_PATH_PORT.to_be_bytes());
    p.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    let flags = if policy != 0 { 0x88 } else { 0x08 };
    p.extend_from_slice(&[flags, 0]);
    p.extend_from_slice(&policy.to_be_bytes());
    p.extend_from_slice(&vni.to_be_bytes()[1..]);
    p.push(0);
    p.extend_from_slice(inner);
    let ip = checksum(&p[14..34], 0);
    p[24..26].copy_from_slice(&ip.to_be_bytes());
    p
}

/// `p` with `more` bytes of payload after its headers, its IPv4 length and header checksum
/// made to match (the L4 checksum is left as it was: for the size of a frame only).
pub fn grown(mut p: Vec<u8>, more: usize) -> Vec<u8> {
    p.resize(p.len() + more, 0);
    let len = (p.len() - 14) as u16;
    p[16..18].copy_from_slice(&len.to_be_bytes());
    with_ttl(p.clone(), p[22])
}
