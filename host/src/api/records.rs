//! JSON records: the envelope (participant, kind, data) is sealed by the
//! encryption host; the metadata DB keeps only the token, the study, a keyed
//! hash of the participant, the version and the opaque refs.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{Principal, Role, participant_hash};
use super::error::{ApiError, ApiResult};
use super::idempotency::{self, Answer};
use super::json::{Body, Path};
use super::reason::Reason;
use super::studies::{Study, visible};
use super::vault::{Sealed, context_digest};
use super::{AppState, ids};

/// Items of one batch stored at once.
const BATCH_CONCURRENCY: usize = 16;

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewRecord {
    participant: String,
    kind: Option<String>,
    data: Value,
}

/// What is sealed: everything a record says.
#[derive(Debug, serde::Serialize, Deserialize)]
struct Envelope {
    participant: String,
    kind: Option<String>,
    data: Value,
}

fn validate(record: &NewRecord) -> ApiResult<()> {
    if record.participant.is_empty() || record.participant.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_participant",
            "participant is 1 to 200 characters",
        ));
    }
    if record
        .kind
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 100)
    {
        return Err(ApiError::bad_request(
            "invalid_kind",
            "kind is 1 to 100 characters",
        ));
    }
    if !record.data.is_object() {
        return Err(ApiError::bad_request(
            "invalid_data",
            "data must be a JSON object",
        ));
    }
    Ok(())
}

async fn store(
    state: &AppState,
    tenant: &str,
    study: &Study,
    record: NewRecord,
) -> ApiResult<Value> {
    validate(&record)?;
    let token = ids::new("rec");
    let hash = participant_hash(&state.secret, &study.id, &record.participant);
    let context = context_digest(tenant, &study.id, &token, &hash);
    let envelope = Envelope {
        participant: record.participant,
        kind: record.kind,
        data: record.data,
    };
    let plaintext = serde_json::to_vec(&envelope)
        .map_err(|_| ApiError::bad_request("invalid_data", "data is not serializable"))?;
    let sealed = state.vault.seal(&study.kek, &context, plaintext).await?;
    let inserted: Result<(String,), _> = sqlx::query_as(
        "INSERT INTO records (token, tenant_id, study_id, participant_hash, version, key_ref, blob_ref) \
         VALUES ($1, $2, $3, $4, 1, $5, $6) RETURNING to_json(created_at)#>>'{}'",
    )
    .bind(&token)
    .bind(tenant)
    .bind(&study.id)
    .bind(&hash)
    .bind(&sealed.key_ref)
    .bind(&sealed.blob_ref)
    .fetch_one(&state.db)
    .await;
    let (created_at,) = match inserted {
        Ok(row) => row,
        Err(e) => {
            // Not recorded, so not kept: shred what was sealed.
            let _ = state.vault.destroy(&sealed).await;
            return Err(e.into());
        }
    };
    Ok(json!({
        "token": token, "participant": envelope.participant, "kind": envelope.kind,
        "version": 1, "created_at": created_at,
    }))
}

/// `POST /v1/studies/{study}/records` (writer). With an `Idempotency-Key`,
/// the same key and body within 24 h answer the first token and store
/// nothing twice; the same key with another body is 409.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(study): Path<String>,
    headers: axum::http::HeaderMap,
    Body(record): Body<NewRecord>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Writer])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    let canonical = serde_json::to_vec(&(&study.id, &record)).unwrap_or_default();
    let (participant, kind) = (record.participant.clone(), record.kind.clone());
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "records",
        &canonical,
        || store(&state, tenant, &study, record),
        // The participant id is never kept: it comes back from the request.
        |answer| json!({ "token": answer["token"], "created_at": answer["created_at"] }),
    )
    .await?;
    let answer = match answer {
        Answer::Fresh(answer) => answer,
        Answer::Replayed(kept) => json!({
            "token": kept["token"], "participant": participant, "kind": kind,
            "version": 1, "created_at": kept["created_at"],
        }),
    };
    Ok((StatusCode::CREATED, Json(answer)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Batch {
    records: Vec<Value>,
}

/// `POST /v1/studies/{study}/records:batch` (writer): one result per item,
/// in order. Honours `Idempotency-Key` like single creation.
pub(crate) async fn batch(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(study): Path<String>,
    headers: axum::http::HeaderMap,
    Body(batch): Body<Batch>,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Writer])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    state
        .limits
        .check_items(batch.records.len(), "a batch", "records")?;
    let canonical = serde_json::to_vec(&(&study.id, &batch.records)).unwrap_or_default();
    let run = || store_batch(&state, tenant, &study, batch.records);
    // Results hold tokens and error codes only: kept whole.
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "records:batch",
        &canonical,
        run,
        Value::clone,
    )
    .await?;
    Ok(Json(answer.into_value()))
}

