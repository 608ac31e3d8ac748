//! The blob store: immutable ciphertext under random ids, replicated over N
//! independent nodes (see `shared/DESIGN.md`, "Replication" and "Lifecycle").
//!
//! The encryption host is the only caller. It supplies a random [`BlobRef`]
//! and only ever stores ciphertext; the store never sees a key or plaintext
//! and keeps nothing that would join its rows to another database by time
//! (no timestamps, no sequence numbers).
//!
//! [`BlobStore`] is the seam another backend (object storage for huge
//! objects) can fill; [`PgBlobStore`] is the PostgreSQL implementation:
//!
//! - **Chunks**: a blob is a sequence of rows of at most [`MAX_CHUNK`] bytes,
//!   each stored with its SHA-256 digest so the store itself detects a
//!   corrupt replica. Chunks the caller hands to [`BlobWriter::write_chunk`]
//!   keep their boundaries (so an encryption segment can map to one chunk)
//!   unless larger than [`MAX_CHUNK`], which are split. Empty chunks are
//!   ignored; an empty blob has zero chunks.
//! - **Write quorum**: every write goes to all N nodes in parallel, one
//!   transaction per node with synchronous commit, and is acknowledged once
//!   committed on W of them (W ≥ 3; N ≥ W+1 keeps writes available through
//!   a node loss). A write that reaches fewer than W nodes is refused and its
//!   partial copies are tombstoned, so a failed put is never resurrected.
//! - **Tombstones**: a delete replaces the blob's header by a tombstone on
//!   every reachable node; a tombstone anywhere wins over a live copy
//!   elsewhere, in reads and in repairs.
//! - **Durable repair queue**: entries `(blob, node, reason)` live in a
//!   `repair_queue` table on the blob nodes themselves, written in the same
//!   transaction as the data they concern. A put writes an entry for every
//!   *other* node inside each node's commit, then clears the entries of the
//!   nodes that committed: a crash at any point leaves at worst extra
//!   entries, which [`BlobStore::repair_pending`] finds already satisfied.
//!   Keeping the queue on the nodes means it survives the process and needs
//!   no extra database; an acknowledged write has its entries on ≥ W nodes.
//! - **Reads**: [`BlobStore::meta`] asks every node in parallel, so a node
//!   that missed a delete cannot serve the blob; chunk reads then try the
//!   live replicas in a per-blob rotated order and check each chunk's digest.
//! - **Deletes** also need W tombstones to succeed; below that the
//!   tombstones applied stay (deletes are never rolled back) and the rest is
//!   queued, and the caller retries.
//! - **Refs are never reused**: a put under a ref any node knows (live or
//!   tombstoned) is refused with [`BlobError::AlreadyExists`] / `Deleted`.
//!   The one-round-trip path for blobs of one chunk does not pre-check, so a
//!   reused ref may leave copies on nodes that lacked it; a tombstone
//!   elsewhere still wins and the repair removes them.

mod error;
mod pg;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use error::{BlobError, ConfigError, DbFailure};
pub use pg::{NodeConfig, PgBlobConfig, PgBlobStore};

/// The largest chunk row, 1 MiB.
pub const MAX_CHUNK: usize = 1 << 20;

/// A blob's random 128-bit id. Unrelated to tokens and key refs; only the
/// metadata DB joins them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobRef(pub [u8; 16]);

impl BlobRef {
    /// A fresh ref from the OS RNG.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the OS RNG is available");
        Self(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobRef({self})")
    }
}

/// A node's configured id (kept in repair-queue rows, so keep it stable).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// What an acknowledged put committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutReceipt {
    /// The blob.
    pub blob_ref: BlobRef,
    /// Chunk rows written.
    pub chunks: u32,
    /// Total length in bytes.
    pub len: u64,
    /// Nodes that committed (at least W).
    pub committed: Vec<NodeId>,
    /// Nodes that missed the write and have a repair-queue entry.
    pub queued: Vec<NodeId>,
}

/// What a delete reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteReceipt {
    /// Nodes that now hold the tombstone.
    pub applied: Vec<NodeId>,
    /// Unreachable nodes with a durable repair-queue entry.
    pub queued: Vec<NodeId>,
}

/// A live blob's shape and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    /// The blob.
    pub blob_ref: BlobRef,
    /// Number of chunks.
    pub chunks: u32,
    /// Total length in bytes.
    pub len: u64,
    /// Nodes holding a live header, in the order reads try them.
    pub replicas: Vec<NodeId>,
}

