//! Encryption at rest: the data key (DEK) seals every raft log entry, snapshot and secret a
//! manager writes (ChaCha20-Poly1305, a fresh random nonce per seal). The DEK itself is
//! stored plain, or wrapped by the unlock key when autolock is on.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::{random, CaError, UnlockKey};

#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn generate() -> Result<Self, CaError> {
        let mut key = [0u8; 32];
        random(&mut key)?;
        Ok(DataKey(key))
    }

    /// `nonce || ciphertext || tag` of `plaintext`.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CaError> {
        seal_with(&self.0, plaintext)
    }

    /// The plaintext of what `seal` produced with this key.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CaError> {
        open_with(&self.0, sealed)
    }

    /// Like `seal`, binding `context` (not stored) to the result: `open_bound` opens it only
    /// with the same context, so a sealed piece cannot be moved to another place.
    pub fn seal_bound(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, CaError> {
        seal_aad(&self.0, plaintext, context)
    }

    /// The plaintext of what `seal_bound` produced with this key and `context`.
    pub fn open_bound(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CaError> {
        open_aad(&self.0, sealed, context)
    }

    /// This key sealed by `kek`, for storing under autolock.
    pub fn wrap(&self, kek: &UnlockKey) -> Result<Vec<u8>, CaError> {
        seal_with(kek.bytes(), &self.0)
    }

    /// The key `wrap` sealed; fails on a wrong unlock key.
    pub fn unwrap_with(wrapped: &[u8], kek: &UnlockKey) -> Result<Self, CaError> {
        let bytes =
            open_with(kek.bytes(), wrapped).map_err(|_| CaError::InvalidUnlockKey("it does not unlock this node"))?;
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| CaError::Unseal)?;
        Ok(DataKey(key))
    }

    /// The raw key, for storing unwrapped when autolock is off.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DataKey(bytes)
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<secret>)")
    }
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key fits ChaCha20"))
}

fn seal_with(key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, CaError> {
    seal_aad(key, plaintext, &[])
}

fn seal_aad(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CaError> {
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let (head, body) = out.split_at_mut(NONCE_LEN);
    let tag = aead_key(key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(head.try_into().expect("nonce length")),
            Aad::from(aad),
            body,
        )
        .map_err(|_| CaError::Unseal)?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_with(key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, CaError> {
    open_aad(key, sealed, &[])
}

fn open_aad(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CaError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(CaError::Unseal);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let mut body = body.to_vec();
    let nonce = Nonce::assume_unique_for_key(nonce.try_into().expect("nonce length"));
    let plain_len = aead_key(key).open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| CaError::Unseal)?.len();
    body.truncate(plain_len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_detects_tampering() {
        let key = DataKey::generate().unwrap();
        let sealed = key.seal(b"node label: secret").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"), "plaintext visible");
        assert_eq!(key.open(&sealed).unwrap(), b"node label: secret");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.open(&tampered).is_err());
        assert!(DataKey::generate().unwrap().open(&sealed).is_err());
    }

    #[test]
    fn a_bound_seal_opens_only_in_its_context() {
        let key = DataKey::generate().unwrap();
        let sealed = key.seal_bound(b"chunk", b"3").unwrap();
        assert_eq!(key.open_bound(&sealed, b"3").unwrap(), b"chunk");
        assert!(key.open_bound(&sealed, b"4").is_err());
        assert!(key.open(&sealed).is_err());
    }

    #[test]
    fn wrapped_key_opens_only_with_its_unlock_key() {
        let (dek, kek) = (DataKey::generate().unwrap(), UnlockKey::generate().unwrap());
        let wrapped = dek.wrap(&kek).unwrap();
        assert_eq!(DataKey::unwrap_with(&wrapped, &kek).unwrap(), dek);
        assert!(DataKey::unwrap_with(&wrapped, &UnlockKey::generate().unwrap()).is_err());
    }
}
