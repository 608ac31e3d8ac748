//! The key folder: one wrapped key file per KEK version, its wrap-budget
//! high-water mark, and the file-root state. Nothing here is secret in the
//! clear: key files are AES-256-GCM under a key derived inside the TPM, and
//! the blobs inside them are themselves encrypted by the storage root.
//!
//! Every write goes to a temporary file that is fsynced, then renamed over
//! the target, then the folder is fsynced, so a crash leaves either the old
//! or the new content.

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::seal;
use crate::error::{Error, Result};
use crate::types::{KekId, KekVersion, random_array};

/// Name of the lock file.
const LOCK_FILE: &str = "lock";
/// Retries of a busy lock, [`LOCK_RETRY`] apart (2 s in all).
const LOCK_ATTEMPTS: u32 = 40;
/// Pause between two attempts at the lock.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
/// Name of the file-root state file.
const STATE_FILE: &str = "file-root.state";
/// First line of the state file.
const STATE_MAGIC: &str = "coffer-tpm-file-root 1";
/// Prefix of temporary files; skipped by scans and swept at open.
const TMP_PREFIX: &str = ".tmp-";

/// Format version of key files.
const KEY_FILE_V1: u8 = 1;
/// Domain separation of everything derived for or bound to key files.
const KEY_FILE_DOMAIN: &[u8] = b"coffer/tpm-kek-file/v1";
/// Key file header: format ‖ file-root handle ‖ nonce.
pub(crate) const KEY_FILE_HEADER_LEN: usize = 1 + 4 + KEY_FILE_NONCE_LEN;
/// Random nonce of a key file; a fresh one at every (re)wrap.
pub(crate) const KEY_FILE_NONCE_LEN: usize = 16;

/// The key folder, locked for as long as this value lives.
#[derive(Debug)]
pub(crate) struct KeyDir {
    path: PathBuf,
    /// Holds an exclusive advisory lock: two backends on one folder would
    /// each miss the other's KEKs and rotate the file root under its feet.
    _lock: File,
}

/// Which persistent file root protects the key files, and an interrupted
/// rotation, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootState {
    /// Persistent handle of the file root the key files are wrapped under.
    pub(crate) current: u32,
    /// During a rotation: the handle of the new root.
    pub(crate) next: Option<u32>,
    /// During a rotation: the KEK versions it destroys. Recorded before any
    /// file is touched so a resumed rotation never re-wraps them, even if a
    /// copy was put back meanwhile.
    pub(crate) destroy: Vec<(KekId, KekVersion)>,
}

/// The parsed header of a key file.
#[derive(Debug)]
pub(crate) struct KeyFileHeader {
    /// The file root it is wrapped under.
    pub(crate) root: u32,
    /// The nonce of its wrapping key.
    pub(crate) nonce: [u8; KEY_FILE_NONCE_LEN],
}