/// What [`BlobStore::repair_pending`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Distinct (blob, node) entries seen.
    pub entries: usize,
    /// Replicas (re)written from a good copy.
    pub replicas_copied: usize,
    /// Chunk rows copied.
    pub chunks_copied: usize,
    /// Tombstones applied to nodes that still held (or lacked) the blob.
    pub tombstones_applied: usize,
    /// Entries whose replica was already complete and correct.
    pub already_good: usize,
    /// Entries left queued because the target or every source was unreachable.
    pub deferred: usize,
    /// Blobs with no good replica on any reachable node (entries kept).
    pub unrecoverable: Vec<BlobRef>,
}

/// One node's readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Why it is down, or `None` when it answered.
    pub down: Option<DbFailure>,
}

/// A verifier for [`BlobStore::get`]: true when the chunks are genuine.
pub type Verify<'a> = &'a (dyn Fn(&[Bytes]) -> bool + Send + Sync);

/// A replicated store of immutable blobs.
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Starts a streaming put; chunks go to the nodes as they are written, so
    /// memory stays bounded whatever the blob's size (an implementation may
    /// hold back the first chunks of a small blob to write it at once). A ref
    /// already in use is refused, at the latest by `finish`, and never
    /// overwritten.
    fn begin_put(&self, blob_ref: BlobRef)
    -> BoxFuture<'_, Result<Box<dyn BlobWriter>, BlobError>>;

    /// Stores a small blob in one call (split into [`MAX_CHUNK`] rows).
    fn put(&self, blob_ref: BlobRef, data: Bytes) -> BoxFuture<'_, Result<PutReceipt, BlobError>>;

    /// The blob's chunk count, length and live replicas. A tombstone on any
    /// node answers [`BlobError::Deleted`].
    fn meta(&self, blob_ref: BlobRef) -> BoxFuture<'_, Result<BlobMeta, BlobError>>;

    /// One chunk from one node, checked against its stored digest (a
    /// mismatch queues a repair and answers [`BlobError::Corrupt`]).
    fn read_chunk_from(
        &self,
        node: NodeId,
        blob_ref: BlobRef,
        index: u32,
    ) -> BoxFuture<'_, Result<Bytes, BlobError>>;

    /// One chunk from the first replica that has it intact, starting with
    /// `replica` when given. Call [`BlobStore::meta`] first: it is the read
    /// that honours tombstones across nodes.
    fn get_chunk(
        &self,
        blob_ref: BlobRef,
        index: u32,
        replica: Option<NodeId>,
    ) -> BoxFuture<'_, Result<(NodeId, Bytes), BlobError>>;

    /// The caller found `node`'s copy bad (a GCM or HMAC tag failed): queues
    /// a durable repair; the caller then tries the next replica.
    fn report_bad(&self, blob_ref: BlobRef, node: NodeId) -> BoxFuture<'_, Result<(), BlobError>>;

    /// A whole small blob: the first replica whose chunks pass the digests
    /// and `verify` wins; bad replicas are queued for repair.
    fn get<'a>(
        &'a self,
        blob_ref: BlobRef,
        verify: Verify<'a>,
    ) -> BoxFuture<'a, Result<Vec<Bytes>, BlobError>>;

    /// Deletes the blob: rows removed and a tombstone left on every reachable
    /// node, a durable repair entry for the others. Fails with
    /// [`BlobError::NotEnoughReplicas`] below W tombstones (those applied
    /// stay, and the rest is queued): retry.
    fn delete(&self, blob_ref: BlobRef) -> BoxFuture<'_, Result<DeleteReceipt, BlobError>>;

    /// Drains the durable repair queue (idempotent, resumable).
    fn repair_pending(&self) -> BoxFuture<'_, Result<RepairReport, BlobError>>;

    /// Which nodes answer, probing each (readiness).
    fn node_status(&self) -> BoxFuture<'_, Vec<NodeStatus>>;
}

/// A put in progress. Dropping it without [`BlobWriter::finish`] rolls back.
pub trait BlobWriter: Send + fmt::Debug {
    /// Appends a chunk (split if larger than [`MAX_CHUNK`]; empty ignored).
    fn write_chunk(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), BlobError>>;

    /// Commits on every node still in the write; acknowledged at W commits.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<PutReceipt, BlobError>>;
}
