//! KEKs kept by a TPM 2.0 (a hardware chip, or swtpm in development).
//!
//! # Design
//!
//! * **Storage root P** — an ECC P-256 restricted decryption key, primary in
//!   the owner hierarchy, persistent at `0x81000C0F`. Its template carries a
//!   random `unique` field that is never written down, so nobody can
//!   re-derive P from the owner seed. Created on first open; never rotated.
//! * **KEK versions** — each one is an HMAC-SHA256 key created under P
//!   (fixedTPM, fixedParent, noDA). Its blobs live outside the TPM, one
//!   file per version in the key folder (`<kek id>.v<N>.key`), and are
//!   loaded on demand. `TPM2_HMAC` is mandatory on every TPM, unlike
//!   `TPM2_EncryptDecrypt2`, which some hardware TPMs lack.
//! * **File root R** — key files are themselves sealed:
//!   `1 ‖ R's handle ‖ nonce ‖ AES-256-GCM_F(blobs)` with
//!   `F = HMAC_R("coffer/tpm-kek-file/v1" ‖ nonce ‖ KEK id ‖ version)`
//!   computed inside the TPM. R is a primary HMAC key with a random
//!   `unique`, persistent at a handle in `0x81000C10..=0x81000CFF` named by
//!   the `file-root.state` file. Destroying a KEK (or a version) deletes
//!   its files, moves every other key file to a fresh R', then evicts R:
//!   a copy of a destroyed key file taken earlier can no longer be opened.
//!   The rotation is written down before it starts, so an interrupted one
//!   is finished by the next [`TpmBackend::open`].
//! * **Data keys** — 32 bytes from `TPM2_GetRandom`. A wrap draws a 16-byte
//!   nonce N and derives a single-use key
//!   `W = HMAC_KEK("coffer/tpm-data-key/v1" ‖ N ‖ AAD)` inside the TPM;
//!   the data key is sealed with AES-256-GCM under W (zero IV: W is never
//!   reused) and the AAD binding the key ref, KEK id and version.
//! * **Wrap budget** — per KEK version, with its high-water mark persisted
//!   beside the key file (`<kek id>.v<N>.budget`).
//!
//! Every TPM call goes through one mutex: a TPM runs one command at a time,
//! and without a resource manager it has only three transient object slots
//! shared by every client, so at most two KEK versions stay loaded.
//!
//! One backend per key folder (enforced with an advisory lock).
//! Several key folders may share a TPM (each has its own file root), but
//! without a resource manager they compete for its three transient slots.

mod cache;
mod device;
mod seal;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tss_esapi::handles::{KeyHandle, ObjectHandle};

use self::cache::LoadedKeys;
use self::device::{FILE_ROOT_FIRST, FILE_ROOT_LAST, Secret32, Tpm};
use self::seal::DATA_KEY_NONCE_LEN;
use self::store::{KEY_FILE_NONCE_LEN, KekBlobs, KeyDir, RootState, parse_key_file};
use crate::aad::wrap_aad;
use crate::budget::{DEFAULT_WRAP_LIMIT, Exhausted, WrapBudget, next_block};
use crate::error::{Error, Result};
use crate::types::{
    Capabilities, DataKey, KekId, KekInfo, KekVersion, KeyRef, WrapMechanism, WrappedKey,
    random_array,
};
use crate::{KekBackend, LINK_MAC_DOMAIN, LINK_MAC_LEN};

/// How to reach the TPM and where to keep the key files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI configuration, e.g. `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// Folder of the key files (created with mode 0700 if missing). Its
    /// files are useless without this TPM, but losing them loses the KEKs:
    /// back it up.
    pub key_dir: PathBuf,
    /// Wraps one KEK version accepts before it must be rotated.
    pub wrap_limit: u64,
}

impl TpmConfig {
    /// A configuration with the default wrap limit.
    pub fn new(tcti: impl Into<String>, key_dir: impl Into<PathBuf>) -> Self {
        Self {
            tcti: tcti.into(),
            key_dir: key_dir.into(),
            wrap_limit: DEFAULT_WRAP_LIMIT,
        }
    }
}

