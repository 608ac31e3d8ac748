//! Run: `cargo build --release --workspace --bins && cargo bench -p coffer-tests --bench api`
//! (quick: `COFFER_BENCH_SECS=2 COFFER_BENCH_BLOB_MIB=64 cargo bench -p coffer-tests --bench api`).
//!
//! Load benchmark of the public API host (not criterion): one run starts the
//! whole stack (`ApiStack::start()`: private CA, key DB, four TLS blob nodes
//! with W = 3, `coffer-keyd` on SoftHSM, `coffer-encryptd`, a metadata
//! cluster and `coffer serve`), makes a tenant, a study and writer / reader
//! keys, and plays an outside client over HTTPS on loopback:
//!
//! 1. 1 KiB JSON records: stores (`POST /v1/studies/{study}/records`) then
//!    reads (`GET /v1/records/{token}`, checked) at concurrency 1, 16 and
//!    64, each for `COFFER_BENCH_SECS` (default 5 s).
//! 2. Batches of 100 such records (`POST .../records:batch`) at concurrency
//!    1 and 4, each for `COFFER_BENCH_BATCH_SECS` (default 10 s).
//! 3. Field tokens: `POST .../tokenize` of 4 fields (one deterministic,
//!    `dtk_` through the HSM linking key) then `POST /v1/detokenize` of
//!    those 4 tokens (checked), at concurrency 1, 16 and 64.
//! 4. One BLOB of `COFFER_BENCH_BLOB_MIB` MiB (default 1024), uploaded and
//!    downloaded streamed (never whole in memory here), checked by SHA-256.
//!
//! It prints to stdout and writes nothing else (the stack lives in a
//! temporary folder that goes away at the end).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_tests::load::{env_u64, ms, run};
use coffer_tests::stack::ApiStack;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const LEVELS: [usize; 3] = [1, 16, 64];
const BATCH_LEVELS: [usize; 2] = [1, 4];
/// Records per batch call.
const BATCH: usize = 100;
/// The serialized size of a record's `data`.
const RECORD: usize = 1024;

// ---------------------------------------------------------------- load runner

// ---------------------------------------------------------------- the client

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    url: String,
    study: String,
    writer: String,
    reader: String,
}

/// Record `n`'s `data`: `{"n":n,"pad":"…"}`, exactly `RECORD` bytes as JSON.
fn data(n: usize) -> Value {
    let head = json!({ "n": n, "pad": "" }).to_string().len();
    let pad: String = (0..RECORD - head)
        .map(|j| char::from(b'a' + ((n + j) % 26) as u8))
        .collect();
    json!({ "n": n, "pad": pad })
}

async fn answer(response: reqwest::Response, want: u16, what: &str) -> Result<Value, String> {
    let status = response.status().as_u16();
    if status != want {
        return Err(format!("{what}: {status} {:?}", response.text().await));
    }
    response.json().await.map_err(|e| format!("{what}: {e}"))
}

