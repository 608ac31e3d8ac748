//! Key-encryption-key (KEK) backends for Coffer.
//!
//! A KEK never leaves its hardware key store. Data keys are drawn from the
//! store's RNG and handed out twice: once in plaintext (in a zeroizing type,
//! for the caller to use and drop at once) and once wrapped under a KEK
//! version, which is the only form that is ever stored.
//!
//! [`KekBackend`] is the one trait every store implements; [`pkcs11`] talks to
//! HSMs through PKCS#11 (SoftHSM in development) and [`tpm`] to TPM 2.0 chips
//! (swtpm in development). What a store cannot do is reported by
//! [`Capabilities`] and answered with [`Error::Unsupported`].

mod aad;
mod budget;
mod error;
pub mod pkcs11;
pub mod tpm;
mod types;

pub use budget::DEFAULT_WRAP_LIMIT;
pub use error::{Error, Result};
pub use types::{
    Capabilities, DATA_KEY_LEN, DataKey, KekId, KekInfo, KekVersion, KeyRef, WrapMechanism,
    WrappedKey,
};

/// A store of key-encryption keys living inside an HSM or a TPM.
///
/// Every method is blocking (it talks to a device) and safe to call from many
/// threads at once; async callers run them on a blocking pool.
pub trait KekBackend: Send + Sync {
    /// What this store can and cannot do.
    fn capabilities(&self) -> Capabilities;

    /// Creates a new KEK inside the store, at version 1, under a fresh random id.
    fn create_kek(&self) -> Result<KekInfo>;

    /// Adds a new version to an existing KEK and returns it. Older versions
    /// keep unwrapping until they are destroyed.
    fn rotate_kek(&self, kek: &KekId) -> Result<KekVersion>;

    /// Draws a fresh 256-bit data key from the store's RNG and wraps it under
    /// the newest version of `kek`, binding `key_ref` as associated data.
    ///
    /// Fails with [`Error::WrapLimitReached`] once that version has wrapped
    /// its configured number of keys: rotate the KEK, then retry.
    fn generate_data_key(&self, kek: &KekId, key_ref: &KeyRef) -> Result<(DataKey, WrappedKey)>;

    /// Recovers the data key from its wrapped form. Fails with
    /// [`Error::TamperedWrappedKey`] when the bytes, the key ref or the KEK
    /// version do not match what was wrapped.
    fn unwrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef) -> Result<DataKey>;

    /// Re-wraps a data key under another version of the same KEK (normally
    /// the newest) without the plaintext key leaving this call.
    fn rewrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef, to: KekVersion) -> Result<WrappedKey>;

    /// Every KEK the store holds, with its live versions.
    fn list_keks(&self) -> Result<Vec<KekInfo>>;

    /// Destroys one version of a KEK (after a rotation's grace period).
    /// Keys wrapped under it can no longer be unwrapped.
    fn destroy_kek_version(&self, kek: &KekId, version: KekVersion) -> Result<()>;

    /// Destroys every version of a KEK, and its linking key: nothing it
    /// wrapped can be unwrapped again (crypto-shredding).
    fn destroy_kek(&self, kek: &KekId) -> Result<()>;

    /// HMAC-SHA256 of `message` under the KEK's linking key, computed inside
    /// the store. The linking key is made with the KEK, is a separate key
    /// that never wraps anything, is not touched by [`rotate_kek`] or
    /// [`destroy_kek_version`] (so deterministic tokens survive re-keying),
    /// and is destroyed by [`destroy_kek`].
    ///
    /// [`rotate_kek`]: KekBackend::rotate_kek
    /// [`destroy_kek_version`]: KekBackend::destroy_kek_version
    /// [`destroy_kek`]: KekBackend::destroy_kek
    fn link_mac(&self, kek: &KekId, message: &[u8]) -> Result<[u8; LINK_MAC_LEN]>;
}

/// Length of a [`KekBackend::link_mac`] output.
pub const LINK_MAC_LEN: usize = 32;

/// Domain separation of linking MACs from every other use of a store key.
pub(crate) const LINK_MAC_DOMAIN: &[u8] = b"coffer/link/v1\0";
