//! What the two binaries' `main` functions share: the logging flags, parsing the command line
//! with fedtune's exit codes, and the tracing subscriber on stderr.

use std::process::ExitCode;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The logging flags both binaries take (flatten into their `Cli`).
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log detail (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Parses the command line. `Err` carries the exit code to return at once: 64 (EX_USAGE) for a
/// usage error, 0 after `--help` or `--version`.
pub fn parse<T: clap::Parser>() -> Result<T, ExitCode> {
    T::try_parse().map_err(|e| {
        let usage = e.use_stderr();
        let _ = e.print();
        if usage { ExitCode::from(64) } else { ExitCode::SUCCESS }
    })
}

/// Installs the tracing subscriber on stderr at the level `-v` asks for (RUST_LOG overrides).
pub fn init_tracing(log: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let level = match log.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colours only on a terminal: a log file (an agent under a service manager) stays plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// An example configuration (`deploy/*.toml`) with every commented-out option line
/// (`# key = value`) switched on: what its tests parse to check the commented examples.
pub fn options_on(example: &str) -> String {
    example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a command line leaves unexplained, one line each: a subcommand without a description,
/// two subcommands with the same description (clap gives an undocumented variant the
/// description of an `Args` struct flattened into it), and an argument without help text. The
/// binaries' tests assert that this is empty.
pub fn undocumented(cmd: &clap::Command) -> Vec<String> {
    fn walk(
        cmd: &clap::Command,
        path: &str,
        seen: &mut Vec<(String, String)>,
        out: &mut Vec<String>,
    ) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if ["help", "version"].contains(&id) || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path}: argument {id} has no help text"));
            }
        }
        for sub in cmd.get_subcommands() {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let here = format!("{path} {name}");
            match sub.get_about().map(|a| a.to_string()) {
                None => out.push(format!("{here}: no description")),
                Some(about) => {
                    if let Some((_, other)) = seen.iter().find(|(a, _)| *a == about) {
                        out.push(format!("{here}: the same description as {other}: {about}"));
                    }
                    seen.push((about, here.clone()));
                }
            }
            walk(sub, &here, seen, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut Vec::new(), &mut out);
    out
}
