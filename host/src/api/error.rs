//! The one error shape of the public API:
//! `{"error": {"code", "message", "request_id"}}`, never a record value, key
//! or SQL text.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

tokio::task_local! {
    /// The id of the request being served (set by the request-id layer).
    pub static REQUEST_ID: String;
}

/// The current request's id, if inside one.
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// A failed call.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// Human message; never contains request content.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404, identical for missing and foreign resources.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// 403: a valid key that may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message, "request_id": request_id() }
        });
        (self.status, Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        // Only the class of failure is logged; never SQL text or values.
        let class = match &e {
            sqlx::Error::Database(db) => {
                format!("database error {}", db.code().unwrap_or_default())
            }
            sqlx::Error::PoolTimedOut => "pool timed out".into(),
            sqlx::Error::Io(_) => "io".into(),
            _ => "other".into(),
        };
        tracing::warn!(request_id = %request_id(), "metadata DB: {class}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metadata_db_unavailable",
            "the metadata database is unavailable",
        )
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
