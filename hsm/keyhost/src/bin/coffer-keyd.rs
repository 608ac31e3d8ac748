//! `coffer-keyd`: the key host process.

use coffer_keyhost::config::{KeydArgs, run};

/// Coffer's key host: owns the HSM/TPM and the key DB, serves data keys over mutual TLS.
#[derive(Debug, clap::Parser)]
#[command(name = "coffer-keyd", version, about)]
struct Cli {
    #[command(flatten)]
    args: KeydArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    coffer_keyhost::logging::init();
    coffer_keyhost::hardening::harden("coffer-keyd");
    let cli: Cli = coffer_keyhost::settings::parse_with_config(|_| Some(("keyd".to_owned(), 1)));
    let result = run(
        cli.args,
        |addr| tracing::info!("coffer-keyd listening on {addr}"),
        coffer_keyhost::logging::shutdown_signal(),
    )
    .await;
    coffer_keyhost::logging::finish("coffer-keyd", result)
}
