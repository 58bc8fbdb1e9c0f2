//! The cluster store: every cluster object (the swarm, its nodes, later services, tasks,
//! networks, secrets) replicated among the managers with Raft (openraft 0.9, storage v2).
//!
//! Three modules make the consensus, as in openraft's examples, each testable alone:
//! - `log`: the raft log and vote, durable in an embedded database (redb) and sealed with
//!   the node's data key, so nothing on disk is readable without it.
//! - `state_machine`: applies committed commands to `state::ClusterState`, keeps snapshots
//!   (a file of sealed chunks beside the database, `snapshot_file`, written and read as a
//!   stream) and announces every change on a watch channel.
//! - `network`: raft RPCs to other managers over mutual TLS (`append_in_flight`: an append
//!   carrying entries outlives openraft's 50 ms per-call timeout).
//!
//! Around them, shaped like swarmkit's `manager/state/store`:
//! - `objects`: the kinds of object (one file each: identity, indexes, invariants) and
//!   `table`: one kind's objects with their indexes.
//! - `command`: what a raft entry carries — a transaction (a batch of mutations over any
//!   kinds, all or nothing) with its format version — and `state`: the pure `apply`.
//! - `watch`: the event stream, with `view_and_watch` for a consistent start.
//! - `codec`: the snapshot encoding. `raft` puts the pieces together.
#![forbid(unsafe_code)]

mod append_in_flight;
mod codec;
pub mod command;
mod db;
mod election;
pub mod log;
pub mod network;
pub mod objects;
pub mod raft;
mod snapshot_file;
pub mod state;
pub mod state_machine;
pub mod table;
pub mod transport;
mod types;
pub mod watch;

pub use command::{Batch, Command, Mutation};
pub use objects::{Cluster, Index, Kind, Object, RootRotation, StoredObject};
pub use raft::{now_rfc3339, ClusterStore, StoreConfig, WriteError};
pub use state::{ClusterState, CommandError};
pub use table::{ResolveError, Table};
pub use types::{Applied, RaftId, RaftPeer, TypeConfig};
pub use watch::{Action, Event, Filter, WatchError, Watcher};

#[cfg(test)]
mod suite_tests;
