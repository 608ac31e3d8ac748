//! The maintenance worker (`coffer worker`): runs queued jobs through the key
//! host and the encryption host, with leases so several workers never run
//! the same job and a crashed worker's job is taken over.
//!
//! Jobs today: `delete_study` and `delete_tenant` — the KEK is destroyed in
//! the HSM first (from that moment nothing the study stored can be
//! decrypted, key DB backups included), then every record's keys and blob
//! replicas are collected. Every step is idempotent, so a resumed job just
//! carries on. Rotation, re-encryption and scrubbing come with the lifecycle
//! work.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use coffer_keyhost::client::{KeyHostClient, KeyHostError};
use coffer_keyhost::tls::install_crypto_provider;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use crate::api::vault::{Sealed, Vault};

/// Attempts before a job is marked failed.
const MAX_ATTEMPTS: i32 = 5;

/// Settings of the maintenance worker.
#[derive(Clone, Debug, Args)]
pub struct WorkerArgs {
    /// The internal CA (key host, encryption host, metadata DB).
    #[arg(long, env = "COFFER_CA")]
    pub ca: PathBuf,
    /// The metadata DB URL; TLS verify-full against --ca.
    #[arg(long, env = "COFFER_META_DB")]
    pub meta_db: String,
    /// The key host.
    #[arg(long, env = "COFFER_KEY_HOST")]
    pub key_host: String,
    /// The encryption host.
    #[arg(long, env = "COFFER_ENCRYPTD_URL")]
    pub encryptd: String,
    /// Client certificate with the `maintenance` role.
    #[arg(long, env = "COFFER_WORKER_CLIENT_CERT")]
    pub client_cert: PathBuf,
    /// Its private key.
    #[arg(long, env = "COFFER_WORKER_CLIENT_KEY")]
    pub client_key: PathBuf,
    /// How often to look for work, in milliseconds.
    #[arg(long, env = "COFFER_WORKER_POLL_MS", default_value_t = 500)]
    pub poll_ms: u64,
}

struct Worker {
    db: PgPool,
    keys: KeyHostClient,
    vault: Vault,
}

/// Runs jobs until `shutdown`; `ready` is called once connected.
pub async fn run(
    args: WorkerArgs,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let options = PgConnectOptions::from_str(&args.meta_db)
        .context("parsing the metadata DB URL")?
        .ssl_mode(PgSslMode::VerifyFull)
        .ssl_root_cert(&args.ca);
    let db = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await
        .context("connecting to the metadata DB")?;
    let worker = Worker {
        db,
        keys: KeyHostClient::new(
            &args.key_host,
            &args.ca,
            &args.client_cert,
            &args.client_key,
        )?,
        vault: Vault::new(
            &args.encryptd,
            &args.ca,
            &args.client_cert,
            &args.client_key,
        )?,
    };
    ready();
    tokio::pin!(shutdown);
    loop {
        let ran = match worker.run_one().await {
            Ok(ran) => ran,
            Err(e) => {
                tracing::warn!("job queue unavailable: {e:#}");
                false
            }
        };
        if !ran {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(args.poll_ms)) => {}
            }
        }
    }
}

/// The statements that collect one kind of stored object.
struct Collect {
    what: &'static str,
    pending: &'static str,
    mark_one: &'static str,
    mark_all: &'static str,
}

impl Collect {
    const RECORDS: Self = Self {
        what: "a record",
        pending: "SELECT token, key_ref, blob_ref FROM records WHERE study_id = $1 AND key_ref <> '' LIMIT 100",
        mark_one: "UPDATE records SET deleted = true, key_ref = '', blob_ref = '' WHERE token = $1",
        mark_all: "UPDATE records SET deleted = true WHERE study_id = $1",
    };
    const BLOBS: Self = Self {
        what: "a BLOB",
        pending: "SELECT token, key_ref, blob_ref FROM blobs WHERE study_id = $1 AND key_ref <> '' LIMIT 100",
        mark_one: "UPDATE blobs SET deleted = true, key_ref = '', blob_ref = '' WHERE token = $1",
        mark_all: "UPDATE blobs SET deleted = true WHERE study_id = $1",
    };
}

/// A claimed job.
#[derive(Debug, sqlx::FromRow)]
struct Job {
    id: String,
    tenant_id: String,
    kind: String,
    target: String,
}