impl KeyDir {
    /// Opens the folder, creating it (mode 0700) if missing, and sweeps
    /// temporary files a crash may have left behind.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io_error("cannot create the key folder", path))?;
        let lock_path = path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error("cannot open", &lock_path))?;
        // A lock just released can linger for a moment: a child process
        // forked by another thread holds a copy of the descriptor until it
        // execs. Retry briefly before calling the folder busy.
        let mut attempts = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if attempts < LOCK_ATTEMPTS => {
                    attempts += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::State(format!(
                        "the key folder {} is in use by another TPM backend",
                        path.display()
                    )));
                }
                Err(TryLockError::Error(e)) => return Err(io_error("cannot lock", &lock_path)(e)),
            }
        }
        let dir = Self {
            path: path.to_path_buf(),
            _lock: lock,
        };
        for entry in fs::read_dir(path).map_err(io_error("cannot list", path))? {
            let entry = entry.map_err(io_error("cannot list", path))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(dir)
    }

    fn key_file_name(kek: &KekId, version: KekVersion) -> String {
        format!("{kek}.v{}.key", version.0)
    }

    fn budget_file_name(kek: &KekId, version: KekVersion) -> String {
        format!("{kek}.v{}.budget", version.0)
    }

    /// Every (KEK, version) that has a key file, by file name only.
    pub(crate) fn scan(&self) -> Result<Vec<(KekId, KekVersion)>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_error("cannot list", &self.path))? {
            let entry = entry.map_err(io_error("cannot list", &self.path))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(parsed) = parse_key_file_name(name) {
                found.push(parsed);
            }
        }
        found.sort();
        Ok(found)
    }

    /// The content of a KEK version's key file, `None` if it has none.
    pub(crate) fn read_key_file(
        &self,
        kek: &KekId,
        version: KekVersion,
    ) -> Result<Option<Vec<u8>>> {
        self.read(&Self::key_file_name(kek, version))
    }

    /// Writes (or replaces) a KEK version's key file.
    pub(crate) fn write_key_file(
        &self,
        kek: &KekId,
        version: KekVersion,
        bytes: &[u8],
    ) -> Result<()> {
        self.write_atomic(&Self::key_file_name(kek, version), bytes)
    }

    /// Deletes a KEK version's key file and budget file, if present. The
    /// caller syncs the folder.
    pub(crate) fn remove_version(&self, kek: &KekId, version: KekVersion) -> Result<()> {
        self.remove(&Self::key_file_name(kek, version))?;
        self.remove(&Self::budget_file_name(kek, version))
    }

    /// The persisted wrap-budget high-water mark of a KEK version (0 if none).
    pub(crate) fn read_budget(&self, kek: &KekId, version: KekVersion) -> Result<u64> {
        let name = Self::budget_file_name(kek, version);
        let Some(bytes) = self.read(&name)? else {
            return Ok(0);
        };
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::State(format!("budget file {name} is not a number")))
    }

    /// Persists a KEK version's wrap-budget high-water mark.
    pub(crate) fn write_budget(&self, kek: &KekId, version: KekVersion, mark: u64) -> Result<()> {
        self.write_atomic(
            &Self::budget_file_name(kek, version),
            format!("{mark}\n").as_bytes(),
        )
    }

    /// The file-root state, `None` for a folder never used.
    pub(crate) fn read_state(&self) -> Result<Option<RootState>> {
        let Some(bytes) = self.read(STATE_FILE)? else {
            return Ok(None);
        };
        let bad = |why: &str| Error::State(format!("{STATE_FILE} is unreadable: {why}"));
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text.lines();
        if lines.next() != Some(STATE_MAGIC) {
            return Err(bad("unknown format"));
        }
        let (mut current, mut next, mut destroy) = (None, None, Vec::new());
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [] => {}
                ["current", h] => current = Some(parse_handle(h).ok_or_else(|| bad("bad handle"))?),
                ["next", h] => next = Some(parse_handle(h).ok_or_else(|| bad("bad handle"))?),
                ["destroy", id, v] => {
                    let id = KekId::parse(id).map_err(|_| bad("bad KEK id"))?;
                    let v = v.parse().map_err(|_| bad("bad KEK version"))?;
                    destroy.push((id, KekVersion(v)));
                }
                _ => return Err(bad("unknown line")),
            }
        }
        Ok(Some(RootState {
            current: current.ok_or_else(|| bad("no current root"))?,
            next,
            destroy,
        }))
    }

    /// Replaces the file-root state.
    pub(crate) fn write_state(&self, state: &RootState) -> Result<()> {
        let mut text = format!("{STATE_MAGIC}\ncurrent {:#010x}\n", state.current);
        if let Some(next) = state.next {
            text.push_str(&format!("next {next:#010x}\n"));
        }
        for (kek, version) in &state.destroy {
            text.push_str(&format!("destroy {kek} {}\n", version.0));
        }
        self.write_atomic(STATE_FILE, text.as_bytes())
    }

    /// Fsyncs the folder, making renames and deletions durable.
    pub(crate) fn sync(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_error("cannot sync", &self.path))
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path.join(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read", &path)(e)),
        }
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("cannot delete", &path)(e)),
        }
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let suffix: [u8; 8] = random_array()?;
        let tmp = self.path.join(format!(
            "{TMP_PREFIX}{}-{name}",
            data_encoding::HEXLOWER.encode(&suffix)
        ));
        let target = self.path.join(name);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &target));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_error("cannot write", &target)(e));
        }
        self.sync()
    }
}

