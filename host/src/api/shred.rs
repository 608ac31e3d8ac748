//! Deleting one record or BLOB: its keys and every replica go first (through
//! the encryption host), then its row is marked deleted with the refs cleared.

use super::AppState;
use super::error::ApiResult;
use super::vault::Sealed;

/// The tables that hold one sealed object per row.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Table {
    Records,
    Blobs,
}

impl Table {
    fn mark_deleted(self) -> &'static str {
        match self {
            Table::Records => {
                "UPDATE records SET deleted = true, key_ref = '', blob_ref = '' \
                 WHERE token = $1 AND tenant_id = $2"
            }
            Table::Blobs => {
                "UPDATE blobs SET deleted = true, key_ref = '', blob_ref = '' \
                 WHERE token = $1 AND tenant_id = $2"
            }
        }
    }
}

/// Destroys `sealed` and marks the row of `token` deleted.
pub(crate) async fn one(
    state: &AppState,
    table: Table,
    tenant: &str,
    token: &str,
    sealed: &Sealed,
) -> ApiResult<()> {
    state.vault.destroy(sealed).await?;
    sqlx::query(table.mark_deleted())
        .bind(token)
        .bind(tenant)
        .execute(&state.db)
        .await?;
    Ok(())
}
