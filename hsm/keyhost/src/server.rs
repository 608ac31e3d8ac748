//! The key host's HTTP API, served over mutual TLS.
//!
//! | call | role |
//! |---|---|
//! | `POST /v1/keks` | encryption host, maintenance |
//! | `POST /v1/keks/{kek}/rotate` | maintenance |
//! | `DELETE /v1/keks/{kek}` | maintenance |
//! | `DELETE /v1/keks/{kek}/versions/{version}` | maintenance |
//! | `POST /v1/keks/{kek}/retire` | maintenance: every row onto the newest version, older versions destroyed |
//! | `POST /v1/keks/{kek}/link` `{inputs}` | encryption host: MACs under the KEK's linking key |
//! | `POST /v1/data-keys` `{kek}` | encryption host |
//! | `POST /v1/data-keys/open` `{key_ref}` | encryption host (rate-limited per KEK) |
//! | `DELETE /v1/data-keys/{key_ref}` | encryption host |
//! | `POST /v1/data-keys/{key_ref}/rewrap` | maintenance |
//! | `GET /v1/health` | any certificate of the CA |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use coffer_hsm::{Error as KeyError, KekBackend, KekId, KekVersion, KeyRef, WrappedKey};
use sqlx::PgPool;
use zeroize::Zeroizing;

use crate::api::{
    CreatedKek, ErrorBody, ErrorDetail, GenerateRequest, KEY_FORMAT_V1, KeyMaterial, KeyRefId,
    LinkAnswer, LinkRequest, MAX_LINK_INPUTS, OpenRequest, RetireAnswer, Secret32, VersionAnswer,
    roles,
};
use crate::oplog::{Op, OpLog};
use crate::ratelimit::RateLimiter;
use crate::tls::Peer;

/// What every handler shares.
pub struct KeyHost {
    /// The hardware key store.
    pub backend: Arc<dyn KekBackend>,
    /// The key DB.
    pub db: PgPool,
    /// Opens per KEK.
    pub open_limit: RateLimiter,
    /// The operations log.
    pub oplog: OpLog,
}

impl std::fmt::Debug for KeyHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHost").finish_non_exhaustive()
    }
}

/// The router; serve it with [`crate::tls::serve_mtls`].
pub fn router(host: Arc<KeyHost>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/keks", post(create_kek))
        .route("/v1/keks/{kek}", delete(destroy_kek))
        .route("/v1/keks/{kek}/rotate", post(rotate_kek))
        .route(
            "/v1/keks/{kek}/versions/{version}",
            delete(destroy_kek_version),
        )
        .route("/v1/keks/{kek}/retire", post(retire_old_versions))
        .route("/v1/keks/{kek}/link", post(link))
        .route("/v1/data-keys", post(generate))
        .route("/v1/data-keys/open", post(open))
        .route("/v1/data-keys/{key_ref}", delete(delete_key))
        .route("/v1/data-keys/{key_ref}/rewrap", post(rewrap))
        .with_state(host)
}

/// A failed call: status, stable code, message.
#[derive(Debug)]
pub struct Failure(StatusCode, &'static str, String);

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

impl From<KeyError> for Failure {
    fn from(e: KeyError) -> Self {
        let (status, code) = match &e {
            KeyError::UnknownKek { .. } => (StatusCode::NOT_FOUND, "unknown_kek"),
            KeyError::UnknownKekVersion { .. } => (StatusCode::NOT_FOUND, "unknown_kek_version"),
            KeyError::TamperedWrappedKey | KeyError::MalformedWrappedKey(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "wrapped_key_invalid")
            }
            KeyError::MalformedId(_) => (StatusCode::BAD_REQUEST, "malformed_id"),
            KeyError::WrapLimitReached { .. } => (StatusCode::CONFLICT, "wrap_limit_reached"),
            KeyError::Unsupported(_) => (StatusCode::CONFLICT, "unsupported"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "key_store_unavailable"),
        };
        Self(status, code, e.to_string())
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        // The SQL text and row values never leave the process.
        tracing::warn!("key DB error: {}", short_db_error(&e));
        Self(
            StatusCode::SERVICE_UNAVAILABLE,
            "key_db_unavailable",
            "the key DB is unavailable".into(),
        )
    }
}

