//! Identifiers, key material and capability flags shared by every backend.

use std::fmt;

use data_encoding::BASE32_NOPAD;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Length of every data key, in bytes (AES-256 and HMAC-SHA256 alike).
pub const DATA_KEY_LEN: usize = 32;

/// Opaque random id of a KEK: `kek_` and 128 random bits in base32.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KekId(String);

impl KekId {
    const PREFIX: &'static str = "kek_";

    /// A fresh id from the operating system's RNG.
    pub fn random() -> Result<Self> {
        let bytes: [u8; 16] = random_array()?;
        Ok(Self(format!(
            "{}{}",
            Self::PREFIX,
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        )))
    }

    /// Parses an id previously produced by [`KekId::random`].
    pub fn parse(s: &str) -> Result<Self> {
        let body = s
            .strip_prefix(Self::PREFIX)
            .ok_or(Error::MalformedId("KEK id must start with kek_"))?;
        let decoded = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| Error::MalformedId("KEK id is not base32"))?;
        if decoded.len() != 16 || body.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(Error::MalformedId(
                "KEK id must hold 128 bits in lower-case base32",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekId({})", self.0)
    }
}

/// Version of a KEK; the first is 1, each rotation adds one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KekVersion(pub u32);

impl KekVersion {
    /// The version every new KEK starts at.
    pub const FIRST: Self = Self(1);

    /// The version after this one.
    pub fn next(self) -> Result<Self> {
        self.0
            .checked_add(1)
            .map(Self)
            .ok_or(Error::State("KEK version counter exhausted".into()))
    }
}

impl fmt::Display for KekVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The caller's opaque reference to one wrapped data key. It is bound into
/// the wrapping as associated data, so a wrapped key copied under another
/// ref does not unwrap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyRef(Vec<u8>);

impl KeyRef {
    /// Wraps bytes the caller already holds (e.g. read back from its key DB).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// A fresh 128-bit random ref.
    pub fn random() -> Result<Self> {
        Ok(Self(random_array::<16>()?.to_vec()))
    }

    /// The ref's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({})", data_encoding::HEXLOWER.encode(&self.0))
    }
}

/// A plaintext data key. Zeroized on drop, never printed.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; DATA_KEY_LEN]>);

impl DataKey {
    pub(crate) fn from_slice(bytes: &[u8]) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        if bytes.len() != DATA_KEY_LEN {
            return Err(Error::MalformedWrappedKey(
                "unwrapped key has the wrong length",
            ));
        }
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    /// The key bytes, for handing straight to a cipher.
    pub fn expose(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// How a backend wraps data keys.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum WrapMechanism {
    /// `CKM_AES_GCM` inside the HSM, random 96-bit IV, AAD = (key ref, KEK id, version).
    Pkcs11AesGcm,
    /// A single-use wrapping key derived inside the TPM with `TPM2_HMAC` under
    /// the KEK (never leaving it), then AES-256-GCM with the same AAD.
    TpmHmacKdfAesGcm,
}

impl WrapMechanism {
    pub(crate) fn tag(self) -> u8 {
        match self {
            Self::Pkcs11AesGcm => 1,
            Self::TpmHmacKdfAesGcm => 2,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Result<Self> {
        match tag {
            1 => Ok(Self::Pkcs11AesGcm),
            2 => Ok(Self::TpmHmacKdfAesGcm),
            _ => Err(Error::MalformedWrappedKey("unknown wrapping mechanism")),
        }
    }
}

/// What a backend can and cannot do, for callers that plan around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Short backend name, e.g. `pkcs11` or `tpm`.
    pub backend: &'static str,
    /// The wrapping mechanism in use.
    pub wrap_mechanism: WrapMechanism,
    /// True when the wrapping itself runs inside the device; false when the
    /// device only derives a single-use wrapping key (TPM).
    pub wraps_inside_device: bool,
    /// True when several calls may run in the device at once; false when the
    /// device serialises them (a TPM has one command queue).
    pub concurrent_operations: bool,
    /// Rough ceiling of wrap or unwrap operations per second, for planning
    /// batch jobs and rate limits (a hardware TPM manages only hundreds).
    pub approx_ops_per_sec: u32,
    /// Wraps one KEK version accepts before it refuses and must be rotated.
    pub wrap_limit: u64,
    /// True when destroying a KEK also invalidates copies of any key file
    /// taken before (TPM: the root key is rotated). PKCS#11 keys have no file
    /// outside the device, but a vendor backup may still hold them.
    pub destroy_invalidates_copies: bool,
}

/// A KEK and its live versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekInfo {
    /// The KEK's id.
    pub id: KekId,
    /// Live versions, oldest first; new wraps use the last.
    pub versions: Vec<KekVersion>,
}

impl KekInfo {
    /// The version new wraps use.
    pub fn current(&self) -> Option<KekVersion> {
        self.versions.last().copied()
    }
}

/// A data key wrapped under one KEK version. `bytes` is self-describing
/// (format version, mechanism, IV or nonce, ciphertext and tag) and is the
/// only form of a data key that may be stored.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WrappedKey {
    /// The KEK that wrapped it.
    pub kek: KekId,
    /// The KEK version that wrapped it.
    pub version: KekVersion,
    /// The wrapped bytes.
    pub bytes: Vec<u8>,
}