impl Client {
    async fn post(&self, path: &str, key: &str, body: &Value) -> Result<reqwest::Response, String> {
        self.http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))
    }

    async fn store(&self, n: usize) -> Result<(usize, String), String> {
        let body =
            json!({ "participant": format!("P-{}", n % 1000), "kind": "bench", "data": data(n) });
        let v = answer(
            self.post(
                &format!("/v1/studies/{}/records", self.study),
                &self.writer,
                &body,
            )
            .await?,
            201,
            "store",
        )
        .await?;
        let token = v["token"].as_str().ok_or(format!("no token: {v}"))?;
        Ok((n, token.to_owned()))
    }

    async fn read(&self, n: usize, token: &str) -> Result<(), String> {
        let response = self
            .http
            .get(format!("{}/v1/records/{token}", self.url))
            .bearer_auth(&self.reader)
            .send()
            .await
            .map_err(|e| format!("read: {e}"))?;
        let v = answer(response, 200, "read").await?;
        if v["data"] != data(n) {
            return Err(format!("record {n} came back different"));
        }
        Ok(())
    }

    /// Tokenizes participant `n`'s four fields; returns the tokens in order.
    async fn tokenize(&self, n: usize) -> Result<(usize, Vec<String>), String> {
        let v = answer(
            self.post(
                &format!("/v1/studies/{}/tokenize", self.study),
                &self.writer,
                &json!({ "participant": format!("P-{}", n % 1000), "fields": fields(n),
                         "deterministic": ["ssn"] }),
            )
            .await?,
            200,
            "tokenize",
        )
        .await?;
        let tokens = FIELDS
            .iter()
            .map(|f| v["fields"][f].as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(format!("tokens missing: {v}"))?;
        Ok((n, tokens))
    }

    async fn detokenize(&self, n: usize, tokens: &[String]) -> Result<(), String> {
        let v = answer(
            self.post("/v1/detokenize", &self.reader, &json!({ "tokens": tokens }))
                .await?,
            200,
            "detokenize",
        )
        .await?;
        let expected = fields(n);
        for (field, token) in FIELDS.iter().zip(tokens) {
            if v["values"][token] != expected[field] {
                return Err(format!("field {field} of {n} came back different"));
            }
        }
        Ok(())
    }

    async fn batch(&self, n: usize) -> Result<(), String> {
        let records: Vec<Value> = (0..BATCH)
            .map(|i| {
                let m = n * BATCH + i;
                json!({ "participant": format!("P-{}", m % 1000), "kind": "bench", "data": data(m) })
            })
            .collect();
        let v = answer(
            self.post(
                &format!("/v1/studies/{}/records:batch", self.study),
                &self.writer,
                &json!({ "records": records }),
            )
            .await?,
            200,
            "batch",
        )
        .await?;
        let results = v["results"].as_array().ok_or(format!("no results: {v}"))?;
        if results.len() != BATCH {
            return Err(format!("{} results for {BATCH} records", results.len()));
        }
        if let Some(bad) = results.iter().find(|r| !r["token"].is_string()) {
            return Err(format!("batch item: {bad}"));
        }
        Ok(())
    }
}

/// The fields tokenized per call.
const FIELDS: [&str; 4] = ["name", "ssn", "mrn", "dob"];

/// Participant `n`'s fields.
fn fields(n: usize) -> Value {
    json!({
        "name": format!("Person {n}"),
        "ssn": format!("{:03}-{:02}-{:04}", n % 1000, n % 100, n % 10_000),
        "mrn": format!("MRN-{n:08}"),
        "dob": format!("19{:02}-0{}-1{}", n % 100, 1 + n % 9, n % 10),
    })
}

// ---------------------------------------------------------------- main

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: a
    // multi-minute load run has no place there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("api: load benchmark, run it with `cargo bench -p coffer-tests --bench api`");
        return;
    }
    let secs = Duration::from_secs(env_u64("COFFER_BENCH_SECS", 5));
    let batch_secs = Duration::from_secs(env_u64("COFFER_BENCH_BATCH_SECS", 10));
    let blob_mib = env_u64("COFFER_BENCH_BLOB_MIB", 1024) as usize;
    println!(
        "# Coffer API host load benchmark, HTTPS ({} s per record phase, {} s per batch phase, BLOB {blob_mib} MiB, {} cores)",
        secs.as_secs(),
        batch_secs.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    // Record linkage is rate-limited per key; not what is measured here.
    let stack = ApiStack::start_with(&["--link-rate", "1000000", "--link-burst", "1000000"]);
    println!(
        "\nstack up in {:.1} s: key DB + 4 blob nodes (W = 3), coffer-keyd (SoftHSM, 1 session), coffer-encryptd, meta DB, coffer serve",
        started.elapsed().as_secs_f64()
    );
    runtime.block_on(async {
        let client = setup(&stack).await;
        records(&client, secs).await;
        batches(&client, batch_secs).await;
        field_tokens(&client, secs).await;
        blob(&client, blob_mib).await;
    });
}

/// A tenant, a study, a writer and a reader key; a client without a
/// whole-request timeout (the fixture's 120 s could cut a slow 1 GiB BLOB).
async fn setup(stack: &ApiStack) -> Client {
    let tls = coffer_keyhost::tls::client_config(&stack.path.infra.ca.cert_path(), None)
        .expect("client TLS");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("client");
    let mut c = Client {
        http,
        url: stack.url(),
        study: String::new(),
        writer: String::new(),
        reader: String::new(),
    };
    let tenant = answer(
        c.post(
            "/v1/tenants",
            &stack.operator_key,
            &json!({ "name": "Bench" }),
        )
        .await
        .expect("tenant"),
        201,
        "tenant",
    )
    .await
    .expect("tenant");
    let admin = tenant["admin_key"].as_str().expect("admin_key").to_owned();
    let study = answer(
        c.post("/v1/studies", &admin, &json!({ "name": "Load" }))
            .await
            .expect("study"),
        201,
        "study",
    )
    .await
    .expect("study");
    c.study = study["id"].as_str().expect("study id").to_owned();
    for role in ["writer", "reader"] {
        let v = answer(
            c.post(
                "/v1/api-keys",
                &admin,
                &json!({ "role": role, "can_link": role == "writer" }),
            )
            .await
            .expect("key"),
            201,
            "key",
        )
        .await
        .expect("key");
        let secret = v["secret"].as_str().expect("secret").to_owned();
        if role == "writer" {
            c.writer = secret;
        } else {
            c.reader = secret;
        }
    }
    c
}