fn short_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!("database error {}", db.code().unwrap_or_default()),
        sqlx::Error::PoolTimedOut => "pool timed out".into(),
        sqlx::Error::Io(io) => format!("io: {io}"),
        sqlx::Error::Tls(_) => "TLS failure".into(),
        _ => "other".into(),
    }
}

type Answer<T> = Result<T, Failure>;

/// The caller's role if it may make `op`; a refusal is logged too.
fn require(host: &KeyHost, peer: &Peer, op: &str, allowed: &[&str]) -> Answer<String> {
    let role = peer.role.as_deref().unwrap_or("none");
    if allowed.contains(&role) {
        return Ok(role.to_owned());
    }
    let refused = Failure(
        StatusCode::FORBIDDEN,
        "forbidden_role",
        format!("the role {role:?} may not make this call"),
    );
    host.log(op, None, None, role, Err(&refused));
    Err(refused)
}

fn kek_id(text: &str) -> Answer<KekId> {
    KekId::parse(text).map_err(Failure::from)
}

fn key_ref_id(text: &str) -> Answer<KeyRefId> {
    KeyRefId::parse(text).ok_or(Failure(
        StatusCode::BAD_REQUEST,
        "malformed_id",
        "a key ref is 32 hex digits".into(),
    ))
}

/// The KEK-bound refs of a record's two keys: each is wrapped with its own
/// role in the AAD, so the two can never be swapped.
fn wrap_refs(key_ref: &KeyRefId) -> (KeyRef, KeyRef) {
    let with = |role: &[u8]| KeyRef::new([&key_ref.0[..], role].concat());
    (with(b"/enc"), with(b"/mac"))
}

/// A record's two wrapped keys under one KEK version, as its row records
/// only one: when a rotation landed between their two wraps, the older is
/// moved onto the newer version (the plaintext key never leaves the store).
pub fn one_version(
    backend: &dyn KekBackend,
    enc: (WrappedKey, &KeyRef),
    mac: (WrappedKey, &KeyRef),
) -> coffer_hsm::Result<(WrappedKey, WrappedKey)> {
    let ((enc, enc_ref), (mac, mac_ref)) = (enc, mac);
    Ok(if enc.version < mac.version {
        let to = mac.version;
        (backend.rewrap(&enc, enc_ref, to)?, mac)
    } else if mac.version < enc.version {
        let to = enc.version;
        (enc, backend.rewrap(&mac, mac_ref, to)?)
    } else {
        (enc, mac)
    })
}

/// Runs a blocking device call off the async workers.
async fn device<T: Send + 'static>(
    f: impl FnOnce() -> coffer_hsm::Result<T> + Send + 'static,
) -> Answer<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "a key store call panicked".into(),
            )
        })?
        .map_err(Failure::from)
}

impl KeyHost {
    fn log(
        &self,
        op: &str,
        kek: Option<&str>,
        key_ref: Option<&KeyRefId>,
        role: &str,
        result: Result<(), &Failure>,
    ) {
        self.oplog.record(&Op {
            op,
            kek,
            key_ref: key_ref.map(ToString::to_string),
            role,
            outcome: result.map_or_else(|f| f.1, |()| "ok"),
        });
    }
}

fn logged<T>(
    host: &KeyHost,
    op: &str,
    kek: Option<&str>,
    key_ref: Option<&KeyRefId>,
    role: &str,
    result: Answer<T>,
) -> Answer<T> {
    host.log(op, kek, key_ref, role, result.as_ref().map(|_| ()));
    result
}

async fn health(
    State(host): State<Arc<KeyHost>>,
    Extension(_peer): Extension<Peer>,
) -> Answer<Json<serde_json::Value>> {
    sqlx::query("SELECT 1").execute(&host.db).await?;
    let caps = host.backend.capabilities();
    Ok(Json(
        serde_json::json!({"ok": true, "backend": caps.backend}),
    ))
}

