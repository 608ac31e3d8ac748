//! `CKM_AES_GCM` inside the token: the wrapping mechanism itself.
//!
//! Public so the Wycheproof suite drives exactly this code with its vectors.

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

use super::errors::{ck, rv};

/// Tag length of every seal, in bits.
pub const TAG_BITS: u64 = 128;

/// Seals `plaintext` under the token key `key`: returns ciphertext ‖ tag.
pub fn seal(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(ck("CK_GCM_PARAMS"))?;
    session
        .encrypt(&Mechanism::AesGcm(params), key, plaintext)
        .map_err(ck("C_Encrypt"))
}

/// Opens ciphertext ‖ tag under the token key `key`. An authentication
/// failure is [`Error::TamperedWrappedKey`] (SoftHSM reports it as
/// `CKR_GENERAL_ERROR`, others as `CKR_ENCRYPTED_DATA_INVALID`).
pub fn open(
    session: &Session,
    key: ObjectHandle,
    iv: &[u8],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, TAG_BITS.into()).map_err(ck("CK_GCM_PARAMS"))?;
    match session.decrypt(&Mechanism::AesGcm(params), key, sealed) {
        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
        Err(e)
            if matches!(
                rv(&e),
                Some(
                    RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::GeneralError
                        | RvError::FunctionFailed
                )
            ) =>
        {
            Err(Error::TamperedWrappedKey)
        }
        Err(e) => Err(ck("C_Decrypt")(e)),
    }
}
