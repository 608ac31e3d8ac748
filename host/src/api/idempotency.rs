//! `Idempotency-Key` on writes: the same key with the same body within 24 h
//! answers the first answer and stores nothing twice; with another body,
//! 409. The first answer is kept as JSON, minus anything the caller strips
//! (a participant id is never kept here).

use std::future::Future;

use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::AppState;
use super::auth::keyed_hash;
use super::error::{ApiError, ApiResult};

/// How a write was answered.
pub(crate) enum Answer {
    /// It ran now.
    Fresh(Value),
    /// It ran before under the same key and body: its kept answer.
    Replayed(Value),
}

/// Runs `write` at most once per `Idempotency-Key` (when the header is
/// there). `scope` names the endpoint and `canonical` is everything that
/// makes two requests the same; `keep` gives the form of the answer that
/// is stored.
pub(crate) async fn once<Fut>(
    state: &AppState,
    tenant: &str,
    headers: &HeaderMap,
    scope: &str,
    canonical: &[u8],
    write: impl FnOnce() -> Fut,
    keep: impl FnOnce(&Value) -> Value,
) -> ApiResult<Answer>
where
    Fut: Future<Output = ApiResult<Value>>,
{
    let Some(key) = headers.get("idempotency-key") else {
        return Ok(Answer::Fresh(write().await?));
    };
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 200)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key is 1 to 200 visible characters",
            )
        })?;
    let body_hash = keyed_hash(
        &state.secret,
        "idempotency",
        &[scope.as_bytes(), b"\0", canonical].concat(),
    );
    sqlx::query("DELETE FROM idempotency WHERE tenant_id = $1 AND key = $2 AND created_at < now() - interval '24 hours'")
        .bind(tenant)
        .bind(key)
        .execute(&state.db)
        .await?;
    let claimed = sqlx::query("INSERT INTO idempotency (tenant_id, key, body_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(tenant)
        .bind(key)
        .bind(&body_hash)
        .execute(&state.db)
        .await?
        .rows_affected()
        == 1;
    if !claimed {
        let (first_hash, answer): (Vec<u8>, Option<Value>) = sqlx::query_as(
            "SELECT body_hash, answer FROM idempotency WHERE tenant_id = $1 AND key = $2",
        )
        .bind(tenant)
        .bind(key)
        .fetch_one(&state.db)
        .await?;
        if first_hash != body_hash {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another body",
            ));
        }
        return answer.map(Answer::Replayed).ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "the first request with this key is still running; retry",
            )
        });
    }
    match write().await {
        Ok(answer) => {
            sqlx::query("UPDATE idempotency SET answer = $3 WHERE tenant_id = $1 AND key = $2")
                .bind(tenant)
                .bind(key)
                .bind(keep(&answer))
                .execute(&state.db)
                .await?;
            Ok(Answer::Fresh(answer))
        }
        Err(e) => {
            // Nothing stored: free the key so a retry can succeed.
            let _ = sqlx::query(
                "DELETE FROM idempotency WHERE tenant_id = $1 AND key = $2 AND answer IS NULL",
            )
            .bind(tenant)
            .bind(key)
            .execute(&state.db)
            .await;
            Err(e)
        }
    }
}
