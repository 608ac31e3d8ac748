//! The maintenance worker (`coffer worker`): runs queued jobs through the key
//! host and the encryption host, with leases so several workers never run
//! the same job and a crashed worker's job is taken over.
//!
//! Jobs today: `delete_study` and `delete_tenant` — the KEK is destroyed in
//! the HSM first (from that moment nothing the study stored can be
//! decrypted, key DB backups included), then every record's keys and blob
//! replicas are collected; `delete_participant` — the participant's keys
//! and replicas are destroyed, then the study's KEK is rotated and its old
//! version destroyed; `rotate_kek` — the study's KEK rotation scheduled
//! after a record or BLOB was deleted or corrected. Every step is
//! idempotent, so a resumed job just carries on. The worker also destroys
//! what is left on the shred queue. Rotation by policy, re-encryption and
//! scrubbing come with the lifecycle work.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use coffer_keyhost::api::RetireAnswer;
use coffer_keyhost::client::{KeyHostClient, KeyHostError};
use coffer_keyhost::tls::install_crypto_provider;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};

use crate::api::vault::{Sealed, Vault};

/// Attempts before a job is marked failed. After the n-th failed attempt
/// the job waits 2^n seconds, at most ten minutes: twenty attempts ride out
/// about two hours of a key or encryption host being down. A failed
/// deletion is queued again by asking for it again; a rotation scheduled
/// after a shredding is never given up (nobody would ask for it again).
const MAX_ATTEMPTS: i32 = 20;

/// Settings of the maintenance worker.
#[derive(Clone, Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub config: coffer_keyhost::settings::ConfigFile,
    #[command(flatten)]
    pub db_tls: coffer_keyhost::dbtls::DbClientCert,
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
    /// Seconds between a KEK rotation and the destruction of the old
    /// version, so keys generated just before the rotation are rewrapped too.
    #[arg(long, env = "COFFER_WORKER_ROTATION_GRACE_SECS", default_value_t = 10)]
    pub rotation_grace_secs: u64,
}

struct Worker {
    db: PgPool,
    keys: KeyHostClient,
    vault: Vault,
    rotation_grace: Duration,
}

/// Runs jobs until `shutdown`; `ready` is called once connected.
pub async fn run(
    args: WorkerArgs,
    ready: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let options = args.db_tls.apply(
        PgConnectOptions::from_str(&args.meta_db)
            .context("parsing the metadata DB URL")?
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&args.ca),
    );
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
        rotation_grace: Duration::from_secs(args.rotation_grace_secs),
    };
    ready();
    tokio::pin!(shutdown);
    let mut swept: Option<std::time::Instant> = None;
    loop {
        if swept.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            worker.sweep().await;
            swept = Some(std::time::Instant::now());
        }
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

/// The statements that collect one kind of stored object, in a whole study
/// (`$2` NULL) or of one participant (`$2` = the participant's hash; those
/// rows were hidden when the deletion was asked for).
struct Collect {
    what: &'static str,
    pending: &'static str,
    mark_one: &'static str,
}

impl Collect {
    const RECORDS: Self = Self {
        what: "a record",
        pending: "SELECT token, key_ref, blob_ref FROM records WHERE study_id = $1 \
                  AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted)) AND key_ref <> '' LIMIT 100",
        mark_one: "UPDATE records SET deleted = true, key_ref = '', blob_ref = '' WHERE token = $1",
    };
    const BLOBS: Self = Self {
        what: "a BLOB",
        pending: "SELECT token, key_ref, blob_ref FROM blobs WHERE study_id = $1 \
                  AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted)) AND key_ref <> '' LIMIT 100",
        mark_one: "UPDATE blobs SET deleted = true, key_ref = '', blob_ref = '' WHERE token = $1",
    };
    /// Field sets go with their token rows: nothing of them is kept.
    const FIELD_SETS: Self = Self {
        what: "a field set",
        pending: "SELECT id, key_ref, blob_ref FROM field_sets WHERE study_id = $1 \
                  AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted)) LIMIT 100",
        mark_one: "DELETE FROM field_sets WHERE id = $1",
    };
    const ALL: [Self; 3] = [Self::RECORDS, Self::BLOBS, Self::FIELD_SETS];
}

/// What one deletion destroyed, by kind.
#[derive(Debug, Default)]
struct Collected([i64; 3]);

