//! The replicated blob store against four real PostgreSQL nodes over
//! verified TLS: round trips, a lost node, a lost quorum, deletes that a late
//! node must not undo, a corrupt replica, and configuration errors.
//!
//! The scenarios share one set of four clusters and run in order in one test
//! (starting clusters dominates the runtime); each is its own function.

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use coffer_host::blob::{
    BlobError, BlobRef, BlobStore, ConfigError, DbFailure, NodeConfig, NodeId, PgBlobConfig,
    PgBlobStore,
};
use coffer_keyhost::dbtls::DbClientCert;
use coffer_softhsm::{DevCa, PgClients, PgCluster, PgTls, StopMode};
use futures::StreamExt;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};

const N: usize = 4;
const MIB: usize = 1 << 20;

struct Fixture {
    clusters: Vec<PgCluster>,
    ca_cert: std::path::PathBuf,
    other_ca_cert: std::path::PathBuf,
    /// The certificate the nodes admit (`blob-client`), and one they do not.
    client: DbClientCert,
    stranger: DbClientCert,
    // Last: clusters stop (on drop) before their folder goes.
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start() -> Self {
        let dir = coffer_tests::scratch_dir("blob");
        let ca = DevCa::open(&dir.path().join("ca")).unwrap();
        let other = DevCa::open(&dir.path().join("other-ca")).unwrap();
        let clusters = (0..N)
            .map(|i| {
                let cert = ca.server(&format!("blob-{i}")).unwrap();
                let tls = PgTls {
                    cert: cert.cert,
                    key: cert.key,
                    clients: Some(PgClients {
                        ca: ca.cert_path(),
                        names: vec!["blob-client".into()],
                    }),
                };
                PgCluster::start(&dir.path().join(format!("node-{i}")), Some(&tls)).unwrap()
            })
            .collect();
        let cert = |name: &str| {
            let issued = ca.db_client(name).unwrap();
            DbClientCert {
                db_client_cert: Some(issued.cert),
                db_client_key: Some(issued.key),
            }
        };
        Self {
            clusters,
            ca_cert: ca.cert_path(),
            other_ca_cert: other.cert_path(),
            client: cert("blob-client"),
            stranger: cert("someone-else"),
            _dir: dir,
        }
    }

    fn node_config(&self, i: usize, root_cert: &Path) -> NodeConfig {
        NodeConfig {
            id: format!("blob-{i}"),
            host: "127.0.0.1".into(),
            port: self.clusters[i].port(),
            database: "postgres".into(),
            user: "postgres".into(),
            root_cert: root_cert.to_path_buf(),
            client: self.client.clone(),
        }
    }

    fn config(&self) -> PgBlobConfig {
        PgBlobConfig::new((0..N).map(|i| self.node_config(i, &self.ca_cert)).collect())
    }

    fn store(&self) -> PgBlobStore {
        PgBlobStore::new(&self.config()).unwrap()
    }

    fn kill(&self, i: usize) {
        self.clusters[i].stop(StopMode::Immediate).unwrap();
    }

    fn revive(&self, i: usize) {
        self.clusters[i].restart().unwrap();
    }

    /// A direct, verified connection to node `i`, bypassing the store.
    async fn direct(&self, i: usize) -> PgConnection {
        self.connect_as(i, &self.client).await.unwrap()
    }

    /// A verified connection to node `i` presenting `client`'s certificate.
    async fn connect_as(
        &self,
        i: usize,
        client: &DbClientCert,
    ) -> Result<PgConnection, sqlx::Error> {
        let options = client.apply(
            PgConnectOptions::new()
                .host("127.0.0.1")
                .port(self.clusters[i].port())
                .username("postgres")
                .database("postgres")
                .ssl_mode(PgSslMode::VerifyFull)
                .ssl_root_cert(&self.ca_cert),
        );
        PgConnection::connect_with(&options).await
    }

    /// What node `i` holds for `blob`: header (state, chunks, len) and the
    /// concatenated chunk data.
    async fn on_node(&self, i: usize, blob: BlobRef) -> (Option<(String, i32, i64)>, Vec<u8>) {
        let mut conn = self.direct(i).await;
        let header = sqlx::query_as("SELECT state, chunks, len FROM blobs WHERE blob_ref = $1")
            .bind(blob.0.as_slice())
            .fetch_optional(&mut conn)
            .await
            .unwrap();
        let chunks: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT data FROM blob_chunks WHERE blob_ref = $1 ORDER BY idx")
                .bind(blob.0.as_slice())
                .fetch_all(&mut conn)
                .await
                .unwrap();
        (header, chunks.concat())
    }

