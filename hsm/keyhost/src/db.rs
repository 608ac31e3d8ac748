//! The key DB: its own Postgres cluster, reached with TLS `verify-full`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

/// Connects to `url`, verifying the server against `ca` when given (always
/// in the dev stack and in production), and applies the key DB migrations.
pub async fn connect(
    url: &str,
    ca: Option<&Path>,
    client: &crate::dbtls::DbClientCert,
) -> Result<PgPool> {
    let mut options =
        client.apply(PgConnectOptions::from_str(url).context("parsing the key DB URL")?);
    if let Some(ca) = ca {
        options = options.ssl_mode(PgSslMode::VerifyFull).ssl_root_cert(ca);
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await
        .context("connecting to the key DB")?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("migrating the key DB")?;
    Ok(pool)
}
