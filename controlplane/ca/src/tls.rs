//! rustls configurations for traffic between nodes (port 2377).
//!
//! Managers serve with a certificate chain `[node cert, root]` and verify client
//! certificates against the root; client certificates are optional at the TLS layer only
//! because a joining node has none yet — every endpoint but `join` requires one, and reads
//! the caller's identity from it (`NodeIdentity::from_cert_der`). Nodes dial managers by the
//! server name `swarm-manager`, which only manager certificates carry. A joining node trusts
//! nothing but the root whose digest is in its token (`join_client_config`).

use std::sync::Arc;

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{self, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::{issuer::certs_from_pem, root::digest_of_der, CaError, JoinToken};

pub use crate::node::MANAGER_OU as MANAGER_SERVER_NAME;

/// The provider every config uses (ring: one crypto library for TLS, certificates and
/// sealing).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto::ring::default_provider())
}

/// A node's certificate, its private key and the cluster root, as PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    pub root_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsMaterial {
    /// Every root in `root_pem`: one, or during a root rotation the old and the new.
    fn root_store(&self) -> Result<RootCertStore, CaError> {
        let mut roots = RootCertStore::empty();
        for root in certs_from_pem(&self.root_pem)? {
            roots.add(root)?;
        }
        Ok(roots)
    }

    /// `[node cert, intermediates.., roots..]`: during a rotation the new root cross-signed
    /// by the old one follows the node certificate, so nodes still trusting only the old root
    /// accept it; the roots ride along so a joining node can match one to its token.
    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        Ok([certs_from_pem(&self.cert_pem)?, certs_from_pem(&self.root_pem)?].concat())
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, CaError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| CaError::InvalidCertificate(format!("private key: {e}")))
    }
}