impl Collected {
    fn receipt(&self) -> Value {
        json!({
            "records_destroyed": self.0[0],
            "blobs_destroyed": self.0[1],
            "field_sets_destroyed": self.0[2],
        })
    }
}

/// A finished rotation, as receipts show it.
fn add_rotation(receipt: &mut Value, rotated: &RetireAnswer) {
    receipt["kek_rotation"] = json!("done");
    receipt["kek_version"] = json!(rotated.current);
    receipt["kek_versions_destroyed"] = json!(rotated.destroyed);
    receipt["keys_rewrapped"] = json!(rotated.rewrapped);
}

/// A claimed job.
#[derive(Debug, sqlx::FromRow)]
struct Job {
    id: String,
    tenant_id: String,
    kind: String,
    target: String,
    /// This claim's lease: the job's updates check it.
    lease_holder: String,
}

impl Worker {
    /// Housekeeping: objects left on the shred queue, and first answers of
    /// idempotent writes older than 24 h.
    async fn sweep(&self) {
        // Not what the API host is destroying right now.
        match self.finish_shredding(None, Duration::from_secs(60)).await {
            Ok(0) => {}
            Ok(left) => tracing::warn!(
                left,
                "objects on the shred queue could not be destroyed yet"
            ),
            Err(e) => tracing::warn!("shred queue unavailable: {e}"),
        }
        if let Err(e) =
            sqlx::query("DELETE FROM idempotency WHERE created_at < now() - interval '24 hours'")
                .execute(&self.db)
                .await
        {
            tracing::warn!("idempotency sweep failed: {e}");
        }
    }

    /// Destroys what the API host unlinked but could not destroy: queued
    /// at least `min_age` ago, of one study or of all. Answers how many
    /// could not be destroyed (a dependency down).
    async fn finish_shredding(&self, study: Option<&str>, min_age: Duration) -> Result<usize> {
        loop {
            let batch: Vec<(String, String)> = sqlx::query_as(
                "SELECT key_ref, blob_ref FROM shred_queue \
                 WHERE queued_at <= now() - make_interval(secs => $1) \
                   AND ($2::text IS NULL OR study_id = $2) \
                 ORDER BY queued_at LIMIT 100",
            )
            .bind(min_age.as_secs_f64())
            .bind(study)
            .fetch_all(&self.db)
            .await?;
            let mut done = 0;
            for (key_ref, blob_ref) in &batch {
                let sealed = Sealed {
                    key_ref: key_ref.clone(),
                    blob_ref: blob_ref.clone(),
                };
                done += usize::from(crate::api::shred::now(&self.db, &self.vault, &sealed).await);
            }
            if done > 0 {
                tracing::info!(done, "destroyed objects left on the shred queue");
            }
            // An empty queue, or a dependency down: the next sweep goes on.
            if done < batch.len() || batch.is_empty() {
                return Ok(batch.len() - done);
            }
        }
    }

