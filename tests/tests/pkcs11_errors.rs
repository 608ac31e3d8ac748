//! Opening a token goes wrong in distinct, clear ways. Its own test binary:
//! a wrong PIN must be tried before anyone in the process has logged in.

use coffer_hsm::Error;
use coffer_hsm::pkcs11::{PinSource, Pkcs11Backend};
use secrecy::{ExposeSecret, SecretString};

#[test]
fn wrong_pin_missing_token_and_missing_module_are_distinct_errors() {
    let token = coffer_tests::new_token();
    let config = coffer_tests::pkcs11_config(&token);

    let wrong = "not-the-pin-4242";
    let mut bad_pin = config.clone();
    bad_pin.pin = PinSource::Value(SecretString::from(wrong));
    let err = Pkcs11Backend::open(&bad_pin).unwrap_err();
    assert!(
        matches!(&err, Error::WrongPin { label } if label == token.label()),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("refused the PIN"), "{message}");
    assert!(
        !message.contains(wrong),
        "the PIN never appears in an error"
    );

    let mut no_token = config.clone();
    no_token.token_label = "no-such-token".into();
    let err = Pkcs11Backend::open(&no_token).unwrap_err();
    assert!(
        matches!(&err, Error::TokenNotFound { label } if label == "no-such-token"),
        "{err:?}"
    );

    let mut no_module = config.clone();
    no_module.module = "/nonexistent/libpkcs11.so".into();
    let err = Pkcs11Backend::open(&no_module).unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");

    let mut unset = config.clone();
    unset.pin = PinSource::Env("COFFER_TEST_PIN_THAT_IS_NOT_SET".into());
    assert!(matches!(
        Pkcs11Backend::open(&unset),
        Err(Error::PinSource(_))
    ));

    // After all that, the right PIN, read from a file as in production, works.
    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{}\n", token.user_pin().expose_secret())).unwrap();
    let mut from_file = config.clone();
    from_file.pin = PinSource::File(pin_file);
    assert!(format!("{from_file:?}").contains("PinSource::File"));
    let backend = Pkcs11Backend::open(&from_file).unwrap();
    assert!(!format!("{backend:?}").contains(token.user_pin().expose_secret()));
}