// ---------------------------------------------------------------- part 1: records

async fn records(c: &Client, secs: Duration) {
    // Warm up: connections, pools, caches.
    for n in 0..20 {
        let (n, token) = c.store(n).await.expect("warm-up store");
        c.read(n, &token).await.expect("warm-up read");
    }
    let base = Arc::new(AtomicUsize::new(1 << 30));
    let mut rows = Vec::new();
    for &conc in &LEVELS {
        eprintln!("records at concurrency {conc} ...");
        let stored = Arc::new(Mutex::new(Vec::new()));
        let store = {
            let (c, stored, base) = (c.clone(), Arc::clone(&stored), Arc::clone(&base));
            run(conc, secs, move |_| {
                let (c, stored) = (c.clone(), Arc::clone(&stored));
                let n = base.fetch_add(1, Ordering::Relaxed);
                async move {
                    let s = c.store(n).await?;
                    stored.lock().expect("lock").push(s);
                    Ok(())
                }
            })
            .await
        };
        let stored = Arc::new(std::mem::take(&mut *stored.lock().expect("lock")));
        let read = {
            let (c, stored) = (c.clone(), Arc::clone(&stored));
            run(conc, secs, move |i| {
                let (c, stored) = (c.clone(), Arc::clone(&stored));
                async move {
                    let (n, token) = &stored[i % stored.len()];
                    c.read(*n, token).await
                }
            })
            .await
        };
        rows.push((conc, store, read));
    }
    println!("\n## 1 KiB JSON records over HTTPS\n");
    println!("| conc. | store/s | p50 / p99 ms | errors | read/s | p50 / p99 ms | errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (conc, store, read) in &rows {
        println!(
            "| {conc} | {:.0} | {} / {} | {} | {:.0} | {} / {} | {} |",
            store.rate(),
            ms(store.pct(0.5)),
            ms(store.pct(0.99)),
            store.errors,
            read.rate(),
            ms(read.pct(0.5)),
            ms(read.pct(0.99)),
            read.errors,
        );
    }
}

// ---------------------------------------------------------------- part 2: batches

async fn batches(c: &Client, secs: Duration) {
    c.batch(1 << 24).await.expect("warm-up batch");
    let base = Arc::new(AtomicUsize::new(1 << 25));
    let mut rows = Vec::new();
    for &conc in &BATCH_LEVELS {
        eprintln!("batches of {BATCH} at concurrency {conc} ...");
        let stats = {
            let (c, base) = (c.clone(), Arc::clone(&base));
            run(conc, secs, move |_| {
                let c = c.clone();
                let n = base.fetch_add(1, Ordering::Relaxed);
                async move { c.batch(n).await }
            })
            .await
        };
        rows.push((conc, stats));
    }
    println!("\n## Batches of {BATCH} records (`records:batch`)\n");
    println!("| conc. | calls/s | records/s | p50 / p99 ms per call | errors |");
    println!("|---:|---:|---:|---:|---:|");
    for (conc, s) in &rows {
        println!(
            "| {conc} | {:.1} | {:.0} | {} / {} | {} |",
            s.rate(),
            s.rate() * BATCH as f64,
            ms(s.pct(0.5)),
            ms(s.pct(0.99)),
            s.errors,
        );
    }
}

// ---------------------------------------------------------------- part 3: field tokens

