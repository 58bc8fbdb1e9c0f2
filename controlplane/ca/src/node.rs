//! A node's key and certificate request, and the identity its certificate carries:
//! CN = node ID, OU = role (`swarm-manager` / `swarm-worker`), O = cluster ID.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use shoal_api::node::NodeRole;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::{root::pem_to_der, CaError};

/// OU of manager certificates, and the TLS server name managers answer to.
pub const MANAGER_OU: &str = "swarm-manager";
/// OU of worker certificates.
pub const WORKER_OU: &str = "swarm-worker";

/// A node's private key (ECDSA P-256). It never leaves the node.
pub struct NodeKey(KeyPair);

impl NodeKey {
    pub fn generate() -> Result<Self, CaError> {
        Ok(NodeKey(KeyPair::generate()?))
    }

    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        Ok(NodeKey(KeyPair::from_pem(pem)?))
    }

    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.serialize_pem())
    }

    /// A certificate request proving possession of this key; the CA fills in the subject.
    pub fn csr_pem(&self) -> Result<String, CaError> {
        Ok(CertificateParams::default().serialize_request(&self.0)?.pem()?)
    }
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub role: NodeRole,
    pub cluster_id: String,
}

impl NodeIdentity {
    pub fn role_ou(&self) -> &'static str {
        match self.role {
            NodeRole::Manager => MANAGER_OU,
            NodeRole::Worker => WORKER_OU,
        }
    }

    /// Reads the identity from a DER certificate (already verified against the root).
    pub fn from_cert_der(der: &[u8]) -> Result<Self, CaError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        let subject = cert.subject();
        let first = |attrs: Option<&x509_parser::x509::AttributeTypeAndValue>| {
            attrs.and_then(|a| a.as_str().ok()).map(str::to_owned)
        };
        let node_id = first(subject.iter_common_name().next())
            .ok_or_else(|| CaError::InvalidCertificate("no common name".into()))?;
        let role = match first(subject.iter_organizational_unit().next()).as_deref() {
            Some(MANAGER_OU) => NodeRole::Manager,
            Some(WORKER_OU) => NodeRole::Worker,
            other => return Err(CaError::InvalidCertificate(format!("unknown role OU {other:?}"))),
        };
        let cluster_id = first(subject.iter_organization().next())
            .ok_or_else(|| CaError::InvalidCertificate("no organization".into()))?;
        Ok(NodeIdentity { node_id, role, cluster_id })
    }

    pub fn from_cert_pem(pem: &str) -> Result<Self, CaError> {
        Self::from_cert_der(&pem_to_der(pem)?)
    }
}

/// When the certificate in `pem` stops being valid.
pub fn not_after(pem: &str) -> Result<SystemTime, CaError> {
    validity(pem).map(|(_, end)| end)
}

/// When the certificate in `pem` starts being valid.
pub fn not_before(pem: &str) -> Result<SystemTime, CaError> {
    validity(pem).map(|(start, _)| start)
}

fn validity(pem: &str) -> Result<(SystemTime, SystemTime), CaError> {
    let der = pem_to_der(pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((at(cert.validity().not_before.timestamp()), at(cert.validity().not_after.timestamp())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RootCa;

    #[test]
    fn issued_certificate_carries_the_identity_the_ca_chose() {
        let root = RootCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let who = NodeIdentity { node_id: "abc123".into(), role: NodeRole::Manager, cluster_id: "cluster9".into() };
        let cert = root.issue(&key.csr_pem().unwrap(), &who, Duration::from_secs(3600)).unwrap();
        assert_eq!(NodeIdentity::from_cert_pem(&cert).unwrap(), who);
        let left = not_after(&cert).unwrap().duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    }

    #[test]
    fn a_root_reloaded_from_pem_signs_for_the_same_digest() {
        let root = RootCa::generate().unwrap();
        let again = RootCa::from_pem(root.cert_pem(), &root.key_pem()).unwrap();
        assert_eq!(root.digest().unwrap(), again.digest().unwrap());
        let key = NodeKey::generate().unwrap();
        let who = NodeIdentity { node_id: "n".into(), role: NodeRole::Worker, cluster_id: "c".into() };
        assert!(again.issue(&key.csr_pem().unwrap(), &who, Duration::from_secs(60)).is_ok());
    }
}
