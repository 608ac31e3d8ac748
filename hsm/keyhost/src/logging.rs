//! One logging set-up for every Coffer process: to stderr, level from
//! `COFFER_LOG` (default `info`). Never a key, PIN or record value: the
//! code logs ids, codes and counts only.

/// Installs the process's log subscriber.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COFFER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves when the process is asked to stop (Ctrl-C / SIGINT).
pub async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Logs how a service ended and turns it into the process's exit code.
pub fn finish(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
