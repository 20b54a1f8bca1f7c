//! `site-agent run`: the connection loop of a site agent.
//!
//! The agent dials out to the coordinator (mutual TLS with the site bundle), says hello with
//! its capabilities and a dataset summary, long-polls for tasks, downloads base weights into a
//! local cache by sha256 (resuming a cut download from its last verified offset), runs the
//! task off the async runtime while heartbeats renew the lease, and submits the result, which
//! the coordinator records once however often it is retried. Every message it sends is first
//! written to the audit log. Connection failures are retried with capped exponential backoff
//! and jitter; on shutdown a running task finishes its optimizer step and is released.
//!
//! # Layout
//! - [`config`]: the `site.toml` file.
//! - [`audit`]: the audit log.
//! - [`exec`]: running a task with the engine.
//! - [`policy`]: the site policy applied to a task before any work.
//! - `link`: `Link`, the audited client of the coordinator.

pub mod audit;
mod cache;
pub mod config;
mod diagnose;
pub mod doctor;
pub mod exec;
pub mod faults;
pub mod federated;
pub(crate) mod link;
pub mod metrics;
pub mod policy;
pub mod proxy;
mod runner;
pub mod site;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::pb;

use self::audit::AuditLog;
use self::config::SiteConfig;
use self::exec::{Outcome, Site};
pub use self::link::{CallError, Link};

/// Agent errors that end `run`; connection trouble is retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("site data: {0}")]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    SiteData(#[from] exec::SiteDataError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("TLS bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("the coordinator refused this site: {0}")]
    Refused(String),
    #[error("agent.device in the site config: {0}")]
    Device(#[from] crate::device::DeviceError),
}

fn gib_to_bytes(gib: f64) -> u64 {
    (gib * (1u64 << 30) as f64) as u64
}

/// Capabilities (the compute device, with a GPU's name and memory) and a dataset summary:
/// counts, organ names and spacing ranges, nothing that identifies a case.
fn hello_request(cfg: &SiteConfig, site: &Site) -> pb::HelloRequest {
    let kinds = cfg
        .policy
        .allowed_tasks
        .iter()
        .filter_map(|k| policy::kind_of(k).map(|k| k as i32))
        .collect();
    let (lo, hi) = site.spacing_range;
    let ranges = lo.iter().all(|v| v.is_finite());
    pb::HelloRequest {
        capabilities: Some(pb::Capabilities {
            device: site.device_info.kind.into(),
            memory_bytes: crate::device::host_memory_bytes().unwrap_or(0),
            gpu_name: if site.device_info.ordinal.is_some() {
                site.device_info.name.clone()
            } else {
                String::new()
            },
            gpu_memory_bytes: if site.device_info.ordinal.is_some() {
                site.device_info.memory_bytes
            } else {
                0
            },
            max_gpu_memory_bytes: cfg.policy.max_gpu_memory_gb.map_or(0, gib_to_bytes),
            gpu_free_bytes: crate::device::free_memory_bytes(&site.device).unwrap_or(0),
            threads: rayon::current_num_threads() as u32,
            allowed_kinds: kinds,
            max_epochs: cfg.policy.max_epochs,
            max_hours: cfg.policy.max_hours,
            share_weights: cfg.policy.share_weights,
        }),
        dataset: Some(pb::DatasetSummary {
            train_cases: site.manifest.cases_in(crate::data::Split::Train).count() as u32,
            test_cases: site.manifest.cases_in(crate::data::Split::Test).count() as u32,
            organs: site.manifest.organs.names().iter().map(|s| s.to_string()).collect(),
            spacing_min_mm: if ranges { lo.to_vec() } else { Vec::new() },
            spacing_max_mm: if ranges { hi.to_vec() } else { Vec::new() },
        }),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// A finished task waiting to be submitted (kept across reconnects).
#[derive(Debug)]
struct Pending {
    task_id: String,
    attempt: u32,
    outcome: Outcome,
    /// Weights to upload before the result, with the arm each is (a transfer source's
    /// Model_S; trained tails).
    uploads: Vec<(u32, PathBuf)>,
}

/// Copies an uploaded weights file into the model cache under its sha256 (best effort: a
/// failure only means a later download).
fn keep_in_cache(cfg: &SiteConfig, path: &std::path::Path, info: &pb::ModelInfo) {
    let Some(sha) = info.model.as_ref().map(|m| m.sha256.to_ascii_lowercase()) else { return };
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return;
    }
    let dir = cfg.storage.dir.join("models");
    let dest = dir.join(&sha);
    if dest.exists() {
        return;
    }
    let copied = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::read(path))
        .and_then(|b| runner::write_atomic(&dest, &b));
    if let Err(e) = copied {
        tracing::warn!(path = %dest.display(), error = %e, "could not keep the uploaded weights in the model cache");
    }
}

