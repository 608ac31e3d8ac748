//! Settings of `coffer serve` (flags or `COFFER_*` variables) and start-up.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use coffer_keyhost::tls::{install_crypto_provider, load_certs, load_key, serve_mtls};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use super::auth::keyed_hash;
use super::vault::Vault;
use super::{AppState, Limits, router};

/// Settings of the API host.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: coffer_keyhost::settings::ConfigFile,
    #[command(flatten)]
    pub db_tls: coffer_keyhost::dbtls::DbClientCert,
    /// Address of the public HTTPS listener (there is no plaintext listener).
    #[arg(long, env = "COFFER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Public server certificate chain (PEM).
    #[arg(long, env = "COFFER_TLS_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "COFFER_TLS_KEY")]
    pub key: PathBuf,
    /// The internal CA (encryption host, metadata DB).
    #[arg(long, env = "COFFER_CA")]
    pub ca: PathBuf,
    /// The metadata DB URL; TLS verify-full against --ca.
    #[arg(long, env = "COFFER_META_DB")]
    pub meta_db: String,
    /// The encryption host, e.g. `https://encrypt.internal:7444`.
    #[arg(long, env = "COFFER_ENCRYPTD_URL")]
    pub encryptd: String,
    /// Client certificate for the encryption host (role `api-host`).
    #[arg(long, env = "COFFER_API_CLIENT_CERT")]
    pub client_cert: PathBuf,
    /// Its private key.
    #[arg(long, env = "COFFER_API_CLIENT_KEY")]
    pub client_key: PathBuf,
    /// File holding the operator API key (only its keyed hash is kept in memory).
    #[arg(long, env = "COFFER_OPERATOR_KEY_FILE")]
    pub operator_key_file: PathBuf,
    /// File holding the server secret (at least 32 bytes, e.g. 64 hex digits)
    /// that keys the hashes of API key secrets and participant ids. Losing it
    /// invalidates every API key; keep it with the HSM PIN.
    #[arg(long, env = "COFFER_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Deterministic (`dtk_`) tokens each `can_link` key may make per
    /// second, sustained (record linkage is rate-limited per key).
    #[arg(long, env = "COFFER_LINK_RATE", default_value_t = 200)]
    pub link_rate: u32,
    /// ... and at once, in a burst.
    #[arg(long, env = "COFFER_LINK_BURST", default_value_t = 2000)]
    pub link_burst: u32,
    /// Largest JSON body accepted, in bytes (larger: 413, nothing stored).
    #[arg(long, env = "COFFER_MAX_JSON_BYTES", default_value_t = Limits::default().json_bytes)]
    pub max_json_bytes: usize,
    /// Most records in a batch, fields in a tokenize call or tokens in a
    /// detokenize call.
    #[arg(long, env = "COFFER_MAX_ITEMS", default_value_t = Limits::default().items)]
    pub max_items: usize,
    /// Largest BLOB accepted, in bytes (default 16 GiB).
    #[arg(long, env = "COFFER_MAX_BLOB_BYTES", default_value_t = Limits::default().blob_bytes)]
    pub max_blob_bytes: u64,
    /// After a record or BLOB is deleted or corrected, the maintenance
    /// worker rotates the study's KEK and destroys the old version within
    /// this many seconds, after which key DB copies taken before no longer
    /// open what was destroyed. Deletions within the window share one
    /// rotation.
    #[arg(long, env = "COFFER_SHRED_ROTATION_SECS", default_value_t = 3600)]
    pub shred_rotation_secs: u64,
}

/// Serves until `shutdown`; `ready` gets the bound address.
pub async fn run(
    args: ServeArgs,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let secret = Zeroizing::new(
        std::fs::read(&args.secret_file)
            .with_context(|| format!("reading {}", args.secret_file.display()))?,
    );
    if secret.len() < 32 {
        bail!("{} must hold at least 32 bytes", args.secret_file.display());
    }
    let operator = Zeroizing::new(
        std::fs::read_to_string(&args.operator_key_file)
            .with_context(|| format!("reading {}", args.operator_key_file.display()))?,
    );
    let operator = operator.trim();
    if operator.len() < 32 {
        bail!(
            "the operator key in {} is too short (32+ characters)",
            args.operator_key_file.display()
        );
    }
    let operator_hash = keyed_hash(&secret, "api-key", operator.as_bytes());

    let options = args.db_tls.apply(
        PgConnectOptions::from_str(&args.meta_db)
            .context("parsing the metadata DB URL")?
            .ssl_mode(PgSslMode::VerifyFull)
            .ssl_root_cert(&args.ca),
    );
    let db = PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(Duration::from_secs(3))
        .connect_with(options)
        .await
        .context("connecting to the metadata DB")?;
    sqlx::migrate!("./migrations/meta")
        .run(&db)
        .await
        .context("migrating the metadata DB")?;

    let vault = Vault::new(
        &args.encryptd,
        &args.ca,
        &args.client_cert,
        &args.client_key,
    )?;
    let state = Arc::new(AppState {
        db,
        vault,
        secret,
        operator_hash,
        limits: Limits {
            json_bytes: args.max_json_bytes,
            items: args.max_items,
            blob_bytes: args.max_blob_bytes,
        },
        link_limit: coffer_keyhost::ratelimit::RateLimiter::new(args.link_rate, args.link_burst),
        shred_rotation: Duration::from_secs(args.shred_rotation_secs),
        served: Default::default(),
    });

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(&args.cert)?, load_key(&args.key)?)
        .context("loading the server certificate")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let app = router(state).layer(axum::extract::DefaultBodyLimit::max(args.max_json_bytes));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    ready(listener.local_addr()?);
    serve_mtls(listener, Arc::new(tls), app, shutdown).await
}
