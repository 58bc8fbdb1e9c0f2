//! The control API: what manager-side Engine API calls do with the store. One file per object
//! kind, as swarmkit's `controlapi`; handlers validate, read the state, and write commands.

pub mod node;
pub mod swarm;
