//! KEKs in a PKCS#11 token (a network HSM in production, SoftHSM in
//! development), through `cryptoki`.
//!
//! Each KEK version is an AES-256 key generated on the token (`CKA_TOKEN`,
//! `CKA_SENSITIVE`, never extractable, encrypt/decrypt only). Data keys come
//! from `C_GenerateRandom` and are sealed inside the token with `CKM_AES_GCM`
//! under a random 96-bit IV, with AAD = (key ref, KEK id, KEK version).
//! Tokens without `CKM_AES_GCM` are refused for now (the KWP fallback is not
//! written yet).

mod errors;
pub mod gcm;
mod module;
pub use module::shared_module;
mod objects;
mod pool;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::aad::wrap_aad;
use crate::budget::{DEFAULT_WRAP_LIMIT, WrapBudget, next_block};
use crate::error::{Error, Result};
use crate::types::{
    Capabilities, DATA_KEY_LEN, DataKey, KekId, KekInfo, KekVersion, KeyRef, WrapMechanism,
    WrappedKey,
};
use crate::{KekBackend, LINK_MAC_DOMAIN, LINK_MAC_LEN};

use errors::{ck, rv};
use pool::SessionPool;

/// IV length of every seal: 96 bits, the only length the path uses.
pub const IV_LEN: usize = 12;

/// Where the token's user PIN comes from. Never logged; `Debug` hides it.
#[derive(Clone)]
pub enum PinSource {
    /// The PIN itself (tests, or a caller that already read it).
    Value(SecretString),
    /// A file holding the PIN (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("PinSource::Value(<redacted>)"),
            Self::File(path) => write!(f, "PinSource::File({})", path.display()),
            Self::Env(name) => write!(f, "PinSource::Env({name})"),
        }
    }
}

impl PinSource {
    fn read(&self) -> Result<SecretString> {
        match self {
            Self::Value(pin) => Ok(pin.clone()),
            Self::File(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    Error::PinSource(format!("cannot read PIN file {}: {e}", path.display()))
                })?);
                let pin = text.strip_suffix('\n').unwrap_or(&text);
                let pin = pin.strip_suffix('\r').unwrap_or(pin);
                Ok(SecretString::from(pin))
            }
            Self::Env(name) => std::env::var(name)
                .map(SecretString::from)
                .map_err(|_| Error::PinSource(format!("environment variable {name} is not set"))),
        }
    }
}

/// How to reach the token.
#[derive(Clone, Debug)]
pub struct Pkcs11Config {
    /// Path of the vendor's PKCS#11 module (`libsofthsm2.so` in development).
    pub module: PathBuf,
    /// Label of the token holding Coffer's KEKs.
    pub token_label: String,
    /// The user PIN.
    pub pin: PinSource,
    /// Sessions kept open for concurrent calls (default 4).
    pub sessions: usize,
    /// Wraps one KEK version accepts before it must be rotated.
    pub wrap_limit: u64,
    /// Rough ceiling of operations per second reported in [`Capabilities`];
    /// the default is what SoftHSM 2.6 manages on one core.
    pub approx_ops_per_sec: u32,
}

impl Pkcs11Config {
    /// A configuration with the defaults for everything but where the token is.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: PinSource) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            sessions: 4,
            wrap_limit: DEFAULT_WRAP_LIMIT,
            approx_ops_per_sec: 30_000,
        }
    }
}

type VersionKey = (KekId, KekVersion);

