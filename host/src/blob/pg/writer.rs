//! The streaming put: one open transaction per node, chunk rows inserted on
//! all of them in parallel as the caller produces them, committed at
//! `finish` and acknowledged at W commits.
//!
//! Small objects (records, field sets) never open those transactions: their
//! chunks are held until `finish` (up to [`SMALL_PUT`] bytes) and written to
//! each node in one statement, which is most of the cost of a small store.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::{BoxFuture, join_all};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};

use super::super::{BlobError, BlobRef, BlobWriter, MAX_CHUNK, PutReceipt};
use super::Inner;
use super::node::{HEADER_FORMAT, chunk_idx};

/// Objects up to this size are written in one statement per node.
pub(crate) const SMALL_PUT: usize = MAX_CHUNK;

pub(crate) struct PgWriter {
    inner: Arc<Inner>,
    blob: BlobRef,
    /// Chunks held back while the object is still small (no transaction
    /// opened yet); `None` once streaming.
    held: Option<Vec<Bytes>>,
    /// One per configured node; `None` once that node dropped out.
    txs: Vec<Option<Transaction<'static, Postgres>>>,
    chunks: u32,
    len: u64,
    poisoned: bool,
}

impl fmt::Debug for PgWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgWriter")
            .field("blob", &self.blob)
            .field("live_nodes", &self.live())
            .field("chunks", &self.chunks)
            .field("len", &self.len)
            .finish()
    }
}

impl PgWriter {
    /// A put that holds its chunks until they pass [`SMALL_PUT`] bytes.
    pub(crate) fn begin(inner: Arc<Inner>, blob: BlobRef) -> Result<Self, BlobError> {
        let available = inner.nodes.iter().filter(|n| n.available()).count();
        if available < inner.write_quorum {
            return Err(BlobError::NotEnoughReplicas {
                needed: inner.write_quorum,
                committed: 0,
            });
        }
        Ok(Self {
            inner,
            blob,
            held: Some(Vec::new()),
            txs: Vec::new(),
            chunks: 0,
            len: 0,
            poisoned: false,
        })
    }

    /// Turns to streaming: a transaction on every available node (checking
    /// the ref is new), then the held chunks.
    async fn open(&mut self) -> Result<(), BlobError> {
        let blob = self.blob;
        let opened = join_all(self.inner.nodes.iter().map(|node| async move {
            if !node.available() {
                return Err(None);
            }
            let mut tx = node.begin().await.map_err(|_| None)?;
            let existing = node
                .in_tx(
                    sqlx::query_scalar::<_, String>("SELECT state FROM blobs WHERE blob_ref = $1")
                        .bind(blob.0.as_slice())
                        .fetch_optional(&mut *tx),
                )
                .await
                .map_err(|_| None)?;
            match existing {
                Some(_) => Err(Some(BlobError::AlreadyExists)),
                None => Ok(tx),
            }
        }))
        .await;
        let mut txs = Vec::with_capacity(opened.len());
        for result in opened {
            match result {
                Ok(tx) => txs.push(Some(tx)),
                Err(Some(e)) => return Err(e),
                Err(None) => txs.push(None),
            }
        }
        self.txs = txs;
        self.fail_below_quorum()?;
        for chunk in self.held.take().unwrap_or_default() {
            self.insert_chunk(chunk).await?;
        }
        Ok(())
    }

    fn live(&self) -> usize {
        self.txs.iter().filter(|t| t.is_some()).count()
    }

    fn check_quorum(&self) -> Result<(), BlobError> {
        let live = self.live();
        if live < self.inner.write_quorum {
            return Err(BlobError::NotEnoughReplicas {
                needed: self.inner.write_quorum,
                committed: live,
            });
        }
        Ok(())
    }

    /// Fails (and rolls back everywhere) when fewer than W nodes remain.
    fn fail_below_quorum(&mut self) -> Result<(), BlobError> {
        if let Err(e) = self.check_quorum() {
            self.poisoned = true;
            self.txs.iter_mut().for_each(|t| *t = None);
            return Err(e);
        }
        Ok(())
    }

