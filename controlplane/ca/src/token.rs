//! Join tokens: `SWMTKN-1-<base36 SHA-256 of the root CA, 50 digits>-<base36 secret, 25
//! digits>`. The worker and manager tokens share the digest and differ in the secret; the
//! secret decides the role a joining node gets.

use std::{fmt, str::FromStr};

use crate::{base36, random, CaError};

const PREFIX: &str = "SWMTKN-1-";
const DIGEST_LEN: usize = 50;
const SECRET_LEN: usize = 25;

#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    digest: String,
    secret: String,
}

impl JoinToken {
    /// A new token for the root whose digest is `ca_digest`.
    pub fn generate(ca_digest: &[u8; 32]) -> Result<Self, CaError> {
        let mut secret = [0u8; 16];
        random(&mut secret)?;
        Ok(JoinToken { digest: base36::encode(ca_digest, DIGEST_LEN), secret: base36::encode(&secret, SECRET_LEN) })
    }

    /// Whether this token pins the root certificate whose digest is `ca_digest`.
    pub fn pins(&self, ca_digest: &[u8; 32]) -> bool {
        self.digest == base36::encode(ca_digest, DIGEST_LEN)
    }

    /// Compares the secrets in constant time (the token is a password).
    pub fn same_secret(&self, other: &JoinToken) -> bool {
        let (a, b) = (self.secret.as_bytes(), other.secret.as_bytes());
        // Every byte is compared whatever the first difference, so timing tells nothing.
        let differences = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        a.len() == b.len() && differences == 0 && self.digest == other.digest
    }
}

impl FromStr for JoinToken {
    type Err = CaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(CaError::InvalidToken)?;
        let (digest, secret) = rest.split_once('-').ok_or(CaError::InvalidToken)?;
        let is_base36 = |t: &str| t.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        if digest.len() != DIGEST_LEN || secret.len() != SECRET_LEN || !is_base36(digest) || !is_base36(secret) {
            return Err(CaError::InvalidToken);
        }
        Ok(JoinToken { digest: digest.to_owned(), secret: secret.to_owned() })
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.digest, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "{PREFIX}{}-<secret>", self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_swarms_shape() {
        let digest = [7u8; 32];
        let token = JoinToken::generate(&digest).unwrap();
        let text = token.to_string();
        assert!(text.starts_with("SWMTKN-1-"));
        assert_eq!(text.len(), 9 + 50 + 1 + 25);
        let parsed: JoinToken = text.parse().unwrap();
        assert!(parsed.same_secret(&token));
        assert!(parsed.pins(&digest));
        assert!(!parsed.pins(&[8u8; 32]));
    }

    #[test]
    fn worker_and_manager_tokens_differ_only_in_the_secret() {
        let digest = [1u8; 32];
        let (a, b) = (JoinToken::generate(&digest).unwrap(), JoinToken::generate(&digest).unwrap());
        assert_eq!(a.digest, b.digest);
        assert!(!a.same_secret(&b));
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = JoinToken::generate(&[2u8; 32]).unwrap().to_string();
        for bad in
            ["", "SWMTKN-1-", &good[..good.len() - 1], &good.replace("SWMTKN-1", "SWMTKN-2"), &good.to_uppercase()]
        {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }
}
