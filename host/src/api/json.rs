//! A JSON body extractor whose rejections use the API's error shape and
//! never echo the body (serde's messages quote values).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// `Json<T>` with API errors: 415 wrong content type, 413 too large, 400
/// malformed or of the wrong shape.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
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
                    format!("JSON bodies are limited to {} bytes", super::MAX_JSON_BODY),
                ),
                _ => ApiError::bad_request("invalid_body", "the body could not be read"),
            }),
        }
    }
}
