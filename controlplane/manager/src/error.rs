//! Errors of swarm operations, each with the HTTP status and wording dockerd uses (the docker
//! CLI shows the message as is, and some clients act on the status).

use shoal_store::{CommandError, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("This node is not part of a swarm")]
    NotInSwarm,
    #[error("This node is not a swarm manager. Use \"docker swarm init\" or \"docker swarm join\" to connect this node to swarm and try again.")]
    NotInSwarmForManagerCall,
    #[error("This node is not a swarm manager. Worker nodes can't be used to view or modify cluster state. Please run this command on a manager node or promote the current node to a manager.")]
    NotManager,
    #[error(
        "This node is already part of a swarm. Use \"docker swarm leave\" to leave this swarm and join another one."
    )]
    AlreadyInSwarm,
    #[error("Swarm is encrypted and needs to be unlocked before it can be used. Please use \"docker swarm unlock\" to unlock it.")]
    Locked,
    #[error("swarm is not locked!")]
    NotLocked,
    #[error("invalid key: it does not unlock this node")]
    InvalidUnlockKey,
    #[error("You are attempting to leave the swarm on a node that is participating as a manager. Removing the last manager erases all current state of the swarm. Use `--force` to ignore this message.")]
    LastManager,
    #[error("invalid join token")]
    InvalidToken,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Another node could not be reached (join, a manager for a worker).
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Internal(String),
}

impl SwarmError {
    pub fn io(what: String, e: std::io::Error) -> Self {
        SwarmError::Internal(format!("{what}: {e}"))
    }

    /// The status dockerd answers with.
    pub fn status(&self) -> u16 {
        match self {
            SwarmError::NotInSwarm
            | SwarmError::NotInSwarmForManagerCall
            | SwarmError::NotManager
            | SwarmError::AlreadyInSwarm
            | SwarmError::Locked
            | SwarmError::LastManager
            | SwarmError::Unreachable(_) => 503,
            SwarmError::NotLocked | SwarmError::InvalidArgument(_) | SwarmError::InvalidToken => 400,
            SwarmError::InvalidUnlockKey => 401,
            SwarmError::NotFound(_) => 404,
            SwarmError::Conflict(_) => 409,
            SwarmError::Write(WriteError::Refused(refused)) => match refused {
                CommandError::NotFound { .. } => 404,
                CommandError::OutOfSequence | CommandError::Conflict(_) => 409,
                CommandError::FailedPrecondition(_) | CommandError::Invalid(_) => 400,
                CommandError::UnsupportedFormat(_) => 500,
            },
            SwarmError::Write(WriteError::NoLeader | WriteError::Unavailable(_) | WriteError::Ambiguous(_)) => 503,
            SwarmError::Internal(_) => 500,
        }
    }
}
