//! The key host's own log of key operations: one JSON line per operation,
//! naming the operation, KEK, key ref, caller role and outcome — never a
//! key, and never tenant, study, participant or record (the key host does
//! not know them).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// An append-only operations log.
#[derive(Debug)]
pub struct OpLog {
    file: Option<Mutex<File>>,
}

/// One logged operation.
#[derive(Debug, Serialize)]
pub struct Op<'a> {
    /// e.g. `generate`, `open`, `destroy_kek`.
    pub op: &'a str,
    /// The KEK involved, if any.
    pub kek: Option<&'a str>,
    /// The key ref involved, if any (hex).
    pub key_ref: Option<String>,
    /// The caller's role.
    pub role: &'a str,
    /// `ok` or an error code.
    pub outcome: &'a str,
}

impl OpLog {
    /// Appends to `path` (created mode 0600), or logs nowhere when `None`.
    pub fn open(path: Option<&Path>) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = match path {
            Some(path) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            )),
            None => None,
        };
        Ok(Self { file })
    }

    /// Records one operation. A log that cannot be written is reported on
    /// stderr (via tracing) but does not fail the operation.
    pub fn record(&self, op: &Op<'_>) {
        let Some(file) = &self.file else { return };
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let line = match serde_json::to_string(&(at, op)) {
            Ok(line) => line,
            Err(_) => return,
        };
        let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(file, "{line}") {
            tracing::error!("cannot write the key operations log: {e}");
        }
    }
}