fn parse_handle(s: &str) -> Option<u32> {
    u32::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// `<kek id>.v<N>.key` -> (id, N); N = 0 is the KEK's linking key.
fn parse_key_file_name(name: &str) -> Option<(KekId, KekVersion)> {
    let (id, version) = name.strip_suffix(".key")?.rsplit_once(".v")?;
    let version: u32 = version.parse().ok()?;
    // Only canonical spellings: "v01" would alias "v1".
    if version.to_string().len() != name.len() - id.len() - ".v.key".len() {
        return None;
    }
    Some((KekId::parse(id).ok()?, KekVersion(version)))
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.display().to_string();
    move |e| Error::State(format!("{what} {path}: {e}"))
}

/// Splits a key file's header from its sealed body.
pub(crate) fn parse_key_file(bytes: &[u8]) -> Result<(KeyFileHeader, &[u8])> {
    if bytes.len() < KEY_FILE_HEADER_LEN || bytes[0] != KEY_FILE_V1 {
        return Err(Error::State("key file has an unknown format".into()));
    }
    let (header, body) = bytes.split_at(KEY_FILE_HEADER_LEN);
    let mut root = [0u8; 4];
    root.copy_from_slice(&header[1..5]);
    let mut nonce = [0u8; KEY_FILE_NONCE_LEN];
    nonce.copy_from_slice(&header[5..]);
    Ok((
        KeyFileHeader {
            root: u32::from_be_bytes(root),
            nonce,
        },
        body,
    ))
}

/// The message the file root HMACs into a key file's single-use key:
/// domain ‖ nonce ‖ len(KEK id) ‖ KEK id ‖ version.
pub(crate) fn file_key_message(
    nonce: &[u8; KEY_FILE_NONCE_LEN],
    kek: &KekId,
    version: KekVersion,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(KEY_FILE_DOMAIN.len() + KEY_FILE_NONCE_LEN + 40);
    message.extend_from_slice(KEY_FILE_DOMAIN);
    message.extend_from_slice(nonce);
    push_id_and_version(&mut message, kek, version);
    message
}

/// The AAD of a key file: domain ‖ header ‖ len(KEK id) ‖ KEK id ‖ version,
/// so a file renamed to another KEK or version does not open.
fn key_file_aad(header: &[u8], kek: &KekId, version: KekVersion) -> Vec<u8> {
    let mut aad = Vec::with_capacity(KEY_FILE_DOMAIN.len() + header.len() + 40);
    aad.extend_from_slice(KEY_FILE_DOMAIN);
    aad.extend_from_slice(header);
    push_id_and_version(&mut aad, kek, version);
    aad
}

fn push_id_and_version(out: &mut Vec<u8>, kek: &KekId, version: KekVersion) {
    let id = kek.as_str().as_bytes();
    // Ids are 30 bytes (checked by KekId::parse), far below u16::MAX.
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&version.0.to_be_bytes());
}

