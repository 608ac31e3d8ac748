//! The public HTTPS API host (`coffer serve`): the contract of
//! `shared/API.md`. It knows who asks and what a token means, and holds no
//! key and no ciphertext: record plaintext goes to the encryption host and
//! comes back in memory only.
//!
//! Built: tenants, API keys, studies, JSON records (single, batch,
//! correction, delete), BLOBs, field tokens, participant export, deletion
//! of records, BLOBs, participants, studies and tenants (the last three as
//! jobs), `Idempotency-Key`, health, readiness and metrics. Plugins,
//! rotation, audit and governance are later work.

pub mod auth;
mod blobs;
pub mod config;
pub mod error;
mod fields;
mod idempotency;
pub mod ids;
mod jobs;
mod json;
mod openapi;
mod participants;
mod reason;
mod records;
pub(crate) mod shred;
mod studies;
mod tenants;
pub mod vault;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sqlx::PgPool;
use zeroize::Zeroizing;

use error::{ApiError, REQUEST_ID};
pub use jobs::ROTATE_KEK;
pub use participants::DELETE_PARTICIPANT;
use vault::Vault;

/// Request size limits: API.md's defaults, set with `coffer serve
/// --max-json-bytes`, `--max-items` and `--max-blob-bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest JSON body.
    pub json_bytes: usize,
    /// Most items in a batch, a tokenize or a detokenize call.
    pub items: usize,
    /// Largest BLOB.
    pub blob_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            json_bytes: 1 << 20,
            items: 1000,
            blob_bytes: 16 << 30,
        }
    }
}

impl Limits {
    /// 413 when a call holds more than `items` of `what` (nothing is stored).
    pub fn check_items(&self, count: usize, call: &str, what: &str) -> Result<(), ApiError> {
        if count > self.items {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{call} holds at most {} {what}", self.items),
            ));
        }
        Ok(())
    }
}

/// What every handler shares.
pub struct AppState {
    /// The metadata DB.
    pub db: PgPool,
    /// The encryption host.
    pub vault: Vault,
    /// Server secret for keyed hashes of API key secrets and participant ids.
    pub secret: Zeroizing<Vec<u8>>,
    /// Keyed hash of the operator key.
    pub operator_hash: Vec<u8>,
    /// Request size limits.
    pub limits: Limits,
    /// Deterministic tokens per API key.
    pub link_limit: coffer_keyhost::ratelimit::RateLimiter,
    /// How soon a study's KEK is rotated after something of it is shredded.
    pub shred_rotation: std::time::Duration,
    /// Responses served, by status class (1xx..5xx).
    pub served: [AtomicU64; 5],
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/v1/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .route("/v1/tenants", post(tenants::create_tenant))
        .route(
            "/v1/tenants/{tenant}",
            axum::routing::delete(tenants::delete_tenant),
        )
        .route(
            "/v1/studies/{study}",
            axum::routing::delete(studies::delete),
        )
        .route("/v1/jobs/{job}", get(jobs::get_job))
        .route(
            "/v1/api-keys",
            post(tenants::create_key).get(tenants::list_keys),
        )
        .route(
            "/v1/api-keys/{id}",
            axum::routing::delete(tenants::revoke_key),
        )
        .route("/v1/studies", post(studies::create).get(studies::list))
        .route("/v1/studies/{study}/records", post(records::create))
        .route("/v1/studies/{study}/records:batch", post(records::batch))
        .route(
            "/v1/studies/{study}/blobs",
            axum::routing::put(blobs::upload).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/blobs/{token}",
            get(blobs::download).delete(blobs::delete),
        )
        .route(
            "/v1/studies/{study}/participants/{participant}/export",
            get(records::export),
        )
        .route(
            "/v1/studies/{study}/participants/{participant}",
            axum::routing::delete(participants::delete),
        )
        .route("/v1/studies/{study}/tokenize", post(fields::tokenize))
        .route("/v1/detokenize", post(fields::detokenize))
        .route(
            "/v1/records/{token}",
            get(records::read)
                .put(records::correct)
                .delete(records::delete),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            envelope,
        ))
        .with_state(state)
}

/// Every response: a request id (header and error bodies), HSTS, counted.
async fn envelope(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let id = ids::new("req");
    // Each request runs to its end in its own task: a client that goes away
    // cannot cut a write off between what it stored and the answer its
    // Idempotency-Key keeps (a retry would then store it twice).
    let handled = tokio::spawn(REQUEST_ID.scope(id.clone(), next.run(request))).await;
    let mut response = match handled {
        Ok(response) => response,
        Err(_) => {
            REQUEST_ID
                .scope(id.clone(), async {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "the request failed; nothing is kept of it if it stored nothing",
                    )
                    .into_response()
                })
                .await
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", value);
    }
    let class = usize::from(response.status().as_u16() / 100).clamp(1, 5) - 1;
    state.served[class].fetch_add(1, Ordering::Relaxed);
    response
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let mut down = Vec::new();
    if sqlx::query("SELECT 1").execute(&state.db).await.is_err() {
        down.push("metadata DB".to_owned());
    }
    if let Err(what) = state.vault.health().await {
        down.push(what);
    }
    if down.is_empty() {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        )
            .into_response();
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        format!("down: {}", down.join(", ")),
    )
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text =
        String::from("# HELP coffer_http_responses_total Responses served, by status class.\n");
    text.push_str("# TYPE coffer_http_responses_total counter\n");
    for (i, count) in state.served.iter().enumerate() {
        text.push_str(&format!(
            "coffer_http_responses_total{{class=\"{}xx\"}} {}\n",
            i + 1,
            count.load(Ordering::Relaxed)
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
