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