/// A [`KekBackend`] whose KEKs are HMAC keys of a TPM 2.0.
///
/// The KEKs never leave the TPM in the clear; the TPM derives a single-use
/// key per wrap and the AES-GCM itself runs in software (hence
/// `wraps_inside_device: false` in [`Capabilities`]).
pub struct TpmBackend {
    inner: Mutex<Inner>,
    tcti: String,
    key_dir: PathBuf,
    wrap_limit: u64,
    /// Moving average of the device time of one wrap or unwrap, in ns.
    op_nanos: AtomicU64,
}

impl fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmBackend")
            .field("tcti", &self.tcti)
            .field("key_dir", &self.key_dir)
            .field("wrap_limit", &self.wrap_limit)
            .finish_non_exhaustive()
    }
}

/// Rounds of (GetRandom + HMAC) timed at open to seed the ops/s figure.
const PROBE_ROUNDS: u32 = 4;

/// Version 0 of every KEK is its linking key: an HMAC key like the others,
/// kept in a key file like the others (so destroying the KEK shreds it the
/// same way), but never used to wrap, never current and never rotated.
const LINK_KEY: KekVersion = KekVersion(0);
/// What the probe HMACs (under the file root, output discarded; the domain
/// differs from every key-file derivation).
const PROBE_MESSAGE: &[u8] = b"coffer/tpm-probe/v1";

impl TpmBackend {
    /// Connects to the TPM and opens the key folder: creates the storage
    /// root and the file root on first use, finishes a file-root rotation a
    /// crash interrupted, and indexes the key files.
    ///
    /// Fails with [`Error::Unavailable`] when the TCTI cannot connect, and
    /// with [`Error::State`] when the key folder and the TPM do not belong
    /// together (e.g. the TPM was cleared).
    pub fn open(config: TpmConfig) -> Result<Self> {
        let dir = KeyDir::open(&config.key_dir)?;
        let mut tpm = Tpm::connect(&config.tcti)?;
        let state = match dir.read_state()? {
            Some(state) => state,
            None => {
                if !dir.scan()?.is_empty() {
                    return Err(Error::State(format!(
                        "{} holds key files but no file-root state: cannot tell which TPM key \
                         protects them",
                        config.key_dir.display()
                    )));
                }
                let present = tpm.handles(FILE_ROOT_FIRST, FILE_ROOT_LAST)?;
                let state = RootState {
                    current: free_root_handle(&present, FILE_ROOT_LAST)?,
                    next: None,
                    destroy: Vec::new(),
                };
                // Written before R is created: the next open fills an empty
                // handle the state names, but never adopts one it doesn't.
                dir.write_state(&state)?;
                state
            }
        };
        let object = tpm.open_file_root(state.current)?;
        let mut inner = Inner {
            tpm,
            dir,
            root: FileRoot {
                handle: state.current,
                object,
            },
            index: BTreeMap::new(),
            loaded: LoadedKeys::default(),
            budgets: HashMap::new(),
            wrap_limit: config.wrap_limit,
            #[cfg(test)]
            crash_at: None,
        };
        if state.next.is_some() {
            tracing::warn!("finishing an interrupted TPM file-root rotation");
            inner.finish_rotation(state)?;
        }
        inner.load_index()?;
        let op_nanos = inner.probe()?;
        Ok(Self {
            inner: Mutex::new(inner),
            tcti: config.tcti,
            key_dir: config.key_dir,
            wrap_limit: config.wrap_limit,
            op_nanos: AtomicU64::new(op_nanos),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        // A panic halfway through a call may have left a TPM handle or the
        // index in an unknown state: refuse rather than guess.
        self.inner.lock().map_err(|_| {
            Error::State("TPM backend unusable after a panic in an earlier call".into())
        })
    }

    /// Runs one wrap or unwrap, folding its duration into the ops/s figure.
    fn timed<T>(&self, op: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut inner = self.lock()?;
        let started = Instant::now();
        let out = op(&mut inner)?;
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Exponential moving average over ~8 operations; racing updates
        // only blur an estimate.
        let old = self.op_nanos.load(Ordering::Relaxed);
        self.op_nanos
            .store(old - old / 8 + took / 8, Ordering::Relaxed);
        Ok(out)
    }

    #[cfg(test)]
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.lock().unwrap()
    }
}

impl KekBackend for TpmBackend {
    fn capabilities(&self) -> Capabilities {
        let nanos = self.op_nanos.load(Ordering::Relaxed).max(1);
        Capabilities {
            backend: "tpm",
            wrap_mechanism: WrapMechanism::TpmHmacKdfAesGcm,
            wraps_inside_device: false,
            concurrent_operations: false,
            approx_ops_per_sec: u32::try_from(1_000_000_000 / nanos)
                .unwrap_or(u32::MAX)
                .max(1),
            wrap_limit: self.wrap_limit,
            destroy_invalidates_copies: true,
        }
    }

