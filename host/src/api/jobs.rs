//! Jobs: long work (deletions) queued here and run by the maintenance worker.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Principal, Role};
use super::error::{ApiError, ApiResult};
use super::ids;
use super::json::Path;

/// Queues a job and returns its id; callers pass the transaction that
/// hides what the job will destroy, so neither happens without the other.
pub(crate) async fn enqueue(
    db: impl sqlx::PgExecutor<'_>,
    tenant: &str,
    kind: &str,
    target: &str,
) -> ApiResult<String> {
    let id = ids::new("job");
    sqlx::query("INSERT INTO jobs (id, tenant_id, kind, target) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(tenant)
        .bind(kind)
        .bind(target)
        .execute(db)
        .await?;
    Ok(id)
}

/// Job kind of a study KEK rotation; its target is the study.
pub const ROTATE_KEK: &str = "rotate_kek";

/// Schedules a rotation of the study's KEK to start within `within`,
/// unless one is already waiting (which then covers this shredding too).
pub(crate) async fn schedule_rotation(
    db: impl sqlx::PgExecutor<'_>,
    tenant: &str,
    study: &str,
    within: std::time::Duration,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO jobs (id, tenant_id, kind, target, not_before) \
         SELECT $1, $2, $3, $4, now() + make_interval(secs => $5) \
         WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE kind = $3 AND target = $4 AND state = 'queued')",
    )
    .bind(ids::new("job"))
    .bind(tenant)
    .bind(ROTATE_KEK)
    .bind(study)
    .bind(within.as_secs_f64())
    .execute(db)
    .await?;
    Ok(())
}

/// The unfinished job of `kind` on `target`, if one is left: a deletion asked
/// for again answers it, and one that failed for good is queued again (the
/// only way to finish shredding what it left behind).
pub(crate) async fn resume(
    db: impl sqlx::PgExecutor<'_>,
    tenant: &str,
    kind: &str,
    target: &str,
) -> ApiResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE jobs SET state = CASE WHEN state = 'failed' THEN 'queued' ELSE state END, \
                errors = CASE WHEN state = 'failed' THEN 0 ELSE errors END, \
                finished_at = CASE WHEN state = 'failed' THEN NULL ELSE finished_at END, \
                not_before = NULL \
         WHERE id = (SELECT id FROM jobs WHERE tenant_id = $1 AND kind = $2 AND target = $3 \
                       AND state <> 'succeeded' ORDER BY created_at DESC LIMIT 1) \
         RETURNING id",
    )
    .bind(tenant)
    .bind(kind)
    .bind(target)
    .fetch_optional(db)
    .await?)
}

/// One job as `GET /v1/jobs/{job}` shows it.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
struct JobView {
    id: String,
    kind: String,
    /// The study (or `study/participant hash`, or tenant) it works on; not shown.
    target: String,
    state: String,
    done: i64,
    total: i64,
    errors: i32,
    started_at: Option<String>,
    finished_at: Option<String>,
    receipt: Option<Value>,
}

/// `GET /v1/jobs/{job}`: the tenant's own jobs (the operator sees tenant deletions).
pub(crate) async fn get_job(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let scope = match principal.role {
        Role::Operator => None,
        _ => Some(
            principal
                .require(&[Role::Admin, Role::Writer, Role::Reader, Role::Auditor])?
                .to_owned(),
        ),
    };
    let job: Option<JobView> = sqlx::query_as(
        "SELECT id, kind, target, state, done, total, errors, to_json(started_at)#>>'{}' AS started_at, \
                to_json(finished_at)#>>'{}' AS finished_at, receipt \
         FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2) \
           AND ($2::text IS NOT NULL OR kind = 'delete_tenant')",
    )
    .bind(&id)
    .bind(scope.as_deref())
    .fetch_optional(&state.db)
    .await?;
    let job = job.ok_or_else(|| ApiError::not_found("job"))?;
    // A key limited to some studies sees only their jobs.
    if principal.studies.is_some() {
        match job.target.split('/').next() {
            Some(study) if job.kind != "delete_tenant" => principal.require_study(study)?,
            _ => {
                return Err(ApiError::forbidden(
                    "a key limited to some studies cannot see tenant-wide jobs",
                ));
            }
        }
    }
    let mut body = json!(job);
    body.as_object_mut().map(|o| o.remove("target"));
    if body["receipt"].is_null() {
        body.as_object_mut().map(|o| o.remove("receipt"));
    }
    Ok(Json(body))
}
