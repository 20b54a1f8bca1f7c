//! `coordinator`: parses flags, sets up logging and TLS, and runs the server or a command.

use std::process::ExitCode;

use anyhow::Context;
use coordinator::lead::{Cli, Command};

fn main() -> ExitCode {
    let cli: Cli = match shared::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    shared::cli::init_tracing(&cli.log);
    // One crypto provider for every TLS connection of the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config } => serve(&config).await,
            Command::Doctor { config } => coordinator::ops::doctor(&config).await,
            Command::Restore { archive, data_dir } => {
                coordinator::ops::restore(&archive, &data_dir)
            }
            other => coordinator::lead::run_admin(other).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<coordinator::lead::RoundNotCompleted>() {
                Some(r) => ExitCode::from(r.exit_code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

async fn serve(config: &std::path::Path) -> anyhow::Result<()> {
    let cfg = coordinator::server::ServerConfig::load(config)?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("listening on {} (listen in {})", cfg.listen, config.display()))?;
    tracing::info!(data_dir = %cfg.data_dir.display(), "coordinator starting");
    coordinator::server::serve_then(cfg, listener, shutdown_signal(), |addr, metrics| {
        // Tests and scripts read the bound address (port 0 picks a free one) from this line,
        // printed once the data dir and certificates are open and checked.
        match metrics {
            Some(m) => println!("listening on {addr}, metrics on http://{m}/metrics"),
            None => println!("listening on {addr}"),
        }
    })
    .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
