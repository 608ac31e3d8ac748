//! A SoftHSM token in a folder of its own.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use secrecy::{ExposeSecret, SecretString};

use crate::tools::{SetupError, io_err, random_hex, run};

const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// Finds the SoftHSM PKCS#11 module of this machine.
pub fn find_softhsm_module() -> Result<PathBuf, SetupError> {
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(SetupError::Missing {
            tool: "libsofthsm2.so".into(),
            package: "softhsm2",
        })
}

/// An initialised SoftHSM token with its own configuration file.
///
/// The configuration is only *written* here; SoftHSM reads it from the
/// `SOFTHSM2_CONF` environment variable of the process that loads the module,
/// so whoever starts that process must set it to [`SoftHsmToken::conf_path`].
#[derive(Debug)]
pub struct SoftHsmToken {
    conf: PathBuf,
    token_dir: PathBuf,
    label: String,
    user_pin: SecretString,
    so_pin: SecretString,
}

impl SoftHsmToken {
    /// Writes `<dir>/softhsm2.conf` (tokens in `<dir>/tokens`) unless it
    /// exists, then initialises a new token `label` with random PINs.
    pub fn create(dir: &Path, label: &str) -> Result<Self, SetupError> {
        let user_pin = SecretString::from(random_hex());
        let so_pin = SecretString::from(random_hex());
        Self::create_with_pins(dir, label, user_pin, so_pin)
    }

    /// As [`SoftHsmToken::create`], with chosen PINs.
    pub fn create_with_pins(
        dir: &Path,
        label: &str,
        user_pin: SecretString,
        so_pin: SecretString,
    ) -> Result<Self, SetupError> {
        let token_dir = dir.join("tokens");
        fs::create_dir_all(&token_dir).map_err(io_err("cannot create", &token_dir))?;
        let conf = dir.join("softhsm2.conf");
        if !conf.exists() {
            // Written whole under another name, then renamed: processes that
            // race to create it never see half a file.
            let body = format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                token_dir.display()
            );
            let tmp = dir.join(format!(".softhsm2.conf.{}", random_hex()));
            fs::write(&tmp, body).map_err(io_err("cannot write", &tmp))?;
            fs::rename(&tmp, &conf).map_err(io_err("cannot write", &conf))?;
        }
        run(
            Command::new("softhsm2-util")
                .env(crate::SOFTHSM2_CONF, &conf)
                .args(["--init-token", "--free", "--label", label])
                .args(["--so-pin", so_pin.expose_secret()])
                .args(["--pin", user_pin.expose_secret()]),
            "softhsm2",
        )?;
        Ok(Self {
            conf,
            token_dir,
            label: label.to_owned(),
            user_pin,
            so_pin,
        })
    }

    /// The configuration file to export as `SOFTHSM2_CONF`.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The folder holding the token files.
    pub fn token_dir(&self) -> &Path {
        &self.token_dir
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN.
    pub fn user_pin(&self) -> &SecretString {
        &self.user_pin
    }

    /// The security officer PIN.
    pub fn so_pin(&self) -> &SecretString {
        &self.so_pin
    }
}
