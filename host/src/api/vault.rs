//! The API host's client of the encryption host: plaintext goes out and
//! comes back in memory only; the API host never sees a key or ciphertext.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// Where a sealed object lives.
#[derive(Debug, serde::Deserialize)]
pub struct Sealed {
    /// The key host's ref of its keys.
    pub key_ref: String,
    /// The blob store's ref of its ciphertext.
    pub blob_ref: String,
}

/// A mutual-TLS client of the encryption host (role `api-host`).
#[derive(Clone, Debug)]
pub struct Vault {
    http: reqwest::Client,
    base: String,
}

/// The context digest bound into every record's encryption: a token
/// re-pointed at another record's keys or blob does not decrypt.
pub fn context_digest(tenant: &str, study: &str, token: &str, participant_hash: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"coffer/context/v1");
    for field in [
        tenant.as_bytes(),
        study.as_bytes(),
        token.as_bytes(),
        participant_hash,
    ] {
        h.update((field.len() as u32).to_be_bytes());
        h.update(field);
    }
    h.update([1u8]); // record format version
    data_encoding::HEXLOWER.encode(&h.finalize())
}

impl Vault {
    /// A client of `base` trusting `ca`, presenting `cert`/`key`.
    pub fn new(base: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let tls = coffer_keyhost::tls::client_config(ca, Some((cert, key)))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    async fn check(
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ApiError> {
        let response = response.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "encryption_host_unavailable",
                "the encryption host is unavailable",
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let code = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        Err(match (status.as_u16(), code.as_str()) {
            (503, "key_host_unavailable") => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "key_host_unavailable",
                "the key host is unavailable",
            ),
            (503, "not_enough_replicas") => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_enough_replicas",
                "not enough blob nodes are up to store this durably; nothing was stored",
            ),
            (503, _) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "the blob store is unavailable",
            ),
            (409, "unsupported") => ApiError::new(
                StatusCode::CONFLICT,
                "linking_unavailable",
                "this study's key has no linking key (it predates them): deterministic tokens are not available for it",
            ),
            (429, _) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many reads of this study's keys; retry later",
            ),
            (422, _) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "record_integrity",
                "the record failed its integrity check",
            ),
            (404, _) => ApiError::not_found("record"),
            (413, _) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the object is over the encryption host's size limit; nothing was stored",
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "encryption_host_error",
                "the encryption host refused the call",
            ),
        })
    }

    /// A new KEK for a study.
    pub async fn create_kek(&self) -> Result<String, ApiError> {
        let response = Self::check(
            self.http
                .post(format!("{}/v1/keks", self.base))
                .send()
                .await,
        )
        .await?;
        let body: serde_json::Value = response.json().await.map_err(|_| bad_answer())?;
        body["kek"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(bad_answer)
    }

    /// MACs under the linking key of `kek`, computed in the HSM, one per
    /// input (32-byte keyed hashes of values, never the values), in order.
    pub async fn link(&self, kek: &str, inputs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, ApiError> {
        let inputs: Vec<String> = inputs
            .iter()
            .map(|i| data_encoding::HEXLOWER.encode(i))
            .collect();
        let response = self
            .http
            .post(format!("{}/v1/keks/{kek}/link", self.base))
            .json(&serde_json::json!({ "inputs": inputs }))
            .send()
            .await;
        let answer: serde_json::Value = Self::check(response)
            .await?
            .json()
            .await
            .map_err(|_| bad_answer())?;
        let macs = answer["macs"].as_array().ok_or_else(bad_answer)?;
        if macs.len() != inputs.len() {
            return Err(bad_answer());
        }
        macs.iter()
            .map(|m| {
                m.as_str()
                    .and_then(|m| data_encoding::HEXLOWER.decode(m.as_bytes()).ok())
                    .ok_or_else(bad_answer)
            })
            .collect()
    }

    /// Seals `plaintext` under fresh keys wrapped by `kek`.
    pub async fn seal(
        &self,
        kek: &str,
        context: &str,
        plaintext: Vec<u8>,
    ) -> Result<Sealed, ApiError> {
        let response = self
            .http
            .put(format!("{}/v1/objects?kek={kek}", self.base))
            .header("x-coffer-context", context)
            .body(plaintext)
            .send()
            .await;
        Self::check(response)
            .await?
            .json()
            .await
            .map_err(|_| bad_answer())
    }

    /// Seals a stream (a BLOB) under fresh keys wrapped by `kek`; returns
    /// where it lives, its size and the plaintext's SHA-256 (hex).
    pub async fn seal_stream(
        &self,
        kek: &str,
        context: &str,
        body: reqwest::Body,
    ) -> Result<(Sealed, u64, String), ApiError> {
        let response = self
            .http
            .put(format!("{}/v1/objects?kek={kek}", self.base))
            .header("x-coffer-context", context)
            .timeout(Duration::from_secs(24 * 3600))
            .body(body)
            .send()
            .await;
        let answer: serde_json::Value = Self::check(response)
            .await?
            .json()
            .await
            .map_err(|_| bad_answer())?;
        let text = |k: &str| answer[k].as_str().map(str::to_owned).ok_or_else(bad_answer);
        Ok((
            Sealed {
                key_ref: text("key_ref")?,
                blob_ref: text("blob_ref")?,
            },
            answer["size"].as_u64().ok_or_else(bad_answer)?,
            text("sha256")?,
        ))
    }

    /// Opens a sealed BLOB as a stream from plaintext byte `offset`; each
    /// chunk is released by the encryption host only after its segments
    /// verified.
    pub async fn open_stream(
        &self,
        sealed: &Sealed,
        context: &str,
        offset: u64,
    ) -> Result<reqwest::Response, ApiError> {
        let response = self
            .http
            .get(format!(
                "{}/v1/objects/{}?key_ref={}&offset={offset}",
                self.base, sealed.blob_ref, sealed.key_ref
            ))
            .header("x-coffer-context", context)
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await;
        Self::check(response).await
    }

    /// Opens a sealed record (verified whole before it is released).
    pub async fn open(&self, sealed: &Sealed, context: &str) -> Result<Bytes, ApiError> {
        let response = self
            .http
            .get(format!(
                "{}/v1/objects/{}?key_ref={}&whole=true",
                self.base, sealed.blob_ref, sealed.key_ref
            ))
            .header("x-coffer-context", context)
            .send()
            .await;
        Self::check(response)
            .await?
            .bytes()
            .await
            .map_err(|_| bad_answer())
    }

    /// Destroys a record's keys, then its blob on every replica.
    pub async fn destroy(&self, sealed: &Sealed) -> Result<(), ApiError> {
        let response = self
            .http
            .delete(format!(
                "{}/v1/objects/{}?key_ref={}",
                self.base, sealed.blob_ref, sealed.key_ref
            ))
            .send()
            .await;
        Self::check(response).await.map(drop)
    }

    /// Whether the encryption host, the key host and W blob nodes answer.
    pub async fn health(&self) -> Result<(), String> {
        match self
            .http
            .get(format!("{}/v1/health", self.base))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                let mut down = Vec::new();
                if body["key_host"] == "down" {
                    down.push("key host".to_owned());
                }
                if let Some(nodes) = body["blob_nodes_down"].as_array() {
                    down.extend(
                        nodes
                            .iter()
                            .filter_map(|n| n.as_str())
                            .map(|n| format!("blob {n}")),
                    );
                }
                Err(if down.is_empty() {
                    "encryption host".into()
                } else {
                    down.join(", ")
                })
            }
            Err(_) => Err("encryption host".into()),
        }
    }
}

fn bad_answer() -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "encryption_host_error",
        "unreadable answer from the encryption host",
    )
}
