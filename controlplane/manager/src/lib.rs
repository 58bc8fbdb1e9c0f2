//! Swarm mode for one node, after swarmkit's `manager/` and `node/`:
//!
//! - `swarm` / `lifecycle`: this node's place in a swarm and the operations that change it
//!   (init, join, leave, unlock, promote/demote, certificate renewal).
//! - `manager`: a running manager — the replica (`shoal-store`), its cluster port
//!   (`cluster_port`: raft, CA and dispatcher endpoints over mutual TLS) and its loops
//!   (`dispatcher`: heartbeats; `keys`: autolock re-wrapping).
//! - `leadership`: the leader-only roles' shape (`new(store)`, `run(cancel)`, pure
//!   decisions) and their start and stop with leadership; `dispatcher::liveness` and
//!   `role_manager` (promotions and demotions carried out in raft) are the first.
//! - `root_ca`: node certificates from the root that signs now, and root rotation
//!   (`swarm ca --rotate`; `root_ca::rotation` finishes one, a leader-only role).
//! - `session`: every node's heartbeats to the leader, role changes, renewals.
//! - `controlapi`: what Engine API calls do with the store; `engine_api`: the HTTP routes.
//! - `disk`: what a node keeps under `<data-root>/swarm`; `wire`: cluster-port messages.
//!
//! Roles talk only through the store; none holds another.
#![forbid(unsafe_code)]

mod cluster_port;
pub mod controlapi;
mod disk;
mod dispatcher;
pub mod engine_api;
mod error;
mod keys;
mod leadership;
mod lifecycle;
mod manager;
mod role_manager;
mod root_ca;
mod session;
mod swarm;
mod wire;

pub use disk::{Membership, SwarmDir};
pub use error::SwarmError;
pub use lifecycle::DEFAULT_PORT;
pub use manager::Manager;
pub use swarm::{Swarm, SwarmConfig};
