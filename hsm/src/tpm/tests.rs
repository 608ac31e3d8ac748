//! The TPM backend's internals against a real swtpm: interrupted rotations,
//! slot hygiene, and a key folder that does not match its TPM.

use std::fs;
use std::path::{Path, PathBuf};

use coffer_softhsm::Swtpm;

use super::device::{FILE_ROOT_FIRST, FILE_ROOT_LAST};
use super::{TpmBackend, TpmConfig};
use crate::types::random_array;
use crate::{Error, KekBackend, KekId, KekVersion, KeyRef};

/// Transient object handles (TPM_HT_TRANSIENT).
const TRANSIENT: (u32, u32) = (0x8000_0000, 0x80FF_FFFF);

/// A temporary folder holding a swtpm state and a key folder.
struct Fixture {
    dir: PathBuf,
    tpm: Option<Swtpm>,
}

impl Fixture {
    fn new() -> Self {
        let suffix: [u8; 8] = random_array().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "coffer-tpm-{}",
            data_encoding::HEXLOWER.encode(&suffix)
        ));
        let tpm = Swtpm::start(&dir.join("tpm")).expect("start swtpm");
        Self {
            dir,
            tpm: Some(tpm),
        }
    }

    fn key_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    fn open(&self) -> crate::Result<TpmBackend> {
        let tcti = self.tpm.as_ref().unwrap().tcti();
        TpmBackend::open(TpmConfig::new(tcti, self.key_dir()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(tpm) = self.tpm.take() {
            let _ = tpm.stop();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn key_file(key_dir: &Path, kek: &KekId) -> PathBuf {
    key_dir.join(format!("{kek}.v1.key"))
}

fn file_roots(backend: &TpmBackend) -> Vec<u32> {
    backend
        .inner()
        .tpm
        .handles(FILE_ROOT_FIRST, FILE_ROOT_LAST)
        .unwrap()
}

/// A crash after any step of a destroy's rotation is finished by the next
/// open: the destroyed KEK stays destroyed (even if its file was put back
/// before the restart), the others unwrap, and exactly one root is left.
#[test]
fn an_interrupted_rotation_is_finished_at_open() {
    for step in 1..=4 {
        let fx = Fixture::new();
        let r = KeyRef::random().unwrap();
        let backend = fx.open().unwrap();
        let doomed = backend.create_kek().unwrap().id;
        let survivor = backend.create_kek().unwrap().id;
        backend.rotate_kek(&survivor).unwrap();
        let (_, doomed_wrapped) = backend.generate_data_key(&doomed, &r).unwrap();
        let (kept, kept_wrapped) = backend.generate_data_key(&survivor, &r).unwrap();
        let copy = fs::read(key_file(&fx.key_dir(), &doomed)).unwrap();
        let roots_before = file_roots(&backend);
        assert_eq!(roots_before.len(), 1);

        backend.inner().crash_at = Some(step);
        let err = backend.destroy_kek(&doomed).unwrap_err();
        assert!(
            matches!(&err, Error::State(m) if m.contains("injected")),
            "{err:?}"
        );
        drop(backend);
        // Put back before the restart: the recorded intent still wins.
        fs::write(key_file(&fx.key_dir(), &doomed), &copy).unwrap();

        let backend = fx.open().unwrap();
        let roots = file_roots(&backend);
        assert_eq!(roots.len(), 1, "step {step}: {roots:x?}");
        assert_ne!(roots, roots_before, "step {step}: the root moved");
        assert!(fx.key_dir().join("file-root.state").exists());
        assert!(
            !fs::read_to_string(fx.key_dir().join("file-root.state"))
                .unwrap()
                .contains("next"),
            "step {step}: rotation finished"
        );
        assert!(!key_file(&fx.key_dir(), &doomed).exists(), "step {step}");
        assert!(
            matches!(
                backend.unwrap(&doomed_wrapped, &r),
                Err(Error::UnknownKek { .. })
            ),
            "step {step}"
        );
        assert_eq!(
            backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
            kept.expose(),
            "step {step}"
        );
        assert_eq!(
            backend.list_keks().unwrap()[0].versions,
            vec![KekVersion(1), KekVersion(2)]
        );

        // And a copy put back after the recovery is dead too.
        drop(backend);
        fs::write(key_file(&fx.key_dir(), &doomed), &copy).unwrap();
        let backend = fx.open().unwrap();
        assert!(matches!(
            backend.unwrap(&doomed_wrapped, &r),
            Err(Error::UnknownKek { .. })
        ));
        assert_eq!(file_roots(&backend).len(), 1);
    }
}

/// At most two KEKs are loaded, and nothing stays loaded after a drop.
#[test]
fn transient_slots_are_bounded_and_given_back() {
    let fx = Fixture::new();
    let r = KeyRef::random().unwrap();
    let backend = fx.open().unwrap();
    let keks: Vec<KekId> = (0..4).map(|_| backend.create_kek().unwrap().id).collect();
    for kek in &keks {
        backend.generate_data_key(kek, &r).unwrap();
        let mut inner = backend.inner();
        assert!(inner.loaded.len() <= 2);
        let transient = inner.tpm.handles(TRANSIENT.0, TRANSIENT.1).unwrap();
        assert_eq!(transient.len(), inner.loaded.len());
    }
    // Destroying flushes what it destroys; rotation flushes the rest.
    backend.destroy_kek(&keks[3]).unwrap();
    assert_eq!(backend.inner().loaded.len(), 0);
    backend.generate_data_key(&keks[0], &r).unwrap();
    drop(backend);

    let backend = fx.open().unwrap();
    let transient = backend
        .inner()
        .tpm
        .handles(TRANSIENT.0, TRANSIENT.1)
        .unwrap();
    assert!(transient.is_empty(), "left loaded: {transient:x?}");
}

/// A key folder whose TPM was cleared (here: a brand-new swtpm) is refused
/// loudly rather than opened empty.
#[test]
fn a_key_folder_without_its_tpm_is_refused() {
    let fx = Fixture::new();
    let backend = fx.open().unwrap();
    backend.create_kek().unwrap();
    drop(backend);

    let other = Fixture::new();
    let tcti = other.tpm.as_ref().unwrap().tcti();
    let err = TpmBackend::open(TpmConfig::new(tcti, fx.key_dir())).unwrap_err();
    assert!(
        matches!(&err, Error::State(m) if m.contains("cleared")),
        "{err:?}"
    );

    // Key files without the state that names their root are refused too.
    fs::remove_file(fx.key_dir().join("file-root.state")).unwrap();
    let err = fx.open().unwrap_err();
    assert!(
        matches!(&err, Error::State(m) if m.contains("no file-root state")),
        "{err:?}"
    );
}

/// Two key folders may share one TPM: each keeps its own file root, and
/// destroying in one leaves the other intact.
#[test]
fn two_key_folders_share_a_tpm() {
    let fx = Fixture::new();
    let r = KeyRef::random().unwrap();
    let tcti = fx.tpm.as_ref().unwrap().tcti();
    let a = TpmBackend::open(TpmConfig::new(&tcti, fx.dir.join("a"))).unwrap();
    let b = TpmBackend::open(TpmConfig::new(&tcti, fx.dir.join("b"))).unwrap();
    let ka = a.create_kek().unwrap().id;
    let kb = b.create_kek().unwrap().id;
    let (key_b, wrapped_b) = b.generate_data_key(&kb, &r).unwrap();
    drop(b);
    a.generate_data_key(&ka, &r).unwrap();
    a.destroy_kek(&ka).unwrap();
    drop(a);
    let b = TpmBackend::open(TpmConfig::new(&tcti, fx.dir.join("b"))).unwrap();
    assert_eq!(b.unwrap(&wrapped_b, &r).unwrap().expose(), key_b.expose());
}