/// Format version of [`WrappedKey::bytes`].
pub(crate) const WRAPPED_FORMAT_V1: u8 = 1;

impl WrappedKey {
    /// Builds the stored form: `[format][mechanism][nonce][sealed]`.
    pub(crate) fn seal(
        kek: &KekId,
        version: KekVersion,
        mechanism: WrapMechanism,
        nonce: &[u8],
        sealed: &[u8],
    ) -> Self {
        let mut bytes = Vec::with_capacity(2 + nonce.len() + sealed.len());
        bytes.push(WRAPPED_FORMAT_V1);
        bytes.push(mechanism.tag());
        bytes.extend_from_slice(nonce);
        bytes.extend_from_slice(sealed);
        Self {
            kek: kek.clone(),
            version,
            bytes,
        }
    }

    /// Splits the stored form after checking its format and mechanism.
    pub(crate) fn open(&self, expected: WrapMechanism, nonce_len: usize) -> Result<(&[u8], &[u8])> {
        let [format, mechanism, rest @ ..] = self.bytes.as_slice() else {
            return Err(Error::MalformedWrappedKey("too short"));
        };
        if *format != WRAPPED_FORMAT_V1 {
            return Err(Error::MalformedWrappedKey("unknown format version"));
        }
        if WrapMechanism::from_tag(*mechanism)? != expected {
            return Err(Error::MalformedWrappedKey(
                "wrapped by another mechanism than this backend's",
            ));
        }
        if rest.len() != nonce_len + DATA_KEY_LEN + 16 {
            return Err(Error::MalformedWrappedKey("wrong length"));
        }
        Ok(rest.split_at(nonce_len))
    }
}

pub(crate) fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| Error::Device {
        op: "getrandom",
        detail: e.to_string(),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_ids_are_random_and_parse_back() {
        let a = KekId::random().unwrap();
        let b = KekId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(KekId::parse(a.as_str()).unwrap(), a);
        assert!(a.as_str().starts_with("kek_"));
    }

    #[test]
    fn malformed_kek_ids_are_refused() {
        for bad in [
            "",
            "kek_",
            "key_aaaa",
            "kek_!!!!",
            "kek_AAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                matches!(KekId::parse(bad), Err(Error::MalformedId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn data_keys_never_print() {
        let key = DataKey::from_slice(&[7u8; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "DataKey(<redacted>)");
    }

    #[test]
    fn wrapped_key_framing_round_trips_and_rejects_others() {
        let kek = KekId::random().unwrap();
        let w = WrappedKey::seal(
            &kek,
            KekVersion(3),
            WrapMechanism::Pkcs11AesGcm,
            &[1; 12],
            &[2; 48],
        );
        let (nonce, sealed) = w.open(WrapMechanism::Pkcs11AesGcm, 12).unwrap();
        assert_eq!((nonce, sealed), (&[1u8; 12][..], &[2u8; 48][..]));
        assert!(w.open(WrapMechanism::TpmHmacKdfAesGcm, 12).is_err());
        let mut short = w.clone();
        short.bytes.pop();
        assert!(matches!(
            short.open(WrapMechanism::Pkcs11AesGcm, 12),
            Err(Error::MalformedWrappedKey(_))
        ));
    }
}
