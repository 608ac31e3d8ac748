//! Wycheproof's AES-GCM vectors through the token's `CKM_AES_GCM`, driven by
//! the same seal/open code the PKCS#11 backend wraps data keys with.
//!
//! Left out, with the reason:
//! - IV sizes other than 96 bits: the wrapping path only ever uses a random
//!   96-bit IV (`coffer_hsm::pkcs11::IV_LEN`).
//! - Tag sizes other than 128 bits: the path always seals and checks a full
//!   128-bit tag (`coffer_hsm::pkcs11::gcm::TAG_BITS`).
//!
//! Every key size (128, 192, 256) runs: the token mechanism expresses them all,
//! though KEKs are always AES-256.

use coffer_hsm::Error;
use coffer_hsm::pkcs11::{IV_LEN, gcm, shared_module};
use coffer_softhsm::find_softhsm_module;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use wycheproof::TestResult;
use wycheproof::aead::{TestName, TestSet};

#[test]
fn aes_gcm_vectors_through_the_token() {
    let token = coffer_tests::shared_token();
    // Opening the backend logs the process in.
    let _backend = coffer_tests::pkcs11_backend();
    let module = shared_module(&find_softhsm_module().unwrap()).unwrap();
    let slot = module
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| module.get_token_info(*s).unwrap().label().trim_end() == token.label())
        .unwrap();
    let session = module.open_rw_session(slot).unwrap();

    let set = TestSet::load(TestName::AesGcm).unwrap();
    let (mut valid, mut invalid) = (0, 0);
    let mut skipped_iv = 0;
    let mut skipped_tag = 0;
    for group in &set.test_groups {
        if group.nonce_size != IV_LEN * 8 {
            skipped_iv += group.tests.len();
            continue;
        }
        if group.tag_size != gcm::TAG_BITS as usize {
            skipped_tag += group.tests.len();
            continue;
        }
        for test in &group.tests {
            let key = session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Token(false),
                    Attribute::Sensitive(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Value(test.key.to_vec()),
                ])
                .unwrap();
            let sealed: Vec<u8> = [&test.ct[..], &test.tag[..]].concat();
            let opened = gcm::open(&session, key, &test.nonce, &test.aad, &sealed);
            match test.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let ours = gcm::seal(&session, key, &test.nonce, &test.aad, &test.pt).unwrap();
                    assert_eq!(ours, sealed, "tcId {} seal", test.tc_id);
                    assert_eq!(
                        opened.unwrap().as_slice(),
                        &test.pt[..],
                        "tcId {} open",
                        test.tc_id
                    );
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(
                        matches!(opened, Err(Error::TamperedWrappedKey)),
                        "tcId {} ({:?}) was accepted",
                        test.tc_id,
                        test.flags
                    );
                    invalid += 1;
                }
            }
            session.destroy_object(key).unwrap();
        }
    }
    eprintln!(
        "AES-GCM: {valid} valid and {invalid} invalid vectors through the token; left out {skipped_iv} with non-96-bit IVs, {skipped_tag} with short tags"
    );
    assert!(
        valid >= 50 && invalid >= 50,
        "the vector file was read ({valid} valid, {invalid} invalid)"
    );
}
