//! Draining the durable repair queue.
//!
//! The queue is the union of the `repair_queue` tables of the reachable
//! nodes. For each queued (blob, node), the current state across the nodes
//! decides, not the entry's reason: a tombstone anywhere wins and is applied
//! to the node (and to any reachable node still holding a live copy);
//! otherwise the node's chunks are compared, digest by digest, with those of
//! a complete, self-consistent replica and only the differing chunks are
//! copied (each checked against its digest on the way), all in one
//! transaction on the target that refuses to write over a tombstone. An
//! entry is removed from every reachable node once its node is done; entries
//! whose node or every source is unreachable stay for the next run.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::future::join_all;
use sha2::{Digest, Sha256};

use super::super::{BlobError, BlobRef, DbFailure, RepairReport};
use super::Inner;
use super::node::{Digests, HEADER_FORMAT, Header, chunk_idx};

/// Queue rows fetched per node per page.
const PAGE: i64 = 500;

enum Outcome {
    Copied(usize),
    Good,
    Tombstoned,
    Deferred,
    Lost,
}

impl Inner {
    pub(crate) async fn repair_pending(&self) -> Result<RepairReport, BlobError> {
        let up: Vec<bool> = join_all(self.nodes.iter().map(|n| n.probe()))
            .await
            .iter()
            .map(Result::is_ok)
            .collect();
        let answered = up.iter().filter(|u| **u).count();
        if answered == 0 {
            return Err(BlobError::Unavailable {
                answered,
                nodes: self.nodes.len(),
            });
        }
        let mut report = RepairReport::default();
        let mut seen: HashSet<(BlobRef, String)> = HashSet::new();
        let mut cursor: Option<(BlobRef, String)> = None;
        loop {
            let pages = join_all(
                self.nodes
                    .iter()
                    .zip(&up)
                    .filter(|(_, up)| **up)
                    .map(|(n, _)| n.queue(cursor.clone(), PAGE)),
            )
            .await;
            // Merge; with a full page from some node, only entries up to that
            // page's last key are known complete.
            let mut limit: Option<(BlobRef, String)> = None;
            let mut merged: BTreeMap<BlobRef, BTreeMap<String, String>> = BTreeMap::new();
            for page in pages.into_iter().flatten() {
                if page.len() as i64 == PAGE
                    && let Some((b, n, _)) = page.last()
                {
                    let key = (*b, n.clone());
                    if limit.as_ref().is_none_or(|l| key < *l) {
                        limit = Some(key);
                    }
                }
                for (b, n, r) in page {
                    merged.entry(b).or_default().insert(n, r);
                }
            }
            let mut last = None;
            let mut batch: BTreeMap<BlobRef, Vec<(String, String)>> = BTreeMap::new();
            for (blob, targets) in merged {
                for (node, reason) in targets {
                    let key = (blob, node.clone());
                    if limit.as_ref().is_some_and(|l| key > *l) {
                        continue;
                    }
                    last = Some(key.clone());
                    if seen.insert(key) {
                        batch.entry(blob).or_default().push((node, reason));
                    }
                }
            }
            for (blob, targets) in batch {
                report.entries += targets.len();
                self.repair_blob(blob, targets, &up, &mut report).await;
            }
            match (last, limit) {
                (Some(last), Some(_)) => cursor = Some(last),
                _ => break,
            }
        }
        Ok(report)
    }

    async fn repair_blob(
        &self,
        blob: BlobRef,
        targets: Vec<(String, String)>,
        up: &[bool],
        report: &mut RepairReport,
    ) {
        let headers: Vec<Option<Option<Header>>> =
            join_all(self.nodes.iter().zip(up).map(|(node, up)| async move {
                if !*up {
                    return None;
                }
                node.header(blob).await.ok()
            }))
            .await;
        let tomb = headers.contains(&Some(Some(Header::Tombstone)));
        let mut targets: Vec<(Option<usize>, String)> = targets
            .into_iter()
            .map(|(name, _reason)| {
                let i = self.nodes.iter().position(|n| n.id.as_str() == name);
                (i, name)
            })
            .collect();
        if tomb {
            // Any reachable live copy of a deleted blob goes too.
            for (i, h) in headers.iter().enumerate() {
                if matches!(h, Some(Some(Header::Live { .. })))
                    && !targets.iter().any(|(t, _)| *t == Some(i))
                {
                    targets.push((Some(i), self.nodes[i].id.as_str().to_owned()));
                }
            }
        }
        let mut lost = false;
        for (target, name) in targets {
            let Some(t) = target.filter(|&t| headers[t].is_some()) else {
                report.deferred += 1;
                continue;
            };
            let outcome = if tomb {
                // Applied even over an existing tombstone: it also removes
                // any chunk row a racing copy left behind.
                match self.nodes[t].tombstone(blob, Vec::new()).await {
                    Ok(()) if headers[t] == Some(Some(Header::Tombstone)) => Outcome::Good,
                    Ok(()) => Outcome::Tombstoned,
                    Err(_) => Outcome::Deferred,
                }
            } else {
                self.ensure_replica(blob, t, &headers).await
            };
            match outcome {
                Outcome::Copied(n) => {
                    report.replicas_copied += 1;
                    report.chunks_copied += n;
                }
                Outcome::Good => report.already_good += 1,
                Outcome::Tombstoned => report.tombstones_applied += 1,
                Outcome::Deferred => {
                    report.deferred += 1;
                    continue;
                }
                Outcome::Lost => {
                    lost = true;
                    continue;
                }
            }
            join_all(
                self.nodes
                    .iter()
                    .zip(up)
                    .filter(|(_, up)| **up)
                    .map(|(n, _)| n.dequeue(blob, vec![name.clone()])),
            )
            .await;
        }
        if lost {
            tracing::error!(%blob, "no good replica of a blob on any reachable node");
            report.unrecoverable.push(blob);
        }
    }

