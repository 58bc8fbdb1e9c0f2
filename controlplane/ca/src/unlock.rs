//! Autolock keys, shown to users as `SWMKEY-1-<base64>`: with autolock on, the data key that
//! encrypts a manager's state is stored wrapped by this key, so a restarted manager cannot
//! read its own state until someone gives it the key (`docker swarm unlock`).

use std::{fmt, str::FromStr};

use base64::{engine::general_purpose::STANDARD_NO_PAD, Engine};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{random, CaError};

const PREFIX: &str = "SWMKEY-1-";

#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct UnlockKey([u8; 32]);

impl UnlockKey {
    pub fn generate() -> Result<Self, CaError> {
        let mut key = [0u8; 32];
        random(&mut key)?;
        Ok(UnlockKey(key))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for UnlockKey {
    type Err = CaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let encoded = s.trim().strip_prefix(PREFIX).ok_or(CaError::InvalidUnlockKey("not a SWMKEY-1 key"))?;
        let bytes = STANDARD_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .map_err(|_| CaError::InvalidUnlockKey("not base64"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CaError::InvalidUnlockKey("wrong length"))?;
        Ok(UnlockKey(key))
    }
}

impl fmt::Display for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(<secret>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_swarms_format() {
        let key = UnlockKey::generate().unwrap();
        let text = key.to_string();
        assert!(text.starts_with("SWMKEY-1-") && text.len() == 9 + 43);
        assert_eq!(text.parse::<UnlockKey>().unwrap(), key);
        assert!("SWMKEY-1-short".parse::<UnlockKey>().is_err());
        assert!("nonsense".parse::<UnlockKey>().is_err());
    }
}
