//! Settings of `coffer-encryptd` (flags or `COFFER_*` variables) and start-up.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use coffer_keyhost::client::KeyHostClient;
use coffer_keyhost::tls::{install_crypto_provider, mtls_server_config, serve_mtls};
use tokio::net::TcpListener;

use super::{EncryptionHost, router};
use crate::blob::{NodeConfig, PgBlobConfig, PgBlobStore};

/// Settings of the encryption host.
#[derive(Clone, Debug, Args)]
pub struct EncryptdArgs {
    #[command(flatten)]
    pub config: coffer_keyhost::settings::ConfigFile,
    #[command(flatten)]
    pub db_tls: coffer_keyhost::dbtls::DbClientCert,
    /// Address to listen on (mutual TLS only; callers need the `api-host` role).
    #[arg(long, env = "COFFER_ENCRYPTD_LISTEN", default_value = "127.0.0.1:7444")]
    pub listen: SocketAddr,
    /// Server certificate (PEM).
    #[arg(long, env = "COFFER_ENCRYPTD_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "COFFER_ENCRYPTD_KEY")]
    pub key: PathBuf,
    /// The CA of every internal certificate (clients, key host, blob nodes).
    #[arg(long, env = "COFFER_CA")]
    pub ca: PathBuf,
    /// The key host, e.g. `https://keys.internal:7443`.
    #[arg(long, env = "COFFER_KEY_HOST")]
    pub key_host: String,
    /// Client certificate for the key host (role `encryption-host`).
    #[arg(long, env = "COFFER_ENCRYPTD_CLIENT_CERT")]
    pub client_cert: PathBuf,
    /// Its private key.
    #[arg(long, env = "COFFER_ENCRYPTD_CLIENT_KEY")]
    pub client_key: PathBuf,
    /// Blob nodes as `host:port,host:port,...` (N ≥ W, and N ≥ W+1 to survive a node loss).
    #[arg(long, env = "COFFER_BLOB_NODES", value_delimiter = ',')]
    pub blob_nodes: Vec<String>,
    /// Database on every blob node.
    #[arg(long, env = "COFFER_BLOB_DB", default_value = "postgres")]
    pub blob_db: String,
    /// User on every blob node.
    #[arg(long, env = "COFFER_BLOB_USER", default_value = "postgres")]
    pub blob_user: String,
    /// W: commits needed before a write is acknowledged (at least 3).
    #[arg(long, env = "COFFER_WRITE_QUORUM", default_value_t = 3)]
    pub write_quorum: usize,
    /// Largest object accepted, in bytes (default 16 GiB).
    #[arg(long, env = "COFFER_MAX_OBJECT", default_value_t = 16 << 30)]
    pub max_object: u64,
    /// Seconds between drains of the blob nodes' repair queue (missed,
    /// damaged or not-yet-deleted replicas); 0 turns it off.
    #[arg(long, env = "COFFER_REPAIR_INTERVAL_SECS", default_value_t = 30)]
    pub repair_interval_secs: u64,
}

/// The blob store the arguments describe.
pub fn blob_store(args: &EncryptdArgs) -> Result<PgBlobStore> {
    let mut nodes = Vec::new();
    for (i, node) in args.blob_nodes.iter().enumerate() {
        let Some((host, port)) = node.rsplit_once(':') else {
            bail!("blob node {node:?} is not host:port");
        };
        nodes.push(NodeConfig {
            id: format!("node{}", i + 1),
            host: host.to_owned(),
            port: port
                .parse()
                .with_context(|| format!("blob node {node:?}: bad port"))?,
            database: args.blob_db.clone(),
            user: args.blob_user.clone(),
            root_cert: args.ca.clone(),
            client: args.db_tls.clone(),
        });
    }
    let mut config = PgBlobConfig::new(nodes);
    config.write_quorum = args.write_quorum;
    Ok(PgBlobStore::new(&config)?)
}

/// Serves until `shutdown`; `ready` gets the bound address.
pub async fn run(
    args: EncryptdArgs,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let tls = mtls_server_config(&args.cert, &args.key, &args.ca)?;
    let keys = KeyHostClient::new(
        &args.key_host,
        &args.ca,
        &args.client_cert,
        &args.client_key,
    )?;
    let blobs: Arc<dyn crate::blob::BlobStore> = Arc::new(blob_store(&args)?);
    if args.repair_interval_secs > 0 {
        tokio::spawn(repair_loop(
            blobs.clone(),
            std::time::Duration::from_secs(args.repair_interval_secs),
        ));
    }
    let host = Arc::new(EncryptionHost {
        keys,
        blobs,
        max_object: args.max_object,
        write_quorum: args.write_quorum,
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    ready(listener.local_addr()?);
    serve_mtls(listener, tls, router(host), shutdown).await
}

/// Drains the repair queue on a schedule, so a node that was down or held a
/// damaged replica is brought back without anyone asking. Repair is
/// idempotent and takes row locks, so several encryption hosts may run it.
async fn repair_loop(
    blobs: std::sync::Arc<dyn crate::blob::BlobStore>,
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        match blobs.repair_pending().await {
            Ok(report) if report.entries > 0 => tracing::info!(
                entries = report.entries,
                copied = report.replicas_copied,
                tombstones = report.tombstones_applied,
                deferred = report.deferred,
                unrecoverable = report.unrecoverable.len(),
                "repair queue drained"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("repair pass failed: {e}"),
        }
    }
}
