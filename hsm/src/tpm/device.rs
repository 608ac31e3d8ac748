//! The one connection to the TPM: key templates, the persistent roots, and
//! thin wrappers around the few commands Coffer uses. tss-esapi errors are
//! translated here, once, into [`Error::Device`].
//!
//! There is no resource manager in front of swtpm (and none is assumed in
//! front of a hardware TPM), so the TPM has only three transient object
//! slots, shared by every connection. Every handle loaded here is flushed by
//! the caller; a persistent key also borrows a slot for the length of each
//! command that uses it.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::TctiNameConf;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, EccParameter, EccPoint, KeyedHashScheme, MaxBuffer, Private, Public,
    PublicBuilder, PublicEccParameters, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use super::store::KekBlobs;
use crate::error::{Error, Result};
use crate::types::random_array;

/// Persistent handle of Coffer's storage root P ("C0F" for Coffer), in the
/// owner's persistent range (0x81000000–0x817FFFFF).
pub(crate) const STORAGE_ROOT_HANDLE: u32 = 0x8100_0C0F;
/// First persistent handle file roots R may occupy. Each rotation moves R to
/// the next free handle of this range, cyclically.
pub(crate) const FILE_ROOT_FIRST: u32 = 0x8100_0C10;
/// Last persistent handle file roots R may occupy.
pub(crate) const FILE_ROOT_LAST: u32 = 0x8100_0CFF;

/// Length of an HMAC-SHA256 output.
pub(crate) const HMAC_LEN: usize = 32;

/// An HMAC output used as a single-use key; zeroized on drop.
pub(crate) type Secret32 = Zeroizing<[u8; HMAC_LEN]>;