    fn create_kek(&self) -> Result<KekInfo> {
        let mut inner = self.lock()?;
        let id = KekId::random()?;
        inner.new_version(&id, LINK_KEY)?;
        inner.new_version(&id, KekVersion::FIRST)?;
        Ok(KekInfo {
            id,
            versions: vec![KekVersion::FIRST],
        })
    }

    fn rotate_kek(&self, kek: &KekId) -> Result<KekVersion> {
        let mut inner = self.lock()?;
        let version = inner.current_version(kek)?.next()?;
        inner.new_version(kek, version)?;
        Ok(version)
    }

    fn generate_data_key(&self, kek: &KekId, key_ref: &KeyRef) -> Result<(DataKey, WrappedKey)> {
        self.timed(|inner| {
            let version = inner.current_version(kek)?;
            inner.take_wrap(kek, version)?;
            let key = inner.tpm.random32()?;
            let wrapped = inner.seal_data_key(kek, version, key_ref, &key)?;
            Ok((DataKey::from_slice(&key[..])?, wrapped))
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef) -> Result<DataKey> {
        self.timed(|inner| {
            let key = inner.open_data_key(wrapped, key_ref)?;
            DataKey::from_slice(&key[..])
        })
    }

    fn rewrap(&self, wrapped: &WrappedKey, key_ref: &KeyRef, to: KekVersion) -> Result<WrappedKey> {
        let mut inner = self.lock()?;
        inner.check(&wrapped.kek, to)?;
        let key = inner.open_data_key(wrapped, key_ref)?;
        inner.take_wrap(&wrapped.kek, to)?;
        inner.seal_data_key(&wrapped.kek, to, key_ref, &key)
    }

    fn list_keks(&self) -> Result<Vec<KekInfo>> {
        let inner = self.lock()?;
        Ok(inner
            .index
            .iter()
            .map(|(id, versions)| KekInfo {
                id: id.clone(),
                versions: versions
                    .iter()
                    .copied()
                    .filter(|v| *v != LINK_KEY)
                    .collect(),
            })
            .collect())
    }

    fn destroy_kek_version(&self, kek: &KekId, version: KekVersion) -> Result<()> {
        let mut inner = self.lock()?;
        inner.check(kek, version)?;
        inner.rotate_file_root(vec![(kek.clone(), version)])
    }

    fn destroy_kek(&self, kek: &KekId) -> Result<()> {
        let mut inner = self.lock()?;
        let versions = inner
            .index
            .get(kek)
            .ok_or_else(|| Error::UnknownKek { kek: kek.clone() })?;
        let doomed = versions.iter().map(|v| (kek.clone(), *v)).collect();
        inner.rotate_file_root(doomed)
    }

    fn link_mac(&self, kek: &KekId, message: &[u8]) -> Result<[u8; LINK_MAC_LEN]> {
        self.timed(|inner| {
            let versions = inner
                .index
                .get(kek)
                .ok_or_else(|| Error::UnknownKek { kek: kek.clone() })?;
            if !versions.contains(&LINK_KEY) {
                return Err(Error::Unsupported(
                    "this KEK has no linking key (it was made before linking keys existed)",
                ));
            }
            let handle = inner.key_handle(kek, LINK_KEY)?;
            let mac = inner
                .tpm
                .hmac(handle.into(), &[LINK_MAC_DOMAIN, message].concat())?;
            Ok(*mac)
        })
    }
}

/// The file root the key files are wrapped under.
struct FileRoot {
    /// Its persistent handle.
    handle: u32,
    /// Its ESYS handle; `None` only while opening, before a missing root
    /// is recreated (or refused).
    object: Option<ObjectHandle>,
}

/// Everything behind the mutex.
struct Inner {
    tpm: Tpm,
    dir: KeyDir,
    root: FileRoot,
    /// Live versions of every KEK, from the key files bound to the current
    /// file root.
    index: BTreeMap<KekId, BTreeSet<KekVersion>>,
    loaded: LoadedKeys,
    budgets: HashMap<(KekId, KekVersion), WrapBudget>,
    wrap_limit: u64,
    /// Test hook: make the next rotation fail after this step.
    #[cfg(test)]
    crash_at: Option<u8>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Transient slots are shared by every TPM client and not freed on
        // disconnect: give ours back.
        self.flush_loaded();
    }
}

impl Inner {
    /// Fails unless `version` of `kek` is live.
    /// That `version` is a live wrapping version of `kek` (never the
    /// linking key).
    fn check(&self, kek: &KekId, version: KekVersion) -> Result<()> {
        let versions = self
            .index
            .get(kek)
            .ok_or_else(|| Error::UnknownKek { kek: kek.clone() })?;
        if version != LINK_KEY && versions.contains(&version) {
            Ok(())
        } else {
            Err(Error::UnknownKekVersion {
                kek: kek.clone(),
                version,
            })
        }
    }

