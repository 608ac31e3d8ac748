//! A client of the key host, for the encryption host and the maintenance worker.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use crate::api::{
    CreatedKek, ErrorBody, GenerateRequest, KeyMaterial, KeyRefId, LinkAnswer, LinkRequest,
    OpenRequest, RetireAnswer, VersionAnswer,
};
use crate::tls::client_config;

/// Why a key host call failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyHostError {
    /// The key host could not be reached (down, refused, timed out).
    #[error("the key host is unavailable: {0}")]
    Unavailable(String),
    /// The key host answered with an error.
    #[error("the key host refused ({status}, {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable error code.
        code: String,
        /// Its message.
        message: String,
    },
}

impl KeyHostError {
    /// The stable code of a refusal, or `key_host_unavailable`.
    pub fn code(&self) -> &str {
        match self {
            Self::Unavailable(_) => "key_host_unavailable",
            Self::Refused { code, .. } => code,
        }
    }
}

/// A mutual-TLS client of one key host.
#[derive(Clone, Debug)]
pub struct KeyHostClient {
    http: reqwest::Client,
    base: String,
}

impl KeyHostClient {
    /// A client of `base` (e.g. `https://127.0.0.1:7443`) trusting `ca` and
    /// presenting the certificate `cert` / `key`. Connecting gives up after
    /// 2 s and a call after 15 s, so callers fail fast when the key host is down.
    pub fn new(base: &str, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let tls = client_config(ca, Some((cert, key)))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, KeyHostError> {
        let response = self.send(request).await?;
        response
            .json()
            .await
            .map_err(|e| KeyHostError::Unavailable(format!("unreadable answer: {e}")))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, KeyHostError> {
        let response = request
            .send()
            .await
            .map_err(|e| KeyHostError::Unavailable(describe(&e)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let (code, message) = match response.json::<ErrorBody>().await {
            Ok(body) => (body.error.code, body.error.message),
            Err(_) => (status_code(status).into(), status.to_string()),
        };
        Err(KeyHostError::Refused {
            status: status.as_u16(),
            code,
            message,
        })
    }

    /// Creates a KEK and returns its id.
    pub async fn create_kek(&self) -> Result<String, KeyHostError> {
        let created: CreatedKek = self
            .call(self.http.post(format!("{}/v1/keks", self.base)))
            .await?;
        Ok(created.kek)
    }

    /// Generates a record's keys under `kek`.
    pub async fn generate(&self, kek: &str) -> Result<KeyMaterial, KeyHostError> {
        let body = GenerateRequest {
            kek: kek.to_owned(),
        };
        self.call(
            self.http
                .post(format!("{}/v1/data-keys", self.base))
                .json(&body),
        )
        .await
    }

    /// Opens a record's keys.
    pub async fn open(&self, key_ref: KeyRefId) -> Result<KeyMaterial, KeyHostError> {
        let body = OpenRequest { key_ref };
        self.call(
            self.http
                .post(format!("{}/v1/data-keys/open", self.base))
                .json(&body),
        )
        .await
    }

    /// Deletes a record's keys.
    pub async fn delete(&self, key_ref: KeyRefId) -> Result<(), KeyHostError> {
        self.send(
            self.http
                .delete(format!("{}/v1/data-keys/{key_ref}", self.base)),
        )
        .await
        .map(drop)
    }

    /// Adds a version to a KEK (maintenance role).
    pub async fn rotate_kek(&self, kek: &str) -> Result<u32, KeyHostError> {
        let answer: VersionAnswer = self
            .call(
                self.http
                    .post(format!("{}/v1/keks/{kek}/rotate", self.base)),
            )
            .await?;
        Ok(answer.version)
    }

    /// Rewraps a record's keys under the newest version of their KEK (maintenance role).
    pub async fn rewrap(&self, key_ref: KeyRefId) -> Result<u32, KeyHostError> {
        let answer: VersionAnswer = self
            .call(
                self.http
                    .post(format!("{}/v1/data-keys/{key_ref}/rewrap", self.base)),
            )
            .await?;
        Ok(answer.version)
    }

    /// Destroys a KEK in the device, then its rows (maintenance role).
    pub async fn destroy_kek(&self, kek: &str) -> Result<(), KeyHostError> {
        self.send(self.http.delete(format!("{}/v1/keks/{kek}", self.base)))
            .await
            .map(drop)
    }

    /// Rewraps up to 1,000 rows of `kek` under its newest version; when none
    /// is left under an older one, destroys the older versions (maintenance
    /// role). Call again while `remaining` > 0.
    pub async fn retire_old_versions(&self, kek: &str) -> Result<RetireAnswer, KeyHostError> {
        self.call(
            self.http
                .post(format!("{}/v1/keks/{kek}/retire", self.base))
                .timeout(Duration::from_secs(3600)),
        )
        .await
    }

    /// MACs of `inputs` (32-byte keyed hashes, hex) under the linking key of
    /// `kek`, hex, in order (encryption-host role).
    pub async fn link(&self, kek: &str, inputs: Vec<String>) -> Result<Vec<String>, KeyHostError> {
        let answer: LinkAnswer = self
            .call(
                self.http
                    .post(format!("{}/v1/keks/{kek}/link", self.base))
                    .json(&LinkRequest { inputs }),
            )
            .await?;
        Ok(answer.macs)
    }

    /// Whether the key host, its DB and its device answer.
    pub async fn health(&self) -> Result<(), KeyHostError> {
        self.send(self.http.get(format!("{}/v1/health", self.base)))
            .await
            .map(drop)
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        // The chain carries the TLS reason (e.g. a refused certificate).
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    }
}

fn status_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        _ => "error",
    }
}
