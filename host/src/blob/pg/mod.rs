//! [`BlobStore`] over N PostgreSQL nodes (see the parent module for the
//! replication model).
//!
//! Connections use `sslmode=verify-full` against the configured root
//! certificate; a node whose certificate does not verify is down. Each node
//! has its own pool with a short acquire (connect) timeout and a server-side
//! `statement_timeout`, and every operation is also bounded client-side, so a
//! dead or hung node fails a write in seconds instead of hanging it. After a
//! connectivity failure a node is skipped for `down_backoff` (repairs and
//! readiness probes still try it), so a lost node costs one connect timeout,
//! not one per request.

mod node;
mod repair;
mod writer;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, join_all};
use sha2::{Digest, Sha256};

use super::{
    BlobError, BlobMeta, BlobRef, BlobStore, BlobWriter, ConfigError, DeleteReceipt, NodeId,
    NodeStatus, PutReceipt, RepairReport, Verify,
};
use node::{Header, Node};

/// One blob node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Stable id, stored in repair-queue rows: 1-64 of `[A-Za-z0-9._-]`.
    pub id: String,
    /// Host name or IP the certificate must match (verify-full).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// User.
    pub user: String,
    /// CA certificate (PEM) the node's certificate must chain to.
    pub root_cert: PathBuf,
    /// The client certificate presented to the node, if any.
    pub client: coffer_keyhost::dbtls::DbClientCert,
}