/// What a finished task uploads: a source's Model_S, and every arm's tail that the task
/// wrote for upload (it did so only where the policy shares weights).
fn uploads_of(site: &Site, task: &pb::Task, outcome: &Outcome) -> Vec<(u32, PathBuf)> {
    let Outcome::Result(result) = outcome else { return Vec::new() };
    let source = task.spec.as_ref().is_some_and(|s| s.kind == pb::TaskKind::TransferSource as i32);
    if source {
        let last = result.arms.len().saturating_sub(1) as u32;
        return vec![(last, exec::weights_path(site, &task.task_id, None))];
    }
    result
        .arms
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.tail_sha256.is_empty())
        .map(|(i, _)| (i as u32, exec::tail_path(site, &task.task_id, i)))
        .collect()
}

/// Runs the agent until `shutdown` resolves, or until the coordinator refuses this site.
pub async fn run(
    cfg: SiteConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.storage.dir)
        .map_err(|source| AgentError::Io { path: cfg.storage.dir.clone(), source })?;
    let audit = AuditLog::open(&cfg.storage.dir)?;
    let selected = cfg.device_choice().select()?;
    tracing::info!(device = %selected.info, "compute device");
    if let Some(addr) = &cfg.agent.metrics_listen {
        let bound = metrics::serve(addr).await.map_err(|source| AgentError::Io {
            path: format!("agent.metrics_listen {addr}").into(),
            source,
        })?;
        tracing::info!(%bound, "metrics on http://{bound}/metrics");
    }
    let site = Arc::new(Site::open(&cfg, selected)?);
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    {
        let stopping = stopping.clone();
        tokio::spawn(async move {
            shutdown.await;
            stopping.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        });
    }
    let mut backoff = Backoff::new(cfg.agent.max_backoff_seconds);
    let mut pending: Option<Pending> = None;
    while !stopping.load(Ordering::SeqCst) {
        match session(&cfg, &site, &audit, &stopping, &mut stop_rx, &mut pending, &mut backoff)
            .await
        {
            Ok(()) => break,
            Err(e) if e.is_fatal() => return Err(AgentError::Refused(e.to_string())),
            Err(e) => {
                let wait = backoff.next();
                let diagnosis = e.diagnose(&cfg).await.unwrap_or_default();
                tracing::warn!(error = %e, %diagnosis, retry_in_ms = wait.as_millis() as u64, "connection to the coordinator failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop_rx.changed() => {}
                }
            }
        }
    }
    // A result that could not be delivered before shutdown stays undelivered: the lease
    // expires and the task runs again; nothing is counted twice.
    Ok(())
}

/// Exponential backoff with full jitter: 0.5 s, 1 s, 2 s ... up to the cap.
#[derive(Debug)]
struct Backoff {
    n: u32,
    cap: Duration,
}