    async fn assert_everywhere(&self, blob: BlobRef, expected: &[u8]) {
        for i in 0..N {
            let (header, data) = self.on_node(i, blob).await;
            let (state, _chunks, len) = header.unwrap_or_default();
            assert_eq!(
                (state.as_str(), len),
                ("live", expected.len() as i64),
                "header of {blob} on node {i}"
            );
            assert!(data == expected, "data of {blob} on node {i}");
        }
    }

    async fn assert_gone_everywhere(&self, blob: BlobRef) {
        for i in 0..N {
            let (header, data) = self.on_node(i, blob).await;
            assert!(
                header.is_none() || header == Some(("tombstone".into(), 0, 0)),
                "node {i} holds {header:?} for {blob}"
            );
            assert!(data.is_empty(), "node {i} still holds chunks of {blob}");
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

async fn read_all(store: &PgBlobStore, blob: BlobRef) -> Result<Vec<u8>, BlobError> {
    let meta = store.meta(blob).await?;
    let mut out = Vec::with_capacity(meta.len as usize);
    let mut replica = None;
    for index in 0..meta.chunks {
        let (node, chunk) = store.get_chunk(blob, index, replica).await?;
        out.extend_from_slice(&chunk);
        replica = Some(node);
    }
    assert_eq!(out.len() as u64, meta.len);
    Ok(out)
}

async fn stream_put(store: &PgBlobStore, blob: BlobRef, data: &[u8], piece: usize) {
    let mut writer = store.begin_put(blob).await.unwrap();
    for part in data.chunks(piece) {
        writer
            .write_chunk(Bytes::copy_from_slice(part))
            .await
            .unwrap();
    }
    let receipt = writer.finish().await.unwrap();
    assert_eq!(receipt.len, data.len() as u64);
}

fn node(i: usize) -> NodeId {
    NodeId::from(format!("blob-{i}").as_str())
}

#[test]
fn configuration_is_validated() {
    let node = |i: usize| NodeConfig {
        id: format!("n{i}"),
        host: "127.0.0.1".into(),
        port: 1,
        database: "postgres".into(),
        user: "postgres".into(),
        root_cert: "/nonexistent".into(),
        client: DbClientCert::default(),
    };
    let mut config = PgBlobConfig::new((0..4).map(node).collect());
    config.write_quorum = 2;
    let err = config.validate().unwrap_err();
    assert_eq!(err, ConfigError::QuorumTooSmall { write_quorum: 2 });
    assert_eq!(err.to_string(), "write quorum 2 is below the minimum of 3");

    let mut config = PgBlobConfig::new((0..3).map(node).collect());
    config.write_quorum = 4;
    let err = config.validate().unwrap_err();
    assert_eq!(
        err,
        ConfigError::TooFewNodes {
            nodes: 3,
            write_quorum: 4
        }
    );
    assert!(
        err.to_string()
            .starts_with("3 nodes cannot satisfy a write quorum of 4")
    );

    let config = PgBlobConfig::new(vec![node(0), node(1), node(1)]);
    assert_eq!(
        config.validate().unwrap_err(),
        ConfigError::DuplicateNode("n1".into())
    );

    // The constructor refuses too, with the error wrapped.
    let mut config = PgBlobConfig::new((0..4).map(node).collect());
    config.write_quorum = 1;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = runtime.block_on(async { PgBlobStore::new(&config).unwrap_err() });
    assert_eq!(
        err.to_string(),
        "invalid blob store configuration: write quorum 1 is below the minimum of 3"
    );
    // N = W = 3 is valid (but warned about).
    let config = PgBlobConfig::new((0..3).map(node).collect());
    assert_eq!(config.validate(), Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_blob_store_on_four_nodes() {
    let started = Instant::now();
    let fx = Fixture::start();
    eprintln!("4 TLS clusters up in {:?}", started.elapsed());
    let store = fx.store();
    let status = store.node_status().await;
    assert!(status.iter().all(|s| s.down.is_none()), "{status:?}");
    // The nodes admit only the certificate named for them: no certificate,
    // or one of another name from the same CA, is refused.
    assert!(fx.connect_as(0, &DbClientCert::default()).await.is_err());
    assert!(fx.connect_as(0, &fx.stranger).await.is_err());
    assert!(fx.connect_as(0, &fx.client).await.is_ok());

    round_trips(&fx, &store).await;
    rough_rates(&store).await;
    one_node_lost_then_repaired(&fx, &store).await;
    two_nodes_lost_refuses_the_write(&fx, &store).await;
    delete_while_a_node_is_down(&fx, &store).await;
    corrupt_replica_detected_and_repaired(&fx, &store).await;
    caller_reported_bad_replica_repaired(&fx, &store).await;
    node_with_wrong_ca_is_down(&fx, &store).await;
    eprintln!("blob store scenarios done in {:?}", started.elapsed());
}

async fn round_trips(fx: &Fixture, store: &PgBlobStore) {
    let always = |_: &[Bytes]| true;

    let empty = BlobRef::random();
    let receipt = store.put(empty, Bytes::new()).await.unwrap();
    assert_eq!(
        (receipt.chunks, receipt.len, receipt.committed.len()),
        (0, 0, N)
    );
    assert!(receipt.queued.is_empty());
    assert_eq!(store.meta(empty).await.unwrap().chunks, 0);
    assert!(store.get(empty, &always).await.unwrap().is_empty());
    fx.assert_everywhere(empty, &[]).await;

    let small = BlobRef::random();
    let data = pattern(1024, 1);
    store.put(small, Bytes::from(data.clone())).await.unwrap();
    assert_eq!(store.get(small, &always).await.unwrap().concat(), data);
    fx.assert_everywhere(small, &data).await;

    // 5 MiB + a tail, streamed in 256 KiB pieces: memory holds one piece.
    let big = BlobRef::random();
    let data = pattern(5 * MIB + 123, 2);
    stream_put(store, big, &data, 256 << 10).await;
    let meta = store.meta(big).await.unwrap();
    assert_eq!(meta.chunks as usize, data.len().div_ceil(256 << 10));
    assert_eq!(meta.replicas.len(), N);
    assert_eq!(read_all(store, big).await.unwrap(), data);

    // Pieces larger than a chunk are split into 1 MiB rows.
    let split = BlobRef::random();
    let data = pattern(3 * MIB + 5, 3);
    let receipt = store.put(split, Bytes::from(data.clone())).await.unwrap();
    assert_eq!(receipt.chunks, 4);
    fx.assert_everywhere(split, &data).await;
    assert_eq!(read_all(store, split).await.unwrap(), data);

    // A ref is never reused.
    assert_eq!(
        store
            .put(small, Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
        BlobError::AlreadyExists
    );
    // A small put is refused when it is written, a big one when it starts
    // streaming; neither touches what is stored.
    for (size, target) in [(10, small), (2 * MIB, big)] {
        let mut writer = store.begin_put(target).await.unwrap();
        let refused = match writer.write_chunk(Bytes::from(vec![0u8; size])).await {
            Err(e) => e,
            Ok(()) => writer.finish().await.unwrap_err(),
        };
        assert_eq!(refused, BlobError::AlreadyExists);
    }
    assert_eq!(
        read_all(store, big).await.unwrap(),
        pattern(5 * MIB + 123, 2)
    );
    assert_eq!(
        store.meta(BlobRef::random()).await.unwrap_err(),
        BlobError::NotFound
    );
}

/// Rough figures for the report; no assertions on speed.
async fn rough_rates(store: &PgBlobStore) {
    let count = 300;
    let refs: Vec<BlobRef> = (0..count).map(|_| BlobRef::random()).collect();
    let payload = Bytes::from(pattern(1024, 9));
    let t = Instant::now();
    let results: Vec<_> = futures::stream::iter(refs.iter().copied())
        .map(|r| {
            let payload = payload.clone();
            async move { store.put(r, payload).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    let put_rate = count as f64 / t.elapsed().as_secs_f64();
    let always = |_: &[Bytes]| true;
    let t = Instant::now();
    let reads: Vec<_> = futures::stream::iter(refs.iter().copied())
        .map(|r| async move { store.get(r, &always).await })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(reads.iter().all(Result::is_ok));
    let get_rate = count as f64 / t.elapsed().as_secs_f64();

    let big = BlobRef::random();
    let data = pattern(16 * MIB, 4);
    let t = Instant::now();
    stream_put(store, big, &data, MIB).await;
    let write_mb = 16.0 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    assert_eq!(read_all(store, big).await.unwrap().len(), data.len());
    let read_mb = 16.0 / t.elapsed().as_secs_f64();
    eprintln!(
        "rates: 1 KiB puts {put_rate:.0}/s, 1 KiB gets {get_rate:.0}/s (16 in flight); \
         16 MiB streamed write {write_mb:.1} MiB/s (x{N} nodes), read {read_mb:.1} MiB/s"
    );
}

async fn one_node_lost_then_repaired(fx: &Fixture, store: &PgBlobStore) {
    fx.kill(3);
    let status = store.node_status().await;
    assert!(status[3].down.is_some() && status[..3].iter().all(|s| s.down.is_none()));

    let mut blobs = Vec::new();
    for k in 0..5 {
        let blob = BlobRef::random();
        let data = pattern(1024 + k, k as u8);
        let receipt = store.put(blob, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(receipt.committed.len(), 3);
        assert_eq!(receipt.queued, vec![node(3)]);
        blobs.push((blob, data));
    }
    let blob = BlobRef::random();
    let data = pattern(2 * MIB + 77, 7);
    stream_put(store, blob, &data, 512 << 10).await;
    blobs.push((blob, data));
    for (blob, data) in &blobs {
        assert_eq!(&read_all(store, *blob).await.unwrap(), data);
    }

    fx.revive(3);
    let report = store.repair_pending().await.unwrap();
    assert_eq!(report.replicas_copied, blobs.len(), "{report:?}");
    assert_eq!(report.deferred, 0, "{report:?}");
    for (blob, data) in &blobs {
        fx.assert_everywhere(*blob, data).await;
    }
    // Idempotent: nothing left to do.
    let again = store.repair_pending().await.unwrap();
    assert_eq!(again.entries, 0, "{again:?}");
}

async fn two_nodes_lost_refuses_the_write(fx: &Fixture, store: &PgBlobStore) {
    fx.kill(1);
    fx.kill(2);
    // The store has not noticed yet: both dead nodes are tried, two commit.
    let blob = BlobRef::random();
    let err = store
        .put(blob, Bytes::from(pattern(1024, 5)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        BlobError::NotEnoughReplicas {
            needed: 3,
            committed: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "not enough replicas: 2 of the 3 required committed"
    );
    assert!(store.meta(blob).await.is_err());
    assert!(store.get(blob, &|_: &[Bytes]| true).await.is_err());

    // A streamed write is refused before anything commits.
    let streamed = BlobRef::random();
    assert!(matches!(
        store.begin_put(streamed).await.unwrap_err(),
        BlobError::NotEnoughReplicas { needed: 3, .. }
    ));

    fx.revive(1);
    fx.revive(2);
    let report = store.repair_pending().await.unwrap();
    assert_eq!(report.deferred, 0, "{report:?}");
    assert_eq!(store.meta(blob).await.unwrap_err(), BlobError::Deleted);
    fx.assert_gone_everywhere(blob).await;
    assert_eq!(store.meta(streamed).await.unwrap_err(), BlobError::NotFound);
}

async fn delete_while_a_node_is_down(fx: &Fixture, store: &PgBlobStore) {
    let blob = BlobRef::random();
    let data = pattern(1536 * 1024, 11);
    store.put(blob, Bytes::from(data.clone())).await.unwrap();
    fx.assert_everywhere(blob, &data).await;

    fx.kill(0);
    let receipt = store.delete(blob).await.unwrap();
    assert_eq!(receipt.applied.len(), 3);
    assert_eq!(receipt.queued, vec![node(0)]);
    assert_eq!(store.meta(blob).await.unwrap_err(), BlobError::Deleted);

    fx.revive(0);
    // The late node still holds the blob, but a tombstone anywhere wins.
    let (header, stale) = fx.on_node(0, blob).await;
    assert_eq!(header.unwrap().0, "live");
    assert_eq!(stale, data);
    store.node_status().await;
    assert_eq!(store.meta(blob).await.unwrap_err(), BlobError::Deleted);
    assert!(store.get(blob, &|_: &[Bytes]| true).await.is_err());

    let report = store.repair_pending().await.unwrap();
    assert_eq!(report.tombstones_applied, 1, "{report:?}");
    fx.assert_gone_everywhere(blob).await;
    for i in 0..N {
        assert_eq!(fx.on_node(i, blob).await.0.unwrap().0, "tombstone");
    }
    // A second repair changes nothing, and a put under the ref is refused.
    store.repair_pending().await.unwrap();
    fx.assert_gone_everywhere(blob).await;
    assert!(store.put(blob, Bytes::from_static(b"again")).await.is_err());
}

async fn corrupt_replica_detected_and_repaired(fx: &Fixture, store: &PgBlobStore) {
    let blob = BlobRef::random();
    let data = pattern(MIB + 4096, 13);
    store.put(blob, Bytes::from(data.clone())).await.unwrap();
    let first = store.replica_order(blob)[0].clone();
    let i: usize = first.as_str()[5..].parse().unwrap();

    let mut conn = fx.direct(i).await;
    sqlx::query(
        "UPDATE blob_chunks SET data = set_byte(data, 100, get_byte(data, 100) # 1) \
         WHERE blob_ref = $1 AND idx = 1",
    )
    .bind(blob.0.as_slice())
    .execute(&mut conn)
    .await
    .unwrap();

    assert!(matches!(
        store
            .read_chunk_from(first.clone(), blob, 1)
            .await
            .unwrap_err(),
        BlobError::Corrupt { index: 1, .. }
    ));
    let (served_by, chunk) = store.get_chunk(blob, 1, None).await.unwrap();
    assert_ne!(served_by, first);
    assert_eq!(&chunk[..], &data[MIB..]);
    let expected = data.clone();
    let verify = move |chunks: &[Bytes]| chunks.concat() == expected;
    assert_eq!(store.get(blob, &verify).await.unwrap().concat(), data);

    let report = store.repair_pending().await.unwrap();
    assert_eq!(
        (report.replicas_copied, report.chunks_copied),
        (1, 1),
        "{report:?}"
    );
    fx.assert_everywhere(blob, &data).await;
    assert_eq!(
        store.read_chunk_from(first, blob, 1).await.unwrap(),
        &data[MIB..]
    );
}

/// Data and digest changed together: only the caller's check (GCM/HMAC in
/// the encryption host) can tell; it reports the replica and the repair
/// rewrites it from one that disagrees with it.
async fn caller_reported_bad_replica_repaired(fx: &Fixture, store: &PgBlobStore) {
    let blob = BlobRef::random();
    let data = pattern(2048, 17);
    store.put(blob, Bytes::from(data.clone())).await.unwrap();
    let first = store.replica_order(blob)[0].clone();
    let i: usize = first.as_str()[5..].parse().unwrap();
    let mut conn = fx.direct(i).await;
    for sql in [
        "UPDATE blob_chunks SET data = set_byte(data, 7, get_byte(data, 7) # 1) WHERE blob_ref = $1",
        "UPDATE blob_chunks SET sha256 = sha256(data) WHERE blob_ref = $1",
    ] {
        sqlx::query(sql)
            .bind(blob.0.as_slice())
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // The store's own digest passes on the tampered replica...
    assert_ne!(
        &store.read_chunk_from(first.clone(), blob, 0).await.unwrap()[..],
        &data[..]
    );
    // ...the caller's check does not, and the next replica serves.
    let expected = data.clone();
    let verify = move |chunks: &[Bytes]| chunks.concat() == expected;
    assert_eq!(store.get(blob, &verify).await.unwrap().concat(), data);

    let report = store.repair_pending().await.unwrap();
    assert_eq!(report.replicas_copied, 1, "{report:?}");
    fx.assert_everywhere(blob, &data).await;
}

async fn node_with_wrong_ca_is_down(fx: &Fixture, store: &PgBlobStore) {
    let mut config = fx.config();
    config.nodes[2] = fx.node_config(2, &fx.other_ca_cert);
    let suspicious = PgBlobStore::new(&config).unwrap();
    let status = suspicious.node_status().await;
    assert_eq!(status[2].down, Some(DbFailure::Tls), "{status:?}");
    assert!(
        status
            .iter()
            .enumerate()
            .all(|(i, s)| i == 2 || s.down.is_none())
    );

    // Writes go on without it, and the queue brings it up to date later.
    let blob = BlobRef::random();
    let data = pattern(4096, 19);
    let receipt = suspicious
        .put(blob, Bytes::from(data.clone()))
        .await
        .unwrap();
    assert_eq!(receipt.queued, vec![node(2)]);
    let report = store.repair_pending().await.unwrap();
    assert_eq!(report.replicas_copied, 1, "{report:?}");
    fx.assert_everywhere(blob, &data).await;
}
