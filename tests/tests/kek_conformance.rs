//! One conformance suite for every KEK backend, run against a real SoftHSM
//! token (PKCS#11) and a real swtpm (TPM 2.0).

use std::any::Any;

use sha2::Digest;

use coffer_hsm::{Error, KekBackend, KekId, KekVersion, KeyRef, WrappedKey};

/// A backend and whatever must outlive it (a swtpm, a temporary folder).
struct Fixture {
    backend: Box<dyn KekBackend>,
    _keep: Vec<Box<dyn Any>>,
}

impl std::ops::Deref for Fixture {
    type Target = dyn KekBackend;
    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

fn pkcs11(wrap_limit: u64) -> Fixture {
    Fixture {
        backend: Box::new(coffer_tests::pkcs11_backend_with_limit(wrap_limit)),
        _keep: Vec::new(),
    }
}

fn tpm(wrap_limit: u64) -> Fixture {
    let (keep, backend) = coffer_tests::tpm_backend_with_limit(wrap_limit);
    Fixture {
        backend: Box::new(backend),
        _keep: vec![Box::new(keep)],
    }
}

macro_rules! conformance_suite {
    ($backend:ident) => {
        mod $backend {
            #[test]
            fn round_trip() {
                super::round_trip(&super::$backend(u64::MAX));
            }
            #[test]
            fn rewrap_to_a_rotated_version() {
                super::rewrap_to_a_rotated_version(&super::$backend(u64::MAX));
            }
            #[test]
            fn destroy_then_unwrap_fails() {
                super::destroy_then_unwrap_fails(&super::$backend(u64::MAX));
            }
            #[test]
            fn unknown_kek_is_a_clear_error() {
                super::unknown_kek_is_a_clear_error(&super::$backend(u64::MAX));
            }
            #[test]
            fn tampered_wrapped_keys_are_refused() {
                super::tampered_wrapped_keys_are_refused(&super::$backend(u64::MAX));
            }
            #[test]
            fn wrap_limit_refuses_new_wraps_but_still_unwraps() {
                super::wrap_limit_refuses_new_wraps_but_still_unwraps(&super::$backend(3), 3);
            }
            #[test]
            fn linking_macs_are_per_kek_survive_rotation_and_die_with_the_kek() {
                super::linking_macs(&super::$backend(u64::MAX));
            }
            #[test]
            fn list_shows_every_live_version() {
                super::list_shows_every_live_version(&super::$backend(u64::MAX));
            }
        }
    };
}

conformance_suite!(pkcs11);
conformance_suite!(tpm);

/// The linking key: deterministic per KEK, different across KEKs, not a
/// wrapping version, untouched by re-keying, gone with the KEK.
fn linking_macs(backend: &Fixture) {
    let kek = backend.create_kek().unwrap().id;
    let other = backend.create_kek().unwrap().id;
    let mac = backend.link_mac(&kek, b"123-45-6789").unwrap();
    assert_eq!(backend.link_mac(&kek, b"123-45-6789").unwrap(), mac);
    assert_ne!(backend.link_mac(&kek, b"123-45-6788").unwrap(), mac);
    assert_ne!(backend.link_mac(&other, b"123-45-6789").unwrap(), mac);
    assert_ne!(
        mac,
        <[u8; 32]>::from(sha2::Sha256::digest(b"123-45-6789")),
        "a keyed function, not a bare hash"
    );

    // Re-keying the KEK (new version, old one destroyed) keeps linkage.
    let v2 = backend.rotate_kek(&kek).unwrap();
    backend.destroy_kek_version(&kek, KekVersion(1)).unwrap();
    assert_eq!(backend.link_mac(&kek, b"123-45-6789").unwrap(), mac);
    let listed = backend.list_keks().unwrap();
    let info = listed.iter().find(|k| k.id == kek).unwrap();
    assert_eq!(info.versions, vec![v2], "the linking key is not a version");

    backend.destroy_kek(&kek).unwrap();
    assert!(matches!(
        backend.link_mac(&kek, b"123-45-6789"),
        Err(Error::UnknownKek { .. })
    ));
    assert!(matches!(
        backend.link_mac(&KekId::random().unwrap(), b"x"),
        Err(Error::UnknownKek { .. })
    ));
    assert_eq!(
        backend.link_mac(&other, b"123-45-6789").unwrap(),
        backend.link_mac(&other, b"123-45-6789").unwrap()
    );
}

fn key_ref() -> KeyRef {
    KeyRef::random().unwrap()
}

fn round_trip(backend: &Fixture) {
    let caps = backend.capabilities();
    assert!(caps.wrap_limit > 0);
    let kek = backend.create_kek().unwrap();
    assert_eq!(kek.versions, vec![KekVersion::FIRST]);

    let r = key_ref();
    let (key, wrapped) = backend.generate_data_key(&kek.id, &r).unwrap();
    assert_eq!(wrapped.kek, kek.id);
    assert_eq!(wrapped.version, KekVersion::FIRST);
    assert_ne!(key.expose(), &[0u8; 32], "a data key is random, not zero");
    assert!(
        !wrapped.bytes.windows(32).any(|w| w == key.expose()),
        "the wrapped form never contains the key"
    );
    assert_eq!(backend.unwrap(&wrapped, &r).unwrap().expose(), key.expose());

    let (other, other_wrapped) = backend.generate_data_key(&kek.id, &r).unwrap();
    assert_ne!(other.expose(), key.expose(), "every data key is fresh");
    assert_ne!(
        other_wrapped.bytes, wrapped.bytes,
        "every wrap has a fresh IV"
    );
}

fn rewrap_to_a_rotated_version(backend: &Fixture) {
    let kek = backend.create_kek().unwrap().id;
    let r = key_ref();
    let (key, old) = backend.generate_data_key(&kek, &r).unwrap();

    let v2 = backend.rotate_kek(&kek).unwrap();
    assert_eq!(v2, KekVersion(2));
    let (_, fresh) = backend.generate_data_key(&kek, &r).unwrap();
    assert_eq!(fresh.version, v2, "new wraps use the newest version");

    let moved = backend.rewrap(&old, &r, v2).unwrap();
    assert_eq!(moved.version, v2);
    assert_eq!(backend.unwrap(&moved, &r).unwrap().expose(), key.expose());
    assert_eq!(
        backend.unwrap(&old, &r).unwrap().expose(),
        key.expose(),
        "v1 still unwraps until destroyed"
    );

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
}

fn destroy_then_unwrap_fails(backend: &Fixture) {
    let kek = backend.create_kek().unwrap().id;
    let survivor = backend.create_kek().unwrap().id;
    let r = key_ref();
    let (_, wrapped) = backend.generate_data_key(&kek, &r).unwrap();
    let (kept, kept_wrapped) = backend.generate_data_key(&survivor, &r).unwrap();

    backend.destroy_kek(&kek).unwrap();
    let err = backend.unwrap(&wrapped, &r).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownKek { kek: k } if *k == kek),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("destroyed"),
        "the message says why: {err}"
    );
    assert!(matches!(
        backend.generate_data_key(&kek, &r),
        Err(Error::UnknownKek { .. })
    ));
    assert!(matches!(
        backend.destroy_kek(&kek),
        Err(Error::UnknownKek { .. })
    ));
    assert!(!backend.list_keks().unwrap().iter().any(|k| k.id == kek));

    assert_eq!(
        backend.unwrap(&kept_wrapped, &r).unwrap().expose(),
        kept.expose(),
        "destroying one KEK leaves the others intact"
    );
}

