//! The client certificate a service presents to its database (key DB, blob
//! nodes, metadata DB). Servers are always verified (`verify-full` against
//! the internal CA); clusters that admit clients by certificate name also
//! need this.

use std::path::PathBuf;

use sqlx::postgres::PgConnectOptions;

/// `--db-client-cert` / `--db-client-key`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct DbClientCert {
    /// Client certificate (PEM) presented to the database, for servers that
    /// admit clients by certificate (`hostssl … cert`); none by default.
    #[arg(
        long = "db-client-cert",
        env = "COFFER_DB_CLIENT_CERT",
        requires = "db_client_key",
        value_name = "PEM"
    )]
    pub db_client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(
        long = "db-client-key",
        env = "COFFER_DB_CLIENT_KEY",
        requires = "db_client_cert",
        value_name = "PEM"
    )]
    pub db_client_key: Option<PathBuf>,
}

impl DbClientCert {
    /// `options` presenting the certificate, if one is configured.
    pub fn apply(&self, options: PgConnectOptions) -> PgConnectOptions {
        match (&self.db_client_cert, &self.db_client_key) {
            (Some(cert), Some(key)) => options.ssl_client_cert(cert).ssl_client_key(key),
            _ => options,
        }
    }
}
