//! The TPM 2.0 KEK backend against a real swtpm: each test starts its own.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use coffer_hsm::tpm::{TpmBackend, TpmConfig};
use coffer_hsm::{DEFAULT_WRAP_LIMIT, Error, KekBackend, KekId, KekVersion, KeyRef, WrapMechanism};
use coffer_softhsm::Swtpm;
use tempfile::TempDir;

/// A swtpm and a key folder in one temporary folder.
struct Fixture {
    dir: TempDir,
    tpm: Option<Swtpm>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let tpm = Swtpm::start(&dir.path().join("tpm")).expect("start swtpm");
        Self {
            dir,
            tpm: Some(tpm),
        }
    }

    fn key_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    fn config(&self, wrap_limit: u64) -> TpmConfig {
        TpmConfig {
            tcti: self.tpm.as_ref().expect("swtpm running").tcti(),
            key_dir: self.key_dir(),
            wrap_limit,
        }
    }

    fn open(&self) -> TpmBackend {
        self.open_with_limit(DEFAULT_WRAP_LIMIT)
    }

    fn open_with_limit(&self, wrap_limit: u64) -> TpmBackend {
        TpmBackend::open(self.config(wrap_limit)).expect("open the TPM backend")
    }

    /// Stops swtpm cleanly and starts it again on the same state.
    fn restart_tpm(&mut self) {
        self.tpm
            .take()
            .expect("swtpm running")
            .stop()
            .expect("stop swtpm");
        self.tpm = Some(Swtpm::start(&self.dir.path().join("tpm")).expect("restart swtpm"));
    }
}

fn key_file(key_dir: &Path, kek: &KekId, version: KekVersion) -> PathBuf {
    key_dir.join(format!("{kek}.v{}.key", version.0))
}

#[test]
fn round_trip_and_capabilities() {
    let fx = Fixture::new();
    let backend = fx.open();
    let caps = backend.capabilities();
    assert_eq!(caps.backend, "tpm");
    assert_eq!(caps.wrap_mechanism, WrapMechanism::TpmHmacKdfAesGcm);
    assert!(!caps.wraps_inside_device);
    assert!(!caps.concurrent_operations);
    assert!(caps.destroy_invalidates_copies);
    assert_eq!(caps.wrap_limit, DEFAULT_WRAP_LIMIT);
    assert!(caps.approx_ops_per_sec > 0);

    let kek = backend.create_kek().unwrap();
    assert_eq!(kek.versions, vec![KekVersion::FIRST]);
    let r = KeyRef::random().unwrap();
    let (key, wrapped) = backend.generate_data_key(&kek.id, &r).unwrap();
    assert_eq!(
        (&wrapped.kek, wrapped.version),
        (&kek.id, KekVersion::FIRST)
    );
    assert_ne!(key.expose(), &[0u8; 32]);
    assert!(!wrapped.bytes.windows(32).any(|w| w == key.expose()));
    assert_eq!(backend.unwrap(&wrapped, &r).unwrap().expose(), key.expose());

    let (other, other_wrapped) = backend.generate_data_key(&kek.id, &r).unwrap();
    assert_ne!(other.expose(), key.expose());
    assert_ne!(other_wrapped.bytes, wrapped.bytes);
    assert_eq!(backend.list_keks().unwrap(), vec![kek]);

    // A key ref longer than one TPM input buffer still binds.
    let long = KeyRef::new(vec![7u8; 5000]);
    let (key, wrapped) = backend.generate_data_key(&wrapped.kek, &long).unwrap();
    assert_eq!(
        backend.unwrap(&wrapped, &long).unwrap().expose(),
        key.expose()
    );
    let mut longer = vec![7u8; 5000];
    longer[4999] = 8;
    assert!(matches!(
        backend.unwrap(&wrapped, &KeyRef::new(longer)),
        Err(Error::TamperedWrappedKey)
    ));
}

#[test]
fn many_keks_stay_usable_through_the_two_slot_cache() {
    let fx = Fixture::new();
    let backend = fx.open();
    let r = KeyRef::random().unwrap();
    let keks: Vec<KekId> = (0..5).map(|_| backend.create_kek().unwrap().id).collect();
    let wrapped: Vec<_> = keks
        .iter()
        .map(|k| backend.generate_data_key(k, &r).unwrap())
        .collect();
    // Round-robin over more KEKs than the TPM can hold at once.
    for _ in 0..3 {
        for (key, w) in &wrapped {
            assert_eq!(backend.unwrap(w, &r).unwrap().expose(), key.expose());
        }
    }
}

