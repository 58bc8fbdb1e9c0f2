//! Packet header layouts and bounds-checked access to them.
//!
//! Multi-byte fields are kept as byte arrays or raw big-endian integers: the programs compare
//! them against constants in network order instead of converting every packet.

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
/// EtherType values in network byte order, as read from the frame.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_ARP_BE: u16 = 0x0806u16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

/// ARP for Ethernet/IPv4 (RFC 826), the only kind a workload sends.
#[repr(C)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

pub const ARP_HTYPE_ETHER_BE: u16 = 1u16.to_be();
pub const ARP_OP_REQUEST_BE: u16 = 1u16.to_be();
pub const ARP_OP_REPLY_BE: u16 = 2u16.to_be();

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// Pointer to a `T` at `offset` in the packet, or `None` when the packet is too short.
///
/// The bounds check sits right beside the pointer arithmetic so the verifier sees it on the
/// same register (LLVM may otherwise move it out of the verifier's sight).
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub check: u16,
}

/// The VXLAN header (RFC 7348), with the group policy extension's fields
/// (draft-smith-vxlan-group-policy) where the reserved ones were.
#[repr(C)]
pub struct VxlanHdr {
    /// `VXLAN_FLAG_*`.
    pub flags: u8,
    /// The group policy extension's own flags (don't learn, policy applied); 0 here.
    pub gbp_flags: u8,
    /// The group policy ID, network byte order, when `VXLAN_FLAG_GBP` is set.
    pub policy: u16,
    /// The VNI in the first three bytes; the last is reserved.
    pub vni: [u8; 4],
}

/// `VxlanHdr::flags`: the VNI is valid (always set).
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// `VxlanHdr::flags`: the group policy ID is valid.
pub const VXLAN_FLAG_GBP: u8 = 0x80;
