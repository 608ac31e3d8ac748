//! Generate+wrap and unwrap per backend at 1 and 2 threads, beside the raw
//! ceiling: a bare cryptoki loop of the same calls on the same kind of token key.
//!
//! `cargo bench -p coffer-hsm --bench kek_backends` (SoftHSM and swtpm must
//! be installed: `scripts/install-deps`). Figures go to BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_hsm::pkcs11::{IV_LEN, PinSource, Pkcs11Backend, Pkcs11Config, gcm, shared_module};
use coffer_hsm::{KekBackend, KeyRef, WrappedKey};
use coffer_softhsm::{SoftHsmToken, find_softhsm_module};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

const THREADS: [usize; 2] = [1, 2];

/// Runs `iters` calls of `op` spread over `threads` threads; returns the wall time.
fn spread<S: Send + 'static>(
    threads: usize,
    iters: u64,
    state: impl Fn(usize) -> S,
    op: impl Fn(&S, u64) + Send + Sync + 'static,
) -> Duration {
    let op = Arc::new(op);
    let states: Vec<S> = (0..threads).map(state).collect();
    let start = Instant::now();
    let handles: Vec<_> = states
        .into_iter()
        .enumerate()
        .map(|(t, s)| {
            let op = op.clone();
            let share = iters / threads as u64 + u64::from((t as u64) < iters % threads as u64);
            std::thread::spawn(move || {
                for i in 0..share {
                    op(&s, i);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("bench thread");
    }
    start.elapsed()
}

fn token() -> SoftHsmToken {
    let conf =
        std::env::var_os("SOFTHSM2_CONF").expect("SOFTHSM2_CONF (set by .cargo/config.toml)");
    let dir = std::path::Path::new(&conf)
        .parent()
        .expect("conf folder")
        .to_path_buf();
    SoftHsmToken::create(&dir, &format!("bench-{}", std::process::id())).expect("SoftHSM token")
}

fn pkcs11(c: &mut Criterion, token: &SoftHsmToken) {
    let mut config = Pkcs11Config::new(
        find_softhsm_module().expect("softhsm"),
        token.label(),
        PinSource::Value(token.user_pin().clone()),
    );
    config.sessions = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let backend = Arc::new(Pkcs11Backend::open(&config).expect("open token"));
    let kek = backend.create_kek().expect("kek").id;
    let key_ref = KeyRef::new(b"bench".to_vec());
    let (_, wrapped) = backend.generate_data_key(&kek, &key_ref).expect("wrap");

    let mut group = c.benchmark_group("pkcs11");
    group.throughput(Throughput::Elements(1));
    for threads in THREADS {
        let (b, k, r) = (backend.clone(), kek.clone(), key_ref.clone());
        group.bench_function(format!("generate_wrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let (b, k, r) = (b.clone(), k.clone(), r.clone());
                spread(
                    threads,
                    iters,
                    |_| (),
                    move |_, _| {
                        b.generate_data_key(&k, &r).expect("generate");
                    },
                )
            })
        });
        let (b, w, r) = (backend.clone(), wrapped.clone(), key_ref.clone());
        group.bench_function(format!("unwrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let (b, w, r) = (b.clone(), w.clone(), r.clone());
                spread(
                    threads,
                    iters,
                    |_| (),
                    move |_, _| {
                        b.unwrap(&w, &r).expect("unwrap");
                    },
                )
            })
        });
    }
    group.finish();
    bare_cryptoki(c, token, &wrapped);
}

/// The same calls with nothing around them: one session per thread, the
/// same token key template, C_GenerateRandom + C_Encrypt(GCM) and C_Decrypt(GCM).
fn bare_cryptoki(c: &mut Criterion, token: &SoftHsmToken, template_of: &WrappedKey) {
    let module = shared_module(&find_softhsm_module().expect("softhsm")).expect("module");
    let slot = module
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| module.get_token_info(*s).expect("info").label().trim_end() == token.label())
        .expect("bench token");
    let setup = module.open_rw_session(slot).expect("session");
    let key: ObjectHandle = setup
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(b"bare-bench".to_vec()),
            ],
        )
        .expect("bare key");
    let aad = vec![7u8; 23 + 2 + 16 + 2 + template_of.kek.as_str().len() + 4];
    let iv = [1u8; IV_LEN];
    let sealed = gcm::seal(&setup, key, &iv, &aad, &[9u8; 32]).expect("seal");

    let mut group = c.benchmark_group("bare_cryptoki");
    group.throughput(Throughput::Elements(1));
    for threads in THREADS {
        let m = module.clone();
        let a = aad.clone();
        group.bench_function(format!("generate_wrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let m = m.clone();
                let a = a.clone();
                spread(
                    threads,
                    iters,
                    |_| m.open_rw_session(slot).expect("session"),
                    move |s: &Session, _| {
                        let mut dk = [0u8; 32];
                        let mut iv = [0u8; IV_LEN];
                        s.generate_random_slice(&mut dk).expect("random");
                        s.generate_random_slice(&mut iv).expect("random");
                        gcm::seal(s, key, &iv, &a, &dk).expect("seal");
                    },
                )
            })
        });
        let m = module.clone();
        let (a, sl) = (aad.clone(), sealed.clone());
        group.bench_function(format!("unwrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let m = m.clone();
                let (a, sl) = (a.clone(), sl.clone());
                spread(
                    threads,
                    iters,
                    |_| m.open_rw_session(slot).expect("session"),
                    move |s: &Session, _| {
                        gcm::open(s, key, &iv, &a, &sl).expect("open");
                    },
                )
            })
        });
    }
    group.finish();
}

/// The TPM backend on a swtpm: every call is serialised by the device.
fn tpm(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let swtpm = coffer_softhsm::Swtpm::start(&dir.path().join("tpm")).expect("swtpm");
    let backend = Arc::new(
        coffer_hsm::tpm::TpmBackend::open(coffer_hsm::tpm::TpmConfig::new(
            swtpm.tcti(),
            dir.path().join("keys"),
        ))
        .expect("open the TPM backend"),
    );
    let kek = backend.create_kek().expect("kek").id;
    let key_ref = KeyRef::new(b"bench".to_vec());
    let (_, wrapped) = backend.generate_data_key(&kek, &key_ref).expect("wrap");

    let mut group = c.benchmark_group("tpm");
    group.throughput(Throughput::Elements(1));
    for threads in THREADS {
        let (b, k, r) = (backend.clone(), kek.clone(), key_ref.clone());
        group.bench_function(format!("generate_wrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let (b, k, r) = (b.clone(), k.clone(), r.clone());
                spread(
                    threads,
                    iters,
                    |_| (),
                    move |_, _| {
                        b.generate_data_key(&k, &r).expect("generate");
                    },
                )
            })
        });
        let (b, w, r) = (backend.clone(), wrapped.clone(), key_ref.clone());
        group.bench_function(format!("unwrap/{threads}t"), |bench| {
            bench.iter_custom(|iters| {
                let (b, w, r) = (b.clone(), w.clone(), r.clone());
                spread(
                    threads,
                    iters,
                    |_| (),
                    move |_, _| {
                        b.unwrap(&w, &r).expect("unwrap");
                    },
                )
            })
        });
    }
    group.finish();
    drop(backend);
    swtpm.stop().expect("stop swtpm");
}

fn backends(c: &mut Criterion) {
    let token = token();
    pkcs11(c, &token);
    tpm(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = backends
}
criterion_main!(benches);
