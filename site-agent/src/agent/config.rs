//! `site.toml`: where the coordinator is, the site's bundle, its data, and its policy.
//!
//! Relative paths are resolved against the file's folder. Every field but `version`,
//! `coordinator.address`, `tls.bundle` and `data.manifest` has a documented default.

use std::path::{Path, PathBuf};

use crate::device::DeviceChoice;
use serde::Deserialize;

/// The parsed configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Format version; 1.
    pub version: u32,
    pub coordinator: CoordinatorConfig,
    pub tls: TlsConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub agent: AgentConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `https://HOST:PORT`; the agent only ever dials out to it.
    pub address: String,
    /// The name in the coordinator's certificate. Default `localhost`.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// HTTP proxy to tunnel through (`http://[USER:PASSWORD@]HOST:PORT`, by CONNECT).
    /// Default: `HTTPS_PROXY` from the environment unless `NO_PROXY` names the coordinator's
    /// host; `""` or `"none"`: always direct.
    #[serde(default)]
    pub proxy: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The site bundle folder: key.pem from `site-agent init`, cert.pem and ca.pem from
    /// `coordinator pki sign` (or a whole demo bundle from `coordinator pki issue-site`).
    pub bundle: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The site manifest (organs and cases with their split).
    pub manifest: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Model cache, fine-tuned weights and the audit log. Default `agent-data`.
    pub dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { dir: "agent-data".into() }
    }
}

/// The names `policy.allowed_tasks` takes.
pub const KINDS: [&str; 6] = ["evaluate", "finetune", "train", "transfer", "fedavg", "cross-eval"];

/// What the site allows; a task beyond it is refused with the reason, not half-run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Task kinds this site runs. Default: evaluate, finetune, train, transfer, fedavg,
    /// cross-eval (a transfer source and fedavg also need `share_weights`).
    pub allowed_tasks: Vec<String>,
    /// Most epochs a task may ask for. Default 200.
    pub max_epochs: u32,
    /// Longest a task may be expected to run, in hours. Default 24.
    pub max_hours: f64,
    /// Whether trained weights may leave the site. Default false.
    pub share_weights: bool,
    /// Most GPU memory a task may plan to use, in GiB (the GPU is shared with other work).
    /// A task whose estimated need (`ModelConfig::training_memory_bytes`) is beyond it is
    /// refused, and the frozen-prefix cache keeps within what is left. Default: no cap.
    pub max_gpu_memory_gb: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_tasks: vec![
                "evaluate".into(),
                "finetune".into(),
                "train".into(),
                "transfer".into(),
                "fedavg".into(),
                "cross-eval".into(),
            ],
            max_epochs: 200,
            max_hours: 24.0,
            share_weights: false,
            max_gpu_memory_gb: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Long-poll wait per `NextTask` call. Default 20 s.
    pub poll_seconds: u32,
    /// Heartbeat interval while a task runs. Default 5 s.
    pub heartbeat_seconds: u32,
    /// Longest wait between reconnection attempts. Default 30 s.
    pub max_backoff_seconds: u32,
    /// Training device: `auto` (the first CUDA GPU when the build has CUDA and one is
    /// visible, else the CPU), `cpu`, `cuda` or `cuda:N`. Default `auto`.
    pub device: String,
    /// Address of the agent's Prometheus endpoint (`/metrics`), plain HTTP, e.g.
    /// `127.0.0.1:9464`. Default: none (no endpoint).
    pub metrics_listen: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            poll_seconds: 20,
            heartbeat_seconds: 5,
            max_backoff_seconds: 30,
            device: "auto".into(),
            metrics_listen: None,
        }
    }
}

fn default_server_name() -> String {
    "localhost".into()
}