impl Worker {
    /// Claims and runs one job; false when there was none.
    async fn run_one(&self) -> Result<bool> {
        let job: Option<Job> = sqlx::query_as(
            "UPDATE jobs SET state = 'running', lease_until = now() + interval '60 seconds', \
                    started_at = coalesce(started_at, now()) \
             WHERE id = (SELECT id FROM jobs \
                         WHERE state = 'queued' OR (state = 'running' AND lease_until < now()) \
                         ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1) \
             RETURNING id, tenant_id, kind, target",
        )
        .fetch_optional(&self.db)
        .await?;
        let Some(job) = job else { return Ok(false) };
        tracing::info!(job = %job.id, kind = %job.kind, "running");
        let outcome = match job.kind.as_str() {
            "delete_study" => self.delete_study(&job, &job.target).await,
            "delete_tenant" => self.delete_tenant(&job).await,
            other => Err(anyhow::anyhow!("unknown job kind {other}")),
        };
        match outcome {
            Ok(receipt) => {
                sqlx::query(
                    "UPDATE jobs SET state = 'succeeded', finished_at = now(), receipt = $2, lease_until = NULL WHERE id = $1",
                )
                .bind(&job.id)
                .bind(receipt)
                .execute(&self.db)
                .await?;
                tracing::info!(job = %job.id, "succeeded");
            }
            Err(e) => {
                tracing::warn!(job = %job.id, "attempt failed: {e:#}");
                sqlx::query(
                    "UPDATE jobs SET errors = errors + 1, lease_until = NULL, \
                        state = CASE WHEN errors + 1 >= $2 THEN 'failed' ELSE 'queued' END, \
                        finished_at = CASE WHEN errors + 1 >= $2 THEN now() ELSE NULL END \
                     WHERE id = $1",
                )
                .bind(&job.id)
                .bind(MAX_ATTEMPTS)
                .execute(&self.db)
                .await?;
            }
        }
        Ok(true)
    }

    /// Destroys the study's KEK, then collects its records.
    async fn delete_study(&self, job: &Job, study: &str) -> Result<Value> {
        let (kek,): (String,) =
            sqlx::query_as("SELECT kek_id FROM studies WHERE id = $1 AND tenant_id = $2")
                .bind(study)
                .bind(&job.tenant_id)
                .fetch_one(&self.db)
                .await
                .context("the study")?;
        sqlx::query("UPDATE studies SET deleted = true WHERE id = $1")
            .bind(study)
            .execute(&self.db)
            .await?;
        // The HSM first: after this nothing of the study can be decrypted.
        match self.keys.destroy_kek(&kek).await {
            Ok(()) | Err(KeyHostError::Refused { status: 404, .. }) => {}
            Err(e) => return Err(e).context("destroying the study's KEK"),
        }
        let (total,): (i64,) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM records WHERE study_id = $1) + (SELECT count(*) FROM blobs WHERE study_id = $1)",
        )
        .bind(study)
        .fetch_one(&self.db)
        .await?;
        sqlx::query("UPDATE jobs SET total = total + $2 WHERE id = $1 AND kind = 'delete_study'")
            .bind(&job.id)
            .bind(total)
            .execute(&self.db)
            .await?;
        let records = self.collect(job, &Collect::RECORDS, study).await?;
        let blobs = self.collect(job, &Collect::BLOBS, study).await?;
        Ok(
            json!({ "study": study, "kek": "destroyed", "records_collected": records, "blobs_collected": blobs }),
        )
    }

    /// Deletes the keys and replicas of every row of a table (records or
    /// blobs) in the study, marking each row collected as it goes.
    async fn collect(&self, job: &Job, table: &Collect, study: &str) -> Result<i64> {
        let mut collected = 0i64;
        loop {
            let batch: Vec<(String, String, String)> = sqlx::query_as(table.pending)
                .bind(study)
                .fetch_all(&self.db)
                .await?;
            if batch.is_empty() {
                break;
            }
            let mut done = 0i64;
            for (token, key_ref, blob_ref) in batch {
                match self.vault.destroy(&Sealed { key_ref, blob_ref }).await {
                    Ok(()) => {}
                    Err(e) if e.status == axum::http::StatusCode::NOT_FOUND => {}
                    Err(e) => {
                        anyhow::bail!("collecting {}: {} ({})", table.what, e.message, e.code)
                    }
                }
                sqlx::query(table.mark_one)
                    .bind(&token)
                    .execute(&self.db)
                    .await?;
                done += 1;
            }
            collected += done;
            sqlx::query("UPDATE jobs SET done = done + $2, lease_until = now() + interval '60 seconds' WHERE id = $1")
                .bind(&job.id)
                .bind(done)
                .execute(&self.db)
                .await?;
        }
        sqlx::query(table.mark_all)
            .bind(study)
            .execute(&self.db)
            .await?;
        Ok(collected)
    }

    /// Every study of the tenant, then its keys.
    async fn delete_tenant(&self, job: &Job) -> Result<Value> {
        let studies: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM studies WHERE tenant_id = $1 ORDER BY created_at")
                .bind(&job.tenant_id)
                .fetch_all(&self.db)
                .await?;
        sqlx::query("UPDATE jobs SET total = $2 WHERE id = $1")
            .bind(&job.id)
            .bind(studies.len() as i64)
            .execute(&self.db)
            .await?;
        let mut receipts = Vec::new();
        for (study,) in &studies {
            receipts.push(self.delete_study(job, study).await?);
        }
        sqlx::query("UPDATE jobs SET done = $2 WHERE id = $1")
            .bind(&job.id)
            .bind(studies.len() as i64)
            .execute(&self.db)
            .await?;
        sqlx::query("UPDATE api_keys SET revoked = true WHERE tenant_id = $1")
            .bind(&job.tenant_id)
            .execute(&self.db)
            .await?;
        Ok(json!({ "tenant": job.tenant_id, "studies": receipts }))
    }
}
