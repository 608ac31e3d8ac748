//! Translating cryptoki errors once, at the boundary.

use cryptoki::error::{Error as CkError, RvError};

use crate::error::Error;

/// Maps a failed call to [`Error::Device`], naming the call and the return
/// code only (never a parameter).
pub(crate) fn ck(op: &'static str) -> impl Fn(CkError) -> Error {
    move |e| Error::Device {
        op,
        detail: match e {
            CkError::Pkcs11(rv, _) => format!("{rv:?}"),
            other => other.to_string(),
        },
    }
}

/// The return code of a failed call, if the module gave one.
pub(crate) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// True when the session itself is unusable and must not go back to the pool.
pub(crate) fn is_session_broken(e: &Error) -> bool {
    matches!(e, Error::Device { detail, .. } if [
        "SessionHandleInvalid", "SessionClosed", "DeviceRemoved", "TokenNotPresent",
        "DeviceError", "UserNotLoggedIn", "CryptokiNotInitialized",
    ].contains(&detail.as_str()))
}

/// True when a cached object handle no longer names an object (destroyed,
/// possibly by another process sharing the token).
pub(crate) fn is_stale(e: &Error) -> bool {
    matches!(e, Error::Device { detail, .. } if detail == "KeyHandleInvalid" || detail == "ObjectHandleInvalid")
}
