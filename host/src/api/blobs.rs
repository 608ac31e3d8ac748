//! BLOBs: streamed in and out through the encryption host, never whole in
//! memory, with single-range `Range` reads.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Principal, Role, participant_hash};
use super::error::{ApiError, ApiResult};
use super::idempotency;
use super::json::{Path, Query};
use super::studies::{Study, visible};
use super::vault::{Sealed, context_digest};
use super::{AppState, ids};

#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    participant: String,
}

/// `PUT /v1/studies/{study}/blobs?participant=` (writer): raw bytes,
/// streamed. Honours `Idempotency-Key`.
pub(crate) async fn upload(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(study): Path<String>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Writer])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    if query.participant.is_empty() || query.participant.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_participant",
            "participant is 1 to 200 characters",
        ));
    }
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && length > state.limits.blob_bytes
    {
        return Err(too_large(state.limits.blob_bytes));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 200)
        .unwrap_or("application/octet-stream")
        .to_owned();
    let Some(key) = idempotency::key_of(&headers)? else {
        let answer = store(
            &state,
            tenant,
            &study,
            &query.participant,
            &content_type,
            body,
        )
        .await?;
        return Ok((StatusCode::CREATED, Json(answer)));
    };
    // The same key and body within 24 h store nothing twice. The body is
    // only known once streamed: the key is claimed under the request's shape,
    // and the bytes' digest joins it when the first upload ends.
    let shape =
        serde_json::to_vec(&(&study.id, &query.participant, &content_type)).unwrap_or_default();
    let with_digest = |sha256: &str| {
        idempotency::body_hash(
            &state,
            "blobs",
            &[&shape[..], b"\0", sha256.as_bytes()].concat(),
        )
    };
    let pending = idempotency::body_hash(&state, "blobs:pending", &shape);
    let owner = idempotency::owner(&principal);
    if !idempotency::claim(&state, &owner, key, &pending).await? {
        let (first_hash, answer) = idempotency::first(&state, &owner, key)
            .await?
            .ok_or_else(idempotency::in_progress)?;
        let mut answer = answer.ok_or_else(idempotency::in_progress)?;
        // A replay: the bytes are hashed here, in memory, and stored nowhere.
        let sha256 = digest_of(body, state.limits.blob_bytes).await?;
        if first_hash != with_digest(&sha256) {
            return Err(idempotency::reused());
        }
        answer["sha256"] = json!(sha256);
        return Ok((StatusCode::CREATED, Json(answer)));
    }
    // A broken-off upload frees the key (see `Claimed`), so its retry runs.
    let claimed = idempotency::Claimed::new(&state, &owner, key);
    let stored = store(
        &state,
        tenant,
        &study,
        &query.participant,
        &content_type,
        body,
    )
    .await;
    let answer = match stored {
        Ok(answer) => answer,
        Err(e) => {
            claimed.release().await;
            return Err(e);
        }
    };
    claimed.stored();
    let sha256 = answer["sha256"].as_str().unwrap_or_default().to_owned();
    // Kept without the digest, which is never stored in the clear.
    let kept = json!({"token": answer["token"], "size": answer["size"], "content_type": answer["content_type"]});
    idempotency::settle(&state, &owner, key, &with_digest(&sha256), &kept).await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

/// The SHA-256 (hex) of a streamed body, within the size limit.
async fn digest_of(body: Body, limit: u64) -> ApiResult<String> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut seen = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let frame = frame.map_err(|_| body_broke_off())?;
        seen += frame.len() as u64;
        if seen > limit {
            return Err(too_large(limit));
        }
        sha.update(&frame);
    }
    Ok(data_encoding::HEXLOWER.encode(&sha.finalize()))
}

/// Streams one BLOB through the encryption host and records its token.
async fn store(
    state: &AppState,
    tenant: &str,
    study: &Study,
    participant: &str,
    content_type: &str,
    body: Body,
) -> ApiResult<Value> {
    let token = ids::new("blb");
    let hash = participant_hash(&state.secret, &study.id, participant);
    let context = context_digest(tenant, &study.id, &token, &hash);
    let limit = state.limits.blob_bytes;
    // Why the stream stopped early, if it did: the encryption host then
    // only sees a broken upload (and stores nothing), so the answer is ours.
    let stopped = Arc::new(std::sync::Mutex::new(None::<ApiError>));
    let mut seen = 0u64;
    let stream = body.into_data_stream().map({
        let stopped = stopped.clone();
        move |frame| {
            let stop = |error: ApiError| {
                let message = error.message.clone();
                *stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                std::io::Error::other(message)
            };
            let frame = frame.map_err(|_| stop(body_broke_off()))?;
            seen += frame.len() as u64;
            if seen > limit {
                return Err(stop(too_large(limit)));
            }
            Ok(frame)
        }
    });
    let sealed = state
        .vault
        .seal_stream(&study.kek, &context, reqwest::Body::wrap_stream(stream))
        .await;
    let (sealed, size, sha256) = match sealed {
        Ok(sealed) => sealed,
        Err(error) => {
            let ours = stopped.lock().unwrap_or_else(|e| e.into_inner()).take();
            return Err(ours.unwrap_or(error));
        }
    };
    let inserted = sqlx::query(
        "INSERT INTO blobs (token, tenant_id, study_id, participant_hash, key_ref, blob_ref, size, content_type) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&token)
    .bind(tenant)
    .bind(&study.id)
    .bind(&hash)
    .bind(&sealed.key_ref)
    .bind(&sealed.blob_ref)
    .bind(i64::try_from(size).unwrap_or(i64::MAX))
    .bind(content_type)
    .execute(&state.db)
    .await;
    if let Err(e) = inserted {
        let _ = state.vault.destroy(&sealed).await;
        return Err(e.into());
    }
    Ok(json!({"token": token, "size": size, "content_type": content_type, "sha256": sha256}))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("BLOBs are limited to {limit} bytes; nothing was stored"),
    )
}

