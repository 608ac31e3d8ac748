//! The local services Coffer's development stack and tests run on: private
//! SoftHSM tokens, swtpm instances, PostgreSQL clusters, a private CA, and
//! Coffer's own service processes.
//!
//! Everything lives under a data dir the caller chooses: a SoftHSM
//! configuration of its own (never the system default token folder) and a
//! swtpm state folder. The same code serves `coffer dev`, the test suites and
//! CI, so they all exercise one set-up.

mod ca;
mod postgres;
mod process;
mod softhsm;
mod swtpm;
mod tools;

pub use ca::{DevCa, IssuedCert, ROLE_URI_PREFIX};
pub use postgres::{PgClients, PgCluster, PgTls, StopMode, server_bin_dir};
pub use process::Service;
pub use softhsm::{SoftHsmToken, find_softhsm_module};
pub use swtpm::Swtpm;
pub use tools::SetupError;

/// Environment variable SoftHSM reads its configuration path from.
pub const SOFTHSM2_CONF: &str = "SOFTHSM2_CONF";