    /// The newest live version of `kek`.
    fn current_version(&self, kek: &KekId) -> Result<KekVersion> {
        self.index
            .get(kek)
            .and_then(|versions| versions.last().copied())
            .filter(|v| *v != LINK_KEY)
            .ok_or_else(|| Error::UnknownKek { kek: kek.clone() })
    }

    fn root_object(&self) -> Result<ObjectHandle> {
        self.root
            .object
            .ok_or_else(|| Error::State("the TPM file root is missing".into()))
    }

    /// Creates a KEK version in the TPM and writes its key file.
    fn new_version(&mut self, kek: &KekId, version: KekVersion) -> Result<()> {
        // TPM2_Create holds the storage root and the new key in two slots.
        self.make_room()?;
        let blobs = self.tpm.create_kek()?;
        let root = (self.root.handle, self.root_object()?);
        self.write_key_file(root, kek, version, &blobs)?;
        self.index.entry(kek.clone()).or_default().insert(version);
        Ok(())
    }

    /// Seals `blobs` under the file root `root` (handle, ESYS handle).
    fn write_key_file(
        &mut self,
        root: (u32, ObjectHandle),
        kek: &KekId,
        version: KekVersion,
        blobs: &KekBlobs,
    ) -> Result<()> {
        let nonce: [u8; KEY_FILE_NONCE_LEN] = random_array()?;
        let file_key = self
            .tpm
            .hmac(root.1, &store::file_key_message(&nonce, kek, version))?;
        let bytes = store::seal_key_file(root.0, &nonce, &file_key, kek, version, blobs)?;
        self.dir.write_key_file(kek, version, &bytes)
    }

    /// Opens a key file's content, which must be bound to `root`.
    fn open_key_file(
        &mut self,
        bytes: &[u8],
        root: (u32, ObjectHandle),
        kek: &KekId,
        version: KekVersion,
    ) -> Result<KekBlobs> {
        let (header, _) = parse_key_file(bytes)?;
        if header.root != root.0 {
            return Err(Error::State(format!(
                "key file of {kek} {version} is bound to the file root {:#010x}, which no longer \
                 exists: it is a stale copy (of a destroyed KEK version?) and cannot be loaded",
                header.root
            )));
        }
        let file_key = self.tpm.hmac(
            root.1,
            &store::file_key_message(&header.nonce, kek, version),
        )?;
        store::open_key_file(bytes, &file_key, kek, version)?.ok_or_else(|| {
            Error::State(format!(
                "key file of {kek} {version} does not authenticate under the current file root: \
                 altered, renamed, or a stale copy of a destroyed KEK version"
            ))
        })
    }