fn unknown_kek_is_a_clear_error(backend: &Fixture) {
    let ghost = KekId::random().unwrap();
    let r = key_ref();
    let is_unknown = |e: Error| matches!(e, Error::UnknownKek { kek } if kek == ghost);
    assert!(is_unknown(
        backend.generate_data_key(&ghost, &r).unwrap_err()
    ));
    assert!(is_unknown(backend.rotate_kek(&ghost).unwrap_err()));
    assert!(is_unknown(backend.destroy_kek(&ghost).unwrap_err()));

    // A wrapped key naming a KEK that never existed.
    let kek = backend.create_kek().unwrap().id;
    let (_, mut wrapped) = backend.generate_data_key(&kek, &r).unwrap();
    wrapped.kek = ghost.clone();
    assert!(is_unknown(backend.unwrap(&wrapped, &r).unwrap_err()));

    // A version that was never minted.
    let (_, mut wrapped) = backend.generate_data_key(&kek, &r).unwrap();
    wrapped.version = KekVersion(9);
    assert!(matches!(
        backend.unwrap(&wrapped, &r),
        Err(Error::UnknownKekVersion {
            version: KekVersion(9),
            ..
        })
    ));
}

fn tampered_wrapped_keys_are_refused(backend: &Fixture) {
    let kek = backend.create_kek().unwrap().id;
    let r = key_ref();
    let (key, wrapped) = backend.generate_data_key(&kek, &r).unwrap();

    // Every byte after the framing (IV or nonce, ciphertext, tag) is authenticated.
    for i in 2..wrapped.bytes.len() {
        let mut bad = wrapped.clone();
        bad.bytes[i] ^= 0x01;
        let err = backend.unwrap(&bad, &r).unwrap_err();
        assert!(
            matches!(err, Error::TamperedWrappedKey),
            "byte {i}: {err:?}"
        );
    }

    // The same bytes presented under another key ref or another version.
    let err = backend.unwrap(&wrapped, &key_ref()).unwrap_err();
    assert!(matches!(err, Error::TamperedWrappedKey), "{err:?}");
    let v2 = backend.rotate_kek(&kek).unwrap();
    let relabelled = WrappedKey {
        version: v2,
        ..wrapped.clone()
    };
    assert!(matches!(
        backend.unwrap(&relabelled, &r),
        Err(Error::TamperedWrappedKey)
    ));

    // Malformed framing is its own error.
    let mut truncated = wrapped.clone();
    truncated.bytes.truncate(10);
    assert!(matches!(
        backend.unwrap(&truncated, &r),
        Err(Error::MalformedWrappedKey(_))
    ));
    let mut future = wrapped.clone();
    future.bytes[0] = 99;
    assert!(matches!(
        backend.unwrap(&future, &r),
        Err(Error::MalformedWrappedKey(_))
    ));

    assert_eq!(
        backend.unwrap(&wrapped, &r).unwrap().expose(),
        key.expose(),
        "the original still unwraps"
    );
}

