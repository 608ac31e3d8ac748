//! `coffer dev`: the whole local stack in one folder (default `.coffer`).
//!
//! A private CA issuing every certificate; PostgreSQL clusters for metadata,
//! keys and four blob nodes (TLS, fsync and synchronous commit on); a
//! SoftHSM token of its own (or a swtpm with `--backend tpm`); the key host,
//! the encryption host, the API host and the maintenance worker as child
//! processes; an operator key and a demo tenant. Writes `dev.env` (mode 0600),
//! runs a demo round trip, and stays up until Ctrl-C, then stops everything
//! it started. Running it again reuses the folder: same token, same keys,
//! same data.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use coffer_keyhost::api::roles;
use coffer_softhsm::{
    DevCa, PgClients, PgCluster, PgTls, SOFTHSM2_CONF, Service, SoftHsmToken, Swtpm,
    find_softhsm_module,
};
use secrecy::{ExposeSecret, SecretString};

/// Label of the development token.
const DEV_TOKEN: &str = "coffer-dev";
/// Blob nodes of the dev stack (W = 3, so one may fail).
const BLOB_NODES: usize = 4;

/// Which key store the dev key host uses.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DevBackend {
    /// A SoftHSM token through PKCS#11.
    Pkcs11,
    /// A swtpm through the TSS.
    Tpm,
}

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Folder holding every file of the stack.
    #[arg(long, env = "COFFER_DATA_DIR", default_value = ".coffer")]
    data_dir: PathBuf,
    /// Key store behind the key host.
    #[arg(long, value_enum, default_value = "pkcs11")]
    backend: DevBackend,
    /// Stop after the demo round trip instead of waiting for Ctrl-C.
    #[arg(long)]
    no_wait: bool,
}

