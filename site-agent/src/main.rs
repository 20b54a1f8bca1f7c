//! `site-agent`: parses flags, sets up logging and runs the command from the library.

use std::process::ExitCode;

use clap::Parser;
use site_agent::commands::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// Training allocates and frees large activation buffers every step; mimalloc keeps freed pages
/// for reuse where the system allocator returns them to the kernel and faults them back in.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            // Usage errors exit 64 (EX_USAGE); --help and --version exit 0.
            return if usage { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match site_agent::commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