/// Builds a key file: header ‖ AES-256-GCM_{file key}(public ‖ private).
pub(crate) fn seal_key_file(
    root: u32,
    nonce: &[u8; KEY_FILE_NONCE_LEN],
    file_key: &[u8; 32],
    kek: &KekId,
    version: KekVersion,
    blobs: &KekBlobs,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(KEY_FILE_HEADER_LEN + blobs.0.len() + 16);
    out.push(KEY_FILE_V1);
    out.extend_from_slice(&root.to_be_bytes());
    out.extend_from_slice(nonce);
    let aad = key_file_aad(&out, kek, version);
    let sealed = seal::seal(file_key, &aad, &blobs.0)?;
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a key file's body; `None` when it does not authenticate (altered,
/// renamed, or wrapped under another root).
pub(crate) fn open_key_file(
    bytes: &[u8],
    file_key: &[u8; 32],
    kek: &KekId,
    version: KekVersion,
) -> Result<Option<KekBlobs>> {
    let (_, body) = parse_key_file(bytes)?;
    let aad = key_file_aad(&bytes[..KEY_FILE_HEADER_LEN], kek, version);
    Ok(seal::open(file_key, &aad, body).map(KekBlobs))
}

/// A KEK version's marshalled public area and private blob:
/// len(public) u16 ‖ public ‖ len(private) u16 ‖ private.
pub(crate) struct KekBlobs(Zeroizing<Vec<u8>>);

impl KekBlobs {
    /// Packs the two blobs.
    pub(crate) fn pack(public: &[u8], private: &[u8]) -> Result<Self> {
        let mut out = Zeroizing::new(Vec::with_capacity(4 + public.len() + private.len()));
        for part in [public, private] {
            let len = u16::try_from(part.len())
                .map_err(|_| Error::State("TPM key blob larger than 64 KiB".into()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(Self(out))
    }

    /// The two blobs, public first.
    pub(crate) fn unpack(&self) -> Result<(&[u8], &[u8])> {
        let bad = || Error::State("key file holds malformed TPM blobs".into());
        let take = |rest: &[u8]| -> Option<(usize, usize)> {
            let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
            (rest.len() >= 2 + len).then_some((2, 2 + len))
        };
        let all = self.0.as_slice();
        let (start, end) = take(all).ok_or_else(bad)?;
        let (public, rest) = (&all[start..end], &all[end..]);
        let (start, end) = take(rest).ok_or_else(bad)?;
        if end != rest.len() {
            return Err(bad());
        }
        Ok((public, &rest[start..end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_names_round_trip_and_refuse_aliases() {
        let kek = KekId::random().unwrap();
        let name = KeyDir::key_file_name(&kek, KekVersion(12));
        assert_eq!(
            parse_key_file_name(&name),
            Some((kek.clone(), KekVersion(12)))
        );
        for bad in [
            format!("{kek}.v00.key"),
            format!("{kek}.v012.key"),
            format!("{kek}.v+1.key"),
            format!("{kek}.v1.budget"),
            "kek_zz.v1.key".to_owned(),
        ] {
            assert_eq!(parse_key_file_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn key_files_bind_their_name_and_header() {
        let kek = KekId::random().unwrap();
        let key = [9u8; 32];
        let nonce = [3u8; KEY_FILE_NONCE_LEN];
        let blobs = KekBlobs::pack(b"public", b"private").unwrap();
        let file = seal_key_file(0x8100_0C10, &nonce, &key, &kek, KekVersion(1), &blobs).unwrap();
        let opened = open_key_file(&file, &key, &kek, KekVersion(1))
            .unwrap()
            .unwrap();
        assert_eq!(opened.unpack().unwrap(), (&b"public"[..], &b"private"[..]));
        assert!(
            open_key_file(&file, &key, &kek, KekVersion(2))
                .unwrap()
                .is_none()
        );
        let other = KekId::random().unwrap();
        assert!(
            open_key_file(&file, &key, &other, KekVersion(1))
                .unwrap()
                .is_none()
        );
        let mut moved = file.clone();
        moved[4] ^= 1; // claims another root
        assert!(
            open_key_file(&moved, &key, &kek, KekVersion(1))
                .unwrap()
                .is_none()
        );
        let (header, _) = parse_key_file(&file).unwrap();
        assert_eq!((header.root, header.nonce), (0x8100_0C10, nonce));
    }

    #[test]
    fn state_round_trips() {
        let dir = tempdir();
        let keys = KeyDir::open(&dir).unwrap();
        assert_eq!(keys.read_state().unwrap(), None);
        let state = RootState {
            current: 0x8100_0C10,
            next: Some(0x8100_0C11),
            destroy: vec![(KekId::random().unwrap(), KekVersion(3))],
        };
        keys.write_state(&state).unwrap();
        assert_eq!(keys.read_state().unwrap(), Some(state));
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let suffix: [u8; 8] = random_array().unwrap();
        std::env::temp_dir().join(format!(
            "coffer-tpm-store-{}",
            data_encoding::HEXLOWER.encode(&suffix)
        ))
    }
}