/// Translates a tss-esapi error, naming the TPM command that failed.
fn tss(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> Error {
    move |e| Error::Device {
        op,
        detail: e.to_string(),
    }
}

/// The TPM connection and the ESYS handle of the storage root.
pub(crate) struct Tpm {
    ctx: Context,
    storage_root: KeyHandle,
}

impl Tpm {
    /// Connects through `tcti` and makes sure the storage root P exists,
    /// creating it on first use.
    pub(crate) fn connect(tcti: &str) -> Result<Self> {
        let unavailable = |reason: String| Error::Unavailable {
            what: tcti.to_owned(),
            reason,
        };
        let conf = TctiNameConf::from_str(tcti)
            .map_err(|e| unavailable(format!("not a TCTI configuration: {e}")))?;
        let mut ctx = Context::new(conf).map_err(|e| unavailable(e.to_string()))?;
        let storage_root = open_or_create_storage_root(&mut ctx)?;
        Ok(Self { ctx, storage_root })
    }

    /// Handles present in the TPM within `first..=last` (one handle type).
    pub(crate) fn handles(&mut self, first: u32, last: u32) -> Result<Vec<u32>> {
        handles(&mut self.ctx, first, last)
    }

    /// The ESYS handle of the file root at `handle`, after checking that
    /// the object there has the file-root template. `None` if the handle is
    /// empty.
    pub(crate) fn open_file_root(&mut self, handle: u32) -> Result<Option<ObjectHandle>> {
        if !self.handles(handle, handle)?.contains(&handle) {
            return Ok(None);
        }
        let object = open_persistent(&mut self.ctx, handle)?;
        let (public, _, _) = self
            .ctx
            .execute_without_session(|ctx| ctx.read_public(object.into()))
            .map_err(tss("TPM2_ReadPublic"))?;
        if !is_hmac_key(&public) {
            return Err(Error::State(format!(
                "persistent handle {handle:#010x} holds an object that is not a Coffer file root"
            )));
        }
        Ok(Some(object))
    }

    /// Creates a new file root R at the empty persistent `handle`.
    ///
    /// R is a primary HMAC key whose template carries a random `unique`
    /// field that is never stored: once R is evicted it can never be
    /// recreated, and neither can any key derived from it.
    pub(crate) fn create_file_root(&mut self, handle: u32) -> Result<ObjectHandle> {
        let unique: Zeroizing<[u8; 32]> = Zeroizing::new(random_array()?);
        let template = hmac_template(Digest::try_from(&unique[..]).map_err(tss("template"))?)?;
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(tss("TPM2_CreatePrimary"))?;
        make_persistent(&mut self.ctx, created.key_handle, handle)
    }

    /// Removes the persistent object `object` (at `handle`) from the TPM.
    pub(crate) fn evict(&mut self, object: ObjectHandle, handle: u32) -> Result<()> {
        let persistent = Persistent::Persistent(
            PersistentTpmHandle::new(handle).map_err(tss("EvictControl handle"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, object, persistent)
            })
            .map_err(tss("TPM2_EvictControl"))?;
        Ok(())
    }

    /// Creates a new HMAC-SHA256 KEK under the storage root and returns its
    /// blobs: the marshalled public area and the private area, which only
    /// this TPM's storage root can decrypt.
    pub(crate) fn create_kek(&mut self) -> Result<KekBlobs> {
        let template = hmac_template(Digest::default())?;
        let parent = self.storage_root;
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create(parent, template, None, None, None, None)
            })
            .map_err(tss("TPM2_Create"))?;
        let public = created
            .out_public
            .marshall()
            .map_err(tss("marshal public"))?;
        KekBlobs::pack(&public, created.out_private.value())
    }

    /// Loads a KEK from its blobs under the storage root. The caller must
    /// flush the returned handle.
    pub(crate) fn load(&mut self, blobs: &KekBlobs) -> Result<KeyHandle> {
        let (public, private) = blobs.unpack()?;
        let public = Public::unmarshall(public).map_err(tss("unmarshal public"))?;
        let private = Private::try_from(private).map_err(tss("unmarshal private"))?;
        if !is_hmac_key(&public) {
            return Err(Error::State(
                "key file holds a TPM key that is not an HMAC KEK".into(),
            ));
        }
        let parent = self.storage_root;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.load(parent, private, public)
            })
            .map_err(tss("TPM2_Load"))
    }

    /// Flushes a loaded KEK.
    pub(crate) fn flush(&mut self, key: KeyHandle) -> Result<()> {
        self.ctx
            .flush_context(key.into())
            .map_err(tss("TPM2_FlushContext"))
    }

    /// TPM2_HMAC(SHA-256) of `message` under `key`, which must fit in one
    /// TPM input buffer (see [`MAX_HMAC_INPUT`]).
    pub(crate) fn hmac(&mut self, key: ObjectHandle, message: &[u8]) -> Result<Secret32> {
        let buffer = MaxBuffer::try_from(message).map_err(tss("TPM2_HMAC input"))?;
        let digest = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.hmac(key, buffer, HashingAlgorithm::Sha256)
            })
            .map_err(tss("TPM2_HMAC"))?;
        let mut out = Zeroizing::new([0u8; HMAC_LEN]);
        if digest.value().len() != HMAC_LEN {
            return Err(Error::Device {
                op: "TPM2_HMAC",
                detail: format!(
                    "returned {} bytes instead of {HMAC_LEN}",
                    digest.value().len()
                ),
            });
        }
        out.copy_from_slice(digest.value());
        Ok(out)
    }

    /// 32 bytes from the TPM's RNG.
    pub(crate) fn random32(&mut self) -> Result<Secret32> {
        let mut out = Zeroizing::new([0u8; 32]);
        let mut filled = 0;
        // TPM2_GetRandom may return fewer bytes than asked; it refuses to
        // run under a password session, hence no session.
        while filled < out.len() {
            let chunk = self
                .ctx
                .execute_without_session(|ctx| ctx.get_random(out.len() - filled))
                .map_err(tss("TPM2_GetRandom"))?;
            let take = chunk.value().len().min(out.len() - filled);
            if take == 0 {
                return Err(Error::Device {
                    op: "TPM2_GetRandom",
                    detail: "returned no bytes".into(),
                });
            }
            out[filled..filled + take].copy_from_slice(&chunk.value()[..take]);
            filled += take;
        }
        Ok(out)
    }
}

/// Largest message one TPM2_HMAC accepts (TPM2B_MAX_BUFFER).
pub(crate) const MAX_HMAC_INPUT: usize = MaxBuffer::MAX_SIZE;

/// Template of every HMAC key: KEK versions (`unique` empty, ignored by
/// TPM2_Create) and file roots (`unique` random, part of the primary
/// derivation). `no_da` because a crash of the TPM's host must not lock us
/// out; fixedTPM and fixedParent so the key can never be duplicated.
fn hmac_template(unique: Digest) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(tss("template"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(
            KeyedHashScheme::HMAC_SHA_256,
        ))
        .with_keyed_hash_unique_identifier(unique)
        .build()
        .map_err(tss("template"))
}

