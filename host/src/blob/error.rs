//! Errors of the blob store.
//!
//! Displays name a node and a short reason only: never SQL text, server
//! messages (which may quote row values) or blob bytes.

use std::fmt;

use super::NodeId;

/// Why one node failed an operation, reduced to what is safe to log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DbFailure {
    /// The node did not accept a connection (refused, reset, closed).
    Unreachable,
    /// The node's certificate did not verify, or the TLS handshake failed.
    Tls,
    /// Connecting or a statement took longer than the configured limit.
    TimedOut,
    /// The server refused a statement; only its SQLSTATE is kept.
    Rejected {
        /// The five-character SQLSTATE code.
        sqlstate: String,
    },
    /// The server sent something the driver did not expect.
    Protocol,
    /// A stored row does not have the shape this store writes.
    BadRow,
}

impl DbFailure {
    /// True when the node looks down (as opposed to refusing one statement).
    pub fn is_connectivity(&self) -> bool {
        matches!(self, Self::Unreachable | Self::Tls | Self::TimedOut)
    }

    pub(crate) fn from_sqlx(e: &sqlx::Error) -> Self {
        match e {
            // rustls reports a certificate that does not verify as an I/O
            // error of kind InvalidData on the stream.
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => Self::Tls,
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
                Self::Unreachable
            }
            sqlx::Error::Tls(_) => Self::Tls,
            sqlx::Error::PoolTimedOut => Self::TimedOut,
            sqlx::Error::Database(db) => Self::Rejected {
                sqlstate: db.code().map(|c| c.into_owned()).unwrap_or_default(),
            },
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::RowNotFound => Self::BadRow,
            _ => Self::Protocol,
        }
    }
}

impl fmt::Display for DbFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable => f.write_str("unreachable"),
            Self::Tls => f.write_str("TLS handshake or certificate verification failed"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Rejected { sqlstate } => write!(f, "statement rejected (SQLSTATE {sqlstate})"),
            Self::Protocol => f.write_str("protocol error"),
            Self::BadRow => f.write_str("unexpected row shape"),
        }
    }
}

/// An invalid store configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// W below the floor of 3.
    #[error("write quorum {write_quorum} is below the minimum of 3")]
    QuorumTooSmall {
        /// The configured W.
        write_quorum: usize,
    },
    /// Fewer nodes than W.
    #[error(
        "{nodes} nodes cannot satisfy a write quorum of {write_quorum} \
         (need at least W nodes, and W+1 to stay writable through a node loss)"
    )]
    TooFewNodes {
        /// The configured N.
        nodes: usize,
        /// The configured W.
        write_quorum: usize,
    },
    /// Two nodes share an id (ids are stored in repair-queue rows).
    #[error("node id {0:?} is used twice")]
    DuplicateNode(String),
    /// A node id that is empty or not printable ASCII.
    #[error("node id {0:?} must be 1-64 characters of [A-Za-z0-9._-]")]
    BadNodeId(String),
    /// A zero timeout or pool size.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

/// Errors of [`super::BlobStore`] operations.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Fewer than W nodes committed a write or a delete. A put that fails
    /// this way is not acknowledged and its partial copies are tombstoned.
    #[error("not enough replicas: {committed} of the {needed} required committed")]
    NotEnoughReplicas {
        /// W.
        needed: usize,
        /// How many nodes committed.
        committed: usize,
    },
    /// No node holds the blob (enough nodes answered to be sure).
    #[error("blob not found")]
    NotFound,
    /// The blob was deleted: a tombstone exists on at least one node.
    #[error("blob was deleted")]
    Deleted,
    /// The blob ref is already in use (live or tombstoned) on some node.
    #[error("blob ref already in use")]
    AlreadyExists,
    /// A chunk index at or past the blob's chunk count.
    #[error("chunk {index} is out of range")]
    ChunkOutOfRange {
        /// The requested index.
        index: u32,
    },
    /// One replica's chunk failed its stored SHA-256 digest; a repair was queued.
    #[error("chunk {index} on node {node} failed its digest check")]
    Corrupt {
        /// The node holding the bad chunk.
        node: NodeId,
        /// The chunk index.
        index: u32,
    },
    /// Every replica tried was missing, corrupt, failed the caller's check or
    /// did not answer.
    #[error(
        "no replica could serve the blob: {tried} tried, {bad} bad or missing, {unreachable} unreachable"
    )]
    AllReplicasBad {
        /// Replicas tried.
        tried: usize,
        /// Replicas that were corrupt, missing the data, or failed verification.
        bad: usize,
        /// Replicas that did not answer.
        unreachable: usize,
    },
    /// Not enough nodes answered to tell anything.
    #[error("blob store unavailable: {answered} of {nodes} nodes answered")]
    Unavailable {
        /// Nodes that answered.
        answered: usize,
        /// Nodes configured.
        nodes: usize,
    },
    /// The node id is not in the configuration.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The configuration is invalid.
    #[error("invalid blob store configuration: {0}")]
    Config(#[from] ConfigError),
    /// One node failed; which node and a short reason only.
    #[error("blob node {node}: {reason}")]
    Db {
        /// The node.
        node: NodeId,
        /// Why.
        reason: DbFailure,
    },
    /// A writer was used after an earlier call failed.
    #[error("the writer failed earlier and cannot be used")]
    WriterPoisoned,
}
