//! 8 threads × 10,000 generate+unwrap against one real SoftHSM token:
//! every result correct, no error, no deadlock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coffer_hsm::{KekBackend, KeyRef};

const THREADS: usize = 8;
const OPS_PER_THREAD: usize = 10_000;

#[test]
fn eight_threads_of_generate_and_unwrap_all_succeed() {
    let backend = Arc::new(coffer_tests::pkcs11_backend());
    // Two KEKs, so threads contend both on one key and across keys; one
    // rotation midway so lookups race a new version.
    let keks: Vec<_> = (0..2).map(|_| backend.create_kek().unwrap().id).collect();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let backend = backend.clone();
            let kek = keks[t % keks.len()].clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..OPS_PER_THREAD {
                    let key_ref = KeyRef::new(format!("{t}-{i}").into_bytes());
                    let (key, wrapped) = backend
                        .generate_data_key(&kek, &key_ref)
                        .unwrap_or_else(|e| panic!("thread {t} op {i}: generate: {e}"));
                    let unwrapped = backend
                        .unwrap(&wrapped, &key_ref)
                        .unwrap_or_else(|e| panic!("thread {t} op {i}: unwrap: {e}"));
                    assert_eq!(unwrapped.expose(), key.expose(), "thread {t} op {i}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // A watchdog instead of a hang: fail if progress stops for 60 s.
    let mut last = 0;
    let mut last_change = Instant::now();
    let mut rotated = false;
    while workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        let now = done.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        if !rotated && now > (THREADS * OPS_PER_THREAD / 2) as u64 {
            backend.rotate_kek(&keks[0]).unwrap();
            rotated = true;
        }
        assert!(
            last_change.elapsed() < Duration::from_secs(60),
            "no progress for 60 s at {now} ops: deadlock?"
        );
    }
    for w in workers {
        w.join().expect("worker panicked");
    }
    let total = done.load(Ordering::Relaxed);
    assert_eq!(total, (THREADS * OPS_PER_THREAD) as u64);
    eprintln!(
        "{total} generate+unwrap pairs in {:.1} s ({:.0} pairs/s)",
        started.elapsed().as_secs_f64(),
        total as f64 / started.elapsed().as_secs_f64()
    );
}
