//! Participant deletion (GDPR art. 17): everything held for one participant
//! in a study is hidden at once, then destroyed by the maintenance worker
//! (keys, every blob replica, metadata), which then rotates the study's KEK
//! so that key DB copies taken before no longer open those records.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Principal, Role, participant_hash};
use super::error::ApiResult;
use super::idempotency;
use super::json::Path;
use super::studies::visible;

/// Job kind of a participant deletion; its target is `<study>/<hash hex>`.
pub const DELETE_PARTICIPANT: &str = "delete_participant";

/// `DELETE /v1/studies/{study}/participants/{participant}` (admin): 202
/// `{"job"}`; the job's receipt lists what was destroyed and the KEK
/// rotation (`pending` → `done`).
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path((study, participant)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Admin])?;
    let study = visible(&state, &principal, tenant, &study).await?;
    let hash = participant_hash(&state.secret, &study.id, &participant);
    // A retried deletion with the same Idempotency-Key queues one job.
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "delete_participant",
        &[study.id.as_bytes(), b"\0", &hash].concat(),
        || queue(&state, tenant, &study.id, &hash),
        Value::clone,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(answer.into_value())))
}

/// Hides the participant's data and queues the job that destroys it.
async fn queue(state: &AppState, tenant: &str, study: &str, hash: &[u8]) -> ApiResult<Value> {
    let target = format!("{study}/{}", data_encoding::HEXLOWER.encode(hash));
    // Hidden from every read at once, in the same transaction as the job
    // that destroys them.
    let mut tx = state.db.begin().await?;
    for hide in [
        "UPDATE records SET deleted = true WHERE study_id = $1 AND participant_hash = $2",
        "UPDATE blobs SET deleted = true WHERE study_id = $1 AND participant_hash = $2",
        "UPDATE field_sets SET deleted = true WHERE study_id = $1 AND participant_hash = $2",
    ] {
        sqlx::query(hide)
            .bind(study)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
    }
    let job = super::jobs::enqueue(&mut *tx, tenant, DELETE_PARTICIPANT, &target).await?;
    tx.commit().await?;
    Ok(json!({ "job": job }))
}
