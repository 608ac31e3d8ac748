//! Tenants (operator) and API keys (tenant admins).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{Principal, Role, keyed_hash, new_key_secret};
use super::error::{ApiError, ApiResult};
use super::idempotency;
use super::ids;
use super::json::{Body, Path};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewTenant {
    name: String,
}

fn check_name(name: &str) -> ApiResult<()> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "a name is 1 to 200 characters",
        ));
    }
    Ok(())
}

/// What a new API key may do.
struct KeySpec<'a> {
    role: Role,
    name: Option<&'a str>,
    studies: Option<&'a [String]>,
    expires_at: Option<&'a str>,
    can_link: bool,
}

/// Stores a new key (only its keyed hash); returns (id, secret).
async fn insert_key(
    db: impl sqlx::PgExecutor<'_>,
    state: &AppState,
    tenant: &str,
    spec: KeySpec<'_>,
) -> ApiResult<(String, zeroize::Zeroizing<String>)> {
    let (id, secret) = new_key_secret();
    let hash = keyed_hash(&state.secret, "api-key", secret.as_bytes());
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, role, name, studies, expires_at, can_link, secret_hash) \
         VALUES ($1, $2, $3, $4, $5, $6::timestamptz, $7, $8)",
    )
    .bind(&id)
    .bind(tenant)
    .bind(spec.role.as_str())
    .bind(spec.name)
    .bind(spec.studies)
    .bind(spec.expires_at)
    .bind(spec.can_link)
    .bind(hash)
    .execute(db)
    .await?;
    Ok((id, secret))
}

/// `POST /v1/tenants` (operator): a tenant and its first admin key. A
/// replay under the same `Idempotency-Key` answers the same tenant without
/// the key: a secret is shown once and kept nowhere.
pub(crate) async fn create_tenant(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    Body(body): Body<NewTenant>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if principal.role != Role::Operator {
        return Err(ApiError::forbidden("only the operator creates tenants"));
    }
    check_name(&body.name)?;
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "tenants",
        body.name.as_bytes(),
        || create_tenant_now(&state, &body),
        |answer| without(answer, "admin_key"),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(answer.into_value())))
}

/// An answer to keep, minus its secret.
fn without(answer: &Value, secret: &str) -> Value {
    let mut kept = answer.clone();
    if let Some(fields) = kept.as_object_mut() {
        fields.remove(secret);
    }
    kept
}

async fn create_tenant_now(state: &AppState, body: &NewTenant) -> ApiResult<Value> {
    let id = ids::new("ten");
    // One transaction: never a tenant without its first admin key.
    let mut tx = state.db.begin().await?;
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(&id)
        .bind(&body.name)
        .execute(&mut *tx)
        .await?;
    let first_admin = KeySpec {
        role: Role::Admin,
        name: Some("first admin"),
        studies: None,
        expires_at: None,
        can_link: false,
    };
    let (_, secret) = insert_key(&mut *tx, state, &id, first_admin).await?;
    tx.commit().await?;
    Ok(json!({"id": id, "name": body.name, "admin_key": secret.as_str()}))
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKey {
    role: String,
    studies: Option<Vec<String>>,
    name: Option<String>,
    expires_at: Option<String>,
    #[serde(default)]
    can_link: bool,
}

/// `POST /v1/api-keys` (admin). A replay under the same `Idempotency-Key`
/// answers the same key without its secret (shown once, kept nowhere).
pub(crate) async fn create_key(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    Body(body): Body<NewKey>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let tenant = principal.require(&[Role::Admin])?;
    within_scope(&principal, body.studies.as_deref())?;
    let canonical = serde_json::to_vec(&body).unwrap_or_default();
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "api-keys",
        &canonical,
        || create_key_now(&state, tenant, &body),
        |answer| without(answer, "secret"),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(answer.into_value())))
}

async fn create_key_now(state: &AppState, tenant: &str, body: &NewKey) -> ApiResult<Value> {
    let role = Role::parse_tenant_role(&body.role).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_role",
            "role is one of admin, writer, reader, auditor",
        )
    })?;
    let expires_at = body.expires_at.as_deref().map(expiry).transpose()?;
    if let Some(studies) = &body.studies {
        let (owned,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM studies WHERE tenant_id = $1 AND id = ANY($2) AND NOT deleted",
        )
        .bind(tenant)
        .bind(studies)
        .fetch_one(&state.db)
        .await?;
        if usize::try_from(owned).unwrap_or(0) != studies.len() {
            return Err(ApiError::not_found("study"));
        }
    }
    let spec = KeySpec {
        role,
        name: body.name.as_deref(),
        studies: body.studies.as_deref(),
        expires_at: expires_at.as_deref(),
        can_link: body.can_link,
    };
    let (id, secret) = insert_key(&state.db, state, tenant, spec).await?;
    Ok(json!({"id": id, "secret": secret.as_str(), "role": role.as_str()}))
}

