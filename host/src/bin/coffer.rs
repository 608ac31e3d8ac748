//! The `coffer` command.

fn main() -> std::process::ExitCode {
    coffer_host::cli::main()
}