#[test]
fn rewrap_to_a_rotated_version() {
    let fx = Fixture::new();
    let backend = fx.open();
    let kek = backend.create_kek().unwrap().id;
    let r = KeyRef::random().unwrap();
    let (key, old) = backend.generate_data_key(&kek, &r).unwrap();

    let v2 = backend.rotate_kek(&kek).unwrap();
    assert_eq!(v2, KekVersion(2));
    let (_, fresh) = backend.generate_data_key(&kek, &r).unwrap();
    assert_eq!(fresh.version, v2);

    let moved = backend.rewrap(&old, &r, v2).unwrap();
    assert_eq!(moved.version, v2);
    assert_eq!(backend.unwrap(&moved, &r).unwrap().expose(), key.expose());
    assert_eq!(backend.unwrap(&old, &r).unwrap().expose(), key.expose());
    assert!(matches!(
        backend.rewrap(&old, &r, KekVersion(7)),
        Err(Error::UnknownKekVersion {
            version: KekVersion(7),
            ..
        })
    ));

    backend
        .destroy_kek_version(&kek, KekVersion::FIRST)
        .unwrap();
    assert!(matches!(
        backend.unwrap(&old, &r),
        Err(Error::UnknownKekVersion {
            version: KekVersion(1),
            ..
        })
    ));
    assert_eq!(backend.unwrap(&moved, &r).unwrap().expose(), key.expose());
    assert_eq!(backend.list_keks().unwrap()[0].versions, vec![v2]);
    assert!(!key_file(&fx.key_dir(), &kek, KekVersion::FIRST).exists());
}

#[test]
fn tampered_or_misbound_wrapped_keys_are_refused() {
    let fx = Fixture::new();
    let backend = fx.open();
    let kek = backend.create_kek().unwrap().id;
    let r = KeyRef::random().unwrap();
    let (key, wrapped) = backend.generate_data_key(&kek, &r).unwrap();

    for i in 2..wrapped.bytes.len() {
        let mut bad = wrapped.clone();
        bad.bytes[i] ^= 0x01;
        let err = backend.unwrap(&bad, &r).unwrap_err();
        assert!(
            matches!(err, Error::TamperedWrappedKey),
            "byte {i}: {err:?}"
        );
    }
    let err = backend
        .unwrap(&wrapped, &KeyRef::random().unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::TamperedWrappedKey), "{err:?}");

    // Presented as another KEK's, or another version's.
    let other = backend.create_kek().unwrap().id;
    let mut moved = wrapped.clone();
    moved.kek = other;
    assert!(matches!(
        backend.unwrap(&moved, &r),
        Err(Error::TamperedWrappedKey)
    ));
    let v2 = backend.rotate_kek(&kek).unwrap();
    let mut relabelled = wrapped.clone();
    relabelled.version = v2;
    assert!(matches!(
        backend.unwrap(&relabelled, &r),
        Err(Error::TamperedWrappedKey)
    ));

    let mut truncated = wrapped.clone();
    truncated.bytes.truncate(10);
    assert!(matches!(
        backend.unwrap(&truncated, &r),
        Err(Error::MalformedWrappedKey(_))
    ));
    let mut pkcs11 = wrapped.clone();
    pkcs11.bytes[1] = 1; // the PKCS#11 mechanism's tag
    assert!(matches!(
        backend.unwrap(&pkcs11, &r),
        Err(Error::MalformedWrappedKey(_))
    ));

    assert_eq!(backend.unwrap(&wrapped, &r).unwrap().expose(), key.expose());
}

