//! One TOML config file for every Coffer service process.
//!
//! The file has a table per process — `[keyd]`, `[encryptd]`, `[serve]`,
//! `[worker]` — whose keys are the long flag names (`meta-db` or
//! `meta_db`). Precedence, highest first: a command-line flag, the flag's
//! `COFFER_*` environment variable, the config file, the built-in default.
//! `docs/coffer.example.toml` lists every setting with its default.
//!
//! The file is applied by turning its entries into flags placed before the
//! ones typed, so clap still checks every value and `--help` stays the one
//! reference.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Command;

/// The `--config` flag every service process takes.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigFile {
    /// TOML config file: a table per process ([keyd], [encryptd], [serve],
    /// [worker]) keyed by long flag names; flags and COFFER_* variables
    /// override it. docs/coffer.example.toml lists every setting.
    #[arg(long = "config", env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Parses the process's own command line with its config file applied:
/// `section` is its table; its flags start at `at` in the arguments. A bad
/// config file ends the process with the reason, like a bad flag.
pub fn parse_with_config<T: clap::Parser>(
    section_at: impl Fn(&[OsString]) -> Option<(String, usize)>,
) -> T {
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some((section, at)) = section_at(&args) else {
        return T::parse_from(args);
    };
    let command = T::command();
    let target = command.find_subcommand(&section).unwrap_or(&command);
    match with_config_file(target, &section, args, at) {
        Ok(args) => T::parse_from(args),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// The tables a config file may have.
pub const SECTIONS: [&str; 4] = ["keyd", "encryptd", "serve", "worker"];

/// Variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "COFFER_CONFIG";

/// The config file named by `--config FILE` / `--config=FILE` in `args`, or
/// by `COFFER_CONFIG`.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// `args` with the `[section]` entries of the config file (if one is named)
/// inserted at `at` as flags of `command`, except those already given as a
/// flag or through their environment variable.
pub fn with_config_file(
    command: &Command,
    section: &str,
    mut args: Vec<OsString>,
    at: usize,
) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let from_file = flags_from_file(command, section, &path, |long, env| {
        let typed = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        });
        typed || env.is_some_and(|e| std::env::var_os(e).is_some())
    })?;
    let at = at.min(args.len());
    args.splice(at..at, from_file);
    Ok(args)
}

/// The flags `[section]` of the file at `path` stands for, skipping those
/// for which `given(long, env)` is true.
fn flags_from_file(
    command: &Command,
    section: &str,
    path: &Path,
    given: impl Fn(&str, Option<&str>) -> bool,
) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            bail!(
                "{}: unknown table [{key}]; the tables are [{}]",
                path.display(),
                SECTIONS.join("], [")
            );
        }
    }
    let Some(entries) = table.get(section) else {
        return Ok(Vec::new());
    };
    let entries = entries
        .as_table()
        .with_context(|| format!("{}: [{section}] must be a table", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in entries {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            let known: Vec<&str> = command
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help" && *l != "version")
                .collect();
            bail!(
                "{}: unknown setting `{key}` in [{section}]; the settings are: {}",
                path.display(),
                known.join(", ")
            );
        };
        let env = arg.get_env().and_then(|e| e.to_str());
        if given(&long, env) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        match value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    flags.push(format!("--{long}").into());
                }
            }
            toml::Value::String(s) => flags.extend([format!("--{long}").into(), s.into()]),
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                flags.extend([format!("--{long}").into(), value.to_string().into()]);
            }
            _ => bail!(
                "{}: `{key}` in [{section}] must be a string, number or boolean",
                path.display()
            ),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn command() -> Command {
        Command::new("t")
            .arg(
                Arg::new("listen")
                    .long("listen")
                    .env("COFFER_TEST_NEVER_SET_1"),
            )
            .arg(Arg::new("meta-db").long("meta-db"))
            .arg(Arg::new("rate").long("rate"))
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .action(ArgAction::SetTrue),
            )
    }

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "coffer-settings-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn file_entries_become_flags_before_the_typed_ones_which_win() {
        let path = file(
            "[serve]\nlisten = \"0.0.0.0:1\"\nmeta_db = \"postgres://x\"\nrate = 5\nverbose = true\n[keyd]\nlisten = \"other\"\n",
        );
        let args: Vec<OsString> = vec![
            "t".into(),
            "--config".into(),
            path.clone().into(),
            "--rate".into(),
            "7".into(),
        ];
        let out = strings(&with_config_file(&command(), "serve", args, 1).unwrap());
        assert_eq!(
            out[1..7],
            [
                "--listen",
                "0.0.0.0:1",
                "--meta-db",
                "postgres://x",
                "--verbose",
                "--config"
            ]
        );
        assert_eq!(out.iter().filter(|a| *a == "--rate").count(), 1, "{out:?}");
        let parsed = command()
            .arg(Arg::new("config").long("config"))
            .try_get_matches_from(out)
            .unwrap();
        assert_eq!(parsed.get_one::<String>("rate").unwrap(), "7");
        assert!(parsed.get_flag("verbose"));
    }

    #[test]
    fn typos_are_refused_with_the_list_of_settings() {
        let path = file("[serve]\nlisen = \"x\"\n");
        let args: Vec<OsString> = vec!["t".into(), format!("--config={}", path.display()).into()];
        let err = with_config_file(&command(), "serve", args, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown setting `lisen`") && err.contains("listen"),
            "{err}"
        );
        let path = file("[srve]\n");
        let args: Vec<OsString> = vec!["t".into(), "--config".into(), path.into()];
        let err = with_config_file(&command(), "serve", args, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown table [srve]"), "{err}");
    }

    #[test]
    fn without_a_config_file_nothing_changes() {
        let args: Vec<OsString> = vec!["t".into(), "--rate".into(), "1".into()];
        if std::env::var_os(CONFIG_ENV).is_none() {
            assert_eq!(
                with_config_file(&command(), "serve", args.clone(), 1).unwrap(),
                args
            );
        }
    }
}