/// Configuration errors, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { path: path.to_owned(), message: e.to_string() })?;
        Self::parse(&text, path)
    }

    /// How to reach the coordinator: `coordinator.proxy`, else the process environment's
    /// `HTTPS_PROXY`/`NO_PROXY` ([`super::proxy::route`]).
    pub fn route(&self) -> Result<super::proxy::Route, String> {
        super::proxy::route(&self.coordinator.address, self.coordinator.proxy.as_deref(), |k| {
            std::env::var(k).ok()
        })
    }

    /// The device `agent.device` names (checked by [`SiteConfig::parse`]).
    pub fn device_choice(&self) -> DeviceChoice {
        self.agent.device.parse().unwrap_or_default()
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError { path: path.to_owned(), message };
        let mut cfg: Self = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut problems = Vec::new();
        if cfg.version != 1 {
            problems.push(format!("version = {}; this agent reads version 1", cfg.version));
        }
        if !cfg.coordinator.address.starts_with("https://") {
            problems.push(format!(
                "coordinator.address = \"{}\": use https://HOST:PORT (the agent speaks only TLS)",
                cfg.coordinator.address
            ));
        }
        for kind in &cfg.policy.allowed_tasks {
            if !KINDS.contains(&kind.as_str()) {
                problems.push(format!(
                    "policy.allowed_tasks: unknown kind \"{kind}\" ({})",
                    KINDS.join(", ")
                ));
            }
        }
        if !(cfg.policy.max_hours.is_finite() && cfg.policy.max_hours > 0.0) {
            problems.push("policy.max_hours must be a positive number".into());
        }
        match cfg.agent.device.parse::<DeviceChoice>() {
            Err(e) => problems.push(format!("agent.device: {e}")),
            Ok(d @ DeviceChoice::Cuda(_)) if !crate::device::cuda_built() => {
                problems.push(format!("agent.device: {}", crate::device::DeviceError::NotBuilt(d)))
            }
            Ok(_) => {}
        }
        if let Some(gb) = cfg.policy.max_gpu_memory_gb
            && !(gb.is_finite() && gb > 0.0)
        {
            problems.push(format!(
                "policy.max_gpu_memory_gb = {gb}: give a positive number of GiB, or leave it out \
                 for no cap"
            ));
        }
        if let Some(proxy) = &cfg.coordinator.proxy
            && let Err(e) = super::proxy::route(&cfg.coordinator.address, Some(proxy), |_| None)
        {
            problems.push(e);
        }
        if cfg.agent.heartbeat_seconds == 0 || cfg.agent.poll_seconds == 0 {
            problems
                .push("agent.heartbeat_seconds and agent.poll_seconds must be at least 1".into());
        }
        if !problems.is_empty() {
            return Err(err(problems.join("; ")));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.tls.bundle, &mut cfg.data.manifest, &mut cfg.storage.dir] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<SiteConfig, ConfigError> {
        let text = format!(
            "version = 1\n[coordinator]\naddress = \"https://c:1\"\n[tls]\nbundle = \"b\"\n\
             [data]\nmanifest = \"m.toml\"\n{extra}"
        );
        SiteConfig::parse(&text, Path::new("/etc/fedtune/site.toml"))
    }

    #[test]
    fn the_device_defaults_to_auto_and_is_checked_against_the_build() {
        let cfg = parse("").expect("defaults");
        assert_eq!(cfg.agent.device, "auto");
        assert_eq!(cfg.device_choice(), DeviceChoice::Auto);
        assert_eq!(cfg.policy.max_gpu_memory_gb, None);
        let cpu = parse("[agent]\ndevice = \"cpu\"").expect("cpu");
        assert_eq!(cpu.device_choice(), DeviceChoice::Cpu);
        let bad = parse("[agent]\ndevice = \"tpu\"").expect_err("tpu").to_string();
        assert!(bad.starts_with("/etc/fedtune/site.toml: agent.device"), "{bad}");
        assert!(bad.contains("auto, cpu, cuda, cuda:N"), "{bad}");
        let cuda = parse("[agent]\ndevice = \"cuda:1\"");
        if crate::device::cuda_built() {
            assert_eq!(cuda.expect("a CUDA build").device_choice(), DeviceChoice::Cuda(1));
        } else {
            let e = cuda.expect_err("a CPU build").to_string();
            assert!(e.contains("agent.device: device cuda:1 needs a build with CUDA"), "{e}");
        }
    }

    #[test]
    fn the_gpu_memory_cap_must_be_a_positive_size() {
        let cfg = parse("[policy]\nmax_gpu_memory_gb = 12.5").expect("cap");
        assert_eq!(cfg.policy.max_gpu_memory_gb, Some(12.5));
        for bad in ["0", "-4", "nan"] {
            let e =
                parse(&format!("[policy]\nmax_gpu_memory_gb = {bad}")).expect_err(bad).to_string();
            assert!(e.contains("policy.max_gpu_memory_gb"), "{bad}: {e}");
        }
    }

    /// `deploy/site.toml` parses as it is and with every commented option switched on, and
    /// names every field of the configuration.
    #[test]
    fn the_deploy_example_parses_and_documents_every_field() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let example =
            std::fs::read_to_string(root.join("deploy/site.toml")).expect("deploy/site.toml");
        let path = Path::new("/etc/fedtune/site.toml");
        let cfg = SiteConfig::parse(&example, path).expect("as shipped");
        assert_eq!(cfg.tls.bundle, Path::new("/etc/fedtune/bundle"));
        let on = shared::cli::options_on(&example);
        let all = SiteConfig::parse(&on, path).expect("every option on");
        assert!(all.coordinator.proxy.is_some() && all.agent.metrics_listen.is_some());
        let source = include_str!("config.rs");
        let source = source.split("#[cfg(test)]").next().expect("the code");
        for line in source.lines() {
            if let Some(field) =
                line.trim().strip_prefix("pub ").and_then(|r| r.split_once(':')).map(|(f, _)| f)
                && field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                && !["coordinator", "tls", "data", "storage", "policy", "agent", "path", "message"]
                    .contains(&field)
            {
                assert!(
                    example.contains(&format!("\n{field} = "))
                        || example.contains(&format!("# {field} = ")),
                    "deploy/site.toml does not document {field}"
                );
            }
        }
    }
}
