//! The cluster's root of trust, as Swarm builds it (swarmkit `ca/`):
//!
//! - `root`: the cluster root CA made at `swarm init`, which signs every node certificate.
//! - `issuer`: who issued a certificate (a root rotation is done when every node's issuer
//!   is the new root).
//! - `node`: a node's key, its certificate request, and the identity a certificate carries
//!   (CN = node ID, OU = role, O = cluster ID).
//! - `token`: join tokens `SWMTKN-1-<CA digest>-<secret>`; the digest pins the CA.
//! - `unlock`: autolock keys `SWMKEY-1-...` and the data key they wrap.
//! - `seal`: authenticated encryption of data at rest with the data key.
//! - `tls`: rustls configurations for mutual TLS between nodes, and for joining.
#![forbid(unsafe_code)]

mod base36;
mod error;
pub mod issuer;
pub mod node;
pub mod root;
pub mod seal;
pub mod tls;
pub mod token;
pub mod unlock;

pub use error::CaError;
pub use issuer::IssuerInfo;
pub use node::{NodeIdentity, NodeKey};
pub use root::RootCa;
pub use seal::DataKey;
pub use token::JoinToken;
pub use unlock::UnlockKey;

/// Fills `buf` from the OS's secure random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), CaError> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| CaError::Random)
}

/// A random ID in Swarm's shape: 25 characters of base36 (128 random bits), as node and
/// cluster IDs are.
pub fn new_id() -> Result<String, CaError> {
    let mut bytes = [0u8; 16];
    random(&mut bytes)?;
    Ok(base36::encode(&bytes, 25))
}

/// The ID for the object a request with ID `request` creates in cluster `scope`: the same
/// on every retry of that request (so a retried write is recognised, not done twice), and
/// unguessable without the request ID (a SHA-256 of both, shaped like `new_id`).
pub fn id_for(scope: &str, request: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{scope}\0{request}").as_bytes());
    base36::encode(&digest.as_ref()[..16], 25)
}
