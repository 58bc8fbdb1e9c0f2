//! The raft type configuration and the small types that travel with it.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::{command::Command, state::CommandError};

/// A manager's raft member ID. Swarm node IDs are strings; raft wants a number, so each
/// manager gets a random one at join and the membership maps it to the node (`RaftPeer`).
pub type RaftId = u64;

/// What the raft membership knows of a manager: its swarm node ID and cluster address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftPeer {
    pub node_id: String,
    /// `IP:port` of the manager's cluster endpoint.
    pub addr: String,
}

/// The version (raft index) a successful command gave the object it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: u64,
}

openraft::declare_raft_types!(
    /// shoal's raft: commands in, command results out, managers as members.
    pub TypeConfig:
        D = Command,
        R = Result<Applied, CommandError>,
        NodeId = RaftId,
        Node = RaftPeer,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