#[test]
fn unknown_keks_and_versions_are_clear_errors() {
    let fx = Fixture::new();
    let backend = fx.open();
    let ghost = KekId::random().unwrap();
    let r = KeyRef::random().unwrap();
    let is_unknown = |e: Error| matches!(e, Error::UnknownKek { kek } if kek == ghost);
    assert!(is_unknown(
        backend.generate_data_key(&ghost, &r).unwrap_err()
    ));
    assert!(is_unknown(backend.rotate_kek(&ghost).unwrap_err()));
    assert!(is_unknown(backend.destroy_kek(&ghost).unwrap_err()));
    assert!(is_unknown(
        backend
            .destroy_kek_version(&ghost, KekVersion::FIRST)
            .unwrap_err()
    ));

    let kek = backend.create_kek().unwrap().id;
    let (_, mut wrapped) = backend.generate_data_key(&kek, &r).unwrap();
    wrapped.version = KekVersion(9);
    assert!(matches!(
        backend.unwrap(&wrapped, &r),
        Err(Error::UnknownKekVersion {
            version: KekVersion(9),
            ..
        })
    ));
    assert!(matches!(
        backend.destroy_kek_version(&kek, KekVersion(9)),
        Err(Error::UnknownKekVersion { .. })
    ));
    wrapped.kek = ghost.clone();
    assert!(is_unknown(backend.unwrap(&wrapped, &r).unwrap_err()));
}

#[test]
fn destroy_then_unwrap_fails_and_others_survive() {
    let fx = Fixture::new();
    let backend = fx.open();
    let kek = backend.create_kek().unwrap().id;
    backend.rotate_kek(&kek).unwrap();
    let survivor = backend.create_kek().unwrap().id;
    let r = KeyRef::random().unwrap();
    let (_, wrapped) = backend.generate_data_key(&kek, &r).unwrap();
    let (kept, kept_wrapped) = backend.generate_data_key(&survivor, &r).unwrap();

    backend.destroy_kek(&kek).unwrap();
    let err = backend.unwrap(&wrapped, &r).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownKek { kek: k } if *k == kek),
        "{err:?}"
    );
    assert!(err.to_string().contains("destroyed"), "{err}");
    assert!(matches!(
        backend.generate_data_key(&kek, &r),
        Err(Error::UnknownKek { .. })
    ));
    assert!(matches!(
        backend.destroy_kek(&kek),
        Err(Error::UnknownKek { .. })
    ));
    assert_eq!(backend.list_keks().unwrap().len(), 1);
    assert_eq!(
        backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
        kept.expose()
    );

    // Destroying the last live version destroys the KEK.
    backend
        .destroy_kek_version(&survivor, KekVersion::FIRST)
        .unwrap();
    assert!(matches!(
        backend.unwrap(&kept_wrapped, &r),
        Err(Error::UnknownKek { .. })
    ));
    assert!(backend.list_keks().unwrap().is_empty());
}

/// Acceptance: the KEK survives a swtpm stop/start; once destroyed, a copy
/// of its key file taken before no longer loads or unwraps anything.
#[test]
fn kek_survives_a_tpm_restart_and_destroyed_copies_stay_dead() {
    let mut fx = Fixture::new();
    let r = KeyRef::random().unwrap();
    let (doomed, survivor, doomed_wrapped, kept, kept_wrapped) = {
        let backend = fx.open();
        let doomed = backend.create_kek().unwrap().id;
        let survivor = backend.create_kek().unwrap().id;
        let (_, doomed_wrapped) = backend.generate_data_key(&doomed, &r).unwrap();
        let (kept, kept_wrapped) = backend.generate_data_key(&survivor, &r).unwrap();
        (doomed, survivor, doomed_wrapped, kept, kept_wrapped)
    };

    fx.restart_tpm();
    let backend = fx.open();
    assert_eq!(
        backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
        kept.expose(),
        "the KEK survives a TPM restart"
    );
    assert!(backend.unwrap(&doomed_wrapped, &r).is_ok());

    let doomed_file = key_file(&fx.key_dir(), &doomed, KekVersion::FIRST);
    let copy = fs::read(&doomed_file).unwrap();
    backend.destroy_kek(&doomed).unwrap();
    assert!(!doomed_file.exists());
    drop(backend);

    // The attacker (or a restored backup) puts the old file back.
    fs::write(&doomed_file, &copy).unwrap();
    fx.restart_tpm();
    let backend = fx.open();
    let err = backend.unwrap(&doomed_wrapped, &r).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownKek { kek } if *kek == doomed),
        "{err:?}"
    );
    assert!(err.to_string().contains("destroyed"), "{err}");
    assert!(matches!(
        backend.generate_data_key(&doomed, &r),
        Err(Error::UnknownKek { .. })
    ));
    let listed: Vec<KekId> = backend
        .list_keks()
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(listed, vec![survivor.clone()]);
    assert_eq!(
        backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
        kept.expose(),
        "the surviving KEK still unwraps"
    );

    // Even the copy's header pointing at the current root does not help:
    // the root that sealed it is gone, so it does not authenticate.
    let current = fs::read(key_file(&fx.key_dir(), &survivor, KekVersion::FIRST)).unwrap();
    let mut forged = copy.clone();
    forged[1..5].copy_from_slice(&current[1..5]);
    drop(backend);
    fs::write(&doomed_file, &forged).unwrap();
    let backend = fx.open();
    let err = backend.unwrap(&doomed_wrapped, &r).unwrap_err();
    assert!(
        matches!(&err, Error::State(msg) if msg.contains("does not authenticate")),
        "{err:?}"
    );
    assert_eq!(
        backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
        kept.expose()
    );
}

