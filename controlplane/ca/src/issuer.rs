//! Who issued a certificate, in the shape Docker reports it (`TLSInfo.CertIssuerSubject` and
//! `CertIssuerPublicKey`: the issuer's DER subject and SubjectPublicKeyInfo). A root rotation
//! is done when every node's certificate names the new root as its issuer.

use base64::{engine::general_purpose::STANDARD, Engine};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CaError;

/// An issuer: DER subject and DER SubjectPublicKeyInfo, base64 as Docker's JSON has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuerInfo {
    /// The issuer's subject (DER), base64.
    pub subject: String,
    /// The issuer's SubjectPublicKeyInfo (DER), base64.
    pub public_key: String,
}

impl IssuerInfo {
    /// The issuer a CA certificate stands for: its own subject and key.
    pub fn of_ca(cert_pem: &str) -> Result<Self, CaError> {
        let der = first(cert_pem)?;
        let cert = parse(&der)?;
        Ok(IssuerInfo {
            subject: STANDARD.encode(cert.subject().as_raw()),
            public_key: STANDARD.encode(cert.public_key().raw),
        })
    }

    /// The issuer of the first certificate in `chain_pem`: the certificate among the rest of
    /// the chain and `roots_pem` whose key verifies its signature (a rotation gives a root
    /// and its cross-signed twin the same subject, so only the key tells them apart).
    pub fn of_leaf(chain_pem: &str, roots_pem: &str) -> Result<Self, CaError> {
        Self::of_chain(&certs_from_pem(chain_pem)?, &certs_from_pem(roots_pem)?)
    }

    /// `of_leaf` for DER certificates (a chain as TLS received it).
    pub fn of_chain(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> Result<Self, CaError> {
        let leaf_der = chain.first().ok_or_else(|| CaError::InvalidCertificate("no certificate".into()))?;
        let leaf = parse(leaf_der)?;
        for candidate in chain[1..].iter().chain(roots.iter()) {
            let issuer = parse(candidate)?;
            if issuer.subject() == leaf.issuer() && leaf.verify_signature(Some(issuer.public_key())).is_ok() {
                return Ok(IssuerInfo {
                    subject: STANDARD.encode(issuer.subject().as_raw()),
                    public_key: STANDARD.encode(issuer.public_key().raw),
                });
            }
        }
        Err(CaError::InvalidCertificate("no known certificate issued this one".into()))
    }
}

/// Every certificate in `pem`, as DER.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))
}

fn first(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    certs_from_pem(pem)?.into_iter().next().ok_or_else(|| CaError::InvalidCertificate("no certificate".into()))
}

fn parse<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der).map(|(_, cert)| cert).map_err(|e| CaError::InvalidCertificate(e.to_string()))
}