impl Backoff {
    fn new(cap_seconds: u32) -> Self {
        Self { n: 0, cap: Duration::from_secs(u64::from(cap_seconds.max(1))) }
    }
    fn next(&mut self) -> Duration {
        let base = Duration::from_millis(500).saturating_mul(1 << self.n.min(10)).min(self.cap);
        self.n += 1;
        base.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
    fn reset(&mut self) {
        self.n = 0;
    }
}

/// One connection: hello, then tasks until shutdown. Returns `Ok` only on shutdown.
async fn session(
    cfg: &SiteConfig,
    site: &Arc<Site>,
    audit: &AuditLog,
    stopping: &Arc<AtomicBool>,
    stop_rx: &mut tokio::sync::watch::Receiver<bool>,
    pending: &mut Option<Pending>,
    backoff: &mut Backoff,
) -> Result<(), CallError> {
    let mut link = Link::connect(cfg, audit.clone()).await?;
    let hello = link.hello(hello_request(cfg, site)).await?;
    backoff.reset();
    tracing::info!(site = %hello.site, approved = hello.approved, "connected to the coordinator");
    if hello.certificate_days_left < 30 {
        tracing::warn!(
            days = hello.certificate_days_left,
            "the site certificate expires soon; ask for a new bundle"
        );
    }
    loop {
        if let Some(p) = pending.take() {
            for (arm, path) in &p.uploads {
                match link.upload_model(&p.task_id, p.attempt, *arm, path).await {
                    // What this site uploaded it has: a later task that names it by sha256
                    // reads it from the model cache instead of downloading it back.
                    Ok(info) => keep_in_cache(cfg, path, &info),
                    Err(e) => {
                        *pending = Some(p);
                        return Err(e);
                    }
                }
            }
            let req = pb::SubmitResultRequest {
                task_id: p.task_id.clone(),
                attempt: p.attempt,
                outcome: Some(p.outcome.clone().into_proto()),
                refusal_detail: p.outcome.refusal_detail().to_owned(),
            };
            match link.submit(req).await {
                Ok(recorded) => {
                    metrics::get().set_phase("idle");
                    tracing::info!(task = %p.task_id, recorded, "result submitted")
                }
                Err(e) => {
                    *pending = Some(p);
                    return Err(e);
                }
            }
        }
        if stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let task = tokio::select! {
            t = link.next_task(cfg.agent.poll_seconds) => match t {
                Ok(t) => t,
                Err(CallError::Status(s)) if s.code() == tonic::Code::FailedPrecondition => {
                    // Not approved yet: ask again later.
                    tracing::info!(reason = %s.message(), "waiting for approval");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(u64::from(cfg.agent.poll_seconds).min(5))) => {}
                        _ = stop_rx.changed() => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            },
            _ = stop_rx.changed() => return Ok(()),
        };
        let Some(task) = task else { continue };
        let outcome = run_leased(cfg, site, &mut link, &task, stopping).await?;
        if let Some(outcome) = outcome {
            *pending = Some(Pending {
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                uploads: uploads_of(site, &task, &outcome),
                outcome,
            });
        }
    }
}

/// The models a task needs downloaded: its base and tail, and a cross-eval's shared models
/// (a model this site did not share is read from its own copy).
fn models_of(task: &pb::Task) -> Vec<pb::ModelRef> {
    let mut out: Vec<pb::ModelRef> = task.base.iter().chain(&task.tail).cloned().collect();
    for m in task.spec.iter().flat_map(|s| &s.models).filter(|m| m.shared) {
        out.extend(m.base.iter().chain(&m.tail).cloned());
    }
    out
}

/// Runs one leased task with heartbeats. `None`: the coordinator told us to stop (cancelled
/// or lease lost), so nothing is submitted.
async fn run_leased(
    cfg: &SiteConfig,
    site: &Arc<Site>,
    link: &mut Link,
    task: &pb::Task,
    stopping: &Arc<AtomicBool>,
) -> Result<Option<Outcome>, CallError> {
    let spec = task.spec.clone().unwrap_or_default();
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    tracing::info!(task = %task.task_id, attempt = task.attempt, kind = policy::kind_name(kind), "task received");
    if let Some((code, detail)) = policy::check_policy(&site.policy, &spec, site.train_cases() * 64)
    {
        tracing::warn!(task = %task.task_id, reason = code.as_str_name(), %detail, "task refused by site policy");
        return Ok(Some(Outcome::Refusal(code, detail)));
    }
    let progress =
        Arc::new(Mutex::new(pb::Progress { phase: "download".into(), ..Default::default() }));
    metrics::get().set_phase("download");
    let cancelled = Arc::new(AtomicBool::new(false));
    // A refusal of this site (revoked) that a heartbeat met: the work stops at once.
    let refused: Arc<Mutex<Option<CallError>>> = Arc::default();

    // Heartbeats run beside the work, on their own connection clone.
    let hb = {
        let mut hb_link = link.clone();
        let progress = progress.clone();
        let cancelled = cancelled.clone();
        let refused = refused.clone();
        let (task_id, attempt) = (task.task_id.clone(), task.attempt);
        let every = Duration::from_secs(u64::from(cfg.agent.heartbeat_seconds));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let p = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match hb_link
                    .heartbeat(pb::HeartbeatRequest {
                        task_id: task_id.clone(),
                        attempt,
                        progress: Some(p),
                    })
                    .await
                {
                    Ok(r) if r.stop => {
                        tracing::warn!(task = %task_id, "the coordinator asked to stop this task");
                        cancelled.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_fatal() => {
                        tracing::error!(task = %task_id, error = %e, "the coordinator refused this site; stopping the task");
                        *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        cancelled.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
                }
            }
        })
    };

