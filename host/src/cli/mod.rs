//! The `coffer` command line.

mod demo;
mod dev;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Coffer: a hardware-backed vault for research records.
#[derive(Debug, Parser)]
#[command(name = "coffer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring up the whole local stack (CA, Postgres clusters, SoftHSM token,
    /// key host, encryption host) in a data folder and run a demo round trip;
    /// stays in the foreground until Ctrl-C, then stops what it started.
    Dev(dev::DevArgs),
}

/// Runs the command line and maps any error to a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dev(args) => dev::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coffer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
