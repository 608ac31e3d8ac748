//! Storing an object: keys from the key host, STREAM sealing, chunks to every
//! blob node as they are produced.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use bytes::Bytes;
use coffer_keyhost::api::KeyMaterial;
use coffer_keyhost::tls::Peer;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::{EncryptionHost, Failure, context, record_keys, require_api_host};
use crate::blob::BlobRef;
use crate::crypto::{CHUNK_BYTES, ContextDigest, SEALED_SEGMENT, Sealer};

#[derive(Debug, serde::Deserialize)]
pub(crate) struct PutQuery {
    kek: String,
}

/// `201` answer of a put.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Stored {
    key_ref: String,
    blob_ref: String,
    size: u64,
    sha256: String,
}

pub(crate) async fn put_object(
    State(host): State<Arc<EncryptionHost>>,
    Extension(peer): Extension<Peer>,
    Query(query): Query<PutQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Stored>), Failure> {
    require_api_host(&peer)?;
    let digest = context(&headers)?;
    // Keys first: with the key host down, fail before anything is written.
    let material = host.keys.generate(&query.kek).await?;
    let blob = BlobRef::random();
    match seal_into_store(&host, blob, &material, &digest, body).await {
        Ok((size, sha)) => Ok((
            StatusCode::CREATED,
            Json(Stored {
                key_ref: material.key_ref.to_string(),
                blob_ref: blob.to_string(),
                size,
                sha256: data_encoding::HEXLOWER.encode(&sha),
            }),
        )),
        Err(failure) => {
            // Leave no orphan: the blob writer rolled back; drop the keys too.
            if let Err(e) = host.keys.delete(material.key_ref).await {
                tracing::warn!(
                    "orphaned key ref {} after a failed put: {e}",
                    material.key_ref
                );
            }
            Err(failure)
        }
    }
}

async fn seal_into_store(
    host: &EncryptionHost,
    blob: BlobRef,
    material: &KeyMaterial,
    digest: &ContextDigest,
    body: Body,
) -> Result<(u64, [u8; 32]), Failure> {
    let keys = record_keys(material);
    let mut sealer = Sealer::new(&keys, digest);
    let mut writer = host.blobs.begin_put(blob).await?;
    writer
        .write_chunk(Bytes::copy_from_slice(&sealer.header()))
        .await?;

    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut sealed = Vec::with_capacity(CHUNK_BYTES + SEALED_SEGMENT);
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let data = frame.map_err(|e| {
            Failure(
                StatusCode::BAD_REQUEST,
                "body_error",
                format!("reading the body: {e}"),
            )
        })?;
        size += data.len() as u64;
        if size > host.max_object {
            return Err(Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("objects are limited to {} bytes", host.max_object),
            ));
        }
        sha.update(&data);
        sealer.push(&data, &mut sealed)?;
        while sealed.len() >= CHUNK_BYTES {
            let rest = sealed.split_off(CHUNK_BYTES);
            writer
                .write_chunk(Bytes::from(std::mem::replace(&mut sealed, rest)))
                .await?;
        }
    }
    let trailer = sealer.finish(&mut sealed)?;
    while sealed.len() > CHUNK_BYTES {
        let rest = sealed.split_off(CHUNK_BYTES);
        writer
            .write_chunk(Bytes::from(std::mem::replace(&mut sealed, rest)))
            .await?;
    }
    writer.write_chunk(Bytes::from(sealed)).await?;
    writer.write_chunk(Bytes::from(trailer)).await?;
    writer.finish().await?;
    Ok((size, sha.finalize().into()))
}