/// A [`KekBackend`] over one PKCS#11 token.
pub struct Pkcs11Backend {
    label: String,
    pool: SessionPool,
    wrap_limit: u64,
    approx_ops_per_sec: u32,
    /// Object handles of KEK versions seen so far (token objects keep their
    /// handle across sessions); dropped when a call finds one stale.
    handles: RwLock<HashMap<VersionKey, ObjectHandle>>,
    /// Newest version of each KEK and when it was read. Another process
    /// (another key host on the same HSM) may rotate meanwhile, so the
    /// entry is read again from the token after [`CURRENT_TTL`]: callers
    /// that destroy an old version wait longer than that after rotating.
    current: RwLock<HashMap<KekId, (KekVersion, Instant)>>,
    budgets: Mutex<HashMap<VersionKey, Arc<Mutex<WrapBudget>>>>,
    /// Object handles of linking keys.
    links: RwLock<HashMap<KekId, ObjectHandle>>,
    /// Serialises rotations so two never mint the same version.
    rotation: Mutex<()>,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("token", &self.label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Loads the module, finds the token by label, checks it can do
    /// `CKM_AES_GCM` and logs in.
    pub fn open(config: &Pkcs11Config) -> Result<Self> {
        let module = module::module(&config.module)?;
        let slot = find_token(&module.context, &config.token_label)?;
        require_gcm(&module.context, slot)?;
        let pin = config.pin.read()?;
        let session = module
            .context
            .open_rw_session(slot)
            .map_err(ck("C_OpenSession"))?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e)
                if matches!(
                    rv(&e),
                    Some(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange)
                ) =>
            {
                return Err(Error::WrongPin {
                    label: config.token_label.clone(),
                });
            }
            Err(e) => return Err(ck("C_Login")(e)),
        }
        Ok(Self {
            label: config.token_label.clone(),
            pool: SessionPool::new(&module, slot, config.sessions, session),
            wrap_limit: config.wrap_limit,
            approx_ops_per_sec: config.approx_ops_per_sec,
            handles: RwLock::default(),
            current: RwLock::default(),
            budgets: Mutex::default(),
            links: RwLock::default(),
            rotation: Mutex::new(()),
        })
    }

    /// Runs `op` with the object handle of a KEK version, looking it up once
    /// more if the cached handle went stale (destroyed by another process).
    fn with_kek<T>(
        &self,
        kek: &KekId,
        version: KekVersion,
        op: impl Fn(&Session, ObjectHandle) -> Result<T>,
    ) -> Result<T> {
        let key = (kek.clone(), version);
        let cached = read(&self.handles).get(&key).copied();
        if let Some(handle) = cached {
            let result = self.pool.with(|s| op(s, handle));
            if !matches!(&result, Err(e) if errors::is_stale(e)) {
                return result;
            }
            write(&self.handles).remove(&key);
        }
        let handle = self.pool.with_objects(|session| {
            objects::find_version(session, kek, version)?
                .ok_or_else(|| missing(session, kek, version))
        })?;
        write(&self.handles).insert(key, handle);
        self.pool.with(|session| op(session, handle))
    }

    /// The newest version of a KEK: cached, or read from the token.
    fn current_version(&self, kek: &KekId) -> Result<KekVersion> {
        if let Some((version, read_at)) = read(&self.current).get(kek)
            && read_at.elapsed() < CURRENT_TTL
        {
            return Ok(*version);
        }
        let version = self
            .pool
            .with_objects(|session| objects::versions(session, kek))?
            .last()
            .copied()
            .ok_or_else(|| Error::UnknownKek { kek: kek.clone() })?;
        write(&self.current).insert(kek.clone(), (version, Instant::now()));
        Ok(version)
    }

    /// Counts one wrap under a KEK version, or refuses past the limit.
    fn take_wrap(&self, kek: &KekId, version: KekVersion) -> Result<()> {
        let budget = lock(&self.budgets)
            .entry((kek.clone(), version))
            .or_default()
            .clone();
        let mut budget = lock(&budget);
        let reserve = |block| {
            self.pool.with_objects(|session| {
                // A version without its key is gone: never mint a counter for it.
                objects::find_version(session, kek, version)?
                    .ok_or_else(|| missing(session, kek, version))?;
                objects::advance_counter(session, kek, version, |mark| {
                    next_block(mark, block, self.wrap_limit)
                })
            })
        };
        budget
            .take(self.wrap_limit, reserve)?
            .map_err(|_| Error::WrapLimitReached {
                kek: kek.clone(),
                version,
                limit: self.wrap_limit,
            })
    }

    fn seal_under(
        &self,
        kek: &KekId,
        version: KekVersion,
        key_ref: &KeyRef,
        key: &[u8],
    ) -> Result<WrappedKey> {
        self.take_wrap(kek, version)?;
        let aad = wrap_aad(key_ref, kek, version);
        self.with_kek(kek, version, |session, handle| {
            let mut iv = [0u8; IV_LEN];
            session
                .generate_random_slice(&mut iv)
                .map_err(ck("C_GenerateRandom"))?;
            let sealed = gcm::seal(session, handle, &iv, &aad, key)?;
            Ok(WrappedKey::seal(
                kek,
                version,
                WrapMechanism::Pkcs11AesGcm,
                &iv,
                &sealed,
            ))
        })
    }

    fn new_version(&self, session: &Session, kek: &KekId, version: KekVersion) -> Result<()> {
        let handle = session
            .generate_key(&Mechanism::AesKeyGen, &objects::kek_template(kek, version))
            .map_err(ck("C_GenerateKey"))?;
        session
            .create_object(&objects::counter_template(kek, version, 0))
            .map_err(ck("C_CreateObject"))?;
        write(&self.handles).insert((kek.clone(), version), handle);
        write(&self.current).insert(kek.clone(), (version, Instant::now()));
        Ok(())
    }

    fn forget(&self, kek: &KekId, version: Option<KekVersion>) {
        let hit = |k: &VersionKey| &k.0 == kek && version.is_none_or(|v| k.1 == v);
        write(&self.handles).retain(|k, _| !hit(k));
        lock(&self.budgets).retain(|k, _| !hit(k));
        write(&self.current).remove(kek);
        if version.is_none() {
            write(&self.links).remove(kek);
        }
    }
}

