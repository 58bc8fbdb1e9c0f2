//! The cluster's CA as the managers run it: node certificates issued by the root that signs
//! now, and root rotation (`swarm ca --rotate`), done as swarmkit does it. A rotation makes a
//! new root and cross-signs it with the current one; from then on certificates come from the
//! new root with the cross-signed copy behind them in the chain, so nodes that trust only the
//! old root still accept them, and nodes are told (in heartbeat replies) to trust both roots
//! and to renew. `rotation`, a leader-only role, ends it once every node holds a certificate
//! of the new root: the new root becomes the only one, with new join tokens pinning it.

mod rotation;

use std::time::Duration;

use shoal_api::swarm::{TlsInfo, DEFAULT_NODE_CERT_EXPIRY_NS};
use shoal_ca::{IssuerInfo, JoinToken, NodeIdentity, RootCa};
use shoal_store::{Cluster, RootRotation};

pub use rotation::RootRotator;

use crate::SwarmError;

fn internal(e: shoal_ca::CaError) -> SwarmError {
    SwarmError::Internal(e.to_string())
}

/// A certificate for the key in `csr_pem` naming `identity`, from the root that signs now,
/// followed by what a node needs to check it (the cross-signed new root, mid-rotation).
pub fn issue(cluster: &Cluster, csr_pem: &str, identity: &NodeIdentity) -> Result<String, SwarmError> {
    let signer = cluster.signer();
    let root = RootCa::from_pem(signer.cert_pem, signer.key_pem).map_err(internal)?;
    let mut pem = root
        .issue(csr_pem, identity, cert_lifetime(cluster))
        .map_err(|e| SwarmError::InvalidArgument(format!("certificate request: {e}")))?;
    pem.push_str(signer.chain_pem);
    Ok(pem)
}

fn cert_lifetime(cluster: &Cluster) -> Duration {
    let ns = cluster.info.spec.ca_config.node_cert_expiry;
    let ns = if ns > 0 { ns } else { DEFAULT_NODE_CERT_EXPIRY_NS };
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// `TLSInfo` of a cluster whose root (and issuer) is `root_pem`.
pub fn tls_info(root_pem: &str) -> Result<TlsInfo, SwarmError> {
    let issuer = IssuerInfo::of_ca(root_pem).map_err(internal)?;
    Ok(TlsInfo {
        trust_root: root_pem.to_owned(),
        cert_issuer_subject: issuer.subject,
        cert_issuer_public_key: issuer.public_key,
    })
}

/// What a node reports of its certificate (Docker's node `TLSInfo`): the roots it trusts
/// and who issued its certificate (`chain_pem`).
pub fn node_tls_info(chain_pem: &str, roots_pem: &str) -> TlsInfo {
    let issuer = IssuerInfo::of_leaf(chain_pem, roots_pem).unwrap_or_else(|e| {
        // Reported empty: the managers see a node that still needs a certificate.
        tracing::warn!(error = %e, "no issuer found for this node's certificate");
        IssuerInfo::default()
    });
    TlsInfo {
        trust_root: roots_pem.to_owned(),
        cert_issuer_subject: issuer.subject,
        cert_issuer_public_key: issuer.public_key,
    }
}

/// Starts rotating `cluster`'s root to `next` (an operator's certificate and key), or to a
/// new root. A rotation already under way is replaced: its certificates stay valid (they
/// chain to the current root) and their holders renew again.
pub fn start_rotation(cluster: &mut Cluster, next: Option<(&str, &str)>) -> Result<(), SwarmError> {
    let current = RootCa::from_pem(&cluster.info.tls_info.trust_root, &cluster.root_key_pem).map_err(internal)?;
    let next = match next {
        Some((cert, key)) => {
            let root = RootCa::from_pem(cert, key)
                .map_err(|e| SwarmError::InvalidArgument(format!("invalid CA certificate or key: {e}")))?;
            if !root.valid_for(cert_lifetime(cluster)) {
                return Err(SwarmError::InvalidArgument(
                    "the CA certificate expires before the node certificates it would issue".into(),
                ));
            }
            root
        }
        None => RootCa::generate().map_err(internal)?,
    };
    let digest = next.digest().map_err(internal)?;
    let issuer = IssuerInfo::of_ca(next.cert_pem()).map_err(internal)?;
    cluster.root_rotation = Some(RootRotation {
        cert_pem: next.cert_pem().to_owned(),
        key_pem: next.key_pem().to_string(),
        cross_signed_pem: current.cross_sign(&next).map_err(internal)?,
        worker_token: JoinToken::generate(&digest).map_err(internal)?.to_string(),
        manager_token: JoinToken::generate(&digest).map_err(internal)?.to_string(),
    });
    // Docker shows the issuer certificates should have from now on, and the old trust root
    // until the rotation is done.
    cluster.info.root_rotation_in_progress = true;
    cluster.info.tls_info.cert_issuer_subject = issuer.subject;
    cluster.info.tls_info.cert_issuer_public_key = issuer.public_key;
    Ok(())
}
