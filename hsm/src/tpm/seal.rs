//! AES-256-GCM under single-use keys derived inside the TPM.
//!
//! Every key passed here is an HMAC output over a fresh 128-bit random
//! nonce, used for exactly one encryption, so the GCM nonce can be the
//! constant zero: a (key, nonce) pair never repeats.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce};
use zeroize::Zeroizing;

use super::device::MAX_HMAC_INPUT;
use crate::error::{Error, Result};

/// Domain separation of data-key wrapping keys.
const DATA_KEY_DOMAIN: &[u8] = b"coffer/tpm-data-key/v1";
/// Length of the nonce stored in a wrapped data key.
pub(crate) const DATA_KEY_NONCE_LEN: usize = 16;
/// Length of a GCM tag.
const TAG_LEN: usize = 16;

fn cipher(key: &[u8; 32]) -> Result<Aes256Gcm> {
    Aes256Gcm::new_from_slice(key).map_err(|_| Error::State("bad AES-256-GCM key length".into()))
}

fn zero_nonce() -> Nonce<Aes256Gcm> {
    Nonce::<Aes256Gcm>::from([0u8; 12])
}

/// Encrypts `plaintext` under the single-use `key`; returns ciphertext ‖ tag.
pub(crate) fn seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    // Room for the tag up front: a reallocation would leave a copy of the
    // plaintext behind in freed memory.
    let mut buffer = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
    buffer.extend_from_slice(plaintext);
    cipher(key)?
        .encrypt_in_place(&zero_nonce(), aad, &mut *buffer)
        .map_err(|_| Error::State("AES-256-GCM encryption failed".into()))?;
    // Now ciphertext and tag only: nothing secret is left to zeroize.
    Ok(std::mem::take(&mut *buffer))
}

/// Decrypts ciphertext ‖ tag; `None` when it does not authenticate.
pub(crate) fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut buffer = Zeroizing::new(sealed.to_vec());
    cipher(key)
        .ok()?
        .decrypt_in_place(&zero_nonce(), aad, &mut *buffer)
        .ok()?;
    Some(buffer)
}

/// The message the KEK HMACs into a data key's wrapping key:
/// domain ‖ nonce ‖ AAD.
///
/// The AAD is cut to what fits one TPM2_HMAC input (only a key ref of more
/// than ~900 bytes is affected). That costs nothing: the nonce alone makes
/// the wrapping key unique, and GCM authenticates the whole AAD.
pub(crate) fn data_key_message(nonce: &[u8; DATA_KEY_NONCE_LEN], aad: &[u8]) -> Vec<u8> {
    let room = MAX_HMAC_INPUT - DATA_KEY_DOMAIN.len() - DATA_KEY_NONCE_LEN;
    let aad = &aad[..aad.len().min(room)];
    let mut message = Vec::with_capacity(DATA_KEY_DOMAIN.len() + DATA_KEY_NONCE_LEN + aad.len());
    message.extend_from_slice(DATA_KEY_DOMAIN);
    message.extend_from_slice(nonce);
    message.extend_from_slice(aad);
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_authenticate_aad() {
        let key = [5u8; 32];
        let sealed = seal(&key, b"aad", b"secret").unwrap();
        assert_eq!(sealed.len(), 6 + 16);
        assert_eq!(open(&key, b"aad", &sealed).unwrap().as_slice(), b"secret");
        assert!(open(&key, b"aae", &sealed).is_none());
        assert!(open(&[6u8; 32], b"aad", &sealed).is_none());
    }

    #[test]
    fn data_key_messages_fit_one_tpm_input() {
        let long = vec![1u8; 70_000];
        assert_eq!(data_key_message(&[0; 16], &long).len(), MAX_HMAC_INPUT);
        assert_eq!(
            data_key_message(&[0; 16], b"ab").len(),
            DATA_KEY_DOMAIN.len() + 16 + 2
        );
    }
}