impl KekBackend for Pkcs11Backend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            backend: "pkcs11",
            wrap_mechanism: WrapMechanism::Pkcs11AesGcm,
            wraps_inside_device: true,
            concurrent_operations: true,
            approx_ops_per_sec: self.approx_ops_per_sec,
            wrap_limit: self.wrap_limit,
            destroy_invalidates_copies: false,
        }
    }

    fn create_kek(&self) -> Result<KekInfo> {
        let id = KekId::random()?;
        self.pool.with_objects(|session| {
            session
                .generate_key(
                    &Mechanism::GenericSecretKeyGen,
                    &objects::link_template(&id),
                )
                .map_err(ck("C_GenerateKey"))?;
            self.new_version(session, &id, KekVersion::FIRST)
        })?;
        Ok(KekInfo {
            id,
            versions: vec![KekVersion::FIRST],
        })
    }

    fn rotate_kek(&self, kek: &KekId) -> Result<KekVersion> {
        let _one_at_a_time = lock(&self.rotation);
        let next = self.current_version(kek)?.next()?;
        self.pool
            .with_objects(|session| self.new_version(session, kek, next))?;
        Ok(next)
    }

    fn generate_data_key(&self, kek: &KekId, key_ref: &KeyRef) -> Result<(DataKey, WrappedKey)> {
        let mut key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        self.pool.with(|session| {
            session
                .generate_random_slice(&mut key[..])
                .map_err(ck("C_GenerateRandom"))
        })?;
        let version = self.current_version(kek)?;
        let wrapped = match self.seal_under(kek, version, key_ref, &key[..]) {
            // Destroyed by another process since it was read: read again.
            Err(Error::UnknownKekVersion { .. }) => {
                write(&self.current).remove(kek);
                let version = self.current_version(kek)?;
                self.seal_under(kek, version, key_ref, &key[..])?
            }
            other => other?,
        };
        Ok((DataKey::from_slice(&key[..])?, wrapped))
    }

    fn unwrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef) -> Result<DataKey> {
        let (iv, sealed) = wrapped.open(WrapMechanism::Pkcs11AesGcm, IV_LEN)?;
        let aad = wrap_aad(key_ref, &wrapped.kek, wrapped.version);
        let key = self.with_kek(&wrapped.kek, wrapped.version, |session, handle| {
            gcm::open(session, handle, iv, &aad, sealed)
        })?;
        DataKey::from_slice(&key)
    }

    fn rewrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef, to: KekVersion) -> Result<WrappedKey> {
        let key = self.unwrap(wrapped, key_ref)?;
        self.seal_under(&wrapped.kek, to, key_ref, key.expose())
    }

    fn list_keks(&self) -> Result<Vec<KekInfo>> {
        let mut keks: BTreeMap<KekId, Vec<KekVersion>> = BTreeMap::new();
        self.pool.with_objects(|session| {
            let keys = session
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(ck("C_FindObjects"))?;
            for key in keys {
                if let Some((id, version)) = objects::read_version_id(session, key)? {
                    keks.entry(id).or_default().push(version);
                }
            }
            Ok(())
        })?;
        Ok(keks
            .into_iter()
            .map(|(id, mut versions)| {
                versions.sort();
                KekInfo { id, versions }
            })
            .collect())
    }

    fn destroy_kek_version(&self, kek: &KekId, version: KekVersion) -> Result<()> {
        self.destroy(kek, Some(version))
    }

    fn destroy_kek(&self, kek: &KekId) -> Result<()> {
        self.destroy(kek, None)
    }

    fn link_mac(&self, kek: &KekId, message: &[u8]) -> Result<[u8; LINK_MAC_LEN]> {
        let input = [LINK_MAC_DOMAIN, message].concat();
        let sign = |session: &Session, key| {
            session
                .sign(&Mechanism::Sha256Hmac, key, &input)
                .map_err(ck("C_Sign"))
        };
        let cached = read(&self.links).get(kek).copied();
        let mac = match cached.map(|key| self.pool.with(|s| sign(s, key))) {
            Some(result) if !matches!(&result, Err(e) if errors::is_stale(e)) => result?,
            _ => {
                let key = self.pool.with_objects(|session| {
                    objects::find_link(session, kek)?.ok_or_else(|| {
                        if objects::versions(session, kek).is_ok_and(|v| v.is_empty()) {
                            Error::UnknownKek { kek: kek.clone() }
                        } else {
                            Error::Unsupported(
                                "this KEK has no linking key (it was made before linking keys existed)",
                            )
                        }
                    })
                })?;
                write(&self.links).insert(kek.clone(), key);
                self.pool.with(|s| sign(s, key))?
            }
        };
        mac.try_into().map_err(|_| Error::Device {
            op: "C_Sign",
            detail: "CKM_SHA256_HMAC returned a MAC that is not 32 bytes".into(),
        })
    }
}

