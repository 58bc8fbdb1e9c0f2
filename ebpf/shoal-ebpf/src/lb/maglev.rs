//! Choosing a flow's backend: its hash's slot in the service's Maglev table (the same on
//! every node; 1021 slots, or 16381 for a service with many backends), past the client
//! itself when it is a backend.

use shoal_common::{
    lb::{FlowKey, NatEntry, HAIRPIN_PROBES, LARGE_TABLE, MAGLEV_LARGE_SLOTS, MAGLEV_SLOTS},
    stats::DROP_NO_BACKEND,
};

use crate::maps::{lookup, BACKENDS, MAGLEV, MAGLEV_LARGE};

/// The backend the service's Maglev table gives this flow, and its ID. `backends` is the
/// service entry's: the count, with `LARGE_TABLE` set when the table is a large one. A table
/// moving between the maps keeps its ID, so when the one the entry names is not there (an
/// entry read just before the move, or one an older version wrote) the other map has it.
#[inline(always)]
pub fn pick(service: u32, backends: u32, flow: &FlowKey) -> Result<(NatEntry, u32), u32> {
    let (large, count) = (backends & LARGE_TABLE != 0, backends & !LARGE_TABLE);
    if count == 0 {
        return Err(DROP_NO_BACKEND);
    }
    let first = flow_hash(flow) as usize;
    let small_table = || MAGLEV.get_ptr(service);
    let large_table = || MAGLEV_LARGE.get_ptr(service);
    let (small, big) = if large {
        match large_table() {
            Some(table) => (None, Some(table)),
            None => (small_table(), None),
        }
    } else {
        match small_table() {
            Some(table) => (Some(table), None),
            None => (None, large_table()),
        }
    };
    if let Some(table) = big {
        // SAFETY: the pointer is valid for this program run; `get` bounds the index.
        return probe(first, count, flow, |slot| unsafe {
            (*table).slots.get(slot & (MAGLEV_LARGE_SLOTS - 1)).copied()
        });
    }
    let table = small.ok_or(DROP_NO_BACKEND)?;
    // SAFETY: as above.
    probe(first, count, flow, |slot| unsafe { (*table).slots.get(slot & (MAGLEV_SLOTS - 1)).copied() })
}

/// The backend in the flow's slot (`first`), or, when that is the client itself, in one of
/// the next slots. A client that is itself a backend is not sent to itself on this path:
/// the packet would come back into its own namespace with its own address as source, which
/// the kernel drops as martian. The next slots give another backend (the socket path has
/// no such limit: a connect() to oneself goes over loopback).
#[inline(always)]
fn probe(
    first: usize,
    backends: u32,
    flow: &FlowKey,
    slot_at: impl Fn(usize) -> Option<u32>,
) -> Result<(NatEntry, u32), u32> {
    let mut chosen = None;
    for step in 0..HAIRPIN_PROBES {
        let Some(backend_id) = slot_at(first + step) else { break };
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