    let result = async {
        // Every model the task names, each once; a model already here is not fetched again.
        let mut models = exec::ModelFiles::new();
        for model in models_of(task) {
            let sha = model.sha256.to_ascii_lowercase();
            if models.contains_key(&sha) {
                continue;
            }
            let p = progress.clone();
            let mut on_bytes = move |done: u64, total: u64| {
                let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                g.phase = "download".into();
                g.fraction = 0.05 * done as f64 / total.max(1) as f64;
            };
            let dir = cfg.storage.dir.join("models");
            match link.fetch_model(&model, &dir, None, &mut on_bytes).await {
                Ok((path, fetched)) => {
                    tracing::info!(sha256 = %sha, bytes = fetched, "model ready");
                    models.insert(sha, path);
                }
                Err(CallError::Download { sha256, message }) => {
                    tracing::error!(sha256 = %sha256, message = %message, "download failed verification");
                    return Ok(Some(Outcome::Failure(pb::FailureCode::Download)));
                }
                Err(CallError::Status(s)) if s.code() == tonic::Code::DataLoss => {
                    tracing::error!(sha256 = %model.sha256, message = %s.message(), "the coordinator's copy of the model is damaged");
                    return Ok(Some(Outcome::Failure(pb::FailureCode::Download)));
                }
                Err(e) => return Err(e),
            }
        }
        let site = site.clone();
        let task = task.clone();
        let progress = progress.clone();
        let stop = {
            let (stopping, cancelled) = (stopping.clone(), cancelled.clone());
            move || stopping.load(Ordering::SeqCst) || cancelled.load(Ordering::SeqCst)
        };
        // Training is CPU-bound: off the runtime.
        let outcome = tokio::task::spawn_blocking(move || {
            let mut on_progress = |p: pb::Progress| {
                metrics::get().set_phase(&p.phase);
                *progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
            };
            exec::run_task(&site, &task, &models, &mut on_progress, &stop)
        })
        .await
        .unwrap_or(Outcome::Failure(pb::FailureCode::Internal));
        Ok(Some(outcome))
    }
    .await;
    hb.abort();
    let ended = match &result {
        Ok(Some(Outcome::Result(_))) => "succeeded",
        Ok(Some(Outcome::Failure(_))) => "failed",
        Ok(Some(Outcome::Refusal(..))) => "refused",
        _ => "stopped",
    };
    metrics::get().task_ended(ended);
    metrics::get().set_phase(if ended == "stopped" { "idle" } else { "submit" });
    if let Some(e) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    if cancelled.load(Ordering::SeqCst) {
        return Ok(None);
    }
    if let Ok(Some(o)) = &result {
        match o {
            Outcome::Result(_) => tracing::info!(task = %task.task_id, "task succeeded"),
            Outcome::Failure(c) => {
                tracing::warn!(task = %task.task_id, code = c.as_str_name(), "task failed")
            }
            Outcome::Refusal(c, detail) => {
                tracing::warn!(task = %task.task_id, code = c.as_str_name(), %detail, "task refused")
            }
        }
    }
    result
}