impl Pkcs11Backend {
    fn destroy(&self, kek: &KekId, version: Option<KekVersion>) -> Result<()> {
        let _no_rotation_meanwhile = lock(&self.rotation);
        self.pool.with_objects(|session| {
            let objects = objects::all_objects(session, kek, version)?;
            let has_key = match version {
                Some(v) => objects::find_version(session, kek, v)?.is_some(),
                // Whatever is left of the KEK (its linking key included).
                None => !objects.is_empty(),
            };
            if !has_key {
                return Err(match version {
                    Some(v) => missing(session, kek, v),
                    None => Error::UnknownKek { kek: kek.clone() },
                });
            }
            for object in objects {
                session
                    .destroy_object(object)
                    .map_err(ck("C_DestroyObject"))?;
            }
            Ok(())
        })?;
        self.forget(kek, version);
        Ok(())
    }
}

/// How long a KEK's newest version is trusted before it is read again.
pub const CURRENT_TTL: Duration = Duration::from_secs(1);

/// The error for a KEK version that is not on the token.
fn missing(session: &Session, kek: &KekId, version: KekVersion) -> Error {
    match objects::versions(session, kek) {
        Ok(versions) if !versions.is_empty() => Error::UnknownKekVersion {
            kek: kek.clone(),
            version,
        },
        Ok(_) => Error::UnknownKek { kek: kek.clone() },
        Err(e) => e,
    }
}

fn find_token(module: &Pkcs11, label: &str) -> Result<Slot> {
    let slots = module.get_slots_with_token().map_err(ck("C_GetSlotList"))?;
    let mut matching = Vec::new();
    for slot in slots {
        let info = module.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(Error::TokenNotFound {
            label: label.into(),
        }),
        _ => Err(Error::State(format!(
            "{} tokens are labelled {label:?}",
            matching.len()
        ))),
    }
}

fn require_gcm(module: &Pkcs11, slot: Slot) -> Result<()> {
    let info = module
        .get_mechanism_info(slot, MechanismType::AES_GCM)
        .map_err(|_| {
            Error::Unsupported("the token lacks CKM_AES_GCM (the KWP fallback is not implemented)")
        })?;
    if !(info.encrypt() && info.decrypt()) {
        return Err(Error::Unsupported(
            "the token cannot encrypt and decrypt with CKM_AES_GCM",
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}
