//! The cluster store: every cluster object (the swarm, its nodes, later services, tasks,
//! networks, secrets) replicated among the managers with Raft (openraft 0.9, storage v2).
//!
//! Three modules make the consensus, as in openraft's examples, each testable alone:
//! - `log`: the raft log and vote, durable in an embedded database (redb) and sealed with
//!   the node's data key, so nothing on disk is readable without it.
//! - `state_machine`: applies committed commands to `state::ClusterState`, keeps snapshots
//!   (sealed, in the same database) and announces every change on a watch channel.
//! - `network`: raft RPCs to other managers over mutual TLS.
//!
//! `state` holds the objects and the pure `apply` of each `Command` (version checks and all),
//! shared by every replica so they all decide alike. `raft` puts the pieces together.
#![forbid(unsafe_code)]

mod db;
pub mod log;
pub mod network;
pub mod raft;
pub mod state;
pub mod state_machine;
pub mod transport;
mod types;

pub use raft::{now_rfc3339, ClusterStore, StoreConfig, WriteError};
pub use state::{Cluster, ClusterState, Command, CommandError, Op};
pub use types::{Applied, Change, RaftId, RaftPeer, TypeConfig};

#[cfg(test)]
mod suite_tests;
