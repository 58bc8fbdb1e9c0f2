//! Counting outcomes in `STATS`, and turning a drop code into a TC verdict.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};

use crate::maps::STATS;

/// Adds this packet to the counter `code`.
#[inline(always)]
pub fn count(ctx: &TcContext, code: u32) {
    if let Some(counter) = STATS.get_ptr_mut(code) {
        // SAFETY: a per-CPU array slot is only touched by this CPU while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}

/// Counts an event that has no packet (a socket hook), under `code`.
#[inline(always)]
pub fn count_event(code: u32) {
    if let Some(counter) = STATS.get_ptr_mut(code) {
        // SAFETY: a per-CPU array slot is only touched by this CPU while the program runs.
        unsafe { (*counter).packets += 1 };
    }
}

/// Counts a drop under its reason and returns the verdict that drops the packet.
#[inline(always)]
pub fn drop_packet(ctx: &TcContext, reason: u32) -> i32 {
    count(ctx, reason);
    TC_ACT_SHOT
}
