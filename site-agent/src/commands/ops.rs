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