async fn create_kek(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
) -> Answer<(StatusCode, Json<CreatedKek>)> {
    let role = require(
        &host,
        &peer,
        "create_kek",
        &[roles::ENCRYPTION_HOST, roles::MAINTENANCE],
    )?;
    let backend = host.backend.clone();
    let result = device(move || backend.create_kek()).await;
    let kek = result.as_ref().ok().map(|info| info.id.to_string());
    let info = logged(&host, "create_kek", kek.as_deref(), None, &role, result)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKek {
            kek: info.id.to_string(),
        }),
    ))
}

async fn rotate_kek(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(kek): Path<String>,
) -> Answer<Json<VersionAnswer>> {
    let role = require(&host, &peer, "rotate_kek", &[roles::MAINTENANCE])?;
    let id = kek_id(&kek)?;
    let backend = host.backend.clone();
    let result = device(move || backend.rotate_kek(&id)).await;
    let version = logged(&host, "rotate_kek", Some(&kek), None, &role, result)?;
    Ok(Json(VersionAnswer { version: version.0 }))
}

async fn destroy_kek(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(kek): Path<String>,
) -> Answer<StatusCode> {
    let role = require(&host, &peer, "destroy_kek", &[roles::MAINTENANCE])?;
    let id = kek_id(&kek)?;
    let backend = host.backend.clone();
    // The device first: once the KEK is gone, every row it wrapped is
    // useless, whatever happens to the rows (crypto-shredding).
    let result = device(move || backend.destroy_kek(&id)).await;
    logged(&host, "destroy_kek", Some(&kek), None, &role, result)?;
    sqlx::query("DELETE FROM data_keys WHERE kek_id = $1")
        .bind(&kek)
        .execute(&host.db)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn destroy_kek_version(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path((kek, version)): Path<(String, u32)>,
) -> Answer<StatusCode> {
    let role = require(&host, &peer, "destroy_kek_version", &[roles::MAINTENANCE])?;
    let id = kek_id(&kek)?;
    let backend = host.backend.clone();
    let result = device(move || backend.destroy_kek_version(&id, KekVersion(version))).await;
    logged(
        &host,
        "destroy_kek_version",
        Some(&kek),
        None,
        &role,
        result,
    )?;
    Ok(StatusCode::NO_CONTENT)
}

async fn generate(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Json(request): Json<GenerateRequest>,
) -> Answer<(StatusCode, Json<KeyMaterial>)> {
    let role = require(&host, &peer, "generate", &[roles::ENCRYPTION_HOST])?;
    let kek = kek_id(&request.kek)?;
    let key_ref = KeyRefId::random().map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "rng_unavailable",
            "no randomness".into(),
        )
    })?;
    let (enc_ref, mac_ref) = wrap_refs(&key_ref);
    let backend = host.backend.clone();
    let result = device(move || {
        let enc = backend.generate_data_key(&kek, &enc_ref)?;
        let mac = backend.generate_data_key(&kek, &mac_ref)?;
        let (enc_wrapped, mac_wrapped) =
            one_version(&*backend, (enc.1, &enc_ref), (mac.1, &mac_ref))?;
        Ok(((enc.0, enc_wrapped), (mac.0, mac_wrapped)))
    })
    .await;
    let ((enc_key, wrapped_enc), (mac_key, wrapped_mac)) = logged(
        &host,
        "generate",
        Some(&request.kek),
        Some(&key_ref),
        &role,
        result,
    )?;
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "rng_unavailable",
            "no randomness".into(),
        )
    })?;
    sqlx::query(
        "INSERT INTO data_keys (key_ref, kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&key_ref.0[..])
    .bind(wrapped_enc.kek.as_str())
    .bind(i32::try_from(wrapped_enc.version.0).unwrap_or(i32::MAX))
    .bind(&wrapped_enc.bytes)
    .bind(&wrapped_mac.bytes)
    .bind(&nonce[..])
    .bind(i16::from(KEY_FORMAT_V1))
    .execute(&host.db)
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(KeyMaterial {
            key_ref,
            enc_key: Secret32(Zeroizing::new(*enc_key.expose())),
            mac_key: Secret32(Zeroizing::new(*mac_key.expose())),
            nonce,
            format: KEY_FORMAT_V1,
        }),
    ))
}

