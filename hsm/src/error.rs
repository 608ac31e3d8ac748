//! The one error type of every backend. Device errors are translated once,
//! at the backend boundary; no variant ever carries a key, a PIN or a
//! plaintext.

use crate::types::{KekId, KekVersion};

/// Result of a backend call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The PKCS#11 module or TPM connection could not be opened.
    #[error("cannot open the key store {what}: {reason}")]
    Unavailable {
        /// The module path or TCTI.
        what: String,
        /// Why, as the library reported it.
        reason: String,
    },
    /// No token with the configured label is present.
    #[error("no PKCS#11 token labelled {label:?} is present")]
    TokenNotFound {
        /// The configured label.
        label: String,
    },
    /// The token refused the PIN.
    #[error("the token {label:?} refused the PIN")]
    WrongPin {
        /// The token's label.
        label: String,
    },
    /// The PIN could not be read from its configured source.
    #[error("cannot read the PIN: {0}")]
    PinSource(String),
    /// No KEK with this id exists (never created, or destroyed).
    #[error("unknown KEK {kek} (never created, or destroyed)")]
    UnknownKek {
        /// The id asked for.
        kek: KekId,
    },
    /// The KEK exists but not this version (never created, or destroyed).
    #[error("KEK {kek} has no version {version} (never created, or destroyed)")]
    UnknownKekVersion {
        /// The KEK.
        kek: KekId,
        /// The version asked for.
        version: KekVersion,
    },
    /// The wrapped key failed authentication: its bytes were altered, or it
    /// was presented with another key ref or KEK version than it was bound to.
    #[error(
        "wrapped key failed authentication (altered, or bound to another key ref or KEK version)"
    )]
    TamperedWrappedKey,
    /// The wrapped key is not in a format this backend reads.
    #[error("malformed wrapped key: {0}")]
    MalformedWrappedKey(&'static str),
    /// An id is not in the expected form.
    #[error("malformed id: {0}")]
    MalformedId(&'static str),
    /// The KEK version has wrapped as many keys as it may.
    #[error("KEK {kek} {version} has reached its limit of {limit} wraps: rotate the KEK")]
    WrapLimitReached {
        /// The KEK.
        kek: KekId,
        /// Its exhausted version.
        version: KekVersion,
        /// The configured limit.
        limit: u64,
    },
    /// The device cannot do this.
    #[error("not supported by this key store: {0}")]
    Unsupported(&'static str),
    /// A device call failed for a reason not listed above.
    #[error("key store call {op} failed: {detail}")]
    Device {
        /// The call that failed, e.g. `C_Encrypt`.
        op: &'static str,
        /// The device's error code or message (never secret data).
        detail: String,
    },
    /// The backend's own state (key files, counters) is inconsistent or unreadable.
    #[error("key store state: {0}")]
    State(String),
}
