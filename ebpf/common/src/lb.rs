//! Service load balancing: services by (VIP, port, protocol), their backends, each service's
//! Maglev lookup table, and the connection tracking that pins a flow to its backend.

/// Size of Maglev's permutation space (a prime, so every backend's permutation visits every
/// position). 1021 keeps the table even for up to ~10 backends per service.
pub const MAGLEV_PRIME: usize = 1021;
/// Slots in each stored table: the next power of two, so programs index it with a mask the
/// verifier can see (a modulo by a constant is turned into arithmetic it cannot bound). Slots
/// past `MAGLEV_PRIME` repeat the first ones.
pub const MAGLEV_SLOTS: usize = 1024;

/// A service with more backends than this gets a large table (`MaglevLargeTable`): with
/// 1021 slots each of 33 or more backends would hold 31 or fewer, and a slot more or less is
/// a share 3% off; 16381 slots keep it within a few tenths of a percent up to
/// `MAGLEV_LARGE_PRIME` / 100 backends (Maglev's rule of thumb: 100 slots a backend). The
/// agent keeps a large table until the service is down to `SMALL_TABLE_AGAIN` backends, so
/// one task stopped and started again does not rebuild every slot twice.
pub const LARGE_TABLE_BACKENDS: u32 = 32;
pub const SMALL_TABLE_AGAIN: u32 = 24;
/// Set in `ServiceEntry::backends` (and `IngressEntry::backends`) when the service's table
/// is a large one, in `SHOAL_MAGLEV_LARGE`; the bits below are the count.
pub const LARGE_TABLE: u32 = 1 << 31;
/// Maglev's permutation space of a large table (a prime).
pub const MAGLEV_LARGE_PRIME: usize = 16381;
/// Slots in each stored large table: the next power of two, as `MAGLEV_SLOTS`.
pub const MAGLEV_LARGE_SLOTS: usize = 16384;

/// Consecutive slots (from the flow's, wrapping at `MAGLEV_SLOTS`) the TC path tries to find
/// a backend other than the client itself: a packet balanced back to its sender would come
/// into its namespace with its own address as source, which the kernel drops as martian.
/// The agent builds every table so that any `HAIRPIN_PROBES` such slots hold at least two
/// backends (when the service has two).
pub const HAIRPIN_PROBES: usize = 8;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `ServiceKey::vni` of the entries the socket hooks look up: a socket does not know its
/// network when it connects, so VIPs must be unique across a node's networks.
pub const SOCKET_VNI: u32 = 0;

/// A service as packets address it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Network of the client (a VIP is per network).
    pub vni: u32,
    /// VIP, network byte order.
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Key of the service's Maglev table.
    pub id: u32,
    /// Backends in the table; 0 means no backend (the packet is refused). With
    /// `LARGE_TABLE` set, the table is a large one.
    pub backends: u32,
}

/// One backend address of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A service's Maglev table: slot -> backend ID (`BACKENDS` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub slots: [u32; MAGLEV_SLOTS],
}

/// A large Maglev table (for services with more than `LARGE_TABLE_BACKENDS` backends):
/// slot -> backend ID. 64 KiB, so only the services that need it have one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevLargeTable {
    pub slots: [u32; MAGLEV_LARGE_SLOTS],
}

/// A published port, as clients outside the overlay address it on any of the node's
/// addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IngressKey {
    /// Published port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The backends behind a published port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressEntry {
    /// Key of the port's Maglev table; its backends carry the target port.
    pub id: u32,
    /// Backends in the table; 0 means no backend (the packet is refused). With
    /// `LARGE_TABLE` set, the table is a large one.
    pub backends: u32,
    /// Network the backends are reached on.
    pub vni: u32,
}

