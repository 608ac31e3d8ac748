//! Destroying sealed objects (a deleted record or BLOB, the old version of a
//! corrected record). The object is unlinked and put on the shred queue in
//! one transaction, then destroyed through the encryption host and taken
//! off the queue. Whatever is left on the queue (the encryption host was
//! down, the API host died) the maintenance worker destroys. Each time, a
//! rotation of the study's KEK is scheduled: once its old version is
//! destroyed, key DB copies taken before open nothing that was shredded.

use super::AppState;
use super::error::{ApiError, ApiResult};
use super::vault::{Sealed, Vault};

/// The tables that hold one sealed object per row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Table {
    Records,
    Blobs,
}

/// Hides a live row of `$table` and clears its refs, answering the study
/// and the refs it had. The row lock makes a concurrent correction either
/// finish first (its new version is what is shredded) or find the row
/// deleted.
macro_rules! unlink {
    ($table:literal) => {
        concat!(
            "WITH old AS (SELECT token, study_id, key_ref, blob_ref FROM ",
            $table,
            " WHERE token = $1 AND tenant_id = $2 AND NOT deleted FOR UPDATE) \
             UPDATE ",
            $table,
            " t SET deleted = true, key_ref = '', blob_ref = '' FROM old \
             WHERE t.token = old.token RETURNING old.study_id, old.key_ref, old.blob_ref"
        )
    };
}

impl Table {
    fn unlink(self) -> &'static str {
        match self {
            Table::Records => unlink!("records"),
            Table::Blobs => unlink!("blobs"),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Table::Records => "record",
            Table::Blobs => "BLOB",
        }
    }
}

/// Deletes the live row of `token`: hidden at once, its keys and replicas
/// destroyed now or, failing that, by the worker. 404 when there is no
/// such live row (already deleted by a concurrent call).
pub(crate) async fn one(
    state: &AppState,
    table: Table,
    tenant: &str,
    token: &str,
) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    let refs: Option<(String, String, String)> = sqlx::query_as(table.unlink())
        .bind(token)
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
    let (study, key_ref, blob_ref) = refs.ok_or_else(|| ApiError::not_found(table.what()))?;
    let sealed = Sealed { key_ref, blob_ref };
    queue(&mut tx, state, tenant, &study, &sealed).await?;
    tx.commit().await?;
    now(&state.db, &state.vault, &sealed).await;
    Ok(())
}

/// Puts `sealed` (of `study`) on the queue and schedules the rotation of
/// the study's KEK; pass the transaction that unlinks it.
pub(crate) async fn queue(
    tx: &mut sqlx::PgConnection,
    state: &AppState,
    tenant: &str,
    study: &str,
    sealed: &Sealed,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO shred_queue (study_id, key_ref, blob_ref) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(study)
    .bind(&sealed.key_ref)
    .bind(&sealed.blob_ref)
    .execute(&mut *tx)
    .await?;
    super::jobs::schedule_rotation(&mut *tx, tenant, study, state.shred_rotation).await
}

/// Destroys a queued object and takes it off the queue; true when done. On
/// failure it stays queued for the worker (which calls this too).
pub(crate) async fn now(db: &sqlx::PgPool, vault: &Vault, sealed: &Sealed) -> bool {
    match vault.destroy(sealed).await {
        Ok(()) => {}
        // Destroyed before (a retry after a crash): done.
        Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => {}
        Err(e) => {
            tracing::warn!(code = %e.code, "destruction left for the maintenance worker");
            return false;
        }
    }
    sqlx::query("DELETE FROM shred_queue WHERE key_ref = $1 AND blob_ref = $2")
        .bind(&sealed.key_ref)
        .bind(&sealed.blob_ref)
        .execute(db)
        .await
        .is_ok()
}