    /// The TPM handle of a live KEK version, loading it if needed.
    fn key_handle(&mut self, kek: &KekId, version: KekVersion) -> Result<KeyHandle> {
        if let Some(handle) = self.loaded.get(kek, version) {
            return Ok(handle);
        }
        let bytes = self.dir.read_key_file(kek, version)?.ok_or_else(|| {
            Error::State(format!("the key file of {kek} {version} has disappeared"))
        })?;
        let root = (self.root.handle, self.root_object()?);
        let blobs = self.open_key_file(&bytes, root, kek, version)?;
        // TPM2_Load holds the storage root and the loaded key in two slots.
        self.make_room()?;
        let handle = self.tpm.load(&blobs)?;
        self.loaded.insert(kek, version, handle);
        Ok(handle)
    }

    /// Flushes the least recently used KEK version if two are loaded, so
    /// that a command needing two transient slots finds them.
    fn make_room(&mut self) -> Result<()> {
        match self.loaded.make_room() {
            Some(evicted) => self.tpm.flush(evicted),
            None => Ok(()),
        }
    }

    /// Counts one wrap against a version's budget. The persisted mark is
    /// advanced a block at a time, before the block's first wrap.
    fn take_wrap(&mut self, kek: &KekId, version: KekVersion) -> Result<()> {
        let limit = self.wrap_limit;
        let dir = &self.dir;
        let budget = self.budgets.entry((kek.clone(), version)).or_default();
        let reserve = |block| {
            let mark = dir.read_budget(kek, version)?;
            let range = next_block(mark, block, limit);
            // An exhausted version is asked again at every refused wrap:
            // no write for an empty block.
            if range.end != mark {
                dir.write_budget(kek, version, range.end)?;
            }
            Ok(range)
        };
        match budget.take(limit, reserve)? {
            Ok(()) => Ok(()),
            Err(Exhausted) => Err(Error::WrapLimitReached {
                kek: kek.clone(),
                version,
                limit,
            }),
        }
    }

    /// The single-use wrapping key of one wrap, derived inside the TPM.
    fn wrapping_key(
        &mut self,
        kek: &KekId,
        version: KekVersion,
        nonce: &[u8; DATA_KEY_NONCE_LEN],
        aad: &[u8],
    ) -> Result<Secret32> {
        let handle = self.key_handle(kek, version)?;
        self.tpm
            .hmac(handle.into(), &seal::data_key_message(nonce, aad))
    }

    /// Wraps a data key under a live version (its budget already taken).
    fn seal_data_key(
        &mut self,
        kek: &KekId,
        version: KekVersion,
        key_ref: &KeyRef,
        key: &[u8; 32],
    ) -> Result<WrappedKey> {
        self.check(kek, version)?;
        let nonce: [u8; DATA_KEY_NONCE_LEN] = random_array()?;
        let aad = wrap_aad(key_ref, kek, version);
        let wrapping_key = self.wrapping_key(kek, version, &nonce, &aad)?;
        let sealed = seal::seal(&wrapping_key, &aad, key)?;
        Ok(WrappedKey::seal(
            kek,
            version,
            WrapMechanism::TpmHmacKdfAesGcm,
            &nonce,
            &sealed,
        ))
    }

