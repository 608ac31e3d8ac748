//! The storage path end to end, against real processes: the key host
//! (`coffer-keyd`) on a real SoftHSM token and key DB cluster, the
//! encryption host (`coffer-encryptd`), and four real blob node clusters
//! (W = 3), all over TLS from one private CA. The test plays the API host.

use std::time::{Duration, Instant};

use bytes::Bytes;
use coffer_host::blob::{BlobRef, BlobStore};
use coffer_softhsm::StopMode;
use coffer_tests::stack::StoragePath;
use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

/// What the encryption host answered for a stored object.
#[derive(Clone, Debug)]
struct Stored {
    key_ref: String,
    blob_ref: String,
    size: u64,
    sha256: String,
}

struct Api {
    client: reqwest::Client,
    url: String,
}

fn ctx(n: u8) -> String {
    data_encoding::HEXLOWER.encode(&[n; 32])
}

impl Api {
    fn new(path: &StoragePath) -> Self {
        Self {
            client: path.api_client(),
            url: path.encryptd.url(),
        }
    }

    async fn kek(&self) -> String {
        let answer: Value = self
            .client
            .post(format!("{}/v1/keks", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["kek"].as_str().unwrap().to_owned()
    }

    async fn put_body(&self, kek: &str, context: &str, body: reqwest::Body) -> reqwest::Response {
        self.client
            .put(format!("{}/v1/objects?kek={kek}", self.url))
            .header("x-coffer-context", context)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn put(&self, kek: &str, context: &str, data: Vec<u8>) -> Stored {
        let response = self.put_body(kek, context, data.into()).await;
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        let v: Value = response.json().await.unwrap();
        Stored {
            key_ref: v["key_ref"].as_str().unwrap().into(),
            blob_ref: v["blob_ref"].as_str().unwrap().into(),
            size: v["size"].as_u64().unwrap(),
            sha256: v["sha256"].as_str().unwrap().into(),
        }
    }

    async fn get_raw(
        &self,
        blob_ref: &str,
        key_ref: &str,
        context: &str,
        whole: bool,
    ) -> reqwest::Response {
        self.client
            .get(format!(
                "{}/v1/objects/{blob_ref}?key_ref={key_ref}&whole={whole}",
                self.url
            ))
            .header("x-coffer-context", context)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, stored: &Stored, context: &str) -> Vec<u8> {
        let response = self
            .get_raw(&stored.blob_ref, &stored.key_ref, context, true)
            .await;
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        response.bytes().await.unwrap().to_vec()
    }

    async fn error_code(response: reqwest::Response) -> (u16, String) {
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (
            status,
            body["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

fn blob(stored: &Stored) -> BlobRef {
    BlobRef(
        data_encoding::HEXLOWER
            .decode(stored.blob_ref.as_bytes())
            .unwrap()
            .try_into()
            .unwrap(),
    )
}

/// Which nodes hold a complete live copy.
async fn holders(path: &StoragePath, stored: &Stored) -> usize {
    let store = path.blob_store();
    let mut count = 0;
    for status in store.node_status().await {
        if let Ok(meta) = store.meta(blob(stored)).await {
            let mut whole = true;
            for i in 0..meta.chunks {
                whole &= store
                    .read_chunk_from(status.node.clone(), blob(stored), i)
                    .await
                    .is_ok();
            }
            count += usize::from(whole);
        }
    }
    count
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

/// The large object's size: 256 MiB, or `COFFER_BIG_OBJECT_MIB` for the
/// on-demand run (`COFFER_BIG_OBJECT_MIB=2048 cargo test -p coffer-tests
/// --test storage_path round_trip -- --nocapture`).
fn big_object_mib() -> usize {
    std::env::var("COFFER_BIG_OBJECT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_from_empty_to_256_mib_in_bounded_memory() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;

    for len in [0, 1, 1024, 64 * 1024, 64 * 1024 + 1, 5 * MIB + 3] {
        let data = pattern(len, len);
        let stored = api.put(&kek, &ctx(1), data.clone()).await;
        assert_eq!(stored.size, len as u64);
        assert_eq!(
            stored.sha256,
            data_encoding::HEXLOWER.encode(&Sha256::digest(&data))
        );
        assert_eq!(api.get(&stored, &ctx(1)).await, data, "{len} bytes");
        assert_eq!(
            holders(&path, &stored).await,
            4,
            "every node holds every chunk"
        );
    }

    // 256 MiB streamed both ways: never whole in the test or the host.
    let total = big_object_mib() * MIB;
    let upload = futures::stream::iter(
        (0..total / MIB).map(|i| Ok::<_, std::io::Error>(Bytes::from(pattern(i, MIB)))),
    );
    let mut expected = Sha256::new();
    for i in 0..total / MIB {
        expected.update(pattern(i, MIB));
    }
    let expected = data_encoding::HEXLOWER.encode(&expected.finalize());
    let started = Instant::now();
    let response = api
        .put_body(&kek, &ctx(2), reqwest::Body::wrap_stream(upload))
        .await;
    assert_eq!(response.status(), 201);
    let v: Value = response.json().await.unwrap();
    let stored = Stored {
        key_ref: v["key_ref"].as_str().unwrap().into(),
        blob_ref: v["blob_ref"].as_str().unwrap().into(),
        size: v["size"].as_u64().unwrap(),
        sha256: v["sha256"].as_str().unwrap().into(),
    };
    let up = started.elapsed();
    assert_eq!(
        (stored.size, stored.sha256.as_str()),
        (total as u64, expected.as_str())
    );

    let started = Instant::now();
    let response = api
        .get_raw(&stored.blob_ref, &stored.key_ref, &ctx(2), false)
        .await;
    assert_eq!(response.status(), 200);
    let mut got = Sha256::new();
    let mut len = 0;
    let mut body = response.bytes_stream();
    while let Some(part) = body.next().await {
        let part = part.unwrap();
        len += part.len();
        got.update(&part);
    }
    let down = started.elapsed();
    assert_eq!(len, total);
    assert_eq!(data_encoding::HEXLOWER.encode(&got.finalize()), expected);

    let peak = peak_rss_kib(path.encryptd.pid());
    eprintln!(
        "{} MiB: up {:.1} s, down {:.1} s; encryption host peak RSS {} MiB",
        total / MIB,
        up.as_secs_f64(),
        down.as_secs_f64(),
        peak / 1024
    );
    assert!(
        peak < 160 * 1024,
        "the encryption host's memory is bounded: peak {} MiB for 256 MiB",
        peak / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_quorum_repair_and_tombstones() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let before = api
        .put(
            &kek,
            &ctx(1),
            b"stored while all four nodes are up".to_vec(),
        )
        .await;

    // One node down: writes and reads continue.
    path.nodes[3].stop(StopMode::Immediate).unwrap();
    let during = api.put(&kek, &ctx(1), pattern(9, 3 * MIB)).await;
    assert_eq!(api.get(&during, &ctx(1)).await, pattern(9, 3 * MIB));
    assert_eq!(
        api.get(&before, &ctx(1)).await,
        b"stored while all four nodes are up"
    );
    // A delete while the node is down leaves tombstones on the others.
    let deleted = api.put(&kek, &ctx(1), b"to be deleted".to_vec()).await;
    path.nodes[3].restart().unwrap();
    path.nodes[3].stop(StopMode::Immediate).unwrap();
    let response = api
        .client
        .delete(format!(
            "{}/v1/objects/{}?key_ref={}",
            api.url, deleted.blob_ref, deleted.key_ref
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    // Two down: refused, nothing acknowledged.
    path.nodes[2].stop(StopMode::Immediate).unwrap();
    let response = api
        .put_body(&kek, &ctx(1), b"must not be stored".to_vec().into())
        .await;
    let (status, code) = Api::error_code(response).await;
    assert_eq!((status, code.as_str()), (503, "not_enough_replicas"));

    // Both back: repair brings every blob to all four nodes; the deleted
    // one stays deleted.
    path.nodes[2].restart().unwrap();
    path.nodes[3].restart().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the store's down-backoff
    let report = path.blob_store().repair_pending().await.unwrap();
    eprintln!("repair: {report:?}");
    assert!(report.unrecoverable.is_empty());
    assert_eq!(holders(&path, &during).await, 4);
    assert_eq!(holders(&path, &before).await, 4);
    let response = api
        .get_raw(&deleted.blob_ref, &deleted.key_ref, &ctx(1), true)
        .await;
    assert_eq!(response.status(), 404, "a deleted blob does not come back");
    let store = path.blob_store();
    assert!(store.meta(blob(&deleted)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_detected_served_from_another_replica_and_repaired() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let data = pattern(3, 200 * 1024);
    let stored = api.put(&kek, &ctx(1), data.clone()).await;

    // Flip one byte of chunk 1 on the replica reads try first, updating the
    // store's own digest too, so only the record's GCM tag can tell.
    let first = path.blob_store().replica_order(blob(&stored))[0].to_string();
    let index: usize = first.trim_start_matches("node").parse::<usize>().unwrap() - 1;
    for (i, node) in path.nodes.iter().enumerate().skip(index).take(1) {
        let url = path.infra.verified_url(node);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let updated = sqlx::query(
            "UPDATE blob_chunks SET data = set_byte(data, 1000, get_byte(data, 1000) # 1), \
             sha256 = sha256(set_byte(data, 1000, get_byte(data, 1000) # 1)) WHERE blob_ref = $1 AND idx = 1",
        )
        .bind(&blob(&stored).0[..])
        .execute(&mut conn)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(updated, 1, "node {i}");
    }
    // Read many times: whichever replica comes first, the answer is right.
    for _ in 0..4 {
        assert_eq!(api.get(&stored, &ctx(1)).await, data);
    }
    let report = path.blob_store().repair_pending().await.unwrap();
    assert!(report.replicas_copied >= 1, "{report:?}");
    // Every node now holds the same, good chunk.
    let store = path.blob_store();
    let mut copies = Vec::new();
    for status in store.node_status().await {
        copies.push(
            store
                .read_chunk_from(status.node, blob(&stored), 1)
                .await
                .unwrap(),
        );
    }
    assert!(
        copies.windows(2).all(|w| w[0] == w[1]),
        "the bad replica was rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_repointed_at_another_records_key_or_blob_fails_clearly() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let a = api.put(&kek, &ctx(1), b"record A".to_vec()).await;
    let b = api.put(&kek, &ctx(2), b"record B".to_vec()).await;

    for (blob_ref, key_ref, context) in [
        (&a.blob_ref, &b.key_ref, ctx(1)), // A's blob with B's keys
        (&b.blob_ref, &a.key_ref, ctx(1)), // B's blob with A's keys
        (&a.blob_ref, &a.key_ref, ctx(2)), // A under B's context (another token or tenant)
    ] {
        let response = api.get_raw(blob_ref, key_ref, &context, true).await;
        let (status, code) = Api::error_code(response).await;
        assert_eq!((status, code.as_str()), (422, "record_integrity"));
    }
    assert_eq!(
        api.get(&a, &ctx(1)).await,
        b"record A",
        "nothing was damaged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_key_host_fails_fast_leaves_nothing_and_service_resumes() {
    let mut path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let stored = api.put(&kek, &ctx(1), b"before the outage".to_vec()).await;
    let rows_before = total_blob_rows(&path).await;
    let key_url = path.keyd.url();
    path.keyd.kill();

    let started = Instant::now();
    let (status, code) =
        Api::error_code(api.put_body(&kek, &ctx(1), b"during".to_vec().into()).await).await;
    assert_eq!((status, code.as_str()), (503, "key_host_unavailable"));
    let (status, code) = Api::error_code(
        api.get_raw(&stored.blob_ref, &stored.key_ref, &ctx(1), true)
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (503, "key_host_unavailable"));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert_eq!(
        total_blob_rows(&path).await,
        rows_before,
        "nothing was written"
    );

    let port = key_url.rsplit(':').next().unwrap();
    path.keyd = path.infra.start_keyd_on(&format!("127.0.0.1:{port}"), &[]);
    assert_eq!(api.get(&stored, &ctx(1)).await, b"before the outage");
    api.put(&kek, &ctx(1), b"after".to_vec()).await;
}

async fn total_blob_rows(path: &StoragePath) -> i64 {
    let mut total = 0;
    for node in &path.nodes {
        let url = path.infra.verified_url(node);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM blob_chunks")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        total += n;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_api_host_role_may_call_the_encryption_host() {
    let path = StoragePath::start(4);
    let enc_role = path.client_as(coffer_keyhost::api::roles::ENCRYPTION_HOST);
    let response = enc_role
        .post(format!("{}/v1/keks", path.encryptd.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_never_reaches_a_disk_or_a_log() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let marker = format!("CANARY-{}", coffer_tests::random_hex());
    let record = format!(r#"{{"name":"{marker}","note":"{marker} again"}}"#).into_bytes();
    let mut big = pattern(1, 3 * MIB);
    big.extend_from_slice(marker.as_bytes());
    let small = api.put(&kek, &ctx(1), record.clone()).await;
    let large = api.put(&kek, &ctx(1), big.clone()).await;
    assert_eq!(api.get(&small, &ctx(1)).await, record);
    assert_eq!(api.get(&large, &ctx(1)).await, big);

    // Make every node write out what it holds: a checkpoint flushes data files.
    for node in path.nodes.iter().chain([&path.infra.key_db]) {
        let url = path.infra.verified_url(node);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        sqlx::query("CHECKPOINT").execute(&mut conn).await.unwrap();
    }
    let mut scanned = 0u64;
    let mut hits = Vec::new();
    let roots = [
        path.infra.dir.path().to_path_buf(),
        path.infra.token.token_dir().to_path_buf(),
    ];
    for root in &roots {
        scan(root, marker.as_bytes(), &mut scanned, &mut hits);
    }
    eprintln!(
        "canary: scanned {} MiB of data dirs, logs and the token folder",
        scanned / MIB as u64
    );
    assert!(
        scanned > 50 * MIB as u64,
        "the scan covered the clusters ({scanned} bytes)"
    );
    assert!(hits.is_empty(), "the marker is on disk in {hits:?}");
}

fn scan(
    dir: &std::path::Path,
    needle: &[u8],
    scanned: &mut u64,
    hits: &mut Vec<std::path::PathBuf>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            scan(&path, needle, scanned, hits);
        } else if let Ok(bytes) = std::fs::read(&path) {
            *scanned += bytes.len() as u64;
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encryption_host_repairs_a_returning_node_by_itself() {
    let path = StoragePath::start_with(4, &["--repair-interval-secs", "1"]);
    let api = Api::new(&path);
    let kek = api.kek().await;
    path.nodes[1].stop(StopMode::Immediate).unwrap();
    let data = pattern(4, 2 * MIB);
    let stored = api.put(&kek, &ctx(1), data.clone()).await;
    assert_eq!(
        holders(&path, &stored).await,
        3,
        "written while one node was down"
    );

    path.nodes[1].restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while holders(&path, &stored).await < 4 {
        assert!(
            Instant::now() < deadline,
            "the returning node was not repaired within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(&path.encryptd.log).unwrap();
    assert!(log.contains("repair queue drained"), "{log}");
    assert_eq!(api.get(&stored, &ctx(1)).await, data);
}

/// A range read starts at the chunk holding its first byte: with the first
/// data chunk damaged on every replica, the whole object no longer reads,
/// but a read from an offset in the second data chunk does, byte for byte.
/// Offsets outside the object, or with `whole=true`, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_starts_at_its_segment() {
    let path = StoragePath::start(4);
    let api = Api::new(&path);
    let kek = api.kek().await;
    let data = pattern(7, 2 * 1024 * 1024 + 5);
    let stored = api.put(&kek, &ctx(1), data.clone()).await;
    for node in &path.nodes {
        let url = path.infra.verified_url(node);
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let updated = sqlx::query(
            "UPDATE blob_chunks SET data = set_byte(data, 10, get_byte(data, 10) # 1), \
             sha256 = sha256(set_byte(data, 10, get_byte(data, 10) # 1)) WHERE blob_ref = $1 AND idx = 1",
        )
        .bind(&blob(&stored).0[..])
        .execute(&mut conn)
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(updated, 1);
    }
    let from_offset = |offset: u64, whole: bool| {
        let (api, stored) = (&api, &stored);
        async move {
            api.client
                .get(format!(
                    "{}/v1/objects/{}?key_ref={}&offset={offset}&whole={whole}",
                    api.url, stored.blob_ref, stored.key_ref
                ))
                .header("x-coffer-context", ctx(1))
                .send()
                .await
                .unwrap()
        }
    };
    // The whole object: refused (records) or cut short (streams).
    let whole = api
        .get_raw(&stored.blob_ref, &stored.key_ref, &ctx(1), true)
        .await;
    assert_eq!(whole.status(), 422);
    assert!(from_offset(0, false).await.bytes().await.is_err());
    // Segment 16 lives in data chunk 2: untouched, and read from there.
    let offset = 16 * 65_536 + 123;
    let r = from_offset(offset as u64, false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[offset..]);
    for (offset, whole) in [(data.len() as u64, false), (10, true)] {
        let r = from_offset(offset, whole).await;
        assert_eq!(Api::error_code(r).await, (400, "bad_offset".to_owned()));
    }
}