/// A flow as one direction of it looks on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What the connection table remembers of a balanced flow, for each direction.
/// Forward (client -> VIP or published port): the backend chosen. Reverse (backend ->
/// client): the address and port to put back as the source, and with `flags` where the reply
/// goes next. No timestamps: an idle flow keeps its entry until the LRU needs room, never
/// because it was quiet (IPVS drops idle flows after 900 s).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    /// Network byte order (host byte order with `NAT_RETURN_VIA_NODE`: a tunnel key's).
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub flags: u16,
}

/// A balanced flow's state in one direction (`CONNTRACK`): the translation, and for the
/// forward direction the backend's ID, so a flow whose backend left its service (not merely
/// drained: a draining backend keeps its ID) is balanced again rather than sent to a task
/// that is gone. `seen` (seconds, `bpf_ktime_get_coarse_ns`) ages UDP flows out after
/// `UDP_IDLE_SECONDS`; TCP flows never age: an idle connection keeps its backend until the
/// LRU needs the room (IPVS cuts them after 900 s).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub nat: NatEntry,
    /// `BACKENDS` key of the forward direction's backend; 0 in the reverse direction.
    pub backend: u32,
    pub seen: u32,
}

/// A UDP flow quiet this long gets a fresh backend with its next datagram (IPVS's and
/// Docker's UDP timeout).
pub const UDP_IDLE_SECONDS: u32 = 300;

/// Reverse entry of an ingress flow on the node the client connected to: after the source
/// rewrite the reply leaves through the underlay, to the client.
pub const NAT_REPLY_TO_UNDERLAY: u16 = 1;
/// Reverse entry of an ingress flow on the backend's node when the client connected to
/// another node: no rewrite here; the reply goes back over the overlay to the node `addr`,
/// which rewrites it (so the client sees the address it connected to).
pub const NAT_RETURN_VIA_NODE: u16 = 2;

/// Both directions of a flow a workload opened to its own service's VIP and that was
/// balanced back to itself (the service's only backend): the forward packet also gets the VIP
/// as its source, so it does not arrive from the workload's own address (which the kernel
/// drops as martian), and the reply, to the VIP, gets the VIP back as its source and the
/// client as its destination.
pub const NAT_HAIRPIN: u16 = 3;

/// A datagram source as one socket sees it: a backend's address and port, by socket cookie
/// (the reverse translation of the `sendmsg` hook, for `recvmsg`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockPeerKey {
    pub cookie: u64,
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A datagram's fragments as the balancer tells them apart (RFC 791: source, destination,
/// protocol and identification), and where they arrive, for `FRAGMENTS`: only the first
/// fragment carries the ports, so the later ones take them from here and follow it to the
/// same backend. The interface keeps senders apart: what arrives on the underlay cannot
/// speak for a workload's datagrams, nor one workload for another's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    /// The interface the fragments arrive on.
    pub ifindex: u32,
    /// The IPv4 identification, network byte order.
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The ports of a fragmented datagram, from its first fragment (network byte order), and
/// when it was seen (seconds, as `CtEntry::seen`): a later fragment is taken for it for
/// `FRAGMENT_SECONDS` only, as the kernel gives up reassembling after `ipfrag_time`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
    pub seen: u32,
}

/// How long a first fragment's ports serve its later ones (Linux's `ipfrag_time`).
pub const FRAGMENT_SECONDS: u32 = 30;

const _: () = assert!(core::mem::size_of::<SockPeerKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 16);
const _: () = assert!(core::mem::size_of::<FragmentPorts>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::size_of::<ServiceEntry>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<MaglevTable>() == 4 * MAGLEV_SLOTS);
const _: () = assert!(core::mem::size_of::<MaglevLargeTable>() == 4 * MAGLEV_LARGE_SLOTS);
const _: () = assert!(core::mem::size_of::<IngressKey>() == 4);
const _: () = assert!(core::mem::size_of::<IngressEntry>() == 12);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::size_of::<NatEntry>() == 8);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) structs of integers and integer arrays with explicit padding; every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MaglevTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MaglevLargeTable {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockPeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FragmentPorts {}
}
