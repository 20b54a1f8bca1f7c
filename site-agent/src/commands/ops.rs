//! The operator's commands: `init` (the site's key and signing request, made here),
//! `doctor` (the preflight) and `completions`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::out;

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The site's name, as the consortium knows it (lowercase letters, digits and '-').
    #[arg(long)]
    pub name: String,
    /// The bundle folder to create: key.pem (stays here) and request.csr (send it).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// site.toml.
    #[arg(long, env = "FEDTUNE_SITE_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The coordinator, `https://host:port`.
    #[arg(long)]
    pub coordinator: String,
    /// The name in the coordinator's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// A folder of site bundles, one sub-folder each (ca.pem, cert.pem, key.pem), as
    /// `coordinator pki issue-site` writes under pki/sites.
    #[arg(long)]
    pub bundles: PathBuf,
    /// How many agents (the first N bundles by name).
    #[arg(long)]
    pub count: usize,
    /// Each task's fake work, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub workload_ms: u64,
    /// Heartbeat interval while a task runs, milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub heartbeat_ms: u64,
    /// Download each task's models (counted, not kept).
    #[arg(long)]
    pub fetch: bool,
    /// Stop after this many seconds (default: at SIGINT/SIGTERM).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Write the JSON report here (default: standard output).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: clap_complete::Shell,
}

pub(super) fn init(a: &InitArgs) -> Result<()> {
    let (key, csr) =
        shared::cert::write_request(&a.out, "site", &a.name).map_err(anyhow::Error::msg)?;
    out(&format!("key: {} (private: it never leaves this folder)", key.display()));
    out(&format!(
        "request: {}\nNext: send request.csr to the study lead, who runs\n  coordinator pki sign \
         request.csr --site {} --dir PKI\nand sends back cert.pem and ca.pem: put both in {}, \
         point [tls] bundle there, and run `site-agent doctor --config site.toml`.",
        csr.display(),
        a.name,
        a.out.display()
    ));
    Ok(())
}

pub(super) fn doctor(a: &DoctorArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let checks = runtime.block_on(crate::agent::doctor::run(&a.config, |c| out(&c.to_string())));
    let failed = checks.iter().filter(|c| c.outcome == crate::agent::doctor::Outcome::Fail).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed (FAIL lines above say what to do)", checks.len());
    }
    out(&format!("all {} checks passed", checks.len()));
    Ok(())
}

pub(super) fn completions(a: &CompletionsArgs) {
    use clap::CommandFactory;
    let mut cmd = super::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "site-agent", &mut std::io::stdout());
}

pub(super) fn simulate(
    a: &SimulateArgs,
    signal: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use anyhow::Context;
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(&a.bundles)
        .with_context(|| format!("reading {}", a.bundles.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("cert.pem").exists())
        .collect();
    bundles.sort();
    if bundles.len() < a.count {
        anyhow::bail!(
            "{} holds {} site bundles and --count is {}; issue more with `coordinator pki \
             issue-site`",
            a.bundles.display(),
            bundles.len(),
            a.count
        );
    }
    bundles.truncate(a.count);
    let opts = crate::simulate::Options {
        coordinator: a.coordinator.clone(),
        server_name: a.server_name.clone(),
        bundles,
        workload: std::time::Duration::from_millis(a.workload_ms),
        heartbeat: std::time::Duration::from_millis(a.heartbeat_ms.max(1)),
        fetch: a.fetch,
        poll_seconds: 30,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Runtime::new()?;
    let seconds = a.seconds;
    let report = runtime.block_on(crate::simulate::run(opts, async move {
        match seconds {
            Some(s) => {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(s)) => {}
                    _ = signal => {}
                }
            }
            None => signal.await,
        }
    }));
    let json = serde_json::to_string_pretty(&report)?;
    match &a.report {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => out(&json),
    }
    Ok(())
}
