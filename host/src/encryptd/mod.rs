//! The encryption host: receives plaintext with an opaque KEK id / key ref /
//! blob ref and a context digest — never tenant, study, participant or
//! token — and turns it into sealed blobs on the replicated blob store, and
//! back.
//!
//! | call (mutual TLS, role `api-host`) | |
//! |---|---|
//! | `POST /v1/keks` | a new KEK (one per study) → `{kek}` |
//! | `PUT /v1/objects?kek=` + `x-coffer-context` | streams plaintext in → `{key_ref, blob_ref, size, sha256}` |
//! | `GET /v1/objects/{blob_ref}?key_ref=[&whole=true][&offset=N]` + `x-coffer-context` | streams plaintext out (from byte N) |
//! | `DELETE /v1/objects/{blob_ref}?key_ref=` | keys, then every replica |
//! | `POST /v1/keks/{kek}/link` `{inputs}` | MACs under the KEK's linking key (inputs are keyed hashes, never values) |
//! | `GET /v1/health` | key host and blob nodes |
//!
//! Records and BLOBs share one path. `whole=true` (records) verifies every
//! segment and the MAC before releasing anything; otherwise each segment is
//! released once its tag verifies and the MAC is checked at the end (a
//! failure then cuts the stream). Memory per call stays at a few chunks.

pub mod config;
mod read;
mod write;

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use coffer_keyhost::api::{ErrorBody, ErrorDetail, KeyMaterial, roles};
use coffer_keyhost::client::{KeyHostClient, KeyHostError};
use coffer_keyhost::tls::Peer;

use crate::blob::{BlobError, BlobRef, BlobStore};
use crate::crypto::{ContextDigest, EnvelopeError, RecordKeys};

/// Header carrying the API host's context digest (64 hex digits).
pub const CONTEXT_HEADER: &str = "x-coffer-context";

/// What every handler shares.
#[derive(Debug)]
pub struct EncryptionHost {
    /// The key host.
    pub keys: KeyHostClient,
    /// The replicated blob store.
    pub blobs: Arc<dyn BlobStore>,
    /// Largest object accepted, in bytes.
    pub max_object: u64,
    /// W: blob nodes that must answer for the host to be ready.
    pub write_quorum: usize,
}

/// The router; serve it with `coffer_keyhost::tls::serve_mtls`.
pub fn router(host: Arc<EncryptionHost>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/keks", post(create_kek))
        .route("/v1/keks/{kek}/link", post(link))
        .route("/v1/objects", axum::routing::put(write::put_object))
        .route(
            "/v1/objects/{blob_ref}",
            get(read::get_object).delete(delete_object),
        )
        .with_state(host)
}

/// A failed call: status, stable code, message (never record content).
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.1.into(),
                message: self.2,
            },
        };
        (self.0, Json(body)).into_response()
    }
}

impl From<KeyHostError> for Failure {
    fn from(e: KeyHostError) -> Self {
        match &e {
            KeyHostError::Unavailable(_) => Self(
                StatusCode::SERVICE_UNAVAILABLE,
                "key_host_unavailable",
                e.to_string(),
            ),
            KeyHostError::Refused { status: 404, .. } => {
                Self(StatusCode::NOT_FOUND, "unknown_key", e.to_string())
            }
            KeyHostError::Refused { status: 429, .. } => {
                Self(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
            }
            KeyHostError::Refused {
                status: 409, code, ..
            } if code == "unsupported" => Self(StatusCode::CONFLICT, "unsupported", e.to_string()),
            KeyHostError::Refused { status: 409, .. } => {
                Self(StatusCode::CONFLICT, "wrap_limit_reached", e.to_string())
            }
            KeyHostError::Refused { .. } => {
                Self(StatusCode::BAD_GATEWAY, "key_host_refused", e.to_string())
            }
        }
    }
}

impl From<BlobError> for Failure {
    fn from(e: BlobError) -> Self {
        let (status, code) = match &e {
            BlobError::NotEnoughReplicas { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_enough_replicas")
            }
            BlobError::NotFound | BlobError::Deleted => (StatusCode::NOT_FOUND, "not_found"),
            BlobError::AllReplicasBad { .. } | BlobError::Corrupt { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "record_integrity")
            }
            _ => (StatusCode::SERVICE_UNAVAILABLE, "blob_store_unavailable"),
        };
        Self(status, code, e.to_string())
    }
}

impl From<EnvelopeError> for Failure {
    fn from(e: EnvelopeError) -> Self {
        integrity(&e.to_string())
    }
}

/// The record does not open: its keys, blob and context do not belong
/// together, or every replica is damaged.
pub(crate) fn integrity(detail: &str) -> Failure {
    Failure(
        StatusCode::UNPROCESSABLE_ENTITY,
        "record_integrity",
        format!(
            "the record does not decrypt ({detail}): its keys, blob or context do not belong together, or every replica is damaged"
        ),
    )
}

