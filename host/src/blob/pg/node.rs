//! One blob node: its pool, its schema, a short-lived "down" mark so a dead
//! node costs one connect timeout rather than one per operation, and the
//! statements the store runs on it.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::OnceCell;

use super::super::{BlobError, BlobRef, DbFailure, NodeId};
use super::NodeConfig;

/// Schema version this code writes; bumped with every schema change.
const SCHEMA_VERSION: i32 = 1;
/// Format version of the blob header row (DESIGN: every stored structure
/// carries one).
pub(crate) const HEADER_FORMAT: i16 = 1;
/// Advisory lock key that serialises schema set-up between processes.
const SCHEMA_LOCK: i64 = 0x636f_6666_6572_0001;

/// Created at first contact, under an advisory lock, in one transaction.
/// `blob_schema` holds the version only: no migration timestamps, as the
/// rest of the node keeps no time either.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS blobs (
    blob_ref bytea PRIMARY KEY CHECK (length(blob_ref) = 16),
    state text NOT NULL CHECK (state IN ('live', 'tombstone')),
    chunks integer NOT NULL CHECK (chunks >= 0),
    len bigint NOT NULL CHECK (len >= 0),
    format smallint NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_chunks (
    blob_ref bytea NOT NULL,
    idx integer NOT NULL CHECK (idx >= 0),
    data bytea NOT NULL CHECK (length(data) <= 1048576),
    sha256 bytea NOT NULL CHECK (length(sha256) = 32),
    PRIMARY KEY (blob_ref, idx)
);
-- Ciphertext does not compress: store it out of line without trying.
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS repair_queue (
    blob_ref bytea NOT NULL,
    node text NOT NULL,
    reason text NOT NULL CHECK (reason IN ('missing', 'bad', 'tombstone')),
    PRIMARY KEY (blob_ref, node)
);
CREATE TABLE IF NOT EXISTS blob_schema (version integer NOT NULL);
"#;

/// A header row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Header {
    Live { chunks: u32, len: u64 },
    Tombstone,
}

/// Per chunk: index, stored digest, digest of the stored data (computed by
/// the server, so no data crosses the wire).
pub(crate) type Digests = Vec<(u32, Vec<u8>, Vec<u8>)>;

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) id: NodeId,
    pool: PgPool,
    schema: OnceCell<()>,
    down_until: Mutex<Option<Instant>>,
    down_backoff: Duration,
    op_timeout: Duration,
}

impl Node {
    pub(crate) fn new(
        config: &NodeConfig,
        connect_timeout: Duration,
        statement_timeout: Duration,
        max_connections: u32,
        down_backoff: Duration,
    ) -> Self {
        let options = config.client.apply(
            PgConnectOptions::new()
                .host(&config.host)
                .port(config.port)
                .username(&config.user)
                .database(&config.database)
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(&config.root_cert)
                .application_name("coffer-blob")
                .options([(
                    "statement_timeout",
                    statement_timeout.as_millis().to_string(),
                )]),
        );
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(connect_timeout)
            .test_before_acquire(true)
            .connect_lazy_with(options);
        Self {
            id: NodeId::from(config.id.as_str()),
            pool,
            schema: OnceCell::new(),
            down_until: Mutex::new(None),
            down_backoff,
            // The server's statement timeout fires first; this catches a
            // node that stopped answering altogether.
            op_timeout: statement_timeout + connect_timeout,
        }
    }

    /// False while the node is marked down after a connectivity failure.
    pub(crate) fn available(&self) -> bool {
        let guard = self.down_until.lock().expect("lock");
        guard.is_none_or(|until| Instant::now() >= until)
    }

    fn mark(&self, result: &Result<impl Sized, BlobError>) {
        let mut guard = self.down_until.lock().expect("lock");
        match result {
            Ok(_) => *guard = None,
            Err(BlobError::Db { reason, .. }) if reason.is_connectivity() => {
                *guard = Some(Instant::now() + self.down_backoff);
            }
            Err(_) => {}
        }
    }

    pub(crate) fn err(&self, reason: DbFailure) -> BlobError {
        BlobError::Db {
            node: self.id.clone(),
            reason,
        }
    }