fn is_hmac_key(public: &Public) -> bool {
    match public {
        Public::KeyedHash {
            object_attributes: a,
            parameters,
            ..
        } => {
            *parameters == PublicKeyedHashParameters::new(KeyedHashScheme::HMAC_SHA_256)
                && a.fixed_tpm()
                && a.fixed_parent()
                && a.sign_encrypt()
                && !a.decrypt()
                && !a.restricted()
        }
        _ => false,
    }
}

fn storage_parameters() -> Result<PublicEccParameters> {
    PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(tss("template"))
}

/// Template of the storage root P: an ECC P-256 restricted decryption key
/// with AES-128-CFB for its children (the TCG's recommended SRK shape,
/// present on every PC-client TPM), with a random `unique` so it cannot be
/// re-derived from its template by anyone else.
fn storage_root_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tss("template"))?;
    let x: Zeroizing<[u8; 32]> = Zeroizing::new(random_array()?);
    let y: Zeroizing<[u8; 32]> = Zeroizing::new(random_array()?);
    let unique = EccPoint::new(
        EccParameter::try_from(&x[..]).map_err(tss("template"))?,
        EccParameter::try_from(&y[..]).map_err(tss("template"))?,
    );
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(storage_parameters()?)
        .with_ecc_unique_identifier(unique)
        .build()
        .map_err(tss("template"))
}

fn is_storage_root(public: &Public) -> Result<bool> {
    let expected = storage_parameters()?;
    Ok(match public {
        Public::Ecc {
            object_attributes: a,
            parameters,
            ..
        } => {
            *parameters == expected
                && a.fixed_tpm()
                && a.fixed_parent()
                && a.restricted()
                && a.decrypt()
                && !a.sign_encrypt()
        }
        _ => false,
    })
}

fn open_or_create_storage_root(ctx: &mut Context) -> Result<KeyHandle> {
    let present = handles(ctx, STORAGE_ROOT_HANDLE, STORAGE_ROOT_HANDLE)?;
    if present.contains(&STORAGE_ROOT_HANDLE) {
        let object = open_persistent(ctx, STORAGE_ROOT_HANDLE)?;
        let (public, _, _) = ctx
            .execute_without_session(|ctx| ctx.read_public(object.into()))
            .map_err(tss("TPM2_ReadPublic"))?;
        if !is_storage_root(&public)? {
            return Err(Error::State(format!(
                "persistent handle {STORAGE_ROOT_HANDLE:#010x} holds an object that is not \
                 Coffer's storage root"
            )));
        }
        return Ok(object.into());
    }
    tracing::info!(
        handle = format_args!("{STORAGE_ROOT_HANDLE:#010x}"),
        "creating the TPM storage root"
    );
    let template = storage_root_template()?;
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
        })
        .map_err(tss("TPM2_CreatePrimary"))?;
    Ok(make_persistent(ctx, created.key_handle, STORAGE_ROOT_HANDLE)?.into())
}

/// Copies the transient `key` to the persistent `handle`, then flushes the
/// transient copy whatever happened.
fn make_persistent(ctx: &mut Context, key: KeyHandle, handle: u32) -> Result<ObjectHandle> {
    let persisted = PersistentTpmHandle::new(handle)
        .map_err(tss("EvictControl handle"))
        .and_then(|h| {
            ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, key.into(), Persistent::Persistent(h))
            })
            .map_err(tss("TPM2_EvictControl"))
        });
    let flushed = ctx
        .flush_context(key.into())
        .map_err(tss("TPM2_FlushContext"));
    let persisted = persisted?;
    flushed?;
    Ok(persisted)
}

fn open_persistent(ctx: &mut Context, handle: u32) -> Result<ObjectHandle> {
    let tpm_handle = PersistentTpmHandle::new(handle).map_err(tss("TR_FromTPMPublic handle"))?;
    ctx.execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
        .map_err(tss("TR_FromTPMPublic"))
}

fn handles(ctx: &mut Context, first: u32, last: u32) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    let mut next = first;
    loop {
        let (data, more) = ctx
            .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, next, 64))
            .map_err(tss("TPM2_GetCapability"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(Error::Device {
                op: "TPM2_GetCapability",
                detail: "did not return a handle list".into(),
            });
        };
        let handles: Vec<u32> = list.into_inner().into_iter().map(u32::from).collect();
        let Some(&highest) = handles.last() else {
            return Ok(found);
        };
        found.extend(handles.into_iter().filter(|h| (first..=last).contains(h)));
        if !more || highest >= last {
            return Ok(found);
        }
        next = highest + 1;
    }
}
