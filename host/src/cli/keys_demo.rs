//! A round trip through the PKCS#11 and TPM key backends.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;
use coffer_hsm::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use coffer_hsm::tpm::{TpmBackend, TpmConfig};
use coffer_hsm::{KekBackend, KeyRef};

#[derive(Debug, Args)]
pub(crate) struct KeysDemoArgs {
    /// PKCS#11 module path.
    #[arg(long, env = "COFFER_PKCS11_MODULE")]
    pkcs11_module: PathBuf,
    /// Label of the token holding the KEKs.
    #[arg(long, env = "COFFER_PKCS11_TOKEN")]
    pkcs11_token: String,
    /// File holding the token's user PIN.
    #[arg(long, env = "COFFER_PKCS11_PIN_FILE")]
    pkcs11_pin_file: PathBuf,
    /// TPM TCTI, e.g. `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`.
    #[arg(long, env = "COFFER_TPM_TCTI")]
    tpm_tcti: String,
    /// Folder of the TPM KEK key files.
    #[arg(long, env = "COFFER_TPM_KEY_DIR")]
    tpm_key_dir: PathBuf,
}

pub(crate) fn run(args: KeysDemoArgs) -> Result<()> {
    let mut config = Pkcs11Config::new(
        &args.pkcs11_module,
        &args.pkcs11_token,
        PinSource::File(args.pkcs11_pin_file),
    );
    // SoftHSM is fastest with calls queued on one session (BENCHMARKS.md).
    config.sessions = 1;
    let backend = Pkcs11Backend::open(&config).context("opening the PKCS#11 token")?;
    round_trip(&format!("PKCS#11 token {:?}", args.pkcs11_token), &backend)?;

    let tpm = TpmBackend::open(TpmConfig::new(&args.tpm_tcti, &args.tpm_key_dir))
        .context("opening the TPM")?;
    round_trip(&format!("TPM at {}", args.tpm_tcti), &tpm)
}

/// Creates a KEK, wraps a fresh data key, unwraps it, rotates, rewraps and
/// destroys the KEK, printing each step (never a key).
pub(crate) fn round_trip(name: &str, backend: &dyn KekBackend) -> Result<()> {
    let caps = backend.capabilities();
    println!(
        "{name}: {:?}, wrap limit {} per KEK version",
        caps.wrap_mechanism, caps.wrap_limit
    );
    let kek = backend.create_kek()?.id;
    let key_ref = KeyRef::random()?;
    let (key, wrapped) = backend.generate_data_key(&kek, &key_ref)?;
    println!(
        "  created {kek}; wrapped a fresh 256-bit data key into {} bytes",
        wrapped.bytes.len()
    );
    ensure!(
        backend.unwrap(&wrapped, &key_ref)?.expose() == key.expose(),
        "unwrap gave another key"
    );
    println!("  unwrapped it: same key");
    let v2 = backend.rotate_kek(&kek)?;
    let moved = backend.rewrap(&wrapped, &key_ref, v2)?;
    ensure!(
        backend.unwrap(&moved, &key_ref)?.expose() == key.expose(),
        "rewrap lost the key"
    );
    println!("  rotated to {v2} and rewrapped: same key");
    backend.destroy_kek(&kek)?;
    let after = backend.unwrap(&moved, &key_ref);
    ensure!(after.is_err(), "a destroyed KEK still unwrapped");
    println!(
        "  destroyed {kek}; unwrapping now fails: {}",
        after.err().map(|e| e.to_string()).unwrap_or_default()
    );
    Ok(())
}