    /// Claims and runs one job; false when there was none.
    async fn run_one(&self) -> Result<bool> {
        let lease = crate::api::ids::new("lease");
        let job: Option<Job> = sqlx::query_as(
            "UPDATE jobs SET state = 'running', lease_until = now() + interval '60 seconds', \
                    lease_holder = $1, started_at = coalesce(started_at, now()) \
             WHERE id = (SELECT id FROM jobs \
                         WHERE (state = 'queued' AND (not_before IS NULL OR not_before <= now())) \
                            OR (state = 'running' AND lease_until < now()) \
                         ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1) \
             RETURNING id, tenant_id, kind, target, lease_holder",
        )
        .bind(&lease)
        .fetch_optional(&self.db)
        .await?;
        let Some(job) = job else { return Ok(false) };
        tracing::info!(job = %job.id, kind = %job.kind, "running");
        // The lease is renewed while the job runs, however long a step takes.
        let keeper = tokio::spawn({
            let (db, id, lease) = (self.db.clone(), job.id.clone(), job.lease_holder.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    let _ = sqlx::query(
                        "UPDATE jobs SET lease_until = now() + interval '60 seconds' \
                         WHERE id = $1 AND state = 'running' AND lease_holder = $2",
                    )
                    .bind(&id)
                    .bind(&lease)
                    .execute(&db)
                    .await;
                }
            }
        });
        let outcome = match job.kind.as_str() {
            "delete_study" => self.delete_study(&job, &job.target).await,
            "delete_tenant" => self.delete_tenant(&job).await,
            crate::api::DELETE_PARTICIPANT => self.delete_participant(&job).await,
            crate::api::ROTATE_KEK => self.rotate_study(&job).await,
            other => Err(anyhow::anyhow!("unknown job kind {other}")),
        };
        keeper.abort();
        // Only while this worker still holds the lease: one whose lease ran
        // out (a long stall) must not overwrite the worker that took over.
        match outcome {
            Ok(receipt) => {
                let ended = sqlx::query(
                    "UPDATE jobs SET state = 'succeeded', finished_at = now(), receipt = $3, \
                        lease_until = NULL, not_before = NULL \
                     WHERE id = $1 AND lease_holder = $2",
                )
                .bind(&job.id)
                .bind(&job.lease_holder)
                .bind(receipt)
                .execute(&self.db)
                .await?
                .rows_affected();
                if ended == 1 {
                    tracing::info!(job = %job.id, "succeeded");
                }
            }
            Err(e) => {
                let (state, errors): (String, i32) = sqlx::query_as(
                    "UPDATE jobs SET errors = errors + 1, lease_until = NULL, \
                        not_before = now() + make_interval(secs => least(power(2, errors + 1), 600)), \
                        state = CASE WHEN errors + 1 >= $3 AND kind <> $4 THEN 'failed' ELSE 'queued' END, \
                        finished_at = CASE WHEN errors + 1 >= $3 AND kind <> $4 THEN now() ELSE NULL END \
                     WHERE id = $1 AND lease_holder = $2 RETURNING state, errors",
                )
                .bind(&job.id)
                .bind(&job.lease_holder)
                .bind(MAX_ATTEMPTS)
                .bind(crate::api::ROTATE_KEK)
                .fetch_optional(&self.db)
                .await?
                .unwrap_or_default();
                if state == "failed" {
                    tracing::error!(job = %job.id, kind = %job.kind, errors,
                        "job failed for good: {e:#}; ask for it again to queue it again");
                } else {
                    tracing::warn!(job = %job.id, errors, "attempt failed, will retry: {e:#}");
                }
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
        let collected = self.collect_all(job, study, None).await?;
        sqlx::query("UPDATE records SET deleted = true WHERE study_id = $1")
            .bind(study)
            .execute(&self.db)
            .await?;
        sqlx::query("UPDATE blobs SET deleted = true WHERE study_id = $1")
            .bind(study)
            .execute(&self.db)
            .await?;
        let mut receipt = collected.receipt();
        receipt["study"] = json!(study);
        receipt["kek"] = json!("destroyed");
        Ok(receipt)
    }

    /// Collects every kind of stored object of a study, or of one
    /// participant of it.
    async fn collect_all(
        &self,
        job: &Job,
        study: &str,
        participant: Option<&[u8]>,
    ) -> Result<Collected> {
        let (total,): (i64,) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM records WHERE study_id = $1 AND key_ref <> '' \
                       AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted))) \
                  + (SELECT count(*) FROM blobs WHERE study_id = $1 AND key_ref <> '' \
                       AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted))) \
                  + (SELECT count(*) FROM field_sets WHERE study_id = $1 \
                       AND ($2::bytea IS NULL OR (participant_hash = $2 AND deleted)))",
        )
        .bind(study)
        .bind(participant)
        .fetch_one(&self.db)
        .await?;
        // What is left to collect, on top of what earlier attempts did.
        sqlx::query("UPDATE jobs SET total = done + $2 WHERE id = $1 AND kind <> 'delete_tenant'")
            .bind(&job.id)
            .bind(total)
            .execute(&self.db)
            .await?;
        let mut collected = Collected::default();
        for (i, table) in Collect::ALL.iter().enumerate() {
            collected.0[i] = self.collect(job, table, study, participant).await?;
        }
        Ok(collected)
    }

    /// Deletes the keys and replicas of every pending row of one kind,
    /// marking each row collected as it goes.
    async fn collect(
        &self,
        job: &Job,
        table: &Collect,
        study: &str,
        participant: Option<&[u8]>,
    ) -> Result<i64> {
        let mut collected = 0i64;
        loop {
            let batch: Vec<(String, String, String)> = sqlx::query_as(table.pending)
                .bind(study)
                .bind(participant)
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
            sqlx::query(
                "UPDATE jobs SET done = done + $2, lease_until = now() + interval '60 seconds' \
                 WHERE id = $1 AND lease_holder = $3",
            )
            .bind(&job.id)
            .bind(done)
            .bind(&job.lease_holder)
            .execute(&self.db)
            .await?;
        }
        Ok(collected)
    }

    /// Destroys everything of one participant, then rotates the study's
    /// KEK: after the old version is destroyed, key DB copies taken before
    /// the deletion open nothing of it. The receipt says `pending` until then.
    async fn delete_participant(&self, job: &Job) -> Result<Value> {
        let (study, hash) = job
            .target
            .split_once('/')
            .and_then(|(s, h)| Some((s, data_encoding::HEXLOWER.decode(h.as_bytes()).ok()?)))
            .context("malformed participant deletion target")?;
        let (kek,): (String,) =
            sqlx::query_as("SELECT kek_id FROM studies WHERE id = $1 AND tenant_id = $2")
                .bind(study)
                .bind(&job.tenant_id)
                .fetch_one(&self.db)
                .await
                .context("the study")?;
        let collected = self.collect_all(job, study, Some(&hash)).await?;
        let mut receipt = collected.receipt();
        receipt["study"] = json!(study);
        receipt["kek_rotation"] = json!("pending");
        self.set_receipt(job, &receipt).await?;

        let rotated = self.rotate_and_retire(study, &kek).await?;
        add_rotation(&mut receipt, &rotated);
        Ok(receipt)
    }

    /// The rotation scheduled after a record or BLOB was shredded; nothing
    /// to do if the study was deleted meanwhile (its KEK is gone).
    async fn rotate_study(&self, job: &Job) -> Result<Value> {
        let (kek, deleted): (String, bool) =
            sqlx::query_as("SELECT kek_id, deleted FROM studies WHERE id = $1 AND tenant_id = $2")
                .bind(&job.target)
                .bind(&job.tenant_id)
                .fetch_one(&self.db)
                .await
                .context("the study")?;
        let mut receipt = json!({ "study": job.target });
        if deleted {
            receipt["kek_rotation"] = json!("not needed: the study is deleted");
        } else {
            add_rotation(
                &mut receipt,
                &self.rotate_and_retire(&job.target, &kek).await?,
            );
        }
        Ok(receipt)
    }

    /// A KEK rotation to its end: a new version, the grace period (keys
    /// generated under the old version just before it land in the key DB,
    /// and every key host reads the new version), every key rewrapped, the
    /// old versions destroyed. One rotation per KEK at a time, across workers.
    /// What is on the shred queue of the study goes first: a key the
    /// rotation rewrapped before it was destroyed would stay open to key DB
    /// copies taken in between.
    async fn rotate_and_retire(&self, study: &str, kek: &str) -> Result<RetireAnswer> {
        let left = self.finish_shredding(Some(study), Duration::ZERO).await?;
        if left > 0 {
            anyhow::bail!(
                "{left} shredded objects of the study are not destroyed yet; the rotation waits for them"
            );
        }
        let mut lock = self.db.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock(hashtext('coffer/rotate/' || $1))")
            .bind(kek)
            .execute(&mut *lock)
            .await?;
        let result = async {
            self.keys
                .rotate_kek(kek)
                .await
                .context("rotating the study's KEK")?;
            tokio::time::sleep(self.rotation_grace).await;
            let mut rewrapped = 0;
            loop {
                let step = self
                    .keys
                    .retire_old_versions(kek)
                    .await
                    .context("retiring the old KEK versions")?;
                rewrapped += step.rewrapped;
                if step.remaining == 0 {
                    return Ok(RetireAnswer { rewrapped, ..step });
                }
                if step.rewrapped == 0 {
                    anyhow::bail!(
                        "{} keys stay under old versions of {kek} and cannot be rewrapped; \
                         see the key host's log",
                        step.remaining
                    );
                }
            }
        }
        .await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext('coffer/rotate/' || $1))")
            .bind(kek)
            .execute(&mut *lock)
            .await;
        if unlocked.is_err() {
            // A session lock must not outlive its holder in the pool.
            lock.detach();
        }
        result
    }

    /// Shows a receipt before the job ends.
    async fn set_receipt(&self, job: &Job, receipt: &Value) -> Result<()> {
        sqlx::query("UPDATE jobs SET receipt = $2 WHERE id = $1")
            .bind(&job.id)
            .bind(receipt)
            .execute(&self.db)
            .await?;
        Ok(())
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
