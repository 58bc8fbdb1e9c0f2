//! The cluster root CA: made once at `swarm init`, it signs every node certificate. Its
//! certificate's SHA-256 digest goes into the join tokens, so a joining node can tell the
//! real cluster from an impostor before it sends anything secret.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::{node::NodeIdentity, CaError};

/// Common name of the root CA certificate, as swarmkit names it.
const ROOT_CN: &str = "swarm-ca";
/// Lifetime of the root CA (swarmkit: 20 years).
const ROOT_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Backdating of `not_before`, so nodes with slightly skewed clocks accept new certificates.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

pub struct RootCa {
    cert: rcgen::Certificate,
    cert_pem: String,
    key: KeyPair,
    /// Certificates it issues end no later than it does.
    not_after: OffsetDateTime,
}

impl RootCa {
    /// A new self-signed root (ECDSA P-256).
    pub fn generate() -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, ROOT_CN);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_LIFETIME;
        let not_after = params.not_after;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(RootCa { cert, cert_pem, key, not_after })
    }

    /// The root as stored in the cluster state, or as an operator hands it to
    /// `swarm ca --rotate --ca-cert --ca-key`: one CA certificate, valid now, and the key it
    /// was made for.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let invalid = |why: &str| CaError::InvalidCertificate(why.to_owned());
        if crate::issuer::certs_from_pem(cert_pem)?.len() != 1 {
            // Every certificate given would become trusted by every node.
            return Err(invalid("give exactly one CA certificate"));
        }
        let key = KeyPair::from_pem(key_pem)?;
        let der = pem_to_der(cert_pem)?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(invalid("the certificate is not a CA certificate"));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(invalid("the key does not belong to the certificate"));
        }
        let now = OffsetDateTime::now_utc();
        let validity = parsed.validity();
        if validity.not_before.to_datetime() > now || validity.not_after.to_datetime() <= now {
            return Err(invalid("the CA certificate is not valid now"));
        }
        // rcgen signs with an issuer `Certificate`; re-deriving it from the stored one keeps
        // the subject and key, which is all a signature by this root depends on — unless
        // rcgen cannot say the subject the same way (several attributes of one type), and
        // then certificates would name an issuer that does not exist.
        let cert = CertificateParams::from_ca_cert_pem(cert_pem)?.self_signed(&key)?;
        let (_, rebuilt) =
            X509Certificate::from_der(cert.der()).map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err(invalid("the CA certificate's subject is not one shoal can sign as"));
        }
        Ok(RootCa { cert, cert_pem: cert_pem.to_owned(), key, not_after: validity.not_after.to_datetime() })
    }

    /// Whether this root stays valid for `lifetime` more (an operator's root must outlive
    /// the certificates it is about to issue).
    pub fn valid_for(&self, lifetime: Duration) -> bool {
        self.not_after >= OffsetDateTime::now_utc() + lifetime
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key in PEM; only ever stored sealed.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// SHA-256 of the root certificate (DER): what join tokens pin.
    pub fn digest(&self) -> Result<[u8; 32], CaError> {
        digest_of_pem(&self.cert_pem)
    }

    /// `next`'s certificate signed by this root: a node that trusts only this root can check a
    /// certificate `next` issued through it, so a root rotation can reissue certificates
    /// before every node has learnt the new root.
    pub fn cross_sign(&self, next: &RootCa) -> Result<String, CaError> {
        let mut params = CertificateParams::from_ca_cert_pem(&next.cert_pem)?;
        params.serial_number = None;
        Ok(params.signed_by(&next.key, &self.cert, &self.key)?.pem())
    }

    /// Signs the key in `csr_pem` into a certificate for `identity`, valid for `lifetime`.
    /// The subject comes from `identity`, never from the request: a node cannot choose its
    /// own ID or role.
    pub fn issue(&self, csr_pem: &str, identity: &NodeIdentity, lifetime: Duration) -> Result<String, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity.node_id.as_str());
        params.distinguished_name.push(DnType::OrganizationalUnitName, identity.role_ou());
        params.distinguished_name.push(DnType::OrganizationName, identity.cluster_id.as_str());
        params.subject_alt_names = vec![
            SanType::DnsName(identity.role_ou().try_into()?),
            SanType::DnsName(identity.node_id.as_str().try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + lifetime).min(self.not_after);
        csr.params = params;
        Ok(csr.signed_by(&self.cert, &self.key)?.pem())
    }
}

/// SHA-256 of the DER inside a PEM certificate.
pub fn digest_of_pem(cert_pem: &str) -> Result<[u8; 32], CaError> {
    Ok(digest_of_der(&pem_to_der(cert_pem)?))
}

pub fn digest_of_der(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The DER of the first certificate in `pem`.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CaError> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    Ok(parsed.contents)
}