/// Stores the items of a batch concurrently (bounded), results in order.
async fn store_batch(
    state: &AppState,
    tenant: &str,
    study: &Study,
    items: Vec<Value>,
) -> ApiResult<Value> {
    let results: Vec<Value> = futures::stream::iter(items)
        .map(|item| async move {
            let outcome = match serde_json::from_value::<NewRecord>(item) {
                Ok(record) => store(state, tenant, study, record).await,
                Err(_) => Err(ApiError::bad_request(
                    "invalid_body",
                    "the item does not have the fields a record needs",
                )),
            };
            match outcome {
                Ok(stored) => json!({ "token": stored["token"] }),
                Err(e) => json!({ "error": { "code": e.code, "message": e.message } }),
            }
        })
        .buffered(BATCH_CONCURRENCY)
        .collect()
        .await;
    Ok(json!({ "results": results }))
}

/// A live record of the caller's tenant.
struct Row {
    study: String,
    participant_hash: Vec<u8>,
    version: i32,
    sealed: Sealed,
    created_at: String,
}

async fn find(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
) -> ApiResult<(Row, Study)> {
    let row: Option<(String, Vec<u8>, i32, String, String, String)> = sqlx::query_as(
        "SELECT study_id, participant_hash, version, key_ref, blob_ref, to_json(created_at)#>>'{}' \
         FROM records WHERE token = $1 AND tenant_id = $2 AND NOT deleted",
    )
    .bind(token)
    .bind(tenant)
    .fetch_optional(&state.db)
    .await?;
    let (study, participant_hash, version, key_ref, blob_ref, created_at) =
        row.ok_or_else(|| ApiError::not_found("record"))?;
    let study_row = visible(state, principal, tenant, &study).await?;
    Ok((
        Row {
            study,
            participant_hash,
            version,
            sealed: Sealed { key_ref, blob_ref },
            created_at,
        },
        study_row,
    ))
}

async fn open(state: &AppState, tenant: &str, token: &str, row: &Row) -> ApiResult<Envelope> {
    let context = context_digest(tenant, &row.study, token, &row.participant_hash);
    let plaintext = state.vault.open(&row.sealed, &context).await?;
    serde_json::from_slice(&plaintext).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "record_integrity",
            "the record's envelope is unreadable",
        )
    })
}