/// The store's configuration; every default is listed in [`PgBlobConfig::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBlobConfig {
    /// The N nodes.
    pub nodes: Vec<NodeConfig>,
    /// W: commits needed to acknowledge a write. At least 3; at most N.
    /// Keep N ≥ W+1 so writes stay available through the loss of a node.
    pub write_quorum: usize,
    /// Longest wait for a connection (connect plus TLS). Default 2 s.
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout`, also the client-side bound of one
    /// statement (plus `connect_timeout`). Default 5 s.
    pub statement_timeout: Duration,
    /// Pool size per node (an open writer holds one connection per node).
    /// Default 16.
    pub max_connections_per_node: u32,
    /// How long a node that failed to answer is skipped by puts, deletes and
    /// reads. Default 2 s.
    pub down_backoff: Duration,
}

impl PgBlobConfig {
    /// The defaults: W = 3, 2 s connect, 5 s statements, 16 connections per
    /// node, 2 s down backoff.
    pub fn new(nodes: Vec<NodeConfig>) -> Self {
        Self {
            nodes,
            write_quorum: 3,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            max_connections_per_node: 16,
            down_backoff: Duration::from_secs(2),
        }
    }

    /// Checks W ≥ 3, N ≥ W, node ids, timeouts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (n, w) = (self.nodes.len(), self.write_quorum);
        if w < 3 {
            return Err(ConfigError::QuorumTooSmall { write_quorum: w });
        }
        if n < w {
            return Err(ConfigError::TooFewNodes {
                nodes: n,
                write_quorum: w,
            });
        }
        let mut seen = HashSet::new();
        for node in &self.nodes {
            let id = &node.id;
            let valid = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !valid {
                return Err(ConfigError::BadNodeId(id.clone()));
            }
            if !seen.insert(id) {
                return Err(ConfigError::DuplicateNode(id.clone()));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::Zero("connect_timeout"));
        }
        if self.statement_timeout.is_zero() {
            return Err(ConfigError::Zero("statement_timeout"));
        }
        if self.max_connections_per_node == 0 {
            return Err(ConfigError::Zero("max_connections_per_node"));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    nodes: Vec<Node>,
    write_quorum: usize,
}

/// The PostgreSQL blob store. Cheap to clone (shared pools).
#[derive(Clone, Debug)]
pub struct PgBlobStore {
    inner: Arc<Inner>,
}

impl PgBlobStore {
    /// Validates the configuration and creates lazy pools: no node needs to
    /// be up yet. Must be called inside a Tokio runtime.
    pub fn new(config: &PgBlobConfig) -> Result<Self, BlobError> {
        config.validate()?;
        if config.nodes.len() == config.write_quorum {
            tracing::warn!(
                nodes = config.nodes.len(),
                write_quorum = config.write_quorum,
                "N = W: losing one blob node stops all writes; run N >= W+1"
            );
        }
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                Node::new(
                    n,
                    config.connect_timeout,
                    config.statement_timeout,
                    config.max_connections_per_node,
                    config.down_backoff,
                )
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                nodes,
                write_quorum: config.write_quorum,
            }),
        })
    }

    /// The order reads try the nodes for `blob`: rotated by the ref, so reads
    /// spread over the replicas.
    pub fn replica_order(&self, blob: BlobRef) -> Vec<NodeId> {
        self.inner
            .order(blob)
            .into_iter()
            .map(|i| self.inner.nodes[i].id.clone())
            .collect()
    }
}

impl Inner {
    fn order(&self, blob: BlobRef) -> Vec<usize> {
        let n = self.nodes.len();
        let start = usize::from(blob.0[0]) % n;
        (0..n).map(|i| (start + i) % n).collect()
    }

    fn node(&self, id: &NodeId) -> Result<usize, BlobError> {
        self.nodes
            .iter()
            .position(|n| &n.id == id)
            .ok_or_else(|| BlobError::UnknownNode(id.clone()))
    }

    fn ids(&self, which: &[usize]) -> Vec<String> {
        which
            .iter()
            .map(|&i| self.nodes[i].id.as_str().to_owned())
            .collect()
    }

    fn others(&self, i: usize) -> Vec<String> {
        let all: Vec<usize> = (0..self.nodes.len()).filter(|&j| j != i).collect();
        self.ids(&all)
    }

    /// After the commits of a put: acknowledge at W, else tombstone the
    /// partial copies.
    async fn settle_put(
        &self,
        blob: BlobRef,
        chunks: u32,
        len: u64,
        committed: Vec<usize>,
    ) -> Result<PutReceipt, BlobError> {
        if committed.len() < self.write_quorum {
            if !committed.is_empty() {
                let (applied, _) = self.tombstone_everywhere(blob).await;
                if applied.is_empty() {
                    tracing::error!(%blob, "a failed put's partial copies could not be tombstoned");
                }
            }
            return Err(BlobError::NotEnoughReplicas {
                needed: self.write_quorum,
                committed: committed.len(),
            });
        }
        let done = self.ids(&committed);
        join_all(
            committed
                .iter()
                .map(|&i| self.nodes[i].dequeue(blob, done.clone())),
        )
        .await;
        let queued = (0..self.nodes.len())
            .filter(|i| !committed.contains(i))
            .map(|i| self.nodes[i].id.clone())
            .collect();
        Ok(PutReceipt {
            blob_ref: blob,
            chunks,
            len,
            committed: committed
                .iter()
                .map(|&i| self.nodes[i].id.clone())
                .collect(),
            queued,
        })
    }

    /// Tombstones on every reachable node, each also queueing the others;
    /// then clears the entries of the nodes that applied it. Returns
    /// (applied, failed) node indexes.
    async fn tombstone_everywhere(&self, blob: BlobRef) -> (Vec<usize>, Vec<usize>) {
        let results = join_all(self.nodes.iter().enumerate().map(|(i, node)| async move {
            if !node.available() {
                return Err(i);
            }
            node.tombstone(blob, self.others(i))
                .await
                .map(|_| i)
                .map_err(|_| i)
        }))
        .await;
        let (applied, failed): (Vec<usize>, Vec<usize>) = (
            results.iter().filter_map(|r| r.ok()).collect(),
            results.iter().filter_map(|r| r.err()).collect(),
        );
        let done = self.ids(&applied);
        join_all(
            applied
                .iter()
                .map(|&i| self.nodes[i].dequeue(blob, done.clone())),
        )
        .await;
        (applied, failed)
    }

    /// Stores a small blob, given as its chunk rows, with one statement per node.
    async fn put_small(&self, blob: BlobRef, chunks: Vec<Bytes>) -> Result<PutReceipt, BlobError> {
        let available = self.nodes.iter().filter(|n| n.available()).count();
        if available < self.write_quorum {
            return Err(BlobError::NotEnoughReplicas {
                needed: self.write_quorum,
                committed: 0,
            });
        }
        let rows: Vec<(Bytes, [u8; 32])> = chunks
            .into_iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let digest = Sha256::digest(&c).into();
                (c, digest)
            })
            .collect();
        let len: u64 = rows.iter().map(|(c, _)| c.len() as u64).sum();
        let results = join_all(self.nodes.iter().enumerate().map(|(i, node)| {
            let rows = &rows;
            async move {
                if !node.available() {
                    return None;
                }
                node.put_small(blob, rows, self.others(i)).await.ok()
            }
        }))
        .await;
        if results.contains(&Some(false)) {
            // The ref is taken on some node (never for a fresh random ref):
            // the copies just written elsewhere must not stay behind.
            join_all(
                results
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| **r == Some(true))
                    .map(|(i, _)| self.nodes[i].undo_small_put(blob)),
            )
            .await;
            return Err(BlobError::AlreadyExists);
        }
        let committed = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| (*r == Some(true)).then_some(i))
            .collect();
        let count = u32::try_from(rows.len()).unwrap_or(u32::MAX);
        self.settle_put(blob, count, len, committed).await
    }

    async fn meta(&self, blob: BlobRef) -> Result<BlobMeta, BlobError> {
        let headers = join_all(self.nodes.iter().map(|node| async move {
            if !node.available() {
                return None;
            }
            node.header(blob).await.ok()
        }))
        .await;
        if headers
            .iter()
            .flatten()
            .any(|h| *h == Some(Header::Tombstone))
        {
            return Err(BlobError::Deleted);
        }
        let mut shape = None;
        let mut replicas = Vec::new();
        for i in self.order(blob) {
            if let Some(Some(Header::Live { chunks, len })) = headers[i] {
                shape.get_or_insert((chunks, len));
                if shape == Some((chunks, len)) {
                    replicas.push(self.nodes[i].id.clone());
                }
            }
        }
        if let Some((chunks, len)) = shape {
            return Ok(BlobMeta {
                blob_ref: blob,
                chunks,
                len,
                replicas,
            });
        }
        // An acknowledged blob is on at least W nodes, so any N - W + 1
        // answers include one of them.
        let answered = headers.iter().filter(|h| h.is_some()).count();
        if answered > self.nodes.len() - self.write_quorum {
            Err(BlobError::NotFound)
        } else {
            Err(BlobError::Unavailable {
                answered,
                nodes: self.nodes.len(),
            })
        }
    }

    async fn read_chunk_from(
        &self,
        i: usize,
        blob: BlobRef,
        index: u32,
    ) -> Result<Bytes, BlobError> {
        let node = &self.nodes[i];
        let (data, digest) = node.chunk(blob, index).await?.ok_or(BlobError::NotFound)?;
        if Sha256::digest(&data).as_slice() != digest.as_slice() {
            tracing::warn!(node = %node.id, %blob, index, "blob chunk failed its digest");
            if let Err(e) = self.report_bad(blob, i).await {
                tracing::error!(error = %e, "could not queue the repair of a corrupt chunk");
            }
            return Err(BlobError::Corrupt {
                node: node.id.clone(),
                index,
            });
        }
        Ok(Bytes::from(data))
    }

    async fn get_chunk(
        &self,
        blob: BlobRef,
        index: u32,
        first: Option<usize>,
    ) -> Result<(NodeId, Bytes), BlobError> {
        let mut order = self.order(blob);
        if let Some(first) = first {
            order.retain(|&i| i != first);
            order.insert(0, first);
        }
        let (mut tried, mut bad, mut unreachable) = (0, 0, 0);
        for i in order {
            if !self.nodes[i].available() {
                unreachable += 1;
                continue;
            }
            tried += 1;
            match self.read_chunk_from(i, blob, index).await {
                Ok(bytes) => return Ok((self.nodes[i].id.clone(), bytes)),
                Err(BlobError::Db { .. }) => unreachable += 1,
                Err(_) => bad += 1,
            }
        }
        Err(BlobError::AllReplicasBad {
            tried,
            bad,
            unreachable,
        })
    }

    async fn get(&self, blob: BlobRef, verify: Verify<'_>) -> Result<Vec<Bytes>, BlobError> {
        let meta = self.meta(blob).await?;
        let (mut bad, mut unreachable) = (0, 0);
        'replicas: for id in &meta.replicas {
            let i = self.node(id)?;
            let mut chunks = Vec::with_capacity(meta.chunks as usize);
            for index in 0..meta.chunks {
                match self.read_chunk_from(i, blob, index).await {
                    Ok(c) => chunks.push(c),
                    Err(BlobError::Db { .. }) => {
                        unreachable += 1;
                        continue 'replicas;
                    }
                    Err(_) => {
                        bad += 1;
                        continue 'replicas;
                    }
                }
            }
            if verify(&chunks) {
                return Ok(chunks);
            }
            bad += 1;
            tracing::warn!(node = %id, %blob, "blob replica failed the caller's verification");
            if let Err(e) = self.report_bad(blob, i).await {
                tracing::error!(error = %e, "could not queue the repair of a bad replica");
            }
        }
        Err(BlobError::AllReplicasBad {
            tried: meta.replicas.len(),
            bad,
            unreachable,
        })
    }

    /// Queues (blob, node, bad) on every reachable node.
    async fn report_bad(&self, blob: BlobRef, i: usize) -> Result<(), BlobError> {
        let target = self.ids(&[i]);
        let stored = join_all(self.nodes.iter().map(|node| {
            let target = target.clone();
            async move { node.available() && node.enqueue(blob, target, "bad").await.is_ok() }
        }))
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
        if stored == 0 {
            return Err(BlobError::Unavailable {
                answered: 0,
                nodes: self.nodes.len(),
            });
        }
        Ok(())
    }

    async fn delete(&self, blob: BlobRef) -> Result<DeleteReceipt, BlobError> {
        let (applied, failed) = self.tombstone_everywhere(blob).await;
        if applied.len() < self.write_quorum {
            return Err(BlobError::NotEnoughReplicas {
                needed: self.write_quorum,
                committed: applied.len(),
            });
        }
        Ok(DeleteReceipt {
            applied: applied.iter().map(|&i| self.nodes[i].id.clone()).collect(),
            queued: failed.iter().map(|&i| self.nodes[i].id.clone()).collect(),
        })
    }

    async fn node_status(&self) -> Vec<NodeStatus> {
        join_all(self.nodes.iter().map(|node| async move {
            NodeStatus {
                node: node.id.clone(),
                down: match node.probe().await {
                    Ok(()) => None,
                    Err(BlobError::Db { reason, .. }) => Some(reason),
                    Err(_) => Some(super::DbFailure::Protocol),
                },
            }
        }))
        .await
    }
}

impl BlobStore for PgBlobStore {
    fn begin_put(
        &self,
        blob_ref: BlobRef,
    ) -> BoxFuture<'_, Result<Box<dyn BlobWriter>, BlobError>> {
        Box::pin(async move {
            let writer = writer::PgWriter::begin(Arc::clone(&self.inner), blob_ref)?;
            Ok(Box::new(writer) as Box<dyn BlobWriter>)
        })
    }

    fn put(&self, blob_ref: BlobRef, data: Bytes) -> BoxFuture<'_, Result<PutReceipt, BlobError>> {
        Box::pin(async move {
            if data.len() <= writer::SMALL_PUT {
                return self.inner.put_small(blob_ref, vec![data]).await;
            }
            let mut writer = self.begin_put(blob_ref).await?;
            writer.write_chunk(data).await?;
            writer.finish().await
        })
    }

    fn meta(&self, blob_ref: BlobRef) -> BoxFuture<'_, Result<BlobMeta, BlobError>> {
        Box::pin(self.inner.meta(blob_ref))
    }

    fn read_chunk_from(
        &self,
        node: NodeId,
        blob_ref: BlobRef,
        index: u32,
    ) -> BoxFuture<'_, Result<Bytes, BlobError>> {
        Box::pin(async move {
            let i = self.inner.node(&node)?;
            self.inner.read_chunk_from(i, blob_ref, index).await
        })
    }

    fn get_chunk(
        &self,
        blob_ref: BlobRef,
        index: u32,
        replica: Option<NodeId>,
    ) -> BoxFuture<'_, Result<(NodeId, Bytes), BlobError>> {
        Box::pin(async move {
            let first = replica.map(|r| self.inner.node(&r)).transpose()?;
            self.inner.get_chunk(blob_ref, index, first).await
        })
    }

    fn report_bad(&self, blob_ref: BlobRef, node: NodeId) -> BoxFuture<'_, Result<(), BlobError>> {
        Box::pin(async move {
            let i = self.inner.node(&node)?;
            self.inner.report_bad(blob_ref, i).await
        })
    }

    fn get<'a>(
        &'a self,
        blob_ref: BlobRef,
        verify: Verify<'a>,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, BlobError>> {
        Box::pin(self.inner.get(blob_ref, verify))
    }

    fn delete(&self, blob_ref: BlobRef) -> BoxFuture<'_, Result<DeleteReceipt, BlobError>> {
        Box::pin(self.inner.delete(blob_ref))
    }

    fn repair_pending(&self) -> BoxFuture<'_, Result<RepairReport, BlobError>> {
        Box::pin(self.inner.repair_pending())
    }

    fn node_status(&self) -> BoxFuture<'_, Vec<NodeStatus>> {
        Box::pin(self.inner.node_status())
    }
}
