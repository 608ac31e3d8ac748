//! Reading an object back: keys from the key host, chunks from the first
//! replica whose segments verify (switching replica segment by segment),
//! plaintext released only after each segment's tag verifies.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use coffer_keyhost::tls::Peer;

use super::{
    EncryptionHost, Failure, KeyRefQuery, blob_ref, context, integrity, key_ref, record_keys,
    require_api_host,
};
use crate::blob::{BlobMeta, BlobStore};
use crate::crypto::{Opener, SEGMENT_SIZE, SEGMENTS_PER_CHUNK, segments};

pub(crate) async fn get_object(
    State(host): State<Arc<EncryptionHost>>,
    Extension(peer): Extension<Peer>,
    Path(blob): Path<String>,
    Query(query): Query<KeyRefQuery>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    require_api_host(&peer)?;
    let blob = blob_ref(&blob)?;
    let digest = context(&headers)?;
    let material = host.keys.open(key_ref(&query.key_ref)?).await?;
    let meta = host.blobs.meta(blob).await?;
    if meta.chunks < 3 {
        return Err(integrity("too few chunks"));
    }
    if query.whole && meta.len > WHOLE_LIMIT {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "whole_too_large",
            format!("whole=true is for records up to {WHOLE_LIMIT} bytes; stream larger objects"),
        ));
    }
    let plain_len = crate::crypto::plaintext_len(meta.len).ok_or_else(|| integrity("bad size"))?;
    if query.offset > 0 && (query.whole || query.offset >= plain_len) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "bad_offset",
            "offset must lie within the object, and not with whole=true".into(),
        ));
    }
    let keys = record_keys(&material);
    drop(material);
    let mut opener = open_header(&host, &meta, &keys, &digest).await?;
    // A range read starts at the segment holding `offset`: data chunk k
    // (from 1) holds segments (k-1)*15 .. k*15.
    let segment = query.offset / SEGMENT_SIZE as u64;
    let chunk = segment / SEGMENTS_PER_CHUNK as u64;
    opener
        .seek(u32::try_from(segment).map_err(|_| integrity("offset past the segment counter"))?)
        .map_err(|e| integrity(&e.to_string()))?;
    let mut reader = Reader {
        blobs: host.blobs.clone(),
        meta,
        opener,
        next: 1 + u32::try_from(chunk).map_err(|_| integrity("offset past the last chunk"))?,
        skip_segments: (segment % SEGMENTS_PER_CHUNK as u64) as usize,
        skip_bytes: (query.offset % SEGMENT_SIZE as u64) as usize,
        seeked: query.offset > 0,
    };

    if query.whole {
        // Records: every segment and the MAC verified before anything leaves.
        let mut plain = Vec::new();
        while let Some(part) = reader.next_plaintext().await? {
            plain.extend_from_slice(&part);
        }
        reader.finish().await?;
        return Ok(octets(Body::from(plain)));
    }

    // BLOBs: stream; at most two verified chunks wait in the channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        loop {
            match reader.next_plaintext().await {
                Ok(Some(part)) => {
                    if tx.send(Ok(Bytes::from(part))).await.is_err() {
                        return; // the client went away
                    }
                }
                Ok(None) => break,
                Err(f) => {
                    let _ = tx.send(Err(std::io::Error::other(f.2))).await;
                    return;
                }
            }
        }
        // A range read cannot check the MAC over every tag; each segment's
        // tag at its position (and the last one's end flag) still is.
        if !reader.seeked
            && let Err(f) = reader.finish().await
        {
            let _ = tx.send(Err(std::io::Error::other(f.2))).await;
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(octets(Body::from_stream(stream)))
}

/// Largest object `whole=true` buffers (records are far smaller).
const WHOLE_LIMIT: u64 = 64 << 20;

/// The opener for the first replica whose header is one we read.
async fn open_header(
    host: &EncryptionHost,
    meta: &BlobMeta,
    keys: &crate::crypto::RecordKeys,
    digest: &crate::crypto::ContextDigest,
) -> Result<Opener, Failure> {
    for node in &meta.replicas {
        let Ok(header) = host
            .blobs
            .read_chunk_from(node.clone(), meta.blob_ref, 0)
            .await
        else {
            continue;
        };
        match Opener::new(keys, digest, &header) {
            Ok(opener) => return Ok(opener),
            Err(_) => {
                let _ = host.blobs.report_bad(meta.blob_ref, node.clone()).await;
            }
        }
    }
    Err(integrity("no replica holds a readable header"))
}

fn octets(body: Body) -> Response {
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    *response.status_mut() = StatusCode::OK;
    response
}

/// Walks the data chunks of one object.
struct Reader {
    blobs: Arc<dyn BlobStore>,
    meta: BlobMeta,
    opener: Opener,
    next: u32,
    /// Segments of the first chunk read to pass over (a range read).
    skip_segments: usize,
    /// Plaintext bytes of the first segment read to pass over.
    skip_bytes: usize,
    /// Started past the beginning.
    seeked: bool,
}

impl Reader {
    fn last_data_chunk(&self) -> u32 {
        self.meta.chunks - 2
    }

    /// The plaintext of the next data chunk, or `None` after the last.
    async fn next_plaintext(&mut self) -> Result<Option<Vec<u8>>, Failure> {
        if self.next > self.last_data_chunk() {
            return Ok(None);
        }
        let index = self.next;
        let last_chunk = index == self.last_data_chunk();
        let mut plain = Vec::new();
        let mut done = std::mem::take(&mut self.skip_segments);
        let mut replicas = self.meta.replicas.clone().into_iter();
        'replicas: loop {
            let Some(node) = replicas.next() else {
                return Err(integrity("no replica of a chunk verifies"));
            };
            let Ok(chunk) = self
                .blobs
                .read_chunk_from(node.clone(), self.meta.blob_ref, index)
                .await
            else {
                continue;
            };
            let segs: Vec<&[u8]> = segments(&chunk).collect();
            if segs.len() < done {
                let _ = self.blobs.report_bad(self.meta.blob_ref, node).await;
                continue;
            }
            for (i, seg) in segs.iter().enumerate().skip(done) {
                let last = last_chunk && i + 1 == segs.len();
                match self.opener.open(seg, last) {
                    Ok(part) => {
                        plain.extend_from_slice(&part);
                        done += 1;
                    }
                    Err(_) => {
                        // This replica's copy is bad from here: queue its
                        // repair and go on from the same segment elsewhere.
                        let _ = self.blobs.report_bad(self.meta.blob_ref, node).await;
                        continue 'replicas;
                    }
                }
            }
            break;
        }
        self.next += 1;
        let skip = std::mem::take(&mut self.skip_bytes).min(plain.len());
        plain.drain(..skip);
        Ok(Some(plain))
    }

    /// Checks the trailer (the MAC over every segment tag) from the first
    /// replica whose copy verifies.
    async fn finish(&mut self) -> Result<(), Failure> {
        let index = self.meta.chunks - 1;
        for node in self.meta.replicas.clone() {
            let Ok(trailer) = self
                .blobs
                .read_chunk_from(node.clone(), self.meta.blob_ref, index)
                .await
            else {
                continue;
            };
            if self.opener.finish(&trailer).is_ok() {
                return Ok(());
            }
            let _ = self.blobs.report_bad(self.meta.blob_ref, node).await;
        }
        Err(integrity("the record's MAC does not match"))
    }
}