    /// Runs `f` with the schema in place, under the operation timeout,
    /// mapping and recording failures.
    pub(crate) async fn run<T, F, Fut>(&self, f: F) -> Result<T, BlobError>
    where
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let result = match tokio::time::timeout(self.op_timeout, async {
            self.schema
                .get_or_try_init(|| setup_schema(&self.pool))
                .await?;
            f(self.pool.clone()).await
        })
        .await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(DbFailure::from_sqlx(&e))),
            Err(_) => Err(self.err(DbFailure::TimedOut)),
        };
        self.mark(&result);
        result
    }

    /// Runs one statement of an open transaction under the timeout.
    pub(crate) async fn in_tx<'t, T, Fut>(&self, fut: Fut) -> Result<T, BlobError>
    where
        Fut: Future<Output = Result<T, sqlx::Error>> + 't,
    {
        let result = match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(DbFailure::from_sqlx(&e))),
            Err(_) => Err(self.err(DbFailure::TimedOut)),
        };
        self.mark(&result);
        result
    }

    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Postgres>, BlobError> {
        self.run(|pool| async move { pool.begin().await }).await
    }

    /// `SELECT 1`, ignoring the down mark (readiness, repair).
    pub(crate) async fn probe(&self) -> Result<(), BlobError> {
        self.run(|pool| async move { sqlx::query("SELECT 1").execute(&pool).await.map(|_| ()) })
            .await
    }

    pub(crate) async fn header(&self, blob: BlobRef) -> Result<Option<Header>, BlobError> {
        let row = self
            .run(|pool| async move {
                sqlx::query("SELECT state, chunks, len FROM blobs WHERE blob_ref = $1")
                    .bind(blob.0.as_slice())
                    .fetch_optional(&pool)
                    .await
            })
            .await?;
        row.map(|row| self.parse_header(&row)).transpose()
    }

    fn parse_header(&self, row: &sqlx::postgres::PgRow) -> Result<Header, BlobError> {
        let bad = |_| self.err(DbFailure::BadRow);
        let state: String = row.try_get(0).map_err(bad)?;
        match state.as_str() {
            "tombstone" => Ok(Header::Tombstone),
            "live" => {
                let chunks: i32 = row.try_get(1).map_err(bad)?;
                let len: i64 = row.try_get(2).map_err(bad)?;
                Ok(Header::Live {
                    chunks: u32::try_from(chunks).map_err(|_| self.err(DbFailure::BadRow))?,
                    len: u64::try_from(len).map_err(|_| self.err(DbFailure::BadRow))?,
                })
            }
            _ => Err(self.err(DbFailure::BadRow)),
        }
    }

    /// A chunk of a live blob: (data, stored digest), unchecked.
    pub(crate) async fn chunk(
        &self,
        blob: BlobRef,
        index: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, BlobError> {
        let idx = chunk_idx(index);
        self.run(|pool| async move {
            sqlx::query_as::<_, (Vec<u8>, Vec<u8>)>(
                "SELECT c.data, c.sha256 FROM blob_chunks c \
                 JOIN blobs b ON b.blob_ref = c.blob_ref AND b.state = 'live' \
                 WHERE c.blob_ref = $1 AND c.idx = $2",
            )
            .bind(blob.0.as_slice())
            .bind(idx)
            .fetch_optional(&pool)
            .await
        })
        .await
    }

    pub(crate) async fn digests(&self, blob: BlobRef) -> Result<Digests, BlobError> {
        let rows = self
            .run(|pool| async move {
                sqlx::query_as::<_, (i32, Vec<u8>, Vec<u8>)>(
                    "SELECT idx, sha256, sha256(data) FROM blob_chunks \
                     WHERE blob_ref = $1 ORDER BY idx",
                )
                .bind(blob.0.as_slice())
                .fetch_all(&pool)
                .await
            })
            .await?;
        rows.into_iter()
            .map(|(i, s, a)| {
                u32::try_from(i)
                    .map(|i| (i, s, a))
                    .map_err(|_| self.err(DbFailure::BadRow))
            })
            .collect()
    }

    /// Removes the chunks and leaves a tombstone, and queues `queue_for`
    /// (the other nodes), in one statement (one transaction).
    pub(crate) async fn tombstone(
        &self,
        blob: BlobRef,
        queue_for: Vec<String>,
    ) -> Result<(), BlobError> {
        self.run(|pool| async move {
            sqlx::query(
                "WITH d AS (DELETE FROM blob_chunks WHERE blob_ref = $1), \
                 h AS (INSERT INTO blobs (blob_ref, state, chunks, len, format) \
                       VALUES ($1, 'tombstone', 0, 0, $3) \
                       ON CONFLICT (blob_ref) DO UPDATE \
                       SET state = 'tombstone', chunks = 0, len = 0, format = EXCLUDED.format), \
                 q AS (INSERT INTO repair_queue (blob_ref, node, reason) \
                       SELECT $1, n, 'tombstone' FROM unnest($2::text[]) AS n \
                       ON CONFLICT (blob_ref, node) DO UPDATE SET reason = 'tombstone') \
                 SELECT 1",
            )
            .bind(blob.0.as_slice())
            .bind(queue_for)
            .bind(HEADER_FORMAT)
            .execute(&pool)
            .await
            .map(|_| ())
        })
        .await
    }

    /// Stores a small blob in one statement (autocommit): header, chunk
    /// rows and queue entries for `queue_for`. False when the ref was already
    /// in use on this node.
    pub(crate) async fn put_small(
        &self,
        blob: BlobRef,
        rows: &[(bytes::Bytes, [u8; 32])],
        queue_for: Vec<String>,
    ) -> Result<bool, BlobError> {
        let len: i64 = rows.iter().map(|(c, _)| c.len() as i64).sum();
        let chunks = i32::try_from(rows.len()).unwrap_or(i32::MAX);
        let data: Vec<&[u8]> = rows.iter().map(|(c, _)| c.as_ref()).collect();
        let digests: Vec<&[u8]> = rows.iter().map(|(_, d)| d.as_slice()).collect();
        self.run(|pool| async move {
            sqlx::query_scalar::<_, i64>(
                "WITH h AS (INSERT INTO blobs (blob_ref, state, chunks, len, format) \
                       VALUES ($1, 'live', $2, $3, $7) \
                       ON CONFLICT (blob_ref) DO NOTHING RETURNING blob_ref), \
                 c AS (INSERT INTO blob_chunks (blob_ref, idx, data, sha256) \
                       SELECT h.blob_ref, (x.i - 1)::int, x.d, x.s \
                       FROM h, unnest($4::bytea[], $5::bytea[]) WITH ORDINALITY AS x(d, s, i)), \
                 q AS (INSERT INTO repair_queue (blob_ref, node, reason) \
                       SELECT h.blob_ref, n, 'missing' FROM h, unnest($6::text[]) AS n \
                       ON CONFLICT (blob_ref, node) DO NOTHING) \
                 SELECT count(*) FROM h",
            )
            .bind(blob.0.as_slice())
            .bind(chunks)
            .bind(len)
            .bind(data)
            .bind(digests)
            .bind(queue_for)
            .bind(HEADER_FORMAT)
            .fetch_one(&pool)
            .await
            .map(|n| n == 1)
        })
        .await
    }

    /// Removes what [`Node::put_small`] just wrote here (header, chunks,
    /// queue entries), after another node refused the ref.
    pub(crate) async fn undo_small_put(&self, blob: BlobRef) {
        let undone = self
            .run(|pool| async move {
                sqlx::query(
                    "WITH c AS (DELETE FROM blob_chunks WHERE blob_ref = $1), \
                          q AS (DELETE FROM repair_queue WHERE blob_ref = $1) \
                     DELETE FROM blobs WHERE blob_ref = $1 AND state = 'live'",
                )
                .bind(blob.0.as_slice())
                .execute(&pool)
                .await
            })
            .await;
        if undone.is_err() {
            tracing::error!(%blob, node = %self.id, "could not undo a refused small put");
        }
    }

    /// Adds repair entries (an existing entry for the pair is kept, except
    /// that a tombstone reason overrides).
    pub(crate) async fn enqueue(
        &self,
        blob: BlobRef,
        nodes: Vec<String>,
        reason: &'static str,
    ) -> Result<(), BlobError> {
        self.run(|pool| async move {
            sqlx::query(
                "INSERT INTO repair_queue (blob_ref, node, reason) \
                 SELECT $1, n, $3 FROM unnest($2::text[]) AS n \
                 ON CONFLICT (blob_ref, node) DO UPDATE SET reason = EXCLUDED.reason \
                 WHERE EXCLUDED.reason = 'tombstone' OR repair_queue.reason = 'missing'",
            )
            .bind(blob.0.as_slice())
            .bind(nodes)
            .bind(reason)
            .execute(&pool)
            .await
            .map(|_| ())
        })
        .await
    }

    pub(crate) async fn dequeue(&self, blob: BlobRef, nodes: Vec<String>) -> Result<(), BlobError> {
        self.run(|pool| async move {
            sqlx::query("DELETE FROM repair_queue WHERE blob_ref = $1 AND node = ANY($2)")
                .bind(blob.0.as_slice())
                .bind(nodes)
                .execute(&pool)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Up to `limit` queue entries after `after`, in key order:
    /// (blob, node, reason).
    pub(crate) async fn queue(
        &self,
        after: Option<(BlobRef, String)>,
        limit: i64,
    ) -> Result<Vec<(BlobRef, String, String)>, BlobError> {
        let (after_blob, after_node) = match after {
            Some((b, n)) => (b.0.to_vec(), n),
            None => (Vec::new(), String::new()),
        };
        let rows = self
            .run(|pool| async move {
                sqlx::query_as::<_, (Vec<u8>, String, String)>(
                    "SELECT blob_ref, node, reason FROM repair_queue \
                     WHERE (blob_ref, node COLLATE \"C\") > ($1, $2 COLLATE \"C\") \
                     ORDER BY blob_ref, node COLLATE \"C\" LIMIT $3",
                )
                .bind(after_blob)
                .bind(after_node)
                .bind(limit)
                .fetch_all(&pool)
                .await
            })
            .await?;
        rows.into_iter()
            .map(|(b, n, r)| {
                BlobRef::from_slice(&b)
                    .map(|b| (b, n, r))
                    .ok_or_else(|| self.err(DbFailure::BadRow))
            })
            .collect()
    }
}

pub(crate) fn chunk_idx(index: u32) -> i32 {
    // Chunk counts are bounded by i32::MAX rows (2 PiB at 1 MiB a row).
    i32::try_from(index).unwrap_or(i32::MAX)
}

async fn setup_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK)
        .execute(&mut *tx)
        .await?;
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('blob_schema')::text")
        .fetch_one(&mut *tx)
        .await?;
    if exists.is_some() {
        let version: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM blob_schema")
            .fetch_one(&mut *tx)
            .await?;
        if version.unwrap_or(0) >= SCHEMA_VERSION {
            return tx.commit().await;
        }
    }
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO blob_schema (version) VALUES ($1)")
        .bind(SCHEMA_VERSION)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