fn wrap_limit_refuses_new_wraps_but_still_unwraps(backend: &Fixture, limit: u64) {
    assert_eq!(backend.capabilities().wrap_limit, limit);
    let kek = backend.create_kek().unwrap().id;
    let r = key_ref();
    let mut wrapped = Vec::new();
    for _ in 0..limit {
        wrapped.push(backend.generate_data_key(&kek, &r).unwrap());
    }
    let err = backend.generate_data_key(&kek, &r).unwrap_err();
    assert!(
        matches!(&err, Error::WrapLimitReached { version: KekVersion(1), limit: l, .. } if *l == limit),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("rotate"),
        "the message says what to do: {err}"
    );
    // A rewrap into the exhausted version is a wrap too.
    assert!(matches!(
        backend.rewrap(&wrapped[0].1, &r, KekVersion::FIRST),
        Err(Error::WrapLimitReached { .. })
    ));
    for (key, w) in &wrapped {
        assert_eq!(
            backend.unwrap(w, &r).unwrap().expose(),
            key.expose(),
            "unwrap still works"
        );
    }
    // Rotation gives a fresh budget.
    let v2 = backend.rotate_kek(&kek).unwrap();
    let moved = backend.rewrap(&wrapped[0].1, &r, v2).unwrap();
    assert_eq!(
        backend.unwrap(&moved, &r).unwrap().expose(),
        wrapped[0].0.expose()
    );
}

fn list_shows_every_live_version(backend: &Fixture) {
    let a = backend.create_kek().unwrap().id;
    let b = backend.create_kek().unwrap().id;
    backend.rotate_kek(&b).unwrap();
    backend.rotate_kek(&b).unwrap();
    backend.destroy_kek_version(&b, KekVersion(2)).unwrap();
    let listed = backend.list_keks().unwrap();
    let versions_of = |id: &KekId| {
        listed
            .iter()
            .find(|k| &k.id == id)
            .map(|k| k.versions.clone())
    };
    assert_eq!(versions_of(&a), Some(vec![KekVersion(1)]));
    assert_eq!(versions_of(&b), Some(vec![KekVersion(1), KekVersion(3)]));
    assert_eq!(
        listed.iter().find(|k| k.id == b).unwrap().current(),
        Some(KekVersion(3))
    );
}