fn body_broke_off() -> ApiError {
    ApiError::bad_request(
        "body_error",
        "the upload broke off before its end; nothing was stored",
    )
}

/// A live BLOB of the caller's tenant.
struct Row {
    study: String,
    require_reason: bool,
    participant_hash: Vec<u8>,
    sealed: Sealed,
    size: u64,
    content_type: String,
}

async fn find(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
) -> ApiResult<Row> {
    let row: Option<(String, Vec<u8>, String, String, i64, String)> = sqlx::query_as(
        "SELECT study_id, participant_hash, key_ref, blob_ref, size, content_type FROM blobs \
         WHERE token = $1 AND tenant_id = $2 AND NOT deleted",
    )
    .bind(token)
    .bind(tenant)
    .fetch_optional(&state.db)
    .await?;
    let (study, participant_hash, key_ref, blob_ref, size, content_type) =
        row.ok_or_else(|| ApiError::not_found("BLOB"))?;
    let require_reason = visible(state, principal, tenant, &study)
        .await?
        .require_reason;
    Ok(Row {
        require_reason,
        study,
        participant_hash,
        sealed: Sealed { key_ref, blob_ref },
        size: u64::try_from(size).unwrap_or(0),
        content_type,
    })
}

/// One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, clamped to the size.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (size.checked_sub(n.min(size))?, size.checked_sub(1)?)
        }
        (start, "") => (start.parse().ok()?, size.checked_sub(1)?),
        (start, end) => (
            start.parse().ok()?,
            end.parse::<u64>().ok()?.min(size.checked_sub(1)?),
        ),
    };
    (start <= end && end < size).then_some((start, end))
}

/// `GET /v1/blobs/{token}` (reader): the bytes, streamed; `Range` honoured.
pub(crate) async fn download(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(token): Path<String>,
    headers: HeaderMap,
    reason: super::reason::Reason,
) -> ApiResult<Response> {
    let tenant = principal.require(&[Role::Reader])?;
    let row = find(&state, &principal, tenant, &token).await?;
    reason.check(row.require_reason)?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(value) => Some(parse_range(value, row.size).ok_or_else(|| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!(
                    "one range of bytes within 0-{} is supported",
                    row.size.saturating_sub(1)
                ),
            )
        })?),
    };
    let context = context_digest(tenant, &row.study, &token, &row.participant_hash);
    let from = range.map_or(0, |(start, _)| start);
    let upstream = state.vault.open_stream(&row.sealed, &context, from).await?;
    let stream = upstream.bytes_stream().map_err(std::io::Error::other);
    let (status, body, length) = match range {
        None => (StatusCode::OK, Body::from_stream(stream), row.size),
        Some((start, end)) => {
            // The encryption host starts at the range; stop after it.
            let mut offset = start;
            let ranged = stream
                .try_filter_map(move |chunk| {
                    let chunk_start = offset;
                    offset += chunk.len() as u64;
                    let from = start.saturating_sub(chunk_start).min(chunk.len() as u64) as usize;
                    let to = (end + 1)
                        .saturating_sub(chunk_start)
                        .min(chunk.len() as u64) as usize;
                    let part = (from < to).then(|| chunk.slice(from..to));
                    async move { Ok(part) }
                })
                .take_while({
                    let mut sent = 0u64;
                    let want = end - start + 1;
                    move |part| {
                        let more = sent < want;
                        if let Ok(p) = part {
                            sent += p.len() as u64;
                        }
                        async move { more }
                    }
                });
            (
                StatusCode::PARTIAL_CONTENT,
                Body::from_stream(ranged),
                end - start + 1,
            )
        }
    };
    let mut response = body.into_response();
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&row.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some((start, end)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", row.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// `DELETE /v1/blobs/{token}` (admin): keys, every replica, metadata.
/// With an `Idempotency-Key`, a retry answers 204 again instead of 404.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = principal.require(&[Role::Admin])?;
    idempotency::once(
        &state,
        &principal,
        &headers,
        "blobs:delete",
        token.as_bytes(),
        || delete_now(&state, &principal, tenant, &token),
        serde_json::Value::clone,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_now(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
) -> ApiResult<serde_json::Value> {
    find(state, principal, tenant, token).await?;
    super::shred::one(state, super::shred::Table::Blobs, tenant, token).await?;
    Ok(idempotency::no_content())
}

/// The participant's BLOBs for an export.
pub(crate) async fn of_participant(
    state: &AppState,
    tenant: &str,
    study: &str,
    hash: &[u8],
) -> ApiResult<Vec<Value>> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT token, size, content_type FROM blobs WHERE tenant_id = $1 AND study_id = $2 AND participant_hash = $3 \
         AND NOT deleted ORDER BY created_at, token",
    )
    .bind(tenant)
    .bind(study)
    .bind(hash)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(token, size, content_type)| json!({"token": token, "size": size, "content_type": content_type}))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_are_parsed_and_clamped() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
