//! Running the external set-up tools with errors that say what to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Why a set-up step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A tool is not installed.
    #[error("`{tool}` was not found: install the Debian package `{package}`")]
    Missing {
        /// The program.
        tool: String,
        /// The package that provides it.
        package: &'static str,
    },
    /// A tool ran and failed.
    #[error("`{tool}` failed ({status}): {stderr}")]
    Failed {
        /// The program.
        tool: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (never carries a PIN: PINs go on the
        /// command line of tools that do not echo them).
        stderr: String,
    },
    /// A file or folder could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A service did not come up in time.
    #[error("{0}")]
    Timeout(String),
}

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::Io { what, path, source }
}

/// Runs a command to completion, translating "not found" into the package to install.
pub(crate) fn run(cmd: &mut Command, package: &'static str) -> Result<Output, SetupError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SetupError::Missing {
            tool: tool.clone(),
            package,
        },
        _ => SetupError::Failed {
            tool: tool.clone(),
            status: "could not start".into(),
            stderr: e.to_string(),
        },
    })?;
    if !output.status.success() {
        return Err(SetupError::Failed {
            tool,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// 64 random bits as lower-case hex, for labels and throwaway PINs.
pub(crate) fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS RNG is available");
    data_encoding::HEXLOWER.encode(&bytes)
}
