//! Studies: each gets its own KEK in the HSM, through the encryption host.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Principal, Role};
use super::error::{ApiError, ApiResult};
use super::idempotency;
use super::ids;
use super::json::Body;

/// A study as the API host knows it.
#[derive(Debug)]
pub(crate) struct Study {
    pub id: String,
    pub kek: String,
    /// Reads must give `?reason=`.
    pub require_reason: bool,
}

/// The caller's study `id`, or 404 (missing and foreign look the same), or
/// 403 when the key is limited to other studies.
pub(crate) async fn visible(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    id: &str,
) -> ApiResult<Study> {
    let row: Option<(String, bool)> = sqlx::query_as(
        "SELECT kek_id, require_reason FROM studies WHERE id = $1 AND tenant_id = $2 AND NOT deleted",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&state.db)
    .await?;
    let (kek, require_reason) = row.ok_or_else(|| ApiError::not_found("study"))?;
    principal.require_study(id)?;
    Ok(Study {
        id: id.to_owned(),
        kek,
        require_reason,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewStudy {
    name: String,
    #[serde(default)]
    require_reason: bool,
}

/// `POST /v1/studies` (admin). Honours `Idempotency-Key`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: axum::http::HeaderMap,
    Body(body): Body<NewStudy>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Admin])?;
    if principal.studies.is_some() {
        // A new study would lie outside the key's own scope.
        return Err(ApiError::forbidden(
            "a key limited to some studies may not create studies",
        ));
    }
    if body.name.trim().is_empty() || body.name.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "a name is 1 to 200 characters",
        ));
    }
    let canonical = serde_json::to_vec(&(&body.name, body.require_reason)).unwrap_or_default();
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "studies",
        &canonical,
        || create_now(&state, tenant, &body),
        Value::clone,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(answer.into_value())))
}

async fn create_now(state: &AppState, tenant: &str, body: &NewStudy) -> ApiResult<Value> {
    let kek = state.vault.create_kek().await?;
    let id = ids::new("std");
    let (created_at,): (String,) = sqlx::query_as(
        "INSERT INTO studies (id, tenant_id, name, kek_id, require_reason) VALUES ($1, $2, $3, $4, $5) \
         RETURNING to_json(created_at)#>>'{}'",
    )
    .bind(&id)
    .bind(tenant)
    .bind(&body.name)
    .bind(&kek)
    .bind(body.require_reason)
    .fetch_one(&state.db)
    .await?;
    Ok(json!({"id": id, "name": body.name, "created_at": created_at}))
}

/// `GET /v1/studies`: the tenant's studies (those the key may use).
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Admin, Role::Writer, Role::Reader, Role::Auditor])?;
    let rows: Vec<(String, String, String, bool)> = sqlx::query_as(
        "SELECT id, name, to_json(created_at)#>>'{}', require_reason FROM studies \
         WHERE tenant_id = $1 AND NOT deleted ORDER BY created_at",
    )
    .bind(tenant)
    .fetch_all(&state.db)
    .await?;
    let studies: Vec<Value> = rows
        .into_iter()
        .filter(|(id, ..)| principal.require_study(id).is_ok())
        .map(|(id, name, created_at, require_reason)| {
            json!({"id": id, "name": name, "created_at": created_at, "require_reason": require_reason})
        })
        .collect();
    Ok(Json(json!({ "studies": studies })))
}

/// `DELETE /v1/studies/{study}` (admin): the study disappears at once; a job
/// destroys its KEK in the HSM first (crypto-shredding), then collects rows
/// and blobs. A retry with the same `Idempotency-Key` answers the same job.
pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    super::json::Path(study): super::json::Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Admin])?;
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "delete_study",
        study.as_bytes(),
        || queue_deletion(&state, &principal, tenant, &study),
        Value::clone,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(answer.into_value())))
}

/// Hides the study and queues the job that shreds it. A study already
/// hidden whose deletion has not finished answers that job (queued again
/// if it failed); once shredded, it is gone (404).
async fn queue_deletion(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    study: &str,
) -> ApiResult<Value> {
    let mut tx = state.db.begin().await?;
    let deleted: Option<bool> = sqlx::query_scalar(
        "SELECT deleted FROM studies WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
    )
    .bind(study)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    let deleted = deleted.ok_or_else(|| ApiError::not_found("study"))?;
    principal.require_study(study)?;
    let job = if deleted {
        super::jobs::resume(&mut *tx, tenant, "delete_study", study)
            .await?
            .ok_or_else(|| ApiError::not_found("study"))?
    } else {
        sqlx::query("UPDATE studies SET deleted = true WHERE id = $1 AND tenant_id = $2")
            .bind(study)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        super::jobs::enqueue(&mut *tx, tenant, "delete_study", study).await?
    };
    tx.commit().await?;
    Ok(json!({ "job": job }))
}