async fn field_tokens(c: &Client, secs: Duration) {
    for n in 0..20 {
        let (n, tokens) = c.tokenize(n).await.expect("warm-up tokenize");
        c.detokenize(n, &tokens).await.expect("warm-up detokenize");
    }
    let base = Arc::new(AtomicUsize::new(1 << 28));
    let mut rows = Vec::new();
    for &conc in &LEVELS {
        eprintln!("field tokens at concurrency {conc} ...");
        let made = Arc::new(Mutex::new(Vec::new()));
        let tokenize = {
            let (c, made, base) = (c.clone(), Arc::clone(&made), Arc::clone(&base));
            run(conc, secs, move |_| {
                let (c, made) = (c.clone(), Arc::clone(&made));
                let n = base.fetch_add(1, Ordering::Relaxed);
                async move {
                    let t = c.tokenize(n).await?;
                    made.lock().expect("lock").push(t);
                    Ok(())
                }
            })
            .await
        };
        let made = Arc::new(std::mem::take(&mut *made.lock().expect("lock")));
        let detokenize = {
            let (c, made) = (c.clone(), Arc::clone(&made));
            run(conc, secs, move |i| {
                let (c, made) = (c.clone(), Arc::clone(&made));
                async move {
                    let (n, tokens) = &made[i % made.len()];
                    c.detokenize(*n, tokens).await
                }
            })
            .await
        };
        rows.push((conc, tokenize, detokenize));
    }
    println!(
        "\n## Field tokens over HTTPS: {} fields per call, one deterministic (`dtk_`)\n",
        FIELDS.len()
    );
    println!(
        "| conc. | tokenize calls/s | p50 / p99 ms | errors | detokenize calls/s | p50 / p99 ms | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (conc, t, d) in &rows {
        println!(
            "| {conc} | {:.0} | {} / {} | {} | {:.0} | {} / {} | {} |",
            t.rate(),
            ms(t.pct(0.5)),
            ms(t.pct(0.99)),
            t.errors,
            d.rate(),
            ms(d.pct(0.5)),
            ms(d.pct(0.99)),
            d.errors,
        );
    }
}

// ---------------------------------------------------------------- part 4: one BLOB

/// Block `i` of the BLOB: the base MiB with `i` in its first 8 bytes.
fn block(base: &Bytes, i: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b
}

async fn blob(c: &Client, mib: usize) {
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
    eprintln!("BLOB of {mib} MiB ...");

    let upload = {
        let base = base.clone();
        futures::stream::iter(
            (0..mib).map(move |i| Ok::<_, std::io::Error>(Bytes::from(block(&base, i)))),
        )
    };
    let started = Instant::now();
    let response = c
        .http
        .put(format!(
            "{}/v1/studies/{}/blobs?participant=P-BLOB",
            c.url, c.study
        ))
        .bearer_auth(&c.writer)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .expect("BLOB upload");
    let v = answer(response, 201, "BLOB upload")
        .await
        .expect("BLOB upload");
    let up = started.elapsed();
    assert_eq!(v["size"].as_u64(), Some(total), "stored size: {v}");
    assert_eq!(
        v["sha256"].as_str(),
        Some(expected.as_str()),
        "digest the API host computed"
    );
    let token = v["token"].as_str().expect("token").to_owned();

    let started = Instant::now();
    let response = c
        .http
        .get(format!("{}/v1/blobs/{token}", c.url))
        .bearer_auth(&c.reader)
        .send()
        .await
        .expect("BLOB download");
    assert_eq!(response.status(), 200, "BLOB download");
    let mut first_byte = None;
    let (mut size, mut sha) = (0u64, Sha256::new());
    let mut body = response.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.expect("BLOB body");
        first_byte.get_or_insert_with(|| started.elapsed());
        size += part.len() as u64;
        sha.update(&part);
    }
    let down = started.elapsed();
    assert_eq!(size, total, "downloaded size");
    assert_eq!(
        data_encoding::HEXLOWER.encode(&sha.finalize()),
        expected,
        "the download's SHA-256 is the upload's"
    );

    let rate = |d: Duration| total as f64 / 1e6 / d.as_secs_f64();
    println!("\n## One {mib} MiB BLOB, streamed both ways (checked by SHA-256)\n");
    println!("| direction | seconds | MB/s |");
    println!("|---|---:|---:|");
    println!(
        "| upload (`PUT .../blobs`, streamed) | {:.1} | {:.0} |",
        up.as_secs_f64(),
        rate(up)
    );
    println!(
        "| download (`GET /v1/blobs/{{token}}`, streamed) | {:.1} | {:.0} |",
        down.as_secs_f64(),
        rate(down)
    );
    println!(
        "\nfirst downloaded byte after {} ms",
        ms(first_byte.unwrap_or_default())
    );
}
