//! `coffer-encryptd`: the encryption host process.

use coffer_host::encryptd::config::{EncryptdArgs, run};

/// Coffer's encryption host: seals records under their own keys and stores them on the blob nodes.
#[derive(Debug, clap::Parser)]
#[command(name = "coffer-encryptd", version, about)]
struct Cli {
    #[command(flatten)]
    args: EncryptdArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    coffer_keyhost::logging::init();
    coffer_keyhost::hardening::harden("coffer-encryptd");
    let cli: Cli =
        coffer_keyhost::settings::parse_with_config(|_| Some(("encryptd".to_owned(), 1)));
    let result = run(
        cli.args,
        |addr| tracing::info!("coffer-encryptd listening on {addr}"),
        coffer_keyhost::logging::shutdown_signal(),
    )
    .await;
    coffer_keyhost::logging::finish("coffer-encryptd", result)
}
