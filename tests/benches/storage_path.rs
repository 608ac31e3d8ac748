//! Run: `cargo build --release --workspace --bins && cargo bench -p coffer-tests --bench storage_path`
//! (quick: `COFFER_BENCH_SECS=2 COFFER_BENCH_BLOB_MIB=64 cargo bench -p coffer-tests --bench storage_path`).
//!
//! Load benchmark of the storage path (not criterion): one run starts the
//! real stack (`StoragePath::start(4)`: private CA, key DB, four TLS blob
//! nodes with W = 3, `coffer-keyd` on SoftHSM, `coffer-encryptd`), plays the
//! API host over mutual TLS on loopback and prints tables, next to the
//! ceilings measured in the same run:
//!
//! 1. 1 KiB records: stores (PUT) then loads (GET `whole=true`) at
//!    concurrency 1, 16 and 64, each for `COFFER_BENCH_SECS` (default 5 s);
//!    ceilings: the key host alone (generate / open), bare sqlx inserts of
//!    the same row to 3 and to 4 nodes, one row per transaction, and bare
//!    point selects.
//! 2. One BLOB of `COFFER_BENCH_BLOB_MIB` MiB (default 1024), uploaded and
//!    downloaded streamed (never whole in memory here), and the encryption
//!    host's peak RSS (`VmHWM`).
//! 3. Software crypto on one core: raw `aes-gcm` / `hmac` against the
//!    envelope's own `Sealer` / `Opener`, 1 KiB and 64 KiB.
//!
//! It prints to stdout and writes nothing else (the stack lives in a
//! temporary folder that goes away at the end).

use std::future::Future;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit};
use bytes::Bytes;
use coffer_host::crypto::{ContextDigest, Opener, RecordKeys, SEALED_SEGMENT, Sealer};
use coffer_keyhost::api::KeyRefId;
use coffer_keyhost::client::KeyHostClient;
use coffer_tests::load::{Stats, env_u64, ms, run};
use coffer_tests::stack::StoragePath;
use futures::StreamExt;
use futures::future::join_all;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgPool, PgPoolOptions};
use zeroize::Zeroizing;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;
const LEVELS: [usize; 3] = [1, 16, 64];
/// The record size of part 1.
const RECORD: usize = KIB;

// ---------------------------------------------------------------- load runner

fn ratio(measured: f64, ceiling: f64) -> String {
    if ceiling > 0.0 {
        format!("{:.0} %", 100.0 * measured / ceiling)
    } else {
        "-".into()
    }
}

// ---------------------------------------------------------------- CPU accounting

/// Clock ticks per second of /proc (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// utime + stime of one process, in seconds (0 once it is gone).
fn proc_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / TICKS
}

/// CPU seconds of every PostgreSQL server process (all clusters), per pid.
fn postgres_cpu() -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            out.insert(pid, proc_cpu(pid));
        }
    }
    out
}

/// Machine-wide (busy, iowait, all) CPU seconds from /proc/stat.
fn machine_cpu() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0) / TICKS;
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy, get(4), busy + get(3) + get(4))
}

/// CPU counters at one moment.
struct Snap {
    encryptd: f64,
    keyd: f64,
    client: f64,
    postgres: std::collections::HashMap<u32, f64>,
    machine: (f64, f64, f64),
}

impl Snap {
    fn take(path: &StoragePath) -> Self {
        Self {
            encryptd: proc_cpu(path.encryptd.pid()),
            keyd: proc_cpu(path.keyd.pid()),
            client: proc_cpu(std::process::id()),
            postgres: postgres_cpu(),
            machine: machine_cpu(),
        }
    }
}

/// Where the CPU went during one phase.
struct CpuUse {
    /// Of all cores, busy and in iowait.
    busy: f64,
    iowait: f64,
    /// CPU seconds of each part.
    encryptd: f64,
    keyd: f64,
    postgres: f64,
    client: f64,
    other: f64,
}