/// An expiry time: RFC 3339 with an offset, in the future. (Postgres alone
/// would also take `now`, `epoch` or `infinity`.)
fn expiry(text: &str) -> ApiResult<String> {
    use time::format_description::well_known::Rfc3339;
    let at = time::OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        ApiError::bad_request(
            "invalid_expires_at",
            "expires_at is an RFC 3339 time, e.g. 2027-01-31T00:00:00Z",
        )
    })?;
    if at <= time::OffsetDateTime::now_utc() {
        return Err(ApiError::bad_request(
            "invalid_expires_at",
            "expires_at is in the past",
        ));
    }
    at.format(&Rfc3339)
        .map_err(|_| ApiError::bad_request("invalid_expires_at", "expires_at is out of range"))
}

/// A key limited to some studies may only hand out keys limited to those
/// studies (or fewer): it can never mint a key wider than itself.
fn within_scope(principal: &Principal, requested: Option<&[String]>) -> ApiResult<()> {
    let Some(scope) = &principal.studies else {
        return Ok(());
    };
    match requested {
        Some(studies) if studies.iter().all(|s| scope.contains(s)) => Ok(()),
        _ => Err(ApiError::forbidden(
            "a key limited to some studies may only create keys limited to those studies",
        )),
    }
}

/// One key in a listing: never its secret.
#[derive(Debug, sqlx::FromRow, serde::Serialize)]
struct KeyListing {
    id: String,
    role: String,
    name: Option<String>,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
}

/// Keys a caller may see and revoke: all of its tenant's, or for a key
/// limited to some studies only keys limited to those studies. ($1 the
/// tenant, $2 the caller's studies or NULL; a macro so queries stay literal.)
macro_rules! in_scope {
    () => {
        "tenant_id = $1 AND ($2::text[] IS NULL OR (studies IS NOT NULL AND studies <@ $2))"
    };
}

/// `GET /v1/api-keys` (admin): never the secrets.
pub(crate) async fn list_keys(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> ApiResult<Json<Value>> {
    let tenant = principal.require(&[Role::Admin])?;
    let rows: Vec<KeyListing> = sqlx::query_as(concat!(
        "SELECT id, role, name, to_json(created_at)#>>'{}' AS created_at, to_json(expires_at)#>>'{}' AS expires_at, \
                to_json(last_used_at)#>>'{}' AS last_used_at \
         FROM api_keys WHERE ",
        in_scope!(),
        " AND NOT revoked ORDER BY created_at"
    ))
    .bind(tenant)
    .bind(principal.studies.as_deref())
    .fetch_all(&state.db)
    .await?;
    Ok(Json(json!({ "keys": rows })))
}

/// `DELETE /v1/api-keys/{id}` (admin): refused from then on.
pub(crate) async fn revoke_key(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let tenant = principal.require(&[Role::Admin])?;
    idempotency::once(
        &state,
        &principal,
        &headers,
        "api-keys:revoke",
        id.as_bytes(),
        || revoke_key_now(&state, &principal, tenant, &id),
        Value::clone,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_key_now(
    state: &AppState,
    principal: &Principal,
    tenant: &str,
    id: &str,
) -> ApiResult<Value> {
    let revoked = sqlx::query(concat!(
        "UPDATE api_keys SET revoked = true WHERE ",
        in_scope!(),
        " AND id = $3 AND NOT revoked"
    ))
    .bind(tenant)
    .bind(principal.studies.as_deref())
    .bind(id)
    .execute(&state.db)
    .await?
    .rows_affected();
    if revoked == 0 {
        return Err(ApiError::not_found("API key"));
    }
    Ok(idempotency::no_content())
}

/// `DELETE /v1/tenants/{tenant}` (operator): every key refused at once; a job
/// crypto-shreds every study of the tenant.
pub(crate) async fn delete_tenant(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if principal.role != Role::Operator {
        return Err(ApiError::forbidden("only the operator deletes tenants"));
    }
    let answer = idempotency::once(
        &state,
        &principal,
        &headers,
        "tenants:delete",
        tenant.as_bytes(),
        || delete_tenant_now(&state, &tenant),
        Value::clone,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(answer.into_value())))
}

async fn delete_tenant_now(state: &AppState, tenant: &str) -> ApiResult<Value> {
    // One transaction: never a tenant marked deleted without the job that
    // shreds it (a retry would find nothing left to delete).
    let mut tx = state.db.begin().await?;
    let marked = sqlx::query("UPDATE tenants SET deleted = true WHERE id = $1 AND NOT deleted")
        .bind(tenant)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // Asked for again before it finished: the same job (queued again if it
    // failed); once shredded, the tenant is gone.
    let job = if marked == 0 {
        super::jobs::resume(&mut *tx, tenant, "delete_tenant", tenant)
            .await?
            .ok_or_else(|| ApiError::not_found("tenant"))?
    } else {
        super::jobs::enqueue(&mut *tx, tenant, "delete_tenant", tenant).await?
    };
    tx.commit().await?;
    Ok(json!({ "job": job }))
}