    /// Makes node `t` hold a complete, correct copy of a live blob.
    async fn ensure_replica(
        &self,
        blob: BlobRef,
        t: usize,
        headers: &[Option<Option<Header>>],
    ) -> Outcome {
        let Ok(target) = self.nodes[t].digests(blob).await else {
            return Outcome::Deferred;
        };
        let mut unsure = headers.iter().any(Option::is_none);
        for s in self.order(blob) {
            let Some(Some(Header::Live { chunks, len })) = headers[s] else {
                continue;
            };
            if s == t {
                continue;
            }
            let Ok(source) = self.nodes[s].digests(blob).await else {
                unsure = true;
                continue;
            };
            let consistent = source.len() == chunks as usize
                && source
                    .iter()
                    .enumerate()
                    .all(|(k, (i, stored, actual))| *i as usize == k && stored == actual);
            if !consistent {
                // The source is itself damaged: queue it and look further.
                let _ = self.report_bad(blob, s).await;
                continue;
            }
            if headers[t] == Some(Some(Header::Live { chunks, len })) && target == source {
                return Outcome::Good;
            }
            match self.copy(blob, s, t, chunks, len, &source, &target).await {
                Ok(n) => return Outcome::Copied(n),
                Err(BlobError::Deleted) => return Outcome::Tombstoned,
                Err(e) => {
                    tracing::warn!(error = %e, %blob, "blob repair copy failed");
                    unsure = true;
                }
            }
        }
        if unsure {
            Outcome::Deferred
        } else {
            Outcome::Lost
        }
    }

    /// Copies the chunks of `s` that `t` lacks or holds wrong, in one
    /// transaction on `t`; returns how many were copied.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        blob: BlobRef,
        s: usize,
        t: usize,
        chunks: u32,
        len: u64,
        source: &Digests,
        target: &Digests,
    ) -> Result<usize, BlobError> {
        let node = &self.nodes[t];
        let key = blob.0.as_slice();
        let mut tx = node.begin().await?;
        let state = node
            .in_tx(
                sqlx::query_scalar::<_, String>(
                    "SELECT state FROM blobs WHERE blob_ref = $1 FOR UPDATE",
                )
                .bind(key)
                .fetch_optional(&mut *tx),
            )
            .await?;
        if state.as_deref() == Some("tombstone") {
            return Err(BlobError::Deleted);
        }
        let have: HashMap<u32, (&Vec<u8>, &Vec<u8>)> =
            target.iter().map(|(i, st, ac)| (*i, (st, ac))).collect();
        let mut copied = 0;
        for (i, digest, _) in source {
            if have.get(i) == Some(&(digest, digest)) {
                continue;
            }
            let (data, stored) = self.nodes[s]
                .chunk(blob, *i)
                .await?
                .ok_or(BlobError::NotFound)?;
            if Sha256::digest(&data).as_slice() != stored.as_slice() || &stored != digest {
                return Err(self.nodes[s].err(DbFailure::BadRow));
            }
            node.in_tx(
                sqlx::query(
                    "INSERT INTO blob_chunks (blob_ref, idx, data, sha256) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (blob_ref, idx) DO UPDATE \
                     SET data = EXCLUDED.data, sha256 = EXCLUDED.sha256",
                )
                .bind(key)
                .bind(chunk_idx(*i))
                .bind(data)
                .bind(stored)
                .execute(&mut *tx),
            )
            .await?;
            copied += 1;
        }
        node.in_tx(
            sqlx::query("DELETE FROM blob_chunks WHERE blob_ref = $1 AND idx >= $2")
                .bind(key)
                .bind(chunk_idx(chunks))
                .execute(&mut *tx),
        )
        .await?;
        let updated = node
            .in_tx(
                sqlx::query(
                    "INSERT INTO blobs (blob_ref, state, chunks, len, format) \
                     VALUES ($1, 'live', $2, $3, $4) \
                     ON CONFLICT (blob_ref) DO UPDATE \
                     SET chunks = EXCLUDED.chunks, len = EXCLUDED.len, format = EXCLUDED.format \
                     WHERE blobs.state = 'live'",
                )
                .bind(key)
                .bind(chunk_idx(chunks))
                .bind(len as i64)
                .bind(HEADER_FORMAT)
                .execute(&mut *tx),
            )
            .await?;
        if updated.rows_affected() == 0 {
            return Err(BlobError::Deleted);
        }
        node.in_tx(tx.commit()).await?;
        Ok(copied)
    }
}