/// What a manager serves with.
pub fn server_config(material: &TlsMaterial) -> Result<Arc<ServerConfig>, CaError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(material.root_store()?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain()?, material.key()?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The Engine API over TCP (dockerd's `--tlsverify`): the daemon's certificate, and client
/// certificates required and verified against `ca_pem`, as `docker --tlsverify` expects.
/// These are the operator's certificates (dockerd's `--tlscacert/--tlscert/--tlskey`), not the
/// cluster's.
pub fn api_server_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, CaError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| CaError::InvalidCertificate(e.to_string()))?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CaError::InvalidCertificate(format!("private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a node dials managers with: the cluster root as the only trust anchor, its own
/// certificate as the client certificate. Managers are dialled by address, but their
/// certificates name their role, not their address (which may change), so the server must
/// present a valid chain to our root that is valid for `swarm-manager`, whatever was dialled.
pub fn client_config(material: &TlsMaterial) -> Result<ClientConfig, CaError> {
    let provider = provider();
    let verifier =
        ManagerVerifier { roots: Some(Arc::new(material.root_store()?)), token: None, provider: provider.clone() };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(material.chain()?, material.key()?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What a node without a certificate dials a manager with to join: it accepts a server
/// only if the chain includes a root whose digest is the token's, and the server's
/// certificate verifies against that root.
pub fn join_client_config(token: &JoinToken) -> Result<ClientConfig, CaError> {
    let provider = provider();
    let verifier = ManagerVerifier { roots: None, token: Some(token.clone()), provider: provider.clone() };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Verifies a manager: a chain to `roots` (or, when joining, to the root in the chain whose
/// digest the token pins), valid for the name `swarm-manager` whatever address was dialled.
#[derive(Debug)]
struct ManagerVerifier {
    roots: Option<Arc<RootCertStore>>,
    token: Option<JoinToken>,
    provider: Arc<CryptoProvider>,
}

impl ManagerVerifier {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }

    fn roots_for(&self, intermediates: &[CertificateDer<'_>]) -> Result<Arc<RootCertStore>, rustls::Error> {
        if let Some(roots) = &self.roots {
            return Ok(roots.clone());
        }
        let token = self.token.as_ref().ok_or_else(|| rustls::Error::General("no trust anchor".into()))?;
        let root = intermediates
            .iter()
            .find(|cert| token.pins(&digest_of_der(cert)))
            .ok_or_else(|| rustls::Error::General("the manager's root CA does not match the join token".into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(root.clone().into_owned())?;
        Ok(Arc::new(roots))
    }
}

impl ServerCertVerifier for ManagerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots_for(intermediates)?;
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, &manager_server_name(), ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

/// The server name managers are dialled by.
pub fn manager_server_name() -> ServerName<'static> {
    ServerName::try_from(MANAGER_SERVER_NAME).expect("a valid DNS name")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_api::node::NodeRole;

    use super::*;
    use crate::{NodeIdentity, NodeKey, RootCa};

    fn material(root: &RootCa, role: NodeRole) -> TlsMaterial {
        let key = NodeKey::generate().unwrap();
        let who = NodeIdentity { node_id: "n1".into(), role, cluster_id: "c".into() };
        TlsMaterial {
            root_pem: root.cert_pem().to_owned(),
            cert_pem: root.issue(&key.csr_pem().unwrap(), &who, Duration::from_secs(600)).unwrap(),
            key_pem: key.to_pem().to_string(),
        }
    }

    /// Runs a TLS handshake in memory between `client` and `server`.
    fn handshake(client: ClientConfig, server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
        // Dialled by address, as nodes dial managers.
        let dialled = ServerName::try_from("10.77.1.1").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), dialled)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General("handshake did not finish".into()))
    }

    #[test]
    fn nodes_of_one_cluster_complete_mutual_tls() {
        let root = RootCa::generate().unwrap();
        let server = server_config(&material(&root, NodeRole::Manager)).unwrap();
        handshake(client_config(&material(&root, NodeRole::Worker)).unwrap(), server).unwrap();
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let (ours, theirs) = (RootCa::generate().unwrap(), RootCa::generate().unwrap());
        let server = server_config(&material(&ours, NodeRole::Manager)).unwrap();
        assert!(handshake(client_config(&material(&theirs, NodeRole::Manager)).unwrap(), server).is_err());
    }

    #[test]
    fn workers_cannot_serve_as_managers() {
        let root = RootCa::generate().unwrap();
        let server = server_config(&material(&root, NodeRole::Worker)).unwrap();
        let err = handshake(client_config(&material(&root, NodeRole::Worker)).unwrap(), server).unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
    }

    /// A node certificate from `issuer` (with `cross`, its root cross-signed, in the chain),
    /// held by a node trusting `trust`.
    fn rotated(issuer: &RootCa, cross: Option<&str>, trust: &[&RootCa], role: NodeRole) -> TlsMaterial {
        let mut tls = material(issuer, role);
        tls.cert_pem.push_str(cross.unwrap_or_default());
        tls.root_pem = trust.iter().map(|r| r.cert_pem()).collect();
        tls
    }

    #[test]
    fn a_root_rotation_keeps_every_pair_of_nodes_talking() {
        let (old, new) = (RootCa::generate().unwrap(), RootCa::generate().unwrap());
        let cross = old.cross_sign(&new).unwrap();
        let cross = Some(cross.as_str());
        // Mid-rotation: reissued and not yet reissued nodes, with and without the new root.
        let nodes = [
            rotated(&old, None, &[&old], NodeRole::Manager),
            rotated(&old, None, &[&old, &new], NodeRole::Manager),
            rotated(&new, cross, &[&old], NodeRole::Manager),
            rotated(&new, cross, &[&old, &new], NodeRole::Manager),
        ];
        for server in &nodes {
            for client in &nodes {
                handshake(client_config(client).unwrap(), server_config(server).unwrap()).unwrap();
            }
        }
        // Done: every node reissued and trusting the new root alone.
        let done = rotated(&new, cross, &[&new], NodeRole::Manager);
        let fresh = rotated(&new, None, &[&new], NodeRole::Manager);
        for (a, b) in [(&done, &fresh), (&fresh, &done), (&nodes[3], &fresh), (&fresh, &nodes[3])] {
            handshake(client_config(a).unwrap(), server_config(b).unwrap()).unwrap();
        }
        // ... and a certificate of the old root alone is no longer accepted.
        assert!(handshake(client_config(&nodes[0]).unwrap(), server_config(&fresh).unwrap()).is_err());
    }

    #[test]
    fn the_issuer_of_a_reissued_certificate_is_the_new_root() {
        let (old, new) = (RootCa::generate().unwrap(), RootCa::generate().unwrap());
        let cross = old.cross_sign(&new).unwrap();
        let reissued = rotated(&new, Some(&cross), &[&old], NodeRole::Worker);
        let issuer = crate::IssuerInfo::of_leaf(&reissued.cert_pem, &reissued.root_pem).unwrap();
        assert_eq!(issuer, crate::IssuerInfo::of_ca(new.cert_pem()).unwrap());
        let before = rotated(&old, None, &[&old, &new], NodeRole::Worker);
        let issuer = crate::IssuerInfo::of_leaf(&before.cert_pem, &before.root_pem).unwrap();
        assert_eq!(issuer, crate::IssuerInfo::of_ca(old.cert_pem()).unwrap());
        assert_ne!(
            crate::IssuerInfo::of_ca(old.cert_pem()).unwrap(),
            crate::IssuerInfo::of_ca(new.cert_pem()).unwrap()
        );
    }

    #[test]
    fn an_operator_root_must_be_a_ca_with_its_own_key() {
        let (a, b) = (RootCa::generate().unwrap(), RootCa::generate().unwrap());
        assert!(RootCa::from_pem(a.cert_pem(), &a.key_pem()).is_ok());
        assert!(RootCa::from_pem(a.cert_pem(), &b.key_pem()).is_err(), "another root's key");
        let leaf = material(&a, NodeRole::Worker);
        assert!(RootCa::from_pem(&leaf.cert_pem, &leaf.key_pem).is_err(), "a node certificate");
        let two = format!("{}{}", a.cert_pem(), b.cert_pem());
        assert!(RootCa::from_pem(&two, &a.key_pem()).is_err(), "a bundle would all be trusted");
        assert!(
            a.valid_for(Duration::from_secs(365 * 24 * 3600))
                && !a.valid_for(Duration::from_secs(25 * 365 * 24 * 3600))
        );
    }

    #[test]
    fn joining_trusts_only_the_root_in_the_token() {
        let (ours, theirs) = (RootCa::generate().unwrap(), RootCa::generate().unwrap());
        let server = server_config(&material(&ours, NodeRole::Manager)).unwrap();
        let good = JoinToken::generate(&ours.digest().unwrap()).unwrap();
        handshake(join_client_config(&good).unwrap(), server.clone()).unwrap();
        let bad = JoinToken::generate(&theirs.digest().unwrap()).unwrap();
        assert!(handshake(join_client_config(&bad).unwrap(), server).is_err());
    }
}
