//! Site agents in a test federation: a running agent, and a site's own connection for tests
//! that play the agent's part by hand.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use site_agent::agent::config::SiteConfig;

use crate::federation::Federation;

/// A running site agent.
#[derive(Debug)]
pub struct Agent {
    pub name: String,
    pub config: SiteConfig,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<JoinHandle<Result<(), site_agent::agent::AgentError>>>,
}

impl Agent {
    /// Whether the agent still runs (it ends on its own only when the coordinator refuses
    /// the site).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the agent (as on SIGTERM) and waits for it.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task).await.context("agent stop")??.ok();
        }
        Ok(())
    }
}

/// A site's own connection, for tests that play the agent's part by hand.
pub async fn site_link(fed: &Federation, name: &str) -> Result<site_agent::agent::Link> {
    let cfg = fed.site_config(name)?;
    std::fs::create_dir_all(&cfg.storage.dir)?;
    let audit = site_agent::agent::audit::AuditLog::open(&cfg.storage.dir.join("manual"))?;
    Ok(site_agent::agent::Link::connect(&cfg, audit).await?)
}