#[test]
fn wrap_limit_refuses_new_wraps_still_unwraps_and_survives_a_reopen() {
    let fx = Fixture::new();
    let r = KeyRef::random().unwrap();
    let (kek, wrapped) = {
        let backend = fx.open_with_limit(3);
        assert_eq!(backend.capabilities().wrap_limit, 3);
        let kek = backend.create_kek().unwrap().id;
        let wrapped: Vec<_> = (0..3)
            .map(|_| backend.generate_data_key(&kek, &r).unwrap())
            .collect();
        let err = backend.generate_data_key(&kek, &r).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::WrapLimitReached {
                    version: KekVersion(1),
                    limit: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("rotate"), "{err}");
        assert!(matches!(
            backend.rewrap(&wrapped[0].1, &r, KekVersion::FIRST),
            Err(Error::WrapLimitReached { .. })
        ));
        (kek, wrapped)
    };

    let backend = fx.open_with_limit(3);
    assert!(matches!(
        backend.generate_data_key(&kek, &r),
        Err(Error::WrapLimitReached { .. })
    ));
    for (key, w) in &wrapped {
        assert_eq!(backend.unwrap(w, &r).unwrap().expose(), key.expose());
    }
    let v2 = backend.rotate_kek(&kek).unwrap();
    let moved = backend.rewrap(&wrapped[0].1, &r, v2).unwrap();
    assert_eq!(
        backend.unwrap(&moved, &r).unwrap().expose(),
        wrapped[0].0.expose()
    );
}

#[test]
fn an_unreachable_tpm_is_unavailable() {
    // Bind a port and close it again: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = TpmConfig::new(format!("swtpm:host=127.0.0.1,port={port}"), dir.path());
    let err = TpmBackend::open(config).unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
}

/// Not a speed assertion: prints generate+unwrap throughput on swtpm.
#[test]
fn measure_generate_and_unwrap_throughput() {
    let fx = Fixture::new();
    let backend = fx.open();
    let kek = backend.create_kek().unwrap().id;
    let r = KeyRef::random().unwrap();
    backend.generate_data_key(&kek, &r).unwrap(); // load the KEK
    let rounds = 300;
    let started = Instant::now();
    let mut wrapped = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        wrapped.push(backend.generate_data_key(&kek, &r).unwrap().1);
    }
    let generate = started.elapsed();
    let started = Instant::now();
    for w in &wrapped {
        backend.unwrap(w, &r).unwrap();
    }
    let unwrap = started.elapsed();
    let per_sec = |d: std::time::Duration| rounds as f64 / d.as_secs_f64();
    println!(
        "swtpm: generate_data_key {:.0}/s, unwrap {:.0}/s, capabilities().approx_ops_per_sec {}",
        per_sec(generate),
        per_sec(unwrap),
        backend.capabilities().approx_ops_per_sec
    );
}

#[test]
fn one_backend_per_key_folder() {
    let fx = Fixture::new();
    let backend = fx.open();
    let err = TpmBackend::open(fx.config(DEFAULT_WRAP_LIMIT)).unwrap_err();
    assert!(
        matches!(&err, Error::State(m) if m.contains("in use")),
        "{err:?}"
    );
    drop(backend);
    fx.open();
}
