//! `?reason=` on reads: the purpose of use (`treatment`, `research`,
//! `audit`, `participant_request`, …). A study created with
//! `"require_reason": true` refuses reads without one (400). The audit log
//! (a later issue) records it with each access.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::{ApiError, ApiResult};

/// The purpose a read gave, if any.
#[derive(Clone, Debug, Default)]
pub struct Reason(pub Option<String>);

#[derive(serde::Deserialize)]
struct Query {
    reason: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Reason {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = axum::extract::Query::<Query>::try_from_uri(&parts.uri)
            .map(|q| q.0.reason)
            .unwrap_or(None);
        match query {
            None => Ok(Self(None)),
            Some(reason)
                if !reason.is_empty()
                    && reason.len() <= 64
                    && reason.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    }) =>
            {
                Ok(Self(Some(reason)))
            }
            Some(_) => Err(ApiError::bad_request(
                "invalid_reason",
                "reason is 1 to 64 characters of a-z, 0-9, _ and -, e.g. research",
            )),
        }
    }
}

impl Reason {
    /// 400 when a study that requires a reason gets none.
    pub fn check(&self, require_reason: bool) -> ApiResult<()> {
        if require_reason && self.0.is_none() {
            return Err(ApiError::bad_request(
                "reason_required",
                "this study requires a purpose of use: add ?reason=… (e.g. treatment, research, audit, participant_request)",
            ));
        }
        Ok(())
    }
}
