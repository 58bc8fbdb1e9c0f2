//! An empty TC program: the floor every TC program pays (the kernel's dispatch and, under
//! BPF_PROG_TEST_RUN, the run's own overhead), measured beside the real programs by the
//! per-packet cost benchmark (`shoal-bpf-cost`). Loaded by it only, never attached.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn empty_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}