pub(crate) fn run(args: DevArgs) -> Result<()> {
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data = fs::canonicalize(&args.data_dir)?;
    // PostgreSQL runs as an unprivileged user that must reach its folders.
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755))?;
    let logs = data.join("logs");
    fs::create_dir_all(&logs)?;

    step("private CA");
    let ca = DevCa::open(&data.join("ca"))?;

    step("PostgreSQL clusters (metadata, keys, 4 blob nodes)");
    // Each cluster admits the client certificates of the services that use
    // it, and `db-operator` (for a person inspecting it with dev.env's URLs).
    let cluster = |name: &str, clients: &[&str]| -> Result<PgCluster> {
        let cert = ca.server(name)?;
        let names = clients.iter().chain(&[DB_OPERATOR]).map(|c| c.to_string());
        PgCluster::start(
            &data.join("pg").join(name),
            Some(&PgTls {
                cert: cert.cert,
                key: cert.key,
                clients: Some(PgClients {
                    ca: ca.cert_path(),
                    names: names.collect(),
                }),
            }),
        )
        .with_context(|| format!("starting the {name} cluster"))
    };
    let meta_db = cluster("meta", &["db-api", "db-worker"])?;
    let key_db = cluster("keys", &["db-keyd"])?;
    let blob_nodes = (1..=BLOB_NODES)
        .map(|i| cluster(&format!("blob{i}"), &["db-encryptd"]))
        .collect::<Result<Vec<_>>>()?;
    let db_cert = |name: &str| -> Result<[String; 2]> {
        let cert = ca.db_client(name)?;
        Ok([
            format!("--db-client-cert={}", cert.cert.display()),
            format!("--db-client-key={}", cert.key.display()),
        ])
    };

    let softhsm_dir = data.join("softhsm");
    let pin_file = softhsm_dir.join("user.pin");
    let softhsm_conf = dev_token(&softhsm_dir, &pin_file)?;
    let module = find_softhsm_module()?;
    let mut _swtpm = None;
    let backend_args: Vec<String> = match args.backend {
        DevBackend::Pkcs11 => {
            step(&format!("SoftHSM token {DEV_TOKEN:?}"));
            vec![
                "--backend=pkcs11".into(),
                format!("--pkcs11-module={}", module.display()),
                format!("--pkcs11-token={DEV_TOKEN}"),
                format!("--pkcs11-pin-file={}", pin_file.display()),
                // SoftHSM is fastest with calls queued on one session (BENCHMARKS.md).
                "--pkcs11-sessions=1".into(),
            ]
        }
        DevBackend::Tpm => {
            step("swtpm");
            let tpm = Swtpm::start(&data.join("tpm")).context("starting swtpm")?;
            let tcti = tpm.tcti();
            _swtpm = Some(tpm);
            vec![
                "--backend=tpm".into(),
                format!("--tpm-tcti={tcti}"),
                format!("--tpm-key-dir={}", data.join("tpm-keys").display()),
            ]
        }
    };

    step("key host");
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no folder for coffer")?
        .to_path_buf();
    let keyd_cert = ca.server("keyhost")?;
    let mut keyd = Command::new(bin_dir.join("coffer-keyd"));
    keyd.arg("--listen=127.0.0.1:0")
        .arg(format!("--cert={}", keyd_cert.cert.display()))
        .arg(format!("--key={}", keyd_cert.key.display()))
        .arg(format!("--ca={}", ca.cert_path().display()))
        .arg(format!("--key-db={}", key_db.url("postgres")))
        .arg(format!(
            "--oplog={}",
            logs.join("key-operations.log").display()
        ))
        .args(&backend_args)
        .args(db_cert("db-keyd")?)
        .env(SOFTHSM2_CONF, &softhsm_conf);
    let mut keyd = Service::start("coffer-keyd", keyd, &logs.join("keyd.log"))?;

    step("encryption host");
    let enc_cert = ca.server("encryptd")?;
    let enc_client = ca.client(roles::ENCRYPTION_HOST)?;
    let nodes: Vec<String> = blob_nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let mut encryptd = Command::new(bin_dir.join("coffer-encryptd"));
    encryptd
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--cert={}", enc_cert.cert.display()))
        .arg(format!("--key={}", enc_cert.key.display()))
        .arg(format!("--ca={}", ca.cert_path().display()))
        .arg(format!("--key-host={}", keyd.url()))
        .arg(format!("--client-cert={}", enc_client.cert.display()))
        .arg(format!("--client-key={}", enc_client.key.display()))
        .arg(format!("--blob-nodes={}", nodes.join(",")))
        .args(db_cert("db-encryptd")?);
    let mut encryptd = Service::start("coffer-encryptd", encryptd, &logs.join("encryptd.log"))?;

    step("API host");
    let operator_key = secret_file(&data.join("operator.key"), "coffer_op_")?;
    let server_secret = data.join("server.secret");
    secret_file(&server_secret, "")?;
    let api_cert = ca.server("api")?;
    let api_client = ca.client(roles::API_HOST)?;
    let mut serve = Command::new(std::env::current_exe()?);
    serve
        .arg("serve")
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--cert={}", api_cert.cert.display()))
        .arg(format!("--key={}", api_cert.key.display()))
        .arg(format!("--ca={}", ca.cert_path().display()))
        .arg(format!("--meta-db={}", meta_db.url("postgres")))
        .arg(format!("--encryptd={}", encryptd.url()))
        .arg(format!("--client-cert={}", api_client.cert.display()))
        .arg(format!("--client-key={}", api_client.key.display()))
        .arg(format!(
            "--operator-key-file={}",
            data.join("operator.key").display()
        ))
        .arg(format!("--secret-file={}", server_secret.display()))
        .args(db_cert("db-api")?);
    let mut api = Service::start("coffer serve", serve, &logs.join("api.log"))?;

    step("maintenance worker");
    let worker_cert = ca.client(roles::MAINTENANCE)?;
    let mut worker = Command::new(std::env::current_exe()?);
    worker
        .arg("worker")
        .arg(format!("--ca={}", ca.cert_path().display()))
        .arg(format!("--meta-db={}", meta_db.url("postgres")))
        .arg(format!("--key-host={}", keyd.url()))
        .arg(format!("--encryptd={}", encryptd.url()))
        .arg(format!("--client-cert={}", worker_cert.cert.display()))
        .arg(format!("--client-key={}", worker_cert.key.display()))
        .args(db_cert("db-worker")?);
    let mut worker = Service::start("coffer worker", worker, &logs.join("worker.log"))?;

    step("demo tenant and round trip");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let demo = runtime.block_on(crate::cli::demo::round_trip(&ca, &api.url(), &operator_key))?;

    let pin = SecretString::from(fs::read_to_string(&pin_file)?);
    let env_file = data.join("dev.env");
    let env = [
        ("COFFER_URL", api.url()),
        ("COFFER_CACERT", ca.cert_path().display().to_string()),
        (
            "COFFER_OPERATOR_KEY",
            operator_key.expose_secret().to_string(),
        ),
        ("COFFER_ADMIN_KEY", demo.admin.expose_secret().to_string()),
        ("COFFER_WRITER_KEY", demo.writer.expose_secret().to_string()),
        ("COFFER_READER_KEY", demo.reader.expose_secret().to_string()),
        ("COFFER_DEMO_STUDY", demo.study.clone()),
        ("COFFER_DATA_DIR", data.display().to_string()),
        ("COFFER_KEY_HOST", keyd.url()),
        ("COFFER_ENCRYPTD_URL", encryptd.url()),
        ("COFFER_BLOB_NODES", nodes.join(",")),
        ("COFFER_META_DB", tls_url(&meta_db, &ca)?),
        ("COFFER_KEY_DB", tls_url(&key_db, &ca)?),
        (SOFTHSM2_CONF, softhsm_conf.display().to_string()),
        ("COFFER_PKCS11_MODULE", module.display().to_string()),
        ("COFFER_PKCS11_TOKEN", DEV_TOKEN.to_string()),
        ("COFFER_PKCS11_PIN", pin.expose_secret().trim().to_string()),
    ];
    write_env_file(&env_file, &env)?;

    println!("\nCoffer is up.");
    println!("  API              {}", api.url());
    println!("  encryption host  {}", encryptd.url());
    println!("  key host         {}", keyd.url());
    println!("  settings         {} (mode 0600)", env_file.display());
    println!("  logs             {}", logs.display());
    if !args.no_wait {
        println!("Press Ctrl-C to stop.");
        runtime.block_on(tokio::signal::ctrl_c())?;
        println!("\nStopping.");
    }
    worker.stop();
    api.stop();
    encryptd.stop();
    keyd.stop();
    // Clusters and swtpm stop as they drop.
    Ok(())
}