impl CpuUse {
    fn between(a: &Snap, b: &Snap) -> Self {
        let all = b.machine.2 - a.machine.2;
        let busy = b.machine.0 - a.machine.0;
        let postgres = b
            .postgres
            .iter()
            .map(|(pid, t)| t - a.postgres.get(pid).copied().unwrap_or(0.0))
            .sum::<f64>();
        let (encryptd, keyd, client) = (
            b.encryptd - a.encryptd,
            b.keyd - a.keyd,
            b.client - a.client,
        );
        Self {
            busy: busy / all.max(1e-9),
            iowait: (b.machine.1 - a.machine.1) / all.max(1e-9),
            encryptd,
            keyd,
            postgres,
            client,
            other: (busy - encryptd - keyd - postgres - client).max(0.0),
        }
    }
}

/// Runs `phase` and measures the CPU it used.
async fn measured<Fut: Future<Output = Stats>>(path: &StoragePath, phase: Fut) -> (Stats, CpuUse) {
    let a = Snap::take(path);
    let stats = phase.await;
    let b = Snap::take(path);
    (stats, CpuUse::between(&a, &b))
}

// ---------------------------------------------------------------- the API host

/// What the encryption host answered for a stored record.
#[derive(Clone, Debug)]
struct Stored {
    n: usize,
    key_ref: String,
    blob_ref: String,
}

#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    url: String,
    kek: String,
    context: String,
}

impl Api {
    async fn put(&self, body: reqwest::Body) -> Result<Value, String> {
        let response = self
            .client
            .put(format!("{}/v1/objects?kek={}", self.url, self.kek))
            .header("x-coffer-context", &self.context)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("put: {e}"))?;
        if response.status() != 201 {
            let status = response.status();
            return Err(format!("put: {status} {:?}", response.text().await));
        }
        response.json().await.map_err(|e| format!("put: {e}"))
    }

    async fn get(
        &self,
        blob_ref: &str,
        key_ref: &str,
        whole: bool,
    ) -> Result<reqwest::Response, String> {
        let response = self
            .client
            .get(format!(
                "{}/v1/objects/{blob_ref}?key_ref={key_ref}&whole={whole}",
                self.url
            ))
            .header("x-coffer-context", &self.context)
            .send()
            .await
            .map_err(|e| format!("get: {e}"))?;
        if response.status() != 200 {
            let status = response.status();
            return Err(format!("get: {status} {:?}", response.text().await));
        }
        Ok(response)
    }

    async fn store(&self, n: usize) -> Result<Stored, String> {
        let v = self.put(record(n).into()).await?;
        let field = |k: &str| v[k].as_str().map(str::to_owned).ok_or(format!("no {k}"));
        Ok(Stored {
            n,
            key_ref: field("key_ref")?,
            blob_ref: field("blob_ref")?,
        })
    }

    async fn load(&self, stored: &Stored) -> Result<(), String> {
        let body = self
            .get(&stored.blob_ref, &stored.key_ref, true)
            .await?
            .bytes()
            .await
            .map_err(|e| format!("get body: {e}"))?;
        if body[..] != record(stored.n)[..] {
            return Err(format!("record {} came back different", stored.n));
        }
        Ok(())
    }
}

/// Record `n`: a fixed 1 KiB pattern with `n` in its first 8 bytes.
fn record(n: usize) -> Vec<u8> {
    let mut r: Vec<u8> = (0..RECORD).map(|j| ((j * 7 + 3) % 251) as u8).collect();
    r[..8].copy_from_slice(&(n as u64).to_le_bytes());
    r
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

// ---------------------------------------------------------------- main

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: a
    // 3-minute load run has no place there.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "storage_path: load benchmark, run it with `cargo bench -p coffer-tests --bench storage_path`"
        );
        return;
    }
    let secs = Duration::from_secs(env_u64("COFFER_BENCH_SECS", 5));
    let blob_mib = env_u64("COFFER_BENCH_BLOB_MIB", 1024) as usize;
    println!(
        "# Coffer storage path load benchmark ({} s per phase, BLOB {blob_mib} MiB, {} cores)",
        secs.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Software crypto first, while nothing else runs.
    crypto_ceilings();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let path = StoragePath::start(4);
    println!(
        "\nstack up in {:.1} s: key DB + 4 blob nodes (W = 3), coffer-keyd (SoftHSM, 1 session), coffer-encryptd",
        started.elapsed().as_secs_f64()
    );
    runtime.block_on(async {
        let pg = Pg::connect(&path).await;
        records(&path, secs, &pg).await;
        blob(&path, blob_mib, &pg).await;
    });
}

// ---------------------------------------------------------------- part 1: records

