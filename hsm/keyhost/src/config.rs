//! The key host's settings (flags or `COFFER_*` environment variables) and
//! its start-up.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use coffer_hsm::KekBackend;
use coffer_hsm::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use coffer_hsm::tpm::{TpmBackend, TpmConfig};
use tokio::net::TcpListener;

use crate::oplog::OpLog;
use crate::ratelimit::RateLimiter;
use crate::server::{KeyHost, router};
use crate::tls::{install_crypto_provider, mtls_server_config, serve_mtls};

/// Which hardware key store holds the KEKs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendKind {
    /// A PKCS#11 HSM (SoftHSM in development).
    Pkcs11,
    /// A TPM 2.0 (swtpm in development).
    Tpm,
}

/// Settings of `coffer-keyd`.
#[derive(Clone, Debug, Args)]
pub struct KeydArgs {
    #[command(flatten)]
    pub config: crate::settings::ConfigFile,
    #[command(flatten)]
    pub db_tls: crate::dbtls::DbClientCert,
    /// Address to listen on (mutual TLS only).
    #[arg(long, env = "COFFER_KEYD_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// The key host's server certificate (PEM).
    #[arg(long, env = "COFFER_KEYD_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "COFFER_KEYD_KEY")]
    pub key: PathBuf,
    /// The CA that issues every client certificate and the key DB's certificate.
    #[arg(long, env = "COFFER_CA")]
    pub ca: PathBuf,
    /// The key DB, e.g. `postgres://coffer@db.internal:5432/keys`; TLS verify-full against --ca.
    #[arg(long, env = "COFFER_KEY_DB")]
    pub key_db: String,
    /// Hardware key store.
    #[arg(
        long,
        env = "COFFER_KEYD_BACKEND",
        value_enum,
        default_value = "pkcs11"
    )]
    pub backend: BackendKind,
    /// PKCS#11 module path (the HSM vendor's library).
    #[arg(long, env = "COFFER_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// Label of the token holding Coffer's KEKs.
    #[arg(long, env = "COFFER_PKCS11_TOKEN")]
    pub pkcs11_token: Option<String>,
    /// File holding the token's user PIN (never pass a PIN on the command line).
    #[arg(long, env = "COFFER_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// PKCS#11 sessions kept open (1 is fastest on SoftHSM; network HSMs want more).
    #[arg(long, env = "COFFER_PKCS11_SESSIONS", default_value_t = 4)]
    pub pkcs11_sessions: usize,
    /// TPM TCTI, e.g. `device:/dev/tpmrm0`.
    #[arg(long, env = "COFFER_TPM_TCTI")]
    pub tpm_tcti: Option<String>,
    /// Folder of the TPM KEK key files.
    #[arg(long, env = "COFFER_TPM_KEY_DIR")]
    pub tpm_key_dir: Option<PathBuf>,
    /// Wraps one KEK version accepts before it must be rotated.
    #[arg(long, env = "COFFER_WRAP_LIMIT", default_value_t = coffer_hsm::DEFAULT_WRAP_LIMIT)]
    pub wrap_limit: u64,
    /// Opens per second allowed per KEK, sustained.
    #[arg(long, env = "COFFER_KEYD_OPEN_RATE", default_value_t = 5000)]
    pub open_rate: u32,
    /// Opens allowed per KEK in a burst.
    #[arg(long, env = "COFFER_KEYD_OPEN_BURST", default_value_t = 10000)]
    pub open_burst: u32,
    /// Append-only log of key operations (JSON lines).
    #[arg(long, env = "COFFER_KEYD_OPLOG")]
    pub oplog: Option<PathBuf>,
}

fn open_backend(args: &KeydArgs) -> Result<Arc<dyn KekBackend>> {
    Ok(match args.backend {
        BackendKind::Pkcs11 => {
            let (Some(module), Some(token), Some(pin)) = (
                &args.pkcs11_module,
                &args.pkcs11_token,
                &args.pkcs11_pin_file,
            ) else {
                bail!(
                    "the pkcs11 backend needs --pkcs11-module, --pkcs11-token and --pkcs11-pin-file"
                );
            };
            let mut config = Pkcs11Config::new(module, token, PinSource::File(pin.clone()));
            config.sessions = args.pkcs11_sessions;
            config.wrap_limit = args.wrap_limit;
            Arc::new(Pkcs11Backend::open(&config).context("opening the PKCS#11 token")?)
        }
        BackendKind::Tpm => {
            let (Some(tcti), Some(dir)) = (&args.tpm_tcti, &args.tpm_key_dir) else {
                bail!("the tpm backend needs --tpm-tcti and --tpm-key-dir");
            };
            let mut config = TpmConfig::new(tcti, dir);
            config.wrap_limit = args.wrap_limit;
            Arc::new(TpmBackend::open(config).context("opening the TPM")?)
        }
    })
}

/// Opens the key store and the key DB, then serves until `shutdown`.
/// `ready` is called with the bound address once the listener accepts.
pub async fn run(
    args: KeydArgs,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    install_crypto_provider();
    let tls = mtls_server_config(&args.cert, &args.key, &args.ca)?;
    let backend = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || open_backend(&args)).await??
    };
    let db = crate::db::connect(&args.key_db, Some(&args.ca), &args.db_tls).await?;
    let host = Arc::new(KeyHost {
        backend,
        db,
        open_limit: RateLimiter::new(args.open_rate, args.open_burst),
        oplog: OpLog::open(args.oplog.as_deref()).context("opening the key operations log")?,
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    ready(listener.local_addr()?);
    serve_mtls(listener, tls, router(host), shutdown).await
}
