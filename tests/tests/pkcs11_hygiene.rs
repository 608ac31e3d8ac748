//! What the token itself says about a KEK: it cannot be read, wrapped out,
//! copied or loosened, and no object on the token both wraps and decrypts.

use coffer_hsm::KekBackend;
use coffer_hsm::pkcs11::shared_module;
use coffer_softhsm::find_softhsm_module;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

/// A session of the test's own on the shared token (the backend has logged
/// the process in already).
fn session() -> Session {
    let token = coffer_tests::shared_token();
    let module = shared_module(&find_softhsm_module().unwrap()).unwrap();
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| module.get_token_info(*s).unwrap().label().trim_end() == token.label())
        .unwrap();
    module.open_rw_session(slot).unwrap()
}

fn kek_object(session: &Session, kek: &coffer_hsm::KekId) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(format!("{kek}/v1").into_bytes()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "exactly one object per KEK version");
    found[0]
}

fn bool_attr(session: &Session, object: ObjectHandle, which: AttributeType) -> Option<bool> {
    session
        .get_attributes(object, &[which])
        .unwrap()
        .into_iter()
        .find_map(|a| match a {
            Attribute::Sensitive(b)
            | Attribute::Extractable(b)
            | Attribute::NeverExtractable(b)
            | Attribute::AlwaysSensitive(b)
            | Attribute::Token(b)
            | Attribute::Wrap(b)
            | Attribute::Unwrap(b)
            | Attribute::Decrypt(b)
            | Attribute::Encrypt(b) => Some(b),
            _ => None,
        })
}

#[test]
fn a_kek_cannot_leave_the_token() {
    let backend = coffer_tests::pkcs11_backend();
    let kek = backend.create_kek().unwrap().id;
    let session = session();
    let object = kek_object(&session, &kek);

    // CKA_VALUE: refused, or (SoftHSM) answered with the attribute left out.
    match session.get_attributes(object, &[AttributeType::Value]) {
        Ok(attributes) => assert!(
            !attributes.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the KEK's value was readable"
        ),
        Err(e) => eprintln!("CKA_VALUE refused: {e}"),
    }

    for (which, expected) in [
        (AttributeType::Token, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::AlwaysSensitive, true),
        (AttributeType::Wrap, false),
        (AttributeType::Unwrap, false),
    ] {
        assert_eq!(
            bool_attr(&session, object, which),
            Some(expected),
            "{which:?}"
        );
    }

    // Wrapping the KEK out under a key we control fails.
    let wrapping_key = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Decrypt(false),
                Attribute::Encrypt(false),
            ],
        )
        .unwrap();
    for mechanism in [Mechanism::AesKeyWrapPad, Mechanism::AesKeyWrap] {
        let result = session.wrap_key(&mechanism, wrapping_key, object);
        assert!(result.is_err(), "{mechanism:?} wrapped the KEK out");
    }
    session.destroy_object(wrapping_key).unwrap();

    // Neither copied nor loosened.
    assert!(
        session
            .copy_object(object, &[Attribute::Token(false)])
            .is_err(),
        "the KEK was copied"
    );
    assert!(
        session
            .update_attributes(object, &[Attribute::Extractable(true)])
            .is_err()
    );
    assert!(
        session
            .update_attributes(object, &[Attribute::Sensitive(false)])
            .is_err()
    );
    assert!(
        session
            .update_attributes(object, &[Attribute::Wrap(true)])
            .is_err()
    );
}

#[test]
fn no_object_on_the_token_both_wraps_and_decrypts() {
    let backend = coffer_tests::pkcs11_backend();
    let kek = backend.create_kek().unwrap().id;
    backend.rotate_kek(&kek).unwrap();
    let session = session();
    let keys = session
        .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
        .unwrap();
    assert!(keys.len() >= 2, "the KEK versions are on the token");
    for key in keys {
        let wrap = bool_attr(&session, key, AttributeType::Wrap).unwrap_or(false);
        let decrypt = bool_attr(&session, key, AttributeType::Decrypt).unwrap_or(false);
        assert!(
            !(wrap && decrypt),
            "object {key:?} can both wrap and decrypt"
        );
    }
}

#[test]
fn a_linking_key_only_computes_macs_and_cannot_leave_the_token() {
    let backend = coffer_tests::pkcs11_backend();
    let kek = backend.create_kek().unwrap().id;
    let session = session();
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Id(format!("{kek}/link").into_bytes()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "one linking key per KEK");
    let object = found[0];
    match session.get_attributes(object, &[AttributeType::Value]) {
        Ok(attributes) => assert!(
            !attributes.iter().any(|a| matches!(a, Attribute::Value(_))),
            "the linking key's value was readable"
        ),
        Err(e) => eprintln!("CKA_VALUE refused: {e}"),
    }
    for (which, expected) in [
        (AttributeType::Token, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::AlwaysSensitive, true),
        (AttributeType::Wrap, false),
        (AttributeType::Unwrap, false),
        (AttributeType::Encrypt, false),
        (AttributeType::Decrypt, false),
    ] {
        assert_eq!(
            bool_attr(&session, object, which),
            Some(expected),
            "{which:?} of the linking key"
        );
    }
    // It signs (HMAC) and does nothing else: no encryption under it.
    assert!(
        session
            .encrypt(&Mechanism::AesEcb, object, &[0u8; 16])
            .is_err()
    );
    let mac = session
        .sign(&Mechanism::Sha256Hmac, object, b"coffer/link/v1\0x")
        .unwrap();
    assert_eq!(mac, backend.link_mac(&kek, b"x").unwrap().to_vec());
    // Destroying the KEK destroys it too.
    backend.destroy_kek(&kek).unwrap();
    assert!(
        session
            .find_objects(&[Attribute::Id(format!("{kek}/link").into_bytes())])
            .unwrap()
            .is_empty()
    );
}
