//! The types shared by shoal's API server, store, agent and CLI: one definition of each.
//!
//! Names and JSON shapes follow the Docker Engine API where Docker has the object
//! (`moby/api/types`); shoal-only objects (the agent's desired data-plane state) live under
//! `/shoal/v1/...` and say so.
#![forbid(unsafe_code)]

pub mod dataplane;
pub mod error;
pub mod info;
pub mod mac;
pub mod network;
pub mod node;
pub mod service;
pub mod swarm;
pub mod system;
pub mod task;

pub use error::ErrorResponse;

/// Go clients send `null` for empty maps and slices; read it as empty.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
pub use mac::MacAddr;
