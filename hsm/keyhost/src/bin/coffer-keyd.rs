//! `coffer-keyd`: the key host process.

use clap::Parser;
use coffer_keyhost::config::{KeydArgs, run};

/// Coffer's key host: owns the HSM/TPM and the key DB, serves data keys over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "coffer-keyd", version, about)]
struct Cli {
    #[command(flatten)]
    args: KeydArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    coffer_keyhost::logging::init();
    let cli = Cli::parse();
    let result = run(
        cli.args,
        |addr| tracing::info!("coffer-keyd listening on {addr}"),
        coffer_keyhost::logging::shutdown_signal(),
    )
    .await;
    coffer_keyhost::logging::finish("coffer-keyd", result)
}