    /// Recovers a wrapped data key.
    fn open_data_key(&mut self, wrapped: &WrappedKey, key_ref: &KeyRef) -> Result<Secret32> {
        let (nonce, sealed) = wrapped.open(WrapMechanism::TpmHmacKdfAesGcm, DATA_KEY_NONCE_LEN)?;
        let nonce: [u8; DATA_KEY_NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| Error::MalformedWrappedKey("wrong nonce length"))?;
        self.check(&wrapped.kek, wrapped.version)?;
        let aad = wrap_aad(key_ref, &wrapped.kek, wrapped.version);
        let wrapping_key = self.wrapping_key(&wrapped.kek, wrapped.version, &nonce, &aad)?;
        let plain = seal::open(&wrapping_key, &aad, sealed).ok_or(Error::TamperedWrappedKey)?;
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        if plain.len() != key.len() {
            return Err(Error::TamperedWrappedKey);
        }
        key.copy_from_slice(&plain);
        Ok(key)
    }

    /// Flushes every loaded KEK version, logging (never failing on) errors.
    fn flush_loaded(&mut self) {
        for handle in self.loaded.drain() {
            if let Err(e) = self.tpm.flush(handle) {
                tracing::warn!(error = %e, "could not flush a loaded TPM KEK");
            }
        }
    }

    /// Forgets a destroyed version: flushed, out of the index and budgets.
    fn forget(&mut self, kek: &KekId, version: KekVersion) -> Result<()> {
        if let Some(handle) = self.loaded.remove(kek, version) {
            self.tpm.flush(handle)?;
        }
        if let Some(versions) = self.index.get_mut(kek) {
            versions.remove(&version);
            if versions.is_empty() {
                self.index.remove(kek);
            }
        }
        self.budgets.remove(&(kek.clone(), version));
        Ok(())
    }

    /// Destroys KEK versions: deletes their files, moves every other key
    /// file to a new file root, and evicts the old root, so that copies of
    /// the destroyed files can never be opened again.
    fn rotate_file_root(&mut self, destroy: Vec<(KekId, KekVersion)>) -> Result<()> {
        let mut state = self
            .dir
            .read_state()?
            .ok_or_else(|| Error::State("the file-root state has disappeared".into()))?;
        if state.next.is_none() {
            let present = self.tpm.handles(FILE_ROOT_FIRST, FILE_ROOT_LAST)?;
            state.next = Some(free_root_handle(&present, state.current)?);
        }
        for doomed in destroy {
            if !state.destroy.contains(&doomed) {
                state.destroy.push(doomed);
            }
        }
        // The intent first: from here on, a crash is finished by the next open.
        self.dir.write_state(&state)?;
        self.finish_rotation(state)
    }

    /// Carries out (or resumes) the rotation `state` describes.
    fn finish_rotation(&mut self, state: RootState) -> Result<()> {
        let Some(next) = state.next else {
            return Ok(());
        };
        tracing::info!(
            from = format_args!("{:#010x}", state.current),
            to = format_args!("{next:#010x}"),
            destroyed = state.destroy.len(),
            "rotating the TPM file root"
        );
        // 1. The destroyed versions go first, so nothing below re-wraps them.
        for (kek, version) in &state.destroy {
            self.forget(kek, *version)?;
            self.dir.remove_version(kek, *version)?;
        }
        self.dir.sync()?;
        self.crash_point(1)?;

        // 2. The new root. Creating and using persistent keys borrows
        // transient slots: free ours first (rotations are rare).
        self.flush_loaded();
        let new_root = match self.tpm.open_file_root(next)? {
            Some(object) => object,
            None => self.tpm.create_file_root(next)?,
        };
        self.crash_point(2)?;

        // 3. Every surviving key file moves to the new root.
        let old_root = self
            .root
            .object
            .filter(|_| self.root.handle == state.current);
        for (kek, version) in self.dir.scan()? {
            if state.destroy.contains(&(kek.clone(), version)) {
                continue; // deleted above; a copy put back since is ignored
            }
            let Some(bytes) = self.dir.read_key_file(&kek, version)? else {
                continue;
            };
            let bound_to = parse_key_file(&bytes).map(|(header, _)| header.root);
            if matches!(bound_to, Ok(root) if root == next) {
                continue; // moved before an interruption
            }
            let moved = match (bound_to, old_root) {
                (Ok(root), Some(old)) if root == state.current => self
                    .open_key_file(&bytes, (state.current, old), &kek, version)
                    .and_then(|blobs| self.write_key_file((next, new_root), &kek, version, &blobs)),
                _ => Err(Error::State(
                    "bound to a file root that no longer exists".into(),
                )),
            };
            if let Err(e) = moved {
                // One unreadable file must not block every destruction.
                tracing::warn!(kek = %kek, version = version.0, error = %e,
                    "leaving a key file that cannot be moved to the new file root");
            }
        }
        self.crash_point(3)?;

        // 4. The old root goes: copies of destroyed key files are now dead.
        if let Some(old) = old_root {
            self.tpm.evict(old, state.current)?;
        }
        self.root = FileRoot {
            handle: next,
            object: Some(new_root),
        };
        self.crash_point(4)?;

        // 5. Done.
        self.dir.write_state(&RootState {
            current: next,
            next: None,
            destroy: Vec::new(),
        })
    }

