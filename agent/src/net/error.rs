//! Errors of the network role, split by whether the caller's input or the node is at fault.

use std::{net::Ipv4Addr, path::PathBuf};

use shoal_api::dataplane::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The desired state is inconsistent in itself.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A local endpoint names an interface this node does not have.
    #[error("no such interface: {0}")]
    InterfaceNotFound(String),
    /// An endpoint on this node came without its host-side interface.
    #[error("endpoint {0} runs on this node but names no interface")]
    MissingInterface(Ipv4Addr),
    /// Two endpoints claim the same host-side interface.
    #[error("interface {0} is claimed by more than one endpoint")]
    InterfaceShared(String),
    /// A local endpoint names an interface that is not a veth (the underlay, the VXLAN
    /// device, ...): attaching the workload program there would cut the node off.
    #[error("interface {0} is not a veth")]
    NotVeth(String),
    /// A batch numbered at or below the last one applied (already applied, or out of order).
    #[error("batch {given} is not after the last one applied ({applied})")]
    StaleSequence { given: u64, applied: u64 },
    /// No batch can come after the last one applied (`u64::MAX`): a whole state must be
    /// sent with a sequence number.
    #[error("the last batch applied is numbered {}: no batch can come after it", u64::MAX)]
    SequenceExhausted,
    /// Every table or backend ID is in use (4 billion of them).
    #[error("no table or backend ID left")]
    IdsExhausted,
    #[error("host stack: {0}")]
    Host(String),
    #[error("kernel: {0}")]
    Kernel(String),
    #[error("mounting bpffs on /sys/fs/bpf: {0}")]
    MountBpfFs(#[source] nix::Error),
    #[error("{} is not on bpffs", .0.display())]
    NotBpfFs(PathBuf),
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {map} is full ({capacity})")]
    MapFull { map: &'static str, capacity: &'static str },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("BPF link: {0}")]
    Link(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    /// The new state is in the kernel but could not be saved; the old one was put back.
    #[error("saving the desired state: {0}")]
    Persist(#[source] std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl NetError {
    /// True when the request was wrong and nothing was changed (HTTP 400).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            NetError::Spec(_)
                | NetError::InterfaceNotFound(_)
                | NetError::MissingInterface(_)
                | NetError::InterfaceShared(_)
                | NetError::NotVeth(_)
                | NetError::SequenceExhausted
        )
    }

    /// The status Docker would answer with: 404 for what is not declared, 409 for what
    /// conflicts with the state, 400 for other bad input, 500 when the node failed.
    pub fn status(&self) -> u16 {
        match self {
            NetError::Spec(e) => e.status(),
            NetError::StaleSequence { .. } | NetError::InterfaceShared(_) => 409,
            e if e.is_bad_input() => 400,
            _ => 500,
        }
    }
}
