//! The `coffer` command line.

mod client;
pub mod config_example;
mod demo;
mod dev;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Coffer: a hardware-backed vault for research records.
#[derive(Debug, Parser)]
#[command(
    name = "coffer",
    version,
    about = "Coffer: a hardware-backed vault for research records",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connection: client::Connection,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring up the whole local stack (CA, Postgres clusters, SoftHSM token,
    /// key host, encryption host) in a data folder and run a demo round trip;
    /// stays in the foreground until Ctrl-C, then stops what it started.
    Dev(dev::DevArgs),
    /// Run the public HTTPS API host (production: settings from flags or COFFER_* variables).
    Serve(Box<crate::api::config::ServeArgs>),
    /// Run the maintenance worker (deletion jobs; rotation and scrubbing to come).
    Worker(crate::worker::WorkerArgs),
    /// Store a JSON record (the `data` object, from FILE or stdin); prints its token.
    Put {
        /// The study (`std_…`).
        #[arg(long)]
        study: String,
        /// The participant id (stored only as a keyed hash).
        #[arg(long)]
        participant: String,
        /// The record's kind, e.g. `demographics`.
        #[arg(long)]
        kind: Option<String>,
        /// JSON file with the record's data; `-` or nothing reads stdin.
        file: Option<std::path::PathBuf>,
    },
    /// Store a BLOB (a file, or stdin), streamed; prints its token.
    PutBlob {
        /// The study (`std_…`).
        #[arg(long)]
        study: String,
        /// The participant id.
        #[arg(long)]
        participant: String,
        /// The content type stored with it.
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// The file; `-` or nothing reads stdin.
        file: Option<std::path::PathBuf>,
    },
    /// Fetch a BLOB, streamed, to a file (or stdout).
    GetBlob {
        /// The token (`blb_…`).
        token: String,
        /// Where to write it; `-` or nothing is stdout.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Turn a record token back into the record.
    Get {
        /// The token (`rec_…`).
        token: String,
    },
    /// Everything held for one participant of a study.
    Export {
        /// The study (`std_…`).
        #[arg(long)]
        study: String,
        /// The participant id.
        #[arg(long)]
        participant: String,
    },
    /// Delete a record: its keys, every replica and its metadata.
    Delete {
        /// The token (`rec_…`).
        token: String,
    },
    /// Swap field values for tokens: FILE (or stdin) is a JSON object of
    /// names to string values, e.g. {"name": "Jane Roe", "ssn": "123-45-6789"}.
    Tokenize {
        /// The study (`std_…`).
        #[arg(long)]
        study: String,
        /// The participant the values belong to (for export and deletion).
        #[arg(long)]
        participant: Option<String>,
        /// A field to tokenize deterministically (`dtk_`: the same value gives
        /// the same token within the study); repeatable; needs a `can_link` key.
        #[arg(long = "deterministic", value_name = "FIELD")]
        deterministic: Vec<String>,
        /// JSON file with the fields; `-` or nothing reads stdin.
        file: Option<std::path::PathBuf>,
    },
    /// Turn field tokens (`tok_…`, `dtk_…`) back into values.
    Detokenize {
        /// The tokens.
        #[arg(required = true)]
        tokens: Vec<String>,
    },
    /// Delete everything held for one participant of a study (a job: keys,
    /// every replica, metadata, then a rotation of the study's KEK).
    Forget {
        /// The study (`std_…`).
        #[arg(long)]
        study: String,
        /// The participant id.
        #[arg(long)]
        participant: String,
    },
    /// Show a job (`job_…`): state, progress and receipt.
    Job {
        /// The job id.
        id: String,
    },
    /// Print a commented config file listing every setting of the service
    /// processes and its default (see --config of serve, worker, keyd, encryptd).
    ConfigExample,
    /// List the tenant's studies, or create one with --create.
    Studies {
        /// Name of a study to create.
        #[arg(long)]
        create: Option<String>,
    },
}

/// Runs the command line and maps any error to a message and exit code 1.
pub fn main() -> ExitCode {
    // `coffer serve` and `coffer worker` read their table of the config file.
    let cli: Cli = coffer_keyhost::settings::parse_with_config(|args| {
        args.iter().enumerate().skip(1).find_map(|(i, a)| {
            let a = a.to_str()?;
            ["serve", "worker"]
                .contains(&a)
                .then(|| (a.to_owned(), i + 1))
        })
    });
    let result = match cli.command {
        Command::Dev(args) => dev::run(args),
        Command::Serve(args) => serve(*args),
        Command::Worker(args) => worker(args),
        Command::Put {
            study,
            participant,
            kind,
            file,
        } => client::put(
            &cli.connection,
            &study,
            &participant,
            kind.as_deref(),
            file.as_deref(),
        ),
        Command::Get { token } => client::get(&cli.connection, &token),
        Command::PutBlob {
            study,
            participant,
            content_type,
            file,
        } => client::put_blob(
            &cli.connection,
            &study,
            &participant,
            &content_type,
            file.as_deref(),
        ),
        Command::GetBlob { token, output } => {
            client::get_blob(&cli.connection, &token, output.as_deref())
        }
        Command::Export { study, participant } => {
            client::export(&cli.connection, &study, &participant)
        }
        Command::Delete { token } => client::delete(&cli.connection, &token),
        Command::Studies { create } => client::studies(&cli.connection, create.as_deref()),
        Command::Tokenize {
            study,
            participant,
            deterministic,
            file,
        } => client::tokenize(
            &cli.connection,
            &study,
            participant.as_deref(),
            &deterministic,
            file.as_deref(),
        ),
        Command::Detokenize { tokens } => client::detokenize(&cli.connection, &tokens),
        Command::Forget { study, participant } => {
            client::forget(&cli.connection, &study, &participant)
        }
        Command::Job { id } => client::job(&cli.connection, &id),
        Command::ConfigExample => {
            print!("{}", config_example::render());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coffer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    coffer_keyhost::logging::init();
}

fn worker(args: crate::worker::WorkerArgs) -> anyhow::Result<()> {
    init_logging();
    coffer_keyhost::hardening::harden("coffer-worker");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::worker::run(
        args,
        || tracing::info!("coffer-worker listening on the job queue"),
        coffer_keyhost::logging::shutdown_signal(),
    ))
}

fn serve(args: crate::api::config::ServeArgs) -> anyhow::Result<()> {
    init_logging();
    coffer_keyhost::hardening::harden("coffer-serve");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::api::config::run(
        args,
        |addr| tracing::info!("coffer-api listening on {addr}"),
        coffer_keyhost::logging::shutdown_signal(),
    ))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        // Catches clashing argument ids between global and subcommand flags.
        super::Cli::command().debug_assert();
    }
}
