//! Choosing a flow's backend: its hash's slot in the service's Maglev table (the same on
//! every node), past the client itself when it is a backend.

use shoal_common::{
    lb::{FlowKey, NatEntry, HAIRPIN_PROBES, MAGLEV_SLOTS},
    stats::DROP_NO_BACKEND,
};

use crate::maps::{lookup, BACKENDS, MAGLEV};

/// The backend the service's Maglev table gives this flow, and its ID.
#[inline(always)]
pub fn pick(service: u32, backends: u32, flow: &FlowKey) -> Result<(NatEntry, u32), u32> {
    if backends == 0 {
        return Err(DROP_NO_BACKEND);
    }
    let table = MAGLEV.get_ptr(service).ok_or(DROP_NO_BACKEND)?;
    let first = flow_hash(flow) as usize;
    let mut chosen = None;
    // A client that is itself a backend is not sent to itself on this path: the packet
    // would come back into its own namespace with its own address as source, which the
    // kernel drops as martian. The next slots give another backend (the socket path has no
    // such limit: a connect() to oneself goes over loopback).
    for probe in 0..HAIRPIN_PROBES {
        let slot = (first + probe) & (MAGLEV_SLOTS - 1);
        // SAFETY: the pointer is valid for this program run; `get` bounds the index.
        let Some(backend_id) = (unsafe { (*table).slots.get(slot).copied() }) else { break };
        let Some(backend) = lookup(&BACKENDS, &backend_id) else { break };
        chosen = Some((NatEntry { addr: backend.addr, port: backend.port, flags: 0 }, backend_id));
        if backend.addr != flow.saddr || backends == 1 {
            break;
        }
    }
    chosen.ok_or(DROP_NO_BACKEND)
}

/// A well-mixed hash of the flow (murmur3's finaliser over the folded tuple). The table it
/// indexes is the same on every node, so a flow hashed the same picks the same backend
/// anywhere (the routing mesh zeroes `daddr`, the one thing that differs between nodes).
#[inline(always)]
fn flow_hash(flow: &FlowKey) -> u32 {
    let mut h =
        flow.saddr ^ flow.daddr.rotate_left(16) ^ ((flow.sport as u32) << 16 | flow.dport as u32) ^ flow.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
