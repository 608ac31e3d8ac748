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
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match run(
        cli.args,
        |addr| tracing::info!("coffer-keyd listening on {addr}"),
        shutdown,
    )
    .await
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("coffer-keyd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
