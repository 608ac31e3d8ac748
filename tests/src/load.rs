//! A small load runner shared by the load benchmarks (`tests/benches/`):
//! N tokio tasks call an operation until a deadline; rates and percentiles
//! come out.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// An environment override of a numeric setting, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// What one timed phase measured.
#[derive(Debug)]
pub struct Stats {
    /// Calls that succeeded.
    pub ops: usize,
    /// Calls that failed.
    pub errors: usize,
    /// The first failure seen.
    pub first_error: Option<String>,
    /// Wall time of the phase.
    pub elapsed: Duration,
    /// Latencies of the successful calls, sorted.
    pub latencies: Vec<Duration>,
}

impl Stats {
    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `p` (0..=1).
    pub fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

/// Runs `op(n)` (n = a sequence number shared by all tasks) in `tasks`
/// tokio tasks until `duration` has passed; every task finishes the call it
/// is in, and the phase's time ends with the last one.
pub async fn run<F, Fut>(tasks: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let seq = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (op, seq) = (Arc::clone(&op), Arc::clone(&seq));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut errors, mut first_error) = (0, None);
                while Instant::now() < deadline {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match op(n).await {
                        Ok(()) => latencies.push(t0.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut stats = Stats {
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for handle in handles {
        let (latencies, errors, first_error) = handle.await.expect("load task");
        stats.latencies.extend(latencies);
        stats.errors += errors;
        if stats.first_error.is_none() {
            stats.first_error = first_error;
        }
    }
    stats.elapsed = start.elapsed();
    stats.ops = stats.latencies.len();
    stats.latencies.sort_unstable();
    if let Some(e) = &stats.first_error {
        eprintln!("  ({} errors; first: {e})", stats.errors);
    }
    stats
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}
