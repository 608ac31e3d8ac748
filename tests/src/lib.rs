//! Shared fixtures for the suites in `tests/tests/`: real SoftHSM tokens and
//! real swtpm instances, each test with its own.

pub mod load;
pub mod stack;

use std::path::PathBuf;

use coffer_hsm::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use coffer_hsm::tpm::{TpmBackend, TpmConfig};
use coffer_softhsm::{SoftHsmToken, Swtpm, find_softhsm_module};
use tempfile::TempDir;

/// The folder of this process's SoftHSM configuration: the parent of
/// `SOFTHSM2_CONF`, which `.cargo/config.toml` points at `.coffer/test/softhsm`.
pub fn softhsm_dir() -> PathBuf {
    let conf = std::env::var_os(coffer_softhsm::SOFTHSM2_CONF)
        .expect("SOFTHSM2_CONF is set (by .cargo/config.toml, or by hand)");
    PathBuf::from(conf)
        .parent()
        .expect("SOFTHSM2_CONF names a file in a folder")
        .to_path_buf()
}

/// A fresh token with a unique label, in this process's SoftHSM configuration.
///
/// SoftHSM reads its token folder once, when the module is initialised: a
/// token created afterwards stays invisible to this process. Create every
/// token a test needs before its first backend opens; most tests share
/// [`shared_token`] instead.
pub fn new_token() -> SoftHsmToken {
    let label = format!("t-{}", random_hex());
    SoftHsmToken::create(&softhsm_dir(), &label).expect("create a SoftHSM token")
}

/// One token per test process, created on first use. Tests sharing it each
/// work on KEKs of their own (random ids), so they never see each other's.
pub fn shared_token() -> &'static SoftHsmToken {
    static TOKEN: std::sync::OnceLock<SoftHsmToken> = std::sync::OnceLock::new();
    TOKEN.get_or_init(new_token)
}

/// The configuration that reaches `token`.
pub fn pkcs11_config(token: &SoftHsmToken) -> Pkcs11Config {
    Pkcs11Config::new(
        find_softhsm_module().expect("SoftHSM is installed"),
        token.label(),
        PinSource::Value(token.user_pin().clone()),
    )
}

/// A backend over this process's shared token.
pub fn pkcs11_backend() -> Pkcs11Backend {
    pkcs11_backend_with_limit(coffer_hsm::DEFAULT_WRAP_LIMIT)
}

/// A backend over this process's shared token, with a chosen wrap limit.
pub fn pkcs11_backend_with_limit(wrap_limit: u64) -> Pkcs11Backend {
    let mut config = pkcs11_config(shared_token());
    config.wrap_limit = wrap_limit;
    Pkcs11Backend::open(&config).expect("open the shared token")
}

/// 64 random bits in hex.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("OS RNG");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A temporary folder that an unprivileged server user (PostgreSQL as root
/// runs as `coffer-pg`) can traverse.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A swtpm and a key folder in one temporary folder.
#[derive(Debug)]
pub struct TpmFixture {
    /// The running swtpm (`None` only inside [`TpmFixture::restart_tpm`]).
    pub tpm: Option<Swtpm>,
    /// The temporary folder (`tpm/` state, `keys/` key files); declared
    /// last so the swtpm stops before its state goes.
    pub dir: TempDir,
}

impl TpmFixture {
    /// Starts a swtpm in a fresh temporary folder.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let tpm = Swtpm::start(&dir.path().join("tpm")).expect("start swtpm");
        Self {
            dir,
            tpm: Some(tpm),
        }
    }

    /// Where the backend keeps its key files.
    pub fn key_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// The backend configuration for this swtpm.
    pub fn config(&self, wrap_limit: u64) -> TpmConfig {
        TpmConfig {
            tcti: self.tpm.as_ref().expect("swtpm running").tcti(),
            key_dir: self.key_dir(),
            wrap_limit,
        }
    }

    /// A backend with the default wrap limit.
    pub fn open(&self) -> TpmBackend {
        self.open_with_limit(coffer_hsm::DEFAULT_WRAP_LIMIT)
    }

    /// A backend with a chosen wrap limit.
    pub fn open_with_limit(&self, wrap_limit: u64) -> TpmBackend {
        TpmBackend::open(self.config(wrap_limit)).expect("open the TPM backend")
    }

    /// Stops swtpm cleanly and starts it again on the same state.
    pub fn restart_tpm(&mut self) {
        self.tpm
            .take()
            .expect("swtpm running")
            .stop()
            .expect("stop swtpm");
        self.tpm = Some(Swtpm::start(&self.dir.path().join("tpm")).expect("restart swtpm"));
    }
}

impl Default for TpmFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// A TPM backend over a fresh swtpm; keep the fixture alive beside it
/// (declared after the backend, so it drops later).
pub fn tpm_backend_with_limit(wrap_limit: u64) -> (TpmFixture, TpmBackend) {
    let fixture = TpmFixture::new();
    let backend = fixture.open_with_limit(wrap_limit);
    (fixture, backend)
}

/// A built binary of the workspace (`scripts/test` builds them first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}
