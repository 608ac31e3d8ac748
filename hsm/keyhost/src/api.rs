//! The key host's wire types, shared by the server and its clients.

use std::fmt;

use data_encoding::{BASE64, HEXLOWER};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Roles a client certificate may carry.
pub mod roles {
    /// The encryption host: create KEKs; generate, open and delete data keys.
    pub const ENCRYPTION_HOST: &str = "encryption-host";
    /// The maintenance worker: rotate, rewrap and destroy KEKs.
    pub const MAINTENANCE: &str = "maintenance";
    /// The API host (a client of the encryption host, never of the key host).
    pub const API_HOST: &str = "api-host";
}

/// Format version of a data-key row and of [`KeyMaterial`].
pub const KEY_FORMAT_V1: u8 = 1;

/// A 256-bit secret on the wire: base64 in JSON, zeroized in memory, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret32(pub Zeroizing<[u8; 32]>);

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

impl Serialize for Secret32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let encoded = Zeroizing::new(BASE64.encode(&self.0[..]));
        s.serialize_str(&encoded)
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.as_bytes())
                .map_err(|_| serde::de::Error::custom("a secret is not base64"))?,
        );
        let mut out = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(serde::de::Error::custom("a secret must be 32 bytes"));
        }
        out.copy_from_slice(&bytes);
        Ok(Self(out))
    }
}

/// The key host's random id of one record's keys: 128 bits, hex on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRefId(pub [u8; 16]);

impl KeyRefId {
    /// A fresh random ref.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// Parses the hex form.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = HEXLOWER.decode(text.as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for KeyRefId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for KeyRefId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRefId({self})")
    }
}

impl Serialize for KeyRefId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyRefId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| serde::de::Error::custom("a key ref is 32 hex digits"))
    }
}

/// `POST /v1/keks` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedKek {
    /// The new KEK's id.
    pub kek: String,
}

/// `POST /v1/data-keys` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The KEK to wrap the new keys under.
    pub kek: String,
}

/// `POST /v1/data-keys/open` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct OpenRequest {
    /// The keys to open.
    pub key_ref: KeyRefId,
}

/// One record's keys in plaintext, as the encryption host receives them.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyMaterial {
    /// The key host's ref for these keys.
    pub key_ref: KeyRefId,
    /// The AES-256-GCM data key.
    pub enc_key: Secret32,
    /// The HMAC-SHA256 key.
    pub mac_key: Secret32,
    /// The 96-bit nonce (records) or nonce prefix (BLOB segments).
    pub nonce: [u8; 12],
    /// Row format version.
    pub format: u8,
}

/// `POST /v1/keks/{kek}/rotate` answer, and `.../rewrap` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct VersionAnswer {
    /// The KEK version now in use.
    pub version: u32,
}

/// Most inputs in one `POST /v1/keks/{kek}/link` call.
pub const MAX_LINK_INPUTS: usize = 1000;

/// `POST /v1/keks/{kek}/link` body: inputs to MAC under the KEK's linking
/// key, each 32 bytes in hex (already keyed hashes of the values, so the
/// key host never sees a value).
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkRequest {
    /// The inputs, hex.
    pub inputs: Vec<String>,
}

/// `POST /v1/keks/{kek}/link` answer: one MAC per input, in order, hex.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkAnswer {
    /// The MACs, hex.
    pub macs: Vec<String>,
}

/// `POST /v1/keks/{kek}/retire` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RetireAnswer {
    /// The version every key is now wrapped under.
    pub current: u32,
    /// Rows moved to it by this call.
    pub rewrapped: u64,
    /// Rows still under older versions (call again); versions are destroyed
    /// only by the call that leaves none.
    pub remaining: u64,
    /// Older versions destroyed in the device.
    pub destroyed: Vec<u32>,
}

/// Every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable code and a human message (never key material).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: String,
    /// What happened.
    pub message: String,
}