    async fn insert_chunk(&mut self, data: Bytes) -> Result<(), BlobError> {
        let digest = Sha256::digest(&data).to_vec();
        let idx = chunk_idx(self.chunks);
        let blob = self.blob;
        let nodes = &self.inner.nodes;
        let results = join_all(self.txs.iter_mut().zip(nodes).map(|(slot, node)| {
            let (data, digest) = (data.clone(), digest.clone());
            async move {
                let Some(tx) = slot.as_mut() else {
                    return true;
                };
                let ok = node
                    .in_tx(
                        sqlx::query(
                            "INSERT INTO blob_chunks (blob_ref, idx, data, sha256) \
                             VALUES ($1, $2, $3, $4)",
                        )
                        .bind(blob.0.as_slice())
                        .bind(idx)
                        .bind(data.as_ref())
                        .bind(digest)
                        .execute(&mut **tx),
                    )
                    .await
                    .is_ok();
                if !ok {
                    tracing::warn!(node = %node.id, "blob node dropped out of a put");
                    *slot = None;
                }
                ok
            }
        }))
        .await;
        drop(results);
        self.fail_below_quorum()?;
        self.chunks += 1;
        self.len += data.len() as u64;
        Ok(())
    }

    async fn write(&mut self, mut chunk: Bytes) -> Result<(), BlobError> {
        if self.poisoned {
            return Err(BlobError::WriterPoisoned);
        }
        while !chunk.is_empty() {
            let piece = chunk.split_to(chunk.len().min(MAX_CHUNK));
            let result = match &mut self.held {
                Some(held) => {
                    held.push(piece);
                    let size: usize = held.iter().map(Bytes::len).sum();
                    if size > SMALL_PUT {
                        self.open().await
                    } else {
                        Ok(())
                    }
                }
                None => self.insert_chunk(piece).await,
            };
            if let Err(e) = result {
                self.poisoned = true;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn commit(mut self) -> Result<PutReceipt, BlobError> {
        if self.poisoned {
            return Err(BlobError::WriterPoisoned);
        }
        if let Some(held) = self.held.take() {
            return self.inner.put_small(self.blob, held).await;
        }
        let blob = self.blob;
        let (chunks, len) = (self.chunks, self.len);
        let ids: Vec<String> = self
            .inner
            .nodes
            .iter()
            .map(|n| n.id.as_str().to_owned())
            .collect();
        // Header, and a queue entry for every other node, in each node's
        // transaction; a conflict means a delete raced the write.
        let results = join_all(self.txs.iter_mut().zip(&self.inner.nodes).map(
            |(slot, node)| {
                let others: Vec<String> =
                    ids.iter().filter(|i| **i != node.id.as_str()).cloned().collect();
                async move {
                    let tx = slot.as_mut()?;
                    let inserted = node
                        .in_tx(
                            sqlx::query_scalar::<_, i64>(
                                "WITH h AS (INSERT INTO blobs (blob_ref, state, chunks, len, format) \
                                       VALUES ($1, 'live', $2, $3, $5) \
                                       ON CONFLICT (blob_ref) DO NOTHING RETURNING blob_ref), \
                                 q AS (INSERT INTO repair_queue (blob_ref, node, reason) \
                                       SELECT h.blob_ref, n, 'missing' FROM h, unnest($4::text[]) AS n \
                                       ON CONFLICT (blob_ref, node) DO NOTHING) \
                                 SELECT count(*) FROM h",
                            )
                            .bind(blob.0.as_slice())
                            .bind(chunk_idx(chunks))
                            .bind(len as i64)
                            .bind(others)
                            .bind(HEADER_FORMAT)
                            .fetch_one(&mut **tx),
                        )
                        .await;
                    match inserted {
                        Ok(1) => Some(false),
                        Ok(_) => {
                            *slot = None;
                            Some(true)
                        }
                        Err(_) => {
                            *slot = None;
                            None
                        }
                    }
                }
            },
        ))
        .await;
        if results.contains(&Some(true)) {
            self.txs.iter_mut().for_each(|t| *t = None);
            return Err(BlobError::Deleted);
        }
        self.fail_below_quorum()?;

        let inner = Arc::clone(&self.inner);
        let committed: Vec<usize> =
            join_all(self.txs.iter_mut().zip(&inner.nodes).enumerate().map(
                |(i, (slot, node))| async move {
                    let tx = slot.take()?;
                    node.in_tx(tx.commit()).await.ok().map(|_| i)
                },
            ))
            .await
            .into_iter()
            .flatten()
            .collect();
        inner.settle_put(blob, chunks, len, committed).await
    }
}

impl BlobWriter for PgWriter {
    fn write_chunk(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(self.write(chunk))
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<PutReceipt, BlobError>> {
        Box::pin((*self).commit())
    }
}
