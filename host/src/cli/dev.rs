//! `coffer dev`: the local development stack.
//!
//! Everything lives under one data folder (default `.coffer`): a SoftHSM
//! configuration and token of its own (never the system default), a swtpm
//! state folder, and `dev.env` (mode 0600) describing how to reach them.
//! Processes that load the PKCS#11 module get `SOFTHSM2_CONF` in their own
//! environment, so the stack's parts run as child processes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use coffer_softhsm::{SOFTHSM2_CONF, SoftHsmToken, Swtpm, find_softhsm_module};
use secrecy::{ExposeSecret, SecretString};

/// Label of the development token.
const DEV_TOKEN: &str = "coffer-dev";

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Folder holding every file of the stack.
    #[arg(long, env = "COFFER_DATA_DIR", default_value = ".coffer")]
    data_dir: PathBuf,
    /// Stop after the demo round trip instead of waiting for Ctrl-C.
    #[arg(long)]
    no_wait: bool,
}

pub(crate) fn run(args: DevArgs) -> Result<()> {
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = fs::canonicalize(&args.data_dir)?;
    let softhsm_dir = data_dir.join("softhsm");
    let pin_file = softhsm_dir.join("user.pin");
    let token = dev_token(&softhsm_dir, &pin_file)?;
    let module = find_softhsm_module()?;
    println!("SoftHSM token {DEV_TOKEN:?} in {}", softhsm_dir.display());

    let tpm = Swtpm::start(&data_dir.join("tpm")).context("starting swtpm")?;
    println!("swtpm at {}", tpm.tcti());

    let env = [
        ("COFFER_DATA_DIR", data_dir.display().to_string()),
        (SOFTHSM2_CONF, token.display().to_string()),
        ("COFFER_PKCS11_MODULE", module.display().to_string()),
        ("COFFER_PKCS11_TOKEN", DEV_TOKEN.to_string()),
        ("COFFER_PKCS11_PIN_FILE", pin_file.display().to_string()),
        ("COFFER_TPM_TCTI", tpm.tcti()),
        (
            "COFFER_TPM_KEY_DIR",
            data_dir.join("tpm-keys").display().to_string(),
        ),
    ];
    let env_file = data_dir.join("dev.env");
    write_env_file(&env_file, &env)?;

    let status = Command::new(std::env::current_exe()?)
        .arg("keys-demo")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .context("running the demo round trip")?;
    if !status.success() {
        bail!("the demo round trip failed ({status})");
    }

    println!("\nThe stack is up. Settings: {}", env_file.display());
    if !args.no_wait {
        println!("Press Ctrl-C to stop it.");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tokio::signal::ctrl_c())?;
        println!("\nStopping.");
    }
    tpm.stop().context("stopping swtpm")?;
    Ok(())
}

/// The development token's configuration file, creating the token (with
/// random PINs, the user PIN kept in a 0600 file) on first run.
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
    write_secret_file(pin_file, token.user_pin())?;
    Ok(token.conf_path().to_path_buf())
}

fn write_secret_file(path: &Path, secret: &SecretString) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(secret.expose_secret().as_bytes())?;
    Ok(())
}

fn write_env_file(path: &Path, env: &[(&str, String)]) -> Result<()> {
    let body: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
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