/// A random secret kept in a 0600 file (created on first run, reused after).
fn secret_file(path: &Path, prefix: &str) -> Result<SecretString> {
    if !path.exists() {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let text = format!("{prefix}{}", data_encoding::HEXLOWER.encode(&bytes));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(text.as_bytes())?;
    }
    Ok(SecretString::from(
        fs::read_to_string(path)?.trim().to_owned(),
    ))
}

fn step(what: &str) {
    println!("• {what}");
}

/// Common name of the client certificate in dev.env's database URLs.
const DB_OPERATOR: &str = "db-operator";

/// A database URL that verifies the server and presents `db-operator`'s
/// certificate (libpq's and sqlx's parameter names).
fn tls_url(cluster: &PgCluster, ca: &DevCa) -> Result<String> {
    let client = ca.db_client(DB_OPERATOR)?;
    Ok(format!(
        "{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        cluster.url("postgres"),
        ca.cert_path().display(),
        client.cert.display(),
        client.key.display()
    ))
}

/// The development token's configuration file, creating the token (random
/// PINs, the user PIN kept in a 0600 file) on first run.
fn dev_token(dir: &Path, pin_file: &Path) -> Result<PathBuf> {
    let conf = dir.join("softhsm2.conf");
    if conf.exists() && pin_file.exists() {
        return Ok(conf);
    }
    if dir.exists() {
        fs::remove_dir_all(dir)
            .with_context(|| format!("clearing a half-made {}", dir.display()))?;
    }
    let token = SoftHsmToken::create(dir, DEV_TOKEN)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(pin_file)
        .with_context(|| format!("writing {}", pin_file.display()))?;
    file.write_all(token.user_pin().expose_secret().as_bytes())?;
    if !token.conf_path().exists() {
        bail!("SoftHSM did not write {}", token.conf_path().display());
    }
    Ok(token.conf_path().to_path_buf())
}

/// Writes `KEY='value'` lines: a shell can source the file (`set -a; .
/// .coffer/dev.env`) even though URLs hold `&` and `?`.
fn write_env_file(path: &Path, env: &[(&str, String)]) -> Result<()> {
    let body: String = env
        .iter()
        .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', r"'\''")))
        .collect();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its old mode on open: tighten it explicitly.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(body.as_bytes())?;
    Ok(())
}