async fn records(path: &StoragePath, secs: Duration, pg: &Pg) {
    let client = path.api_client();
    let url = path.encryptd.url();
    let kek: Value = client
        .post(format!("{url}/v1/keks"))
        .send()
        .await
        .expect("create KEK")
        .json()
        .await
        .expect("KEK answer");
    let api = Api {
        client,
        url,
        kek: kek["kek"].as_str().expect("kek").to_owned(),
        context: data_encoding::HEXLOWER.encode(&[7u8; 32]),
    };
    // Warm up: connections, pools, the schema on every node.
    for n in 0..20 {
        let stored = api.store(n).await.expect("warm-up store");
        api.load(&stored).await.expect("warm-up load");
    }

    let key_host = path
        .infra
        .client_cert(coffer_keyhost::api::roles::ENCRYPTION_HOST);
    let keys = KeyHostClient::new(
        &path.keyd.url(),
        &path.infra.ca.cert_path(),
        &key_host.cert,
        &key_host.key,
    )
    .expect("key host client");
    let keys_kek = keys.create_kek().await.expect("KEK");

    let seq_base = Arc::new(AtomicUsize::new(1 << 40));
    let mut rows = Vec::new();
    for &c in &LEVELS {
        eprintln!("records at concurrency {c} ...");
        // The path: stores, then loads of what was stored.
        let stored = Arc::new(Mutex::new(Vec::new()));
        let store = {
            let (api, stored) = (api.clone(), Arc::clone(&stored));
            measured(
                path,
                run(c, secs, move |n| {
                    let (api, stored) = (api.clone(), Arc::clone(&stored));
                    async move {
                        let s = api.store(n).await?;
                        stored.lock().expect("lock").push(s);
                        Ok(())
                    }
                }),
            )
            .await
        };
        let stored: Arc<Vec<Stored>> = Arc::new(std::mem::take(&mut *stored.lock().expect("lock")));
        let load = {
            let (api, stored) = (api.clone(), Arc::clone(&stored));
            measured(
                path,
                run(c, secs, move |n| {
                    let (api, stored) = (api.clone(), Arc::clone(&stored));
                    async move { api.load(&stored[n % stored.len()]).await }
                }),
            )
            .await
        };

        // Ceiling: the key host alone.
        let generated = Arc::new(Mutex::new(Vec::new()));
        let generate = {
            let (keys, kek, generated) = (keys.clone(), keys_kek.clone(), Arc::clone(&generated));
            run(c, secs, move |_| {
                let (keys, kek, generated) = (keys.clone(), kek.clone(), Arc::clone(&generated));
                async move {
                    let m = keys.generate(&kek).await.map_err(|e| e.to_string())?;
                    generated.lock().expect("lock").push(m.key_ref);
                    Ok(())
                }
            })
            .await
        };
        let refs: Arc<Vec<KeyRefId>> =
            Arc::new(std::mem::take(&mut *generated.lock().expect("lock")));
        let open = {
            let (keys, refs) = (keys.clone(), Arc::clone(&refs));
            run(c, secs, move |n| {
                let (keys, refs) = (keys.clone(), Arc::clone(&refs));
                async move {
                    keys.open(refs[n % refs.len()])
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            })
            .await
        };

        // Ceilings: bare inserts to 3 and to 4 nodes, bare selects.
        let insert3 = pg.inserts(3, c, secs, &seq_base).await;
        let insert4 = pg.inserts(4, c, secs, &seq_base).await;
        let select = pg.selects(c, secs).await;
        rows.push((c, store, load, generate, open, insert3, insert4, select));
    }

    println!(
        "\n## 1 KiB records through the encryption host (stores, then loads of what was stored)\n"
    );
    println!("| conc. | store/s | p50 ms | p99 ms | errors | load/s | p50 ms | p99 ms | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, (store, _), (load, _), ..) in &rows {
        println!(
            "| {c} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} |",
            store.rate(),
            ms(store.pct(0.5)),
            ms(store.pct(0.99)),
            store.errors,
            load.rate(),
            ms(load.pct(0.5)),
            ms(load.pct(0.99)),
            load.errors
        );
    }
    println!("\n## Ceilings for the records (same run, same stack)\n");
    println!("| conc. | what | ops/s | p50 ms | p99 ms | errors | path/ceiling |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (c, (store, _), (load, _), generate, open, insert3, insert4, select) in &rows {
        let lines: [(&str, &Stats, f64); 5] = [
            (
                "key host generate (store's key call)",
                generate,
                store.rate(),
            ),
            ("bare INSERT 1 KiB row, 3 nodes (W)", insert3, store.rate()),
            (
                "bare INSERT 1 KiB row, 4 nodes (all)",
                insert4,
                store.rate(),
            ),
            ("key host open (load's key call)", open, load.rate()),
            ("bare SELECT 1 KiB row, 1 node", select, load.rate()),
        ];
        for (what, s, path_rate) in lines {
            println!(
                "| {c} | {what} | {:.0} | {} | {} | {} | {} |",
                s.rate(),
                ms(s.pct(0.5)),
                ms(s.pct(0.99)),
                s.errors,
                ratio(path_rate, s.rate())
            );
        }
    }
    println!("\n## Where the CPU went in the path phases (2 cores; CPU ms per record)\n");
    println!(
        "| conc. | phase | records/s | machine busy | iowait | encryptd | keyd | postgres (5 clusters) | bench client | other |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, store, load, ..) in &rows {
        for (phase, (s, u)) in [("store", store), ("load", load)] {
            let per = |t: f64| format!("{:.2}", 1e3 * t / s.ops.max(1) as f64);
            println!(
                "| {c} | {phase} | {:.0} | {:.0} % | {:.0} % | {} | {} | {} | {} | {} |",
                s.rate(),
                100.0 * u.busy,
                100.0 * u.iowait,
                per(u.encryptd),
                per(u.keyd),
                per(u.postgres),
                per(u.client),
                per(u.other)
            );
        }
    }
}

/// Direct sqlx pools over the same TLS blob nodes, with a scratch table.
struct Pg {
    pools: Vec<PgPool>,
}

impl Pg {
    async fn connect(path: &StoragePath) -> Self {
        let mut pools = Vec::new();
        for node in &path.nodes {
            let url = path.infra.verified_url(node);
            let max = *LEVELS.iter().max().expect("levels") as u32;
            let pool = PgPoolOptions::new()
                .max_connections(max)
                .connect(&url)
                .await
                .expect("bare pool");
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS bench_ceiling (
                    blob_ref bytea NOT NULL,
                    idx integer NOT NULL,
                    data bytea NOT NULL,
                    sha256 bytea NOT NULL,
                    PRIMARY KEY (blob_ref, idx));
                 ALTER TABLE bench_ceiling ALTER COLUMN data SET STORAGE EXTERNAL;",
            )
            .execute(&pool)
            .await
            .expect("scratch table");
            // Open every connection now, not in a timed phase.
            let conns = join_all((0..max).map(|_| pool.acquire())).await;
            drop(conns);
            pools.push(pool);
        }
        Self { pools }
    }

    /// One 1 KiB + 16-byte-tag row with its digest, one row per
    /// transaction (autocommit), on `nodes` nodes in parallel per record.
    async fn inserts(
        &self,
        nodes: usize,
        c: usize,
        secs: Duration,
        seq: &Arc<AtomicUsize>,
    ) -> Stats {
        let pools: Arc<Vec<PgPool>> = Arc::new(self.pools[..nodes].to_vec());
        let seq = Arc::clone(seq);
        run(c, secs, move |_| {
            let (pools, seq) = (Arc::clone(&pools), Arc::clone(&seq));
            async move {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let key = (n as u128).to_be_bytes().to_vec();
                let mut data = record(n);
                data.extend_from_slice(&[0u8; 16]);
                let digest = Sha256::digest(&data).to_vec();
                let results = join_all(pools.iter().map(|pool| {
                    sqlx::query(
                        "INSERT INTO bench_ceiling (blob_ref, idx, data, sha256) VALUES ($1, 1, $2, $3)",
                    )
                    .bind(&key)
                    .bind(&data)
                    .bind(&digest)
                    .execute(pool)
                }))
                .await;
                for r in results {
                    r.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        })
        .await
    }

    /// `mib` 1 MiB rows into all 4 nodes, one transaction per node, chunk
    /// after chunk (as the blob writer does); then read back from one node.
    async fn bulk(&self, base: &Bytes, mib: usize) -> (Duration, Duration) {
        let key = b"bulk-ceiling-row".to_vec();
        let digest = Sha256::digest(base).to_vec();
        let started = Instant::now();
        let mut txs = join_all(self.pools.iter().map(|p| p.begin()))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("begin");
        for i in 0..mib {
            let results = join_all(txs.iter_mut().map(|tx| {
                sqlx::query(
                    "INSERT INTO bench_ceiling (blob_ref, idx, data, sha256) VALUES ($1, $2, $3, $4)",
                )
                .bind(&key)
                .bind(i as i32 + 1000)
                .bind(base.as_ref())
                .bind(&digest)
                .execute(&mut **tx)
            }))
            .await;
            for r in results {
                r.expect("bulk insert");
            }
        }
        for r in join_all(txs.into_iter().map(|tx| tx.commit())).await {
            r.expect("commit");
        }
        let up = started.elapsed();
        let started = Instant::now();
        for i in 0..mib {
            let data: Vec<u8> = sqlx::query_scalar(
                "SELECT data FROM bench_ceiling WHERE blob_ref = $1 AND idx = $2",
            )
            .bind(&key)
            .bind(i as i32 + 1000)
            .fetch_one(&self.pools[0])
            .await
            .expect("bulk select");
            assert_eq!(data.len(), MIB);
        }
        (up, started.elapsed())
    }

    /// Point selects of rows the 4-node inserts wrote, nodes in rotation.
    async fn selects(&self, c: usize, secs: Duration) -> Stats {
        let pools: Arc<Vec<PgPool>> = Arc::new(self.pools.clone());
        let keys: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT blob_ref FROM bench_ceiling LIMIT 10000")
                .fetch_all(&self.pools[3])
                .await
                .expect("keys");
        let keys = Arc::new(keys);
        run(c, secs, move |n| {
            let (pools, keys) = (Arc::clone(&pools), Arc::clone(&keys));
            async move {
                let data: Vec<u8> = sqlx::query_scalar(
                    "SELECT data FROM bench_ceiling WHERE blob_ref = $1 AND idx = 1",
                )
                .bind(&keys[n % keys.len()])
                .fetch_one(&pools[n % pools.len()])
                .await
                .map_err(|e| e.to_string())?;
                if data.len() != RECORD + 16 {
                    return Err(format!("{} bytes", data.len()));
                }
                Ok(())
            }
        })
        .await
    }
}

// ---------------------------------------------------------------- part 2: BLOB

/// Block `i` of the BLOB: a fixed 1 MiB pseudo-random pattern with `i` in
/// its first 8 bytes.
fn block(base: &[u8], i: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

async fn blob(path: &StoragePath, mib: usize, pg: &Pg) {
    let client = path.api_client();
    let url = path.encryptd.url();
    let kek: Value = client
        .post(format!("{url}/v1/keks"))
        .send()
        .await
        .expect("create KEK")
        .json()
        .await
        .expect("KEK answer");
    let api = Api {
        client,
        url,
        kek: kek["kek"].as_str().expect("kek").to_owned(),
        context: data_encoding::HEXLOWER.encode(&[9u8; 32]),
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let base: Bytes = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into();
    // The expected digest, block by block (outside the timed part).
    let mut sha = Sha256::new();
    for i in 0..mib {
        sha.update(block(&base, i));
    }
    let expected = data_encoding::HEXLOWER.encode(&sha.finalize());
    let total = (mib * MIB) as u64;
    let rss_before = peak_rss_kib(path.encryptd.pid());
    eprintln!("BLOB of {mib} MiB ...");

    let upload = {
        let base = base.clone();
        futures::stream::iter(
            (0..mib).map(move |i| Ok::<_, std::io::Error>(Bytes::from(block(&base, i)))),
        )
    };
    let cpu_up = Snap::take(path);
    let started = Instant::now();
    let v = api
        .put(reqwest::Body::wrap_stream(upload))
        .await
        .expect("BLOB upload");
    let up = started.elapsed();
    let cpu_up = CpuUse::between(&cpu_up, &Snap::take(path));
    assert_eq!(v["size"].as_u64(), Some(total), "stored size");
    assert_eq!(
        v["sha256"].as_str(),
        Some(expected.as_str()),
        "stored digest"
    );
    let (blob_ref, key_ref) = (
        v["blob_ref"].as_str().expect("blob_ref"),
        v["key_ref"].as_str().expect("key_ref"),
    );
    let rss_after_up = peak_rss_kib(path.encryptd.pid());

    let cpu_down = Snap::take(path);
    let started = Instant::now();
    let response = api
        .get(blob_ref, key_ref, false)
        .await
        .expect("BLOB download");
    let mut first_byte = None;
    let (mut pos, mut current, mut same) = (0usize, (usize::MAX, Vec::new()), true);
    let mut body = response.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.expect("BLOB body");
        first_byte.get_or_insert_with(|| started.elapsed());
        let mut rest = &part[..];
        while !rest.is_empty() {
            let i = pos / MIB;
            if current.0 != i {
                current = (i, block(&base, i));
            }
            let off = pos % MIB;
            let take = (MIB - off).min(rest.len());
            same &= current.1.get(off..off + take) == Some(&rest[..take]);
            pos += take;
            rest = &rest[take..];
        }
    }
    let down = started.elapsed();
    let cpu_down = CpuUse::between(&cpu_down, &Snap::take(path));
    assert_eq!(pos as u64, total, "downloaded size");
    assert!(same, "the download is what was uploaded");
    let rss_after = peak_rss_kib(path.encryptd.pid());

    // Ceiling: the same chunk rows straight into the nodes, no HTTP, keys or crypto.
    let bare_mib = (mib / 4).max(1);
    eprintln!("bare bulk ceiling, {bare_mib} MiB ...");
    let (bare_up, bare_down) = pg.bulk(&base, bare_mib).await;

    let rate = |bytes: usize, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    let (up_rate, down_rate) = (rate(mib * MIB, up), rate(mib * MIB, down));
    let (ceil_up, ceil_down) = (
        rate(bare_mib * MIB, bare_up),
        rate(bare_mib * MIB, bare_down),
    );
    println!("\n## One {mib} MiB BLOB, streamed both ways (verified byte for byte)\n");
    println!("| direction | seconds | MB/s | bare ceiling MB/s | path/ceiling |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| upload (PUT, streamed) | {:.1} | {up_rate:.0} | {ceil_up:.0} | {} |",
        up.as_secs_f64(),
        ratio(up_rate, ceil_up)
    );
    println!(
        "| download (GET whole=false) | {:.1} | {down_rate:.0} | {ceil_down:.0} | {} |",
        down.as_secs_f64(),
        ratio(down_rate, ceil_down)
    );
    println!(
        "\nbare ceiling: {bare_mib} MiB as 1 MiB rows (the writer's chunk size) INSERTed in one \
         transaction per node on all 4 nodes in parallel, chunk after chunk, then SELECTed back \
         chunk after chunk from one node; no HTTP, key host or crypto."
    );
    println!(
        "\n| direction | machine busy | iowait | CPU s encryptd | keyd | postgres | bench client | other |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (what, u) in [("upload", &cpu_up), ("download", &cpu_down)] {
        println!(
            "| {what} | {:.0} % | {:.0} % | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            100.0 * u.busy,
            100.0 * u.iowait,
            u.encryptd,
            u.keyd,
            u.postgres,
            u.client,
            u.other
        );
    }
    println!(
        "\nfirst downloaded byte after {} ms; encryption host peak RSS (VmHWM): {} MiB before the BLOB \
         (after the record phases), {} MiB after the upload, {} MiB after the download",
        ms(first_byte.unwrap_or_default()),
        rss_before / 1024,
        rss_after_up / 1024,
        rss_after / 1024
    );
}

// ---------------------------------------------------------------- part 3: crypto

/// Calls per second of `f` on this thread over about `budget`.
fn per_sec(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..32 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..32 {
            f();
        }
        n += 32;
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return n as f64 / elapsed.as_secs_f64();
        }
    }
}

fn crypto_ceilings() {
    eprintln!("crypto ...");
    let budget = Duration::from_millis(env_u64("COFFER_BENCH_CRYPTO_MS", 1000));
    let keys = RecordKeys {
        enc: Zeroizing::new([1; 32]),
        mac: Zeroizing::new([2; 32]),
        nonce_prefix: [3; 7],
    };
    let digest = ContextDigest([4; 32]);
    let cipher = Aes256Gcm::new((&[1u8; 32]).into());
    let aad = [5u8; 40];
    let mut counter = 0u64;

    let mut table = Vec::new();
    for size in [KIB, 64 * KIB] {
        let mut buf = vec![6u8; size];
        let mut gcm = || {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let tag = cipher
                .encrypt_inout_detached(&nonce.into(), &aad, (&mut buf[..]).into())
                .expect("seal");
            black_box(tag);
        };
        let raw_gcm = per_sec(budget, &mut gcm);
        let mut buf = vec![6u8; size];
        let raw_hmac = per_sec(budget, || {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&[2; 32]).expect("key");
            mac.update(&buf);
            black_box(mac.finalize().into_bytes());
        });
        let raw_both = per_sec(budget, || {
            counter += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&counter.to_be_bytes());
            let tag = cipher
                .encrypt_inout_detached(&nonce.into(), &aad, (&mut buf[..]).into())
                .expect("seal");
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&[2; 32]).expect("key");
            mac.update(&buf);
            mac.update(&tag);
            black_box(mac.finalize().into_bytes());
        });
        let plain = vec![6u8; size];
        let mut out = Vec::with_capacity(2 * size + 64);
        let (sealer_what, sealer, opener_what, opener);
        if size == KIB {
            // A whole record per call: new (key schedule), push, finish.
            sealer_what = "Sealer: whole 1 KiB record (new + push + finish)";
            sealer = per_sec(budget, || {
                out.clear();
                let mut s = Sealer::new(&keys, &digest);
                s.push(&plain, &mut out).expect("push");
                black_box(s.finish(&mut out).expect("finish"));
            });
            let mut s = Sealer::new(&keys, &digest);
            let header = s.header();
            let mut sealed = Vec::new();
            s.push(&plain, &mut sealed).expect("push");
            let trailer = s.finish(&mut sealed).expect("finish");
            opener_what = "Opener: whole 1 KiB record (new + open + finish)";
            opener = per_sec(budget, || {
                let mut o = Opener::new(&keys, &digest, &header).expect("opener");
                black_box(o.open(&sealed, true).expect("open"));
                o.finish(&trailer).expect("mac");
            });
        } else {
            // Steady streaming: one 64 KiB segment per call.
            sealer_what = "Sealer: streaming, per 64 KiB segment";
            let mut s = Sealer::new(&keys, &digest);
            sealer = per_sec(budget, || {
                out.clear();
                s.push(&plain, &mut out).expect("push");
                black_box(&out);
            });
            let mut s = Sealer::new(&keys, &digest);
            let header = s.header();
            let mut sealed = Vec::new();
            for _ in 0..16 {
                s.push(&plain, &mut sealed).expect("push");
            }
            s.push(&[0], &mut sealed).expect("push"); // so the 16 are not last
            assert_eq!(sealed.len(), 16 * SEALED_SEGMENT);
            let segs: Vec<&[u8]> = sealed.chunks(SEALED_SEGMENT).collect();
            let mut o = Opener::new(&keys, &digest, &header).expect("opener");
            let mut i = 0;
            opener_what = "Opener: streaming, per 64 KiB segment";
            opener = per_sec(budget, || {
                if i == segs.len() {
                    o = Opener::new(&keys, &digest, &header).expect("opener");
                    i = 0;
                }
                black_box(o.open(segs[i], false).expect("open"));
                i += 1;
            });
        }
        table.push((size, "raw aes-gcm: seal (ceiling)", raw_gcm, raw_gcm));
        table.push((
            size,
            "raw hmac: HMAC-SHA256 over the buffer",
            raw_hmac,
            raw_gcm,
        ));
        table.push((
            size,
            "raw aes-gcm seal + HMAC over the buffer",
            raw_both,
            raw_gcm,
        ));
        table.push((size, sealer_what, sealer, raw_gcm));
        table.push((size, opener_what, opener, raw_gcm));
    }
    println!("\n## Software crypto, one core\n");
    println!("| buffer | what | ops/s | MB/s | of raw seal |");
    println!("|---:|---|---:|---:|---:|");
    for (size, what, rate, ceiling) in table {
        println!(
            "| {} KiB | {what} | {rate:.0} | {:.0} | {} |",
            size / KIB,
            rate * size as f64 / 1e6,
            ratio(rate, ceiling)
        );
    }
}
