//! Extractors whose rejections use the API's error shape and never echo
//! the request (serde's messages quote values): JSON bodies, paths, queries.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// `Json<T>` with API errors: 415 wrong content type, 413 too large, 400
/// malformed or of the wrong shape.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as application/json",
                ),
                JsonRejection::JsonSyntaxError(_) => {
                    ApiError::bad_request("malformed_json", "the body is not valid JSON")
                }
                JsonRejection::JsonDataError(_) => ApiError::bad_request(
                    "invalid_body",
                    "the body does not have the fields this call expects",
                ),
                JsonRejection::BytesRejection(_) => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!(
                        "JSON bodies are limited to {} bytes",
                        state.limits.json_bytes
                    ),
                ),
                _ => ApiError::bad_request("invalid_body", "the body could not be read"),
            }),
        }
    }
}

/// `axum::extract::Path` whose rejections (a segment that is not UTF-8)
/// use the API's error shape.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|_| {
                ApiError::bad_request("invalid_path", "the path is not valid (ids are UTF-8 text)")
            })
    }
}

/// `axum::extract::Query` whose rejections (a missing, repeated or
/// malformed parameter) use the API's error shape and never echo the query.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|_| {
                ApiError::bad_request(
                    "invalid_query",
                    "the query string does not have the parameters this call expects",
                )
            })
    }
}
