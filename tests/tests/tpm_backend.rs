//! What only the TPM backend has, against a real swtpm (each test starts its
//! own): a restart, destroyed key files copied back, the slot cache, the
//! folder lock. The behaviour every backend shares is in `kek_conformance.rs`.

use std::fs;
use std::path::{Path, PathBuf};

use coffer_hsm::tpm::{TpmBackend, TpmConfig};
use coffer_hsm::{DEFAULT_WRAP_LIMIT, Error, KekBackend, KekId, KekVersion, KeyRef, WrapMechanism};

use coffer_tests::TpmFixture as Fixture;

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
