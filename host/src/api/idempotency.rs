//! `Idempotency-Key` on writes: the same key with the same body within 24 h
//! answers the first answer and stores nothing twice; with another body,
//! 409. The first answer is kept as JSON, minus anything the caller strips
//! (a participant id is never kept here).

use std::future::Future;

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::AppState;
use super::auth::{Principal, keyed_hash};
use super::error::{ApiError, ApiResult};

/// How a write was answered.
pub(crate) enum Answer {
    /// It ran now.
    Fresh(Value),
    /// It ran before under the same key and body: its kept answer.
    Replayed(Value),
}

impl Answer {
    /// The answer, whether it ran now or before.
    pub(crate) fn into_value(self) -> Value {
        match self {
            Answer::Fresh(answer) | Answer::Replayed(answer) => answer,
        }
    }
}

/// Whose `Idempotency-Key`s these are: each API key has its own, so a
/// replay only ever reaches the key that made the first request (and passed
/// its role and study checks); the tenant comes first so a tenant's keys
/// can be found together.
pub(crate) fn owner(principal: &Principal) -> String {
    format!(
        "{}/{}",
        principal.tenant.as_deref().unwrap_or("operator"),
        principal.key_id
    )
}

/// The kept answer of a write that answers 204: `{}` (a JSON null would
/// read back as "not answered yet").
pub(crate) fn no_content() -> Value {
    Value::Object(serde_json::Map::new())
}

/// Runs `write` at most once per `Idempotency-Key` (when the header is
/// there). `scope` names the endpoint and `canonical` is everything that
/// makes two requests the same; `keep` gives the form of the answer that
/// is stored.
pub(crate) async fn once<Fut>(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    scope: &str,
    canonical: &[u8],
    write: impl FnOnce() -> Fut,
    keep: impl FnOnce(&Value) -> Value,
) -> ApiResult<Answer>
where
    Fut: Future<Output = ApiResult<Value>>,
{
    let Some(key) = key_of(headers)? else {
        return Ok(Answer::Fresh(write().await?));
    };
    let owner = owner(principal);
    let body_hash = body_hash(state, scope, canonical);
    if !claim(state, &owner, key, &body_hash).await? {
        let (first_hash, answer) = first(state, &owner, key).await?.ok_or_else(in_progress)?;
        if first_hash != body_hash {
            return Err(reused());
        }
        return answer.map(Answer::Replayed).ok_or_else(in_progress);
    }
    let claimed = Claimed::new(state, &owner, key);
    let answer = match write().await {
        Ok(answer) => answer,
        Err(e) => {
            claimed.release().await;
            return Err(e);
        }
    };
    claimed.stored();
    settle(state, &owner, key, &body_hash, &keep(&answer)).await?;
    Ok(Answer::Fresh(answer))
}

/// A claimed key whose write has not ended. A write that fails frees it, so
/// the retry can succeed rather than answer `idempotency_in_progress` for
/// 24 h; so does one that panics (dropped). Once the write has stored
/// something the key stays taken, even if keeping its answer then fails: a
/// retry must never store it twice. (Requests run to their end whether or
/// not the client stays: see `envelope`.)
pub(crate) struct Claimed {
    release: Option<(sqlx::PgPool, String, String)>,
}

impl Claimed {
    pub(crate) fn new(state: &AppState, owner: &str, key: &str) -> Self {
        Self {
            release: Some((state.db.clone(), owner.to_owned(), key.to_owned())),
        }
    }

    /// The write stored what it stores: the key stays taken.
    pub(crate) fn stored(mut self) {
        self.release = None;
    }

    /// The write stored nothing: the key is free again before the answer.
    pub(crate) async fn release(mut self) {
        if let Some((db, owner, key)) = self.release.take() {
            release(&db, &owner, &key).await;
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let Some((db, owner, key)) = self.release.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release(&db, &owner, &key).await });
        }
    }
}

/// The request's `Idempotency-Key`, if any (400 when malformed).
pub(crate) fn key_of(headers: &HeaderMap) -> ApiResult<Option<&str>> {
    let Some(key) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    key.to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 200)
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key is 1 to 200 visible characters",
            )
        })
}

/// What makes two requests the same, as stored: a keyed hash.
pub(crate) fn body_hash(state: &AppState, scope: &str, canonical: &[u8]) -> Vec<u8> {
    keyed_hash(
        &state.secret,
        "idempotency",
        &[scope.as_bytes(), b"\0", canonical].concat(),
    )
}

/// Claims `key` for a first request; false when it is already taken.
pub(crate) async fn claim(
    state: &AppState,
    owner: &str,
    key: &str,
    body_hash: &[u8],
) -> ApiResult<bool> {
    sqlx::query("DELETE FROM idempotency WHERE tenant_id = $1 AND key = $2 AND created_at < now() - interval '24 hours'")
        .bind(owner)
        .bind(key)
        .execute(&state.db)
        .await?;
    Ok(sqlx::query("INSERT INTO idempotency (tenant_id, key, body_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(owner)
        .bind(key)
        .bind(body_hash)
        .execute(&state.db)
        .await?
        .rows_affected()
        == 1)
}

/// The first request of `key`: its (final) body hash and kept answer.
pub(crate) async fn settle(
    state: &AppState,
    owner: &str,
    key: &str,
    body_hash: &[u8],
    answer: &Value,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE idempotency SET body_hash = $3, answer = $4 WHERE tenant_id = $1 AND key = $2",
    )
    .bind(owner)
    .bind(key)
    .bind(body_hash)
    .bind(answer)
    .execute(&state.db)
    .await?;
    Ok(())
}

/// Frees a claimed key whose first request stored nothing, so a retry can succeed.
async fn release(db: &sqlx::PgPool, owner: &str, key: &str) {
    let _ =
        sqlx::query("DELETE FROM idempotency WHERE tenant_id = $1 AND key = $2 AND answer IS NULL")
            .bind(owner)
            .bind(key)
            .execute(db)
            .await;
}

/// The kept first answer of `key` and its body hash, if the key is taken.
pub(crate) async fn first(
    state: &AppState,
    owner: &str,
    key: &str,
) -> ApiResult<Option<(Vec<u8>, Option<Value>)>> {
    Ok(sqlx::query_as(
        "SELECT body_hash, answer FROM idempotency WHERE tenant_id = $1 AND key = $2",
    )
    .bind(owner)
    .bind(key)
    .fetch_optional(&state.db)
    .await?)
}

/// 409: the key was used with another body.
pub(crate) fn reused() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_reused",
        "this Idempotency-Key was used with another body",
    )
}

/// 409: the first request with the key has not finished.
pub(crate) fn in_progress() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_in_progress",
        "the first request with this key is still running; retry",
    )
}