/// A stored row of one record's keys.
struct Row {
    kek: KekId,
    version: KekVersion,
    wrapped_enc: Vec<u8>,
    wrapped_mac: Vec<u8>,
    nonce: [u8; 12],
}

/// `(kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format)` as stored.
type StoredRow = (String, i32, Vec<u8>, Vec<u8>, Vec<u8>, i16);

async fn load_row(db: &PgPool, key_ref: &KeyRefId) -> Answer<Row> {
    let row: Option<StoredRow> = sqlx::query_as(
        "SELECT kek_id, kek_version, wrapped_enc, wrapped_mac, nonce, format FROM data_keys WHERE key_ref = $1",
    )
    .bind(&key_ref.0[..])
    .fetch_optional(db)
    .await?;
    let Some((kek, version, wrapped_enc, wrapped_mac, nonce, format)) = row else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            "unknown_key_ref",
            format!("no keys under ref {key_ref}"),
        ));
    };
    let corrupt = |what: &str| {
        Failure(
            StatusCode::UNPROCESSABLE_ENTITY,
            "key_row_invalid",
            format!("key row {key_ref}: {what}"),
        )
    };
    if format != i16::from(KEY_FORMAT_V1) {
        return Err(corrupt("unknown format version"));
    }
    Ok(Row {
        kek: KekId::parse(&kek).map_err(|_| corrupt("bad KEK id"))?,
        version: KekVersion(u32::try_from(version).map_err(|_| corrupt("bad KEK version"))?),
        wrapped_enc,
        wrapped_mac,
        nonce: nonce.try_into().map_err(|_| corrupt("bad nonce"))?,
    })
}

async fn open(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Json(request): Json<OpenRequest>,
) -> Answer<Json<KeyMaterial>> {
    let role = require(&host, &peer, "open", &[roles::ENCRYPTION_HOST])?;
    let key_ref = request.key_ref;
    let row = load_row(&host.db, &key_ref).await?;
    let kek_text = row.kek.to_string();
    if !host.open_limit.allow(&kek_text) {
        let refused = Err(Failure(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many opens under {kek_text}; retry later"),
        ));
        return logged(
            &host,
            "open",
            Some(&kek_text),
            Some(&key_ref),
            &role,
            refused,
        );
    }
    let (enc_ref, mac_ref) = wrap_refs(&key_ref);
    let backend = host.backend.clone();
    let wrapped = |bytes: Vec<u8>| WrappedKey {
        kek: row.kek.clone(),
        version: row.version,
        bytes,
    };
    let (we, wm) = (wrapped(row.wrapped_enc), wrapped(row.wrapped_mac));
    let result = device(move || {
        Ok((
            backend.unwrap(&we, &enc_ref)?,
            backend.unwrap(&wm, &mac_ref)?,
        ))
    })
    .await;
    let (enc_key, mac_key) = logged(
        &host,
        "open",
        Some(&kek_text),
        Some(&key_ref),
        &role,
        result,
    )?;
    Ok(Json(KeyMaterial {
        key_ref,
        enc_key: Secret32(Zeroizing::new(*enc_key.expose())),
        mac_key: Secret32(Zeroizing::new(*mac_key.expose())),
        nonce: row.nonce,
        format: KEY_FORMAT_V1,
    }))
}

async fn delete_key(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(key_ref): Path<String>,
) -> Answer<StatusCode> {
    let role = require(&host, &peer, "delete", &[roles::ENCRYPTION_HOST])?;
    let key_ref = key_ref_id(&key_ref)?;
    let deleted = sqlx::query("DELETE FROM data_keys WHERE key_ref = $1")
        .bind(&key_ref.0[..])
        .execute(&host.db)
        .await?
        .rows_affected();
    let result = if deleted == 1 {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Failure(
            StatusCode::NOT_FOUND,
            "unknown_key_ref",
            format!("no keys under ref {key_ref}"),
        ))
    };
    logged(&host, "delete", None, Some(&key_ref), &role, result)
}

