//! What can go wrong with keys, certificates and tokens.

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the system random source failed")]
    Random,
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A join token that is malformed or not ours. Docker's wording for the user.
    #[error("invalid join token")]
    InvalidToken,
    /// An unlock key that is malformed or does not open the data key.
    #[error("invalid key: {0}")]
    InvalidUnlockKey(&'static str),
    /// Sealed data that fails authentication: wrong key or tampered bytes.
    #[error("sealed data cannot be opened: wrong key or corrupt data")]
    Unseal,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}
