//! The key host process over real mutual TLS, with a real key DB cluster
//! and a real SoftHSM token: roles, refusals at the handshake, rate limits.

use coffer_keyhost::api::roles;
use coffer_keyhost::client::{KeyHostClient, KeyHostError};
use coffer_keyhost::tls::install_crypto_provider;
use coffer_tests::stack::Infra;

fn client(infra: &Infra, url: &str, role: &str) -> KeyHostClient {
    install_crypto_provider();
    let cert = infra.client_cert(role);
    KeyHostClient::new(url, &infra.ca.cert_path(), &cert.cert, &cert.key).unwrap()
}

fn refused_with(result: Result<impl std::fmt::Debug, KeyHostError>, status: u16, code: &str) {
    match result {
        Err(KeyHostError::Refused {
            status: s, code: c, ..
        }) if s == status && c == code => {}
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_per_call() {
    let infra = Infra::new();
    let keyd = infra.start_keyd(&[]);
    let enc = client(&infra, &keyd.url(), roles::ENCRYPTION_HOST);
    let maint = client(&infra, &keyd.url(), roles::MAINTENANCE);
    let api = client(&infra, &keyd.url(), roles::API_HOST);

    // The encryption host: create a KEK, generate, open, delete.
    let kek = enc.create_kek().await.unwrap();
    let keys = enc.generate(&kek).await.unwrap();
    let opened = enc.open(keys.key_ref).await.unwrap();
    assert_eq!(opened.enc_key, keys.enc_key);
    assert_eq!(opened.mac_key, keys.mac_key);
    assert_eq!(opened.nonce, keys.nonce);
    assert_ne!(keys.enc_key, keys.mac_key, "two independent keys");

    // ...but never rotate, rewrap or destroy.
    refused_with(enc.rotate_kek(&kek).await, 403, "forbidden_role");
    refused_with(enc.rewrap(keys.key_ref).await, 403, "forbidden_role");
    refused_with(enc.destroy_kek(&kek).await, 403, "forbidden_role");

    // The maintenance worker rotates and rewraps, but never sees keys.
    refused_with(maint.generate(&kek).await, 403, "forbidden_role");
    refused_with(maint.open(keys.key_ref).await, 403, "forbidden_role");
    assert_eq!(maint.rotate_kek(&kek).await.unwrap(), 2);
    assert_eq!(maint.rewrap(keys.key_ref).await.unwrap(), 2);
    let after_rewrap = enc.open(keys.key_ref).await.unwrap();
    assert_eq!(after_rewrap.enc_key, keys.enc_key, "a rewrap keeps the key");

    // The API host may not call the key host at all.
    refused_with(api.create_kek().await, 403, "forbidden_role");
    refused_with(api.open(keys.key_ref).await, 403, "forbidden_role");

    // Delete, then the ref is unknown.
    enc.delete(keys.key_ref).await.unwrap();
    refused_with(enc.open(keys.key_ref).await, 404, "unknown_key_ref");

    // Destroying the KEK shreds every key it wrapped.
    let other = enc.generate(&kek).await.unwrap();
    maint.destroy_kek(&kek).await.unwrap();
    assert!(enc.open(other.key_ref).await.is_err());
    refused_with(enc.generate(&kek).await, 404, "unknown_kek");

    // The operations log names operations, never keys.
    let ops = std::fs::read_to_string(infra.path("keyd-ops.log")).unwrap();
    assert!(
        ops.contains("\"op\":\"open\"") && ops.contains("\"outcome\":\"forbidden_role\""),
        "{ops}"
    );
    let b64 = |s: &coffer_keyhost::api::Secret32| {
        serde_json::to_string(s)
            .unwrap()
            .trim_matches('"')
            .to_owned()
    };
    assert!(!ops.contains(&b64(&keys.enc_key)) && !ops.contains(&b64(&keys.mac_key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_at_the_handshake() {
    install_crypto_provider();
    let infra = Infra::new();
    let keyd = infra.start_keyd(&[]);

    // No client certificate at all.
    let tls = coffer_keyhost::tls::client_config(&infra.ca.cert_path(), None).unwrap();
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let err = anonymous
        .get(format!("{}/v1/health", keyd.url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // A certificate from another CA, even with the right role.
    let other_dir = coffer_tests::scratch_dir("otherca");
    let other_ca = coffer_softhsm::DevCa::open(other_dir.path()).unwrap();
    let forged = other_ca.client(roles::ENCRYPTION_HOST).unwrap();
    let stranger = KeyHostClient::new(
        &keyd.url(),
        &infra.ca.cert_path(),
        &forged.cert,
        &forged.key,
    )
    .unwrap();
    let err = stranger.create_kek().await.unwrap_err();
    assert!(matches!(err, KeyHostError::Unavailable(_)), "{err:?}");

    // The handshake refusals are in the key host's log; it keeps serving.
    let enc = client(&infra, &keyd.url(), roles::ENCRYPTION_HOST);
    enc.health().await.unwrap();
    let log = std::fs::read_to_string(&keyd.log).unwrap();
    assert!(log.contains("TLS handshake refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_are_rate_limited_per_kek() {
    let infra = Infra::new();
    let keyd = infra.start_keyd(&["--open-rate", "1", "--open-burst", "3"]);
    let enc = client(&infra, &keyd.url(), roles::ENCRYPTION_HOST);
    let (a, b) = (
        enc.create_kek().await.unwrap(),
        enc.create_kek().await.unwrap(),
    );
    let ka = enc.generate(&a).await.unwrap();
    let kb = enc.generate(&b).await.unwrap();
    for _ in 0..3 {
        enc.open(ka.key_ref).await.unwrap();
    }
    refused_with(enc.open(ka.key_ref).await, 429, "rate_limited");
    enc.open(kb.key_ref)
        .await
        .expect("another KEK has its own budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_key_host_fails_fast_and_service_resumes() {
    let infra = Infra::new();
    let mut keyd = infra.start_keyd(&[]);
    let url = keyd.url();
    let enc = client(&infra, &url, roles::ENCRYPTION_HOST);
    let kek = enc.create_kek().await.unwrap();
    let keys = enc.generate(&kek).await.unwrap();
    keyd.kill();

    let started = std::time::Instant::now();
    let err = enc.open(keys.key_ref).await.unwrap_err();
    assert!(matches!(err, KeyHostError::Unavailable(_)), "{err:?}");
    assert_eq!(err.code(), "key_host_unavailable");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );

    // Same address again: the client reconnects by itself.
    let port = url.rsplit(':').next().unwrap().to_owned();
    let _keyd = infra.start_keyd_on(&format!("127.0.0.1:{port}"), &[]);
    let opened = enc.open(keys.key_ref).await.unwrap();
    assert_eq!(opened.enc_key, keys.enc_key);
}

/// Keys generated while the KEK is rotated and its old versions retired,
/// over and over, all still open afterwards: no key is left under a
/// destroyed version (the two keys of a row always share one version, and
/// a retire never destroys a version a row still needs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_rotations_and_retirements_under_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    let infra = Infra::new();
    let keyd = infra.start_keyd(&[]);
    let enc = client(&infra, &keyd.url(), roles::ENCRYPTION_HOST);
    let maint = client(&infra, &keyd.url(), roles::MAINTENANCE);
    let kek = enc.create_kek().await.unwrap();
    // Retire refuses nothing and destroys nothing while only version 1 exists.
    let first = maint.retire_old_versions(&kek).await.unwrap();
    assert_eq!((first.current, first.remaining), (1, 0));
    assert!(first.destroyed.is_empty());

    // A count of cycles, not a deadline: a busy machine makes each cycle
    // slower, never fewer. Writers pace themselves: flat out they keep the
    // HSM so busy that each retire takes longer than the last (measured:
    // 35,000 keys and 75 s for four cycles), which proves nothing more.
    const CYCLES: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (enc, kek, made) = (enc.clone(), kek.clone(), Arc::clone(&made));
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let keys = enc.generate(&kek).await.unwrap();
                    made.lock()
                        .unwrap()
                        .push((keys.key_ref, keys.enc_key, keys.mac_key));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let mut destroyed = Vec::new();
    for _ in 0..CYCLES {
        maint.rotate_kek(&kek).await.unwrap();
        // The worker's grace period: longer than a generate takes.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        loop {
            let step = maint.retire_old_versions(&kek).await.unwrap();
            destroyed.extend(step.destroyed);
            if step.remaining == 0 {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(
        destroyed.len(),
        CYCLES,
        "every cycle retired the version before it: {destroyed:?}"
    );
    let made = made.lock().unwrap().clone();
    assert!(made.len() > 100, "{} keys made", made.len());
    for (key_ref, enc_key, mac_key) in made {
        let opened = enc.open(key_ref).await.unwrap();
        assert!(opened.enc_key == enc_key && opened.mac_key == mac_key);
    }
}

/// A rotation between the wraps of a record's two keys: both end up under
/// the newer version (the row records one), and both still open.
#[test]
fn a_rows_two_keys_are_moved_onto_one_kek_version() {
    use coffer_hsm::{KekBackend, KeyRef};
    let backend = coffer_tests::pkcs11_backend();
    let kek = backend.create_kek().unwrap().id;
    let (enc_ref, mac_ref) = (
        KeyRef::new(b"r/enc".to_vec()),
        KeyRef::new(b"r/mac".to_vec()),
    );
    let (enc_key, enc) = backend.generate_data_key(&kek, &enc_ref).unwrap();
    let v2 = backend.rotate_kek(&kek).unwrap();
    let (mac_key, mac) = backend.generate_data_key(&kek, &mac_ref).unwrap();
    assert_ne!(enc.version, mac.version, "the rotation landed in between");

    let (enc, mac) =
        coffer_keyhost::server::one_version(&backend, (enc, &enc_ref), (mac, &mac_ref)).unwrap();
    assert_eq!((enc.version, mac.version), (v2, v2));
    assert_eq!(
        backend.unwrap(&enc, &enc_ref).unwrap().expose(),
        enc_key.expose()
    );
    assert_eq!(
        backend.unwrap(&mac, &mac_ref).unwrap().expose(),
        mac_key.expose()
    );
    // The other way round: the MAC key wrapped first, the rotation after.
    let (mac_key, mac) = backend.generate_data_key(&kek, &mac_ref).unwrap();
    let v3 = backend.rotate_kek(&kek).unwrap();
    let (enc_key, enc) = backend.generate_data_key(&kek, &enc_ref).unwrap();
    let (enc, mac) =
        coffer_keyhost::server::one_version(&backend, (enc, &enc_ref), (mac, &mac_ref)).unwrap();
    assert_eq!((enc.version, mac.version), (v3, v3));
    assert_eq!(
        backend.unwrap(&enc, &enc_ref).unwrap().expose(),
        enc_key.expose()
    );
    assert_eq!(
        backend.unwrap(&mac, &mac_ref).unwrap().expose(),
        mac_key.expose()
    );
}