async fn rewrap(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(key_ref): Path<String>,
) -> Answer<Json<VersionAnswer>> {
    let role = require(&host, &peer, "rewrap", &[roles::MAINTENANCE])?;
    let key_ref = key_ref_id(&key_ref)?;
    let row = load_row(&host.db, &key_ref).await?;
    let current = current_version(&host, row.kek.clone()).await?;
    let version = rewrap_row(&host, &role, &key_ref, row, current).await?;
    Ok(Json(VersionAnswer { version: version.0 }))
}

/// The newest version of a KEK.
async fn current_version(host: &KeyHost, kek: KekId) -> Answer<KekVersion> {
    let backend = host.backend.clone();
    device(move || {
        backend
            .list_keks()?
            .into_iter()
            .find(|k| k.id == kek)
            .and_then(|k| k.current())
            .ok_or(KeyError::UnknownKek { kek: kek.clone() })
    })
    .await
}

/// Moves one row's keys onto version `to` of their KEK; the plaintext keys
/// never leave the device call.
async fn rewrap_row(
    host: &KeyHost,
    role: &str,
    key_ref: &KeyRefId,
    row: Row,
    to: KekVersion,
) -> Answer<KekVersion> {
    let kek_text = row.kek.to_string();
    let (enc_ref, mac_ref) = wrap_refs(key_ref);
    let backend = host.backend.clone();
    let kek = row.kek.clone();
    let version = row.version;
    let result = device(move || {
        let w = |bytes| WrappedKey {
            kek: kek.clone(),
            version,
            bytes,
        };
        Ok((
            backend.rewrap(&w(row.wrapped_enc), &enc_ref, to)?,
            backend.rewrap(&w(row.wrapped_mac), &mac_ref, to)?,
        ))
    })
    .await;
    let (enc, mac) = logged(host, "rewrap", Some(&kek_text), Some(key_ref), role, result)?;
    // Only over the row as it was read: a concurrent rewrap or delete wins.
    let updated = sqlx::query(
        "UPDATE data_keys SET kek_version = $2, wrapped_enc = $3, wrapped_mac = $4 \
         WHERE key_ref = $1 AND kek_version = $5",
    )
    .bind(&key_ref.0[..])
    .bind(version_column(enc.version))
    .bind(&enc.bytes)
    .bind(&mac.bytes)
    .bind(version_column(version))
    .execute(&host.db)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Failure(
            StatusCode::CONFLICT,
            "key_row_changed",
            format!("the keys under ref {key_ref} changed meanwhile; read them again"),
        ));
    }
    Ok(enc.version)
}

/// A KEK version as the key DB stores it.
fn version_column(version: KekVersion) -> i32 {
    i32::try_from(version.0).unwrap_or(i32::MAX)
}