/// Finds and opens the live version of `token`, once `check` allows its
/// study. A correction may destroy the version just found before it is
/// opened: the pointer is read again.
async fn find_and_open(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
    check: impl Fn(&Study) -> ApiResult<()>,
) -> ApiResult<(Row, Study, Envelope)> {
    let mut tries = 0;
    loop {
        let (row, study) = find(state, principal, tenant, token).await?;
        check(&study)?;
        match open(state, tenant, token, &row).await {
            Ok(envelope) => return Ok((row, study, envelope)),
            Err(e) if e.status == StatusCode::NOT_FOUND && tries < 2 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// `GET /v1/records/{token}` (reader).
pub(crate) async fn read(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(token): Path<String>,
    reason: Reason,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Reader])?;
    let (row, _, envelope) = find_and_open(&state, &principal, tenant, &token, |study| {
        reason.check(study.require_reason)
    })
    .await?;
    Ok(Json(json!({
        "token": token, "study": row.study, "participant": envelope.participant, "kind": envelope.kind,
        "version": row.version, "data": envelope.data, "created_at": row.created_at,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Correction {
    data: Value,
}

/// `PUT /v1/records/{token}` (writer): new keys, new blob, the old version destroyed.
/// With an `Idempotency-Key`, a retried correction makes one new version.
pub(crate) async fn correct(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
    Body(correction): Body<Correction>,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Writer])?;
    if !correction.data.is_object() {
        return Err(ApiError::bad_request(
            "invalid_data",
            "data must be a JSON object",
        ));
    }
    let canonical = serde_json::to_vec(&(&token, &correction.data)).unwrap_or_default();
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "records:correct",
        &canonical,
        || correct_now(&state, &principal, tenant, &token, correction),
        // A token and a version number: nothing of the record.
        Value::clone,
    )
    .await?;
    Ok(Json(answer.into_value()))
}

async fn correct_now(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
    correction: Correction,
) -> ApiResult<Value> {
    let (row, study) = find(state, principal, tenant, token).await?;
    let old = open(state, tenant, token, &row).await?;
    let envelope = Envelope {
        participant: old.participant,
        kind: old.kind,
        data: correction.data,
    };
    let plaintext = serde_json::to_vec(&envelope)
        .map_err(|_| ApiError::bad_request("invalid_data", "data is not serializable"))?;
    let context = context_digest(tenant, &row.study, token, &row.participant_hash);
    let sealed = state.vault.seal(&study.kek, &context, plaintext).await?;
    if let Err(e) = switch_version(state, tenant, token, &row, &sealed).await {
        // The new version is linked nowhere: it goes.
        let _ = state.vault.destroy(&sealed).await;
        return Err(e);
    }
    super::shred::now(&state.db, &state.vault, &row.sealed).await;
    Ok(json!({ "token": token, "version": row.version + 1 }))
}

/// Points the record at its new version `sealed` and puts the old one on the
/// shred queue, in one transaction: the old version is destroyed at once
/// (GDPR art. 16), or by the worker if that fails, never forgotten. 409
/// when the record changed since `row` was read.
async fn switch_version(
    state: &AppState,
    tenant: &str,
    token: &str,
    row: &Row,
    sealed: &Sealed,
) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    let switched = sqlx::query(
        "UPDATE records SET version = version + 1, key_ref = $3, blob_ref = $4 \
         WHERE token = $1 AND tenant_id = $2 AND version = $5 AND NOT deleted",
    )
    .bind(token)
    .bind(tenant)
    .bind(&sealed.key_ref)
    .bind(&sealed.blob_ref)
    .bind(row.version)
    .execute(&mut *tx)
    .await?;
    if switched.rows_affected() != 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the record changed meanwhile; retry",
        ));
    }
    super::shred::queue(&mut tx, state, tenant, &row.study, &row.sealed).await?;
    tx.commit().await?;
    Ok(())
}

/// `DELETE /v1/records/{token}` (admin): keys, every replica, metadata.
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
        "records:delete",
        token.as_bytes(),
        || delete_now(&state, &principal, tenant, &token),
        Value::clone,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_now(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    token: &str,
) -> ApiResult<Value> {
    // Found first for the role and study checks; the row itself is
    // unlinked under its lock, whatever version it holds by then.
    find(state, principal, tenant, token).await?;
    super::shred::one(state, super::shred::Table::Records, tenant, token).await?;
    Ok(idempotency::no_content())
}

/// `GET /v1/studies/{study}/participants/{participant}/export` (reader):
/// everything held for one participant, decrypted, in one answer.
pub(crate) async fn export(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path((study, participant)): Path<(String, String)>,
    reason: Reason,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Reader])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    reason.check(study.require_reason)?;
    let hash = participant_hash(&state.secret, &study.id, &participant);
    let tokens: Vec<(String,)> = sqlx::query_as(
        "SELECT token FROM records WHERE tenant_id = $1 AND study_id = $2 AND participant_hash = $3 AND NOT deleted \
         ORDER BY created_at, token",
    )
    .bind(tenant)
    .bind(&study.id)
    .bind(&hash)
    .fetch_all(&state.db)
    .await?;
    let mut records = Vec::with_capacity(tokens.len());
    for (token,) in tokens {
        let (row, _, envelope) =
            match find_and_open(&state, &principal, tenant, &token, |_| Ok(())).await {
                Ok(found) => found,
                // Deleted since it was listed.
                Err(e) if e.status == StatusCode::NOT_FOUND => continue,
                Err(e) => return Err(e),
            };
        records.push(json!({
            "token": token, "kind": envelope.kind, "data": envelope.data,
            "version": row.version, "created_at": row.created_at,
        }));
    }
    let blobs = super::blobs::of_participant(&state, tenant, &study.id, &hash).await?;
    let fields = super::fields::of_participant(&state, tenant, &study.id, &hash).await?;
    Ok(Json(
        json!({ "participant": participant, "records": records, "blobs": blobs, "fields": fields }),
    ))
}