pub(crate) fn require_api_host(peer: &Peer) -> Result<(), Failure> {
    match peer.role.as_deref() {
        Some(roles::API_HOST) => Ok(()),
        other => Err(Failure(
            StatusCode::FORBIDDEN,
            "forbidden_role",
            format!(
                "the role {:?} may not call the encryption host",
                other.unwrap_or("none")
            ),
        )),
    }
}

pub(crate) fn context(headers: &HeaderMap) -> Result<ContextDigest, Failure> {
    let bad = || {
        Failure(
            StatusCode::BAD_REQUEST,
            "bad_context",
            format!("{CONTEXT_HEADER} must be 64 hex digits"),
        )
    };
    let text = headers
        .get(CONTEXT_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(bad)?;
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .map_err(|_| bad())?;
    Ok(ContextDigest(bytes.try_into().map_err(|_| bad())?))
}

pub(crate) fn blob_ref(text: &str) -> Result<BlobRef, Failure> {
    data_encoding::HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(BlobRef)
        .ok_or(Failure(
            StatusCode::BAD_REQUEST,
            "bad_ref",
            "a blob ref is 32 hex digits".into(),
        ))
}

pub(crate) fn record_keys(material: &KeyMaterial) -> RecordKeys {
    let mut nonce_prefix = [0u8; 7];
    nonce_prefix.copy_from_slice(&material.nonce[..7]);
    RecordKeys {
        enc: material.enc_key.0.clone(),
        mac: material.mac_key.0.clone(),
        nonce_prefix,
    }
}

async fn health(
    axum::extract::State(host): axum::extract::State<Arc<EncryptionHost>>,
    Extension(_peer): Extension<Peer>,
) -> Response {
    let key_host = host.keys.health().await;
    let nodes = host.blobs.node_status().await;
    let up = nodes.iter().filter(|n| n.down.is_none()).count();
    let down: Vec<String> = nodes
        .iter()
        .filter(|n| n.down.is_some())
        .map(|n| n.node.to_string())
        .collect();
    let body = serde_json::json!({
        "key_host": key_host.as_ref().map(|()| "up").unwrap_or("down"),
        "blob_nodes_up": up,
        "blob_nodes_down": down,
    });
    let status = if key_host.is_ok() && up >= host.write_quorum {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn create_kek(
    axum::extract::State(host): axum::extract::State<Arc<EncryptionHost>>,
    Extension(peer): Extension<Peer>,
) -> Result<(StatusCode, Json<serde_json::Value>), Failure> {
    require_api_host(&peer)?;
    let kek = host.keys.create_kek().await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "kek": kek }))))
}

/// Passes linking MACs through to the key host: the API host has no key
/// host certificate of its own (it talks to nothing but this host).
async fn link(
    axum::extract::State(host): axum::extract::State<Arc<EncryptionHost>>,
    Extension(peer): Extension<Peer>,
    axum::extract::Path(kek): axum::extract::Path<String>,
    Json(request): Json<coffer_keyhost::api::LinkRequest>,
) -> Result<Json<coffer_keyhost::api::LinkAnswer>, Failure> {
    require_api_host(&peer)?;
    let macs = host.keys.link(&kek, request.inputs).await?;
    Ok(Json(coffer_keyhost::api::LinkAnswer { macs }))
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct KeyRefQuery {
    pub key_ref: String,
    #[serde(default)]
    pub whole: bool,
    /// Start streaming at this plaintext byte (a range read).
    #[serde(default)]
    pub offset: u64,
}

pub(crate) fn key_ref(text: &str) -> Result<coffer_keyhost::api::KeyRefId, Failure> {
    coffer_keyhost::api::KeyRefId::parse(text).ok_or(Failure(
        StatusCode::BAD_REQUEST,
        "bad_ref",
        "a key ref is 32 hex digits".into(),
    ))
}

async fn delete_object(
    axum::extract::State(host): axum::extract::State<Arc<EncryptionHost>>,
    Extension(peer): Extension<Peer>,
    axum::extract::Path(blob): axum::extract::Path<String>,
    axum::extract::Query(query): axum::extract::Query<KeyRefQuery>,
) -> Result<StatusCode, Failure> {
    // The maintenance worker collects deleted studies' records too.
    if peer.role.as_deref() != Some(roles::MAINTENANCE) {
        require_api_host(&peer)?;
    }
    let blob = blob_ref(&blob)?;
    // Keys first: without them every replica is unreadable at once.
    match host.keys.delete(key_ref(&query.key_ref)?).await {
        Ok(()) | Err(KeyHostError::Refused { status: 404, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    match host.blobs.delete(blob).await {
        Ok(_) | Err(BlobError::NotFound | BlobError::Deleted) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e.into()),
    }
}