    #[cfg(test)]
    fn crash_point(&self, step: u8) -> Result<()> {
        if self.crash_at == Some(step) {
            return Err(Error::State(format!(
                "injected crash after rotation step {step}"
            )));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn crash_point(&self, _step: u8) -> Result<()> {
        Ok(())
    }

    /// Indexes the key files bound to the current file root, and creates
    /// that root if it is missing and nothing depends on it.
    fn load_index(&mut self) -> Result<()> {
        let mut index: BTreeMap<KekId, BTreeSet<KekVersion>> = BTreeMap::new();
        for (kek, version) in self.dir.scan()? {
            let Some(bytes) = self.dir.read_key_file(&kek, version)? else {
                continue;
            };
            match parse_key_file(&bytes) {
                Ok((header, _)) if header.root == self.root.handle => {
                    index.entry(kek).or_default().insert(version);
                }
                Ok((header, _)) => tracing::warn!(
                    kek = %kek,
                    version = version.0,
                    root = format_args!("{:#010x}", header.root),
                    "ignoring a key file bound to a file root that no longer exists \
                     (a copy of a destroyed KEK version?)"
                ),
                Err(_) => tracing::warn!(
                    kek = %kek,
                    version = version.0,
                    "ignoring a key file in an unknown format"
                ),
            }
        }
        if self.root.object.is_none() {
            if !index.is_empty() {
                return Err(Error::State(format!(
                    "the TPM has no file root at {:#010x}, which protects the key files: was \
                     the TPM cleared or replaced? They cannot be read",
                    self.root.handle
                )));
            }
            tracing::info!(
                handle = format_args!("{:#010x}", self.root.handle),
                "creating the TPM file root"
            );
            self.root.object = Some(self.tpm.create_file_root(self.root.handle)?);
        }
        self.index = index;
        Ok(())
    }

    /// Times a few (GetRandom + HMAC) rounds: the seed of the ops/s figure.
    fn probe(&mut self) -> Result<u64> {
        let root = self.root_object()?;
        let started = Instant::now();
        for _ in 0..PROBE_ROUNDS {
            self.tpm.random32()?;
            self.tpm.hmac(root, PROBE_MESSAGE)?;
        }
        let per_op = started.elapsed() / PROBE_ROUNDS;
        Ok(u64::try_from(per_op.max(Duration::from_nanos(1)).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The first empty handle of the file-root range after `after`, cyclically.
fn free_root_handle(present: &[u32], after: u32) -> Result<u32> {
    let span = FILE_ROOT_LAST - FILE_ROOT_FIRST + 1;
    let start = after.wrapping_sub(FILE_ROOT_FIRST).wrapping_add(1) % span;
    (0..span)
        .map(|i| FILE_ROOT_FIRST + (start + i) % span)
        .find(|h| *h != after && !present.contains(h))
        .ok_or_else(|| {
            Error::State(format!(
                "no free persistent handle between {FILE_ROOT_FIRST:#010x} and \
                 {FILE_ROOT_LAST:#010x} for a new file root"
            ))
        })
}