/// The end of a KEK rotation: rows still under an older version are
/// rewrapped under the newest, up to 1,000 per call (the caller calls again
/// while `remaining` > 0); once none is left the older versions are
/// destroyed in the device, so copies of the key DB taken before are useless. Callers leave
/// a grace period after the rotation first, so that keys generated under
/// the old version just before it are already in the DB.
async fn retire_old_versions(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(kek): Path<String>,
) -> Answer<Json<RetireAnswer>> {
    let role = require(&host, &peer, "retire", &[roles::MAINTENANCE])?;
    let id = kek_id(&kek)?;
    let backend = host.backend.clone();
    let lookup = id.clone();
    let versions = device(move || {
        backend
            .list_keks()?
            .into_iter()
            .find(|k| k.id == lookup)
            .map(|k| k.versions)
            .ok_or(KeyError::UnknownKek { kek: lookup })
    })
    .await;
    let versions = logged(&host, "retire", Some(&kek), None, &role, versions)?;
    let current = *versions
        .last()
        .ok_or_else(|| Failure::from(KeyError::UnknownKek { kek: id.clone() }))?;
    // One retire per KEK at a time, across every key host sharing the DB.
    let mut lock = host.db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('coffer/retire/' || $1))")
        .bind(&kek)
        .execute(&mut *lock)
        .await?;
    let stale: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT key_ref FROM data_keys WHERE kek_id = $1 AND kek_version <> $2 LIMIT 1000",
    )
    .bind(&kek)
    .bind(version_column(current))
    .fetch_all(&host.db)
    .await?;
    let mut rewrapped = 0;
    for key_ref in stale {
        let key_ref = KeyRefId(<[u8; 16]>::try_from(key_ref.as_slice()).map_err(|_| {
            Failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "key_row_invalid",
                format!("a key row of {kek} has a malformed key ref"),
            )
        })?);
        // A row deleted or rewrapped since the SELECT is simply skipped.
        let row = match load_row(&host.db, &key_ref).await {
            Err(Failure(_, "unknown_key_ref", _)) => continue,
            other => other?,
        };
        match rewrap_row(&host, &role, &key_ref, row, current).await {
            Ok(_) => rewrapped += 1,
            Err(Failure(_, "key_row_changed", _)) => {}
            Err(e) => return Err(e),
        }
    }
    let (remaining,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM data_keys WHERE kek_id = $1 AND kek_version <> $2")
            .bind(&kek)
            .bind(version_column(current))
            .fetch_one(&host.db)
            .await?;
    let mut destroyed = Vec::new();
    if remaining > 0 {
        // Called again until none are left; only then are versions destroyed.
        return Ok(Json(RetireAnswer {
            current: current.0,
            rewrapped,
            remaining: u64::try_from(remaining).unwrap_or(0),
            destroyed,
        }));
    }
    for version in versions.into_iter().filter(|v| *v != current) {
        let backend = host.backend.clone();
        let doomed = id.clone();
        let result = device(move || backend.destroy_kek_version(&doomed, version)).await;
        logged(
            &host,
            "destroy_kek_version",
            Some(&kek),
            None,
            &role,
            result,
        )?;
        destroyed.push(version.0);
    }
    lock.commit().await?;
    Ok(Json(RetireAnswer {
        current: current.0,
        rewrapped,
        remaining: 0,
        destroyed,
    }))
}

/// MACs under a KEK's linking key (deterministic field tokens). The inputs
/// are keyed hashes made by the API host, never values.
async fn link(
    State(host): State<Arc<KeyHost>>,
    Extension(peer): Extension<Peer>,
    Path(kek): Path<String>,
    Json(request): Json<LinkRequest>,
) -> Answer<Json<LinkAnswer>> {
    let role = require(&host, &peer, "link", &[roles::ENCRYPTION_HOST])?;
    let id = kek_id(&kek)?;
    if request.inputs.len() > MAX_LINK_INPUTS {
        return Err(Failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_inputs",
            format!("at most {MAX_LINK_INPUTS} inputs per call"),
        ));
    }
    let inputs = request
        .inputs
        .iter()
        .map(|text| {
            data_encoding::HEXLOWER
                .decode(text.as_bytes())
                .ok()
                .filter(|bytes| bytes.len() == 32)
                .ok_or(Failure(
                    StatusCode::BAD_REQUEST,
                    "malformed_input",
                    "each input is 32 bytes in lowercase hex".into(),
                ))
        })
        .collect::<Answer<Vec<_>>>()?;
    let backend = host.backend.clone();
    let result = device(move || {
        inputs
            .iter()
            .map(|input| backend.link_mac(&id, input))
            .collect::<coffer_hsm::Result<Vec<_>>>()
    })
    .await;
    let macs = logged(&host, "link", Some(&kek), None, &role, result)?;
    Ok(Json(LinkAnswer {
        macs: macs
            .iter()
            .map(|m| data_encoding::HEXLOWER.encode(m))
            .collect(),
    }))
}
