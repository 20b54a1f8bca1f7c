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

pub mod audit;
pub mod config;
pub mod exec;
pub mod faults;
pub mod policy;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use proto::limits;
use proto::pb::{self, site_service_client::SiteServiceClient};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use self::audit::AuditLog;
use self::config::SiteConfig;
use self::exec::{Outcome, Site};

/// Agent errors that end `run`; connection trouble is retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("site data: {0}")]
    Data(#[from] shared::data::DataError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("TLS bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("the coordinator refused this site: {0}")]
    Refused(String),
    #[error("agent.device in the site config: {0}")]
    Device(#[from] shared::device::DeviceError),
}

/// Why a call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("download of {0} stopped on request")]
    Interrupted(String),
    #[error("model {sha256}: {message}")]
    Download { sha256: String, message: String },
    /// A download resumed from a kept part did not verify: the part was damaged.
    /// `Link::fetch_model` answers it by fetching again from the start.
    #[error("model {sha256}: resumed download {message}")]
    ResumedMismatch { sha256: String, message: String },
    /// The site's own certificate cannot be used (expired, not yet valid, unreadable).
    #[error("{0}")]
    Certificate(String),
}

impl CallError {
    /// Refusals the agent cannot fix by retrying: a revoked or unknown certificate.
    fn is_fatal(&self) -> bool {
        matches!(self, CallError::Certificate(_))
            || matches!(self, CallError::Status(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
    }
}

/// Refuses to dial with an expired or not yet valid site certificate, saying what to do (the
/// coordinator would only drop the handshake); warns when it expires soon.
fn check_certificate(path: &Path) -> Result<(), CallError> {
    let renew = "ask the study lead for a new bundle (`coordinator pki revoke site NAME`, then \
                 `coordinator pki issue-site NAME`) and point [tls] bundle at it";
    match shared::cert::check_own(path, "site", renew) {
        Err(e) => Err(CallError::Certificate(e)),
        Ok(Some(days_left)) => {
            tracing::warn!(days_left, "the site certificate expires soon; {renew}");
            Ok(())
        }
        Ok(None) => Ok(()),
    }
}

/// A connection to the coordinator whose every request is audited before it is sent.
#[derive(Clone, Debug)]
pub struct Link {
    client: SiteServiceClient<Channel>,
    audit: AuditLog,
}

const SVC: &str = "fedtune.v1.SiteService";

impl Link {
    pub async fn connect(cfg: &SiteConfig, audit: AuditLog) -> Result<Self, CallError> {
        let bundle = &cfg.tls.bundle;
        check_certificate(&bundle.join("cert.pem"))?;
        let read = |f: &str| {
            let path = bundle.join(f);
            std::fs::read(&path).map_err(|source| CallError::Io { path, source })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(read("cert.pem")?, read("key.pem")?))
            .domain_name(cfg.coordinator.server_name.clone());
        let channel = Channel::from_shared(cfg.coordinator.address.clone())
            .map_err(|e| CallError::Download { sha256: String::new(), message: e.to_string() })?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        let client = SiteServiceClient::new(channel)
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(limits::MAX_MESSAGE_BYTES);
        Ok(Self { client, audit })
    }

    fn audit<M: Message>(&self, rpc: &str, m: &M) -> Result<(), CallError> {
        self.audit.record(&format!("{SVC}/{rpc}"), &m.encode_to_vec())?;
        Ok(())
    }

    pub async fn hello(&mut self, req: pb::HelloRequest) -> Result<pb::HelloResponse, CallError> {
        self.audit("Hello", &req)?;
        Ok(self.client.hello(req).await?.into_inner())
    }

    pub async fn next_task(&mut self, wait_seconds: u32) -> Result<Option<pb::Task>, CallError> {
        let req = pb::NextTaskRequest { wait_seconds };
        self.audit("NextTask", &req)?;
        let mut r = tonic::Request::new(req);
        r.set_timeout(Duration::from_secs(u64::from(wait_seconds) + 30));
        Ok(self.client.next_task(r).await?.into_inner().task)
    }

    pub async fn heartbeat(
        &mut self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, CallError> {
        self.audit("Heartbeat", &req)?;
        Ok(self.client.heartbeat(req).await?.into_inner())
    }

    pub async fn submit(&mut self, req: pb::SubmitResultRequest) -> Result<bool, CallError> {
        self.audit("SubmitResult", &req)?;
        faults::pause_at("submit");
        Ok(self.client.submit_result(req).await?.into_inner().recorded)
    }

    /// Uploads the weights a source task trained (Model_S), each message audited. Safe to
    /// repeat: the coordinator accepts the same bytes again.
    pub async fn upload_model(
        &mut self,
        task_id: &str,
        attempt: u32,
        path: &Path,
    ) -> Result<pb::ModelInfo, CallError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| CallError::Io { path: path.to_owned(), source })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let mut msgs = vec![pb::UploadModelRequest {
            part: Some(pb::upload_model_request::Part::Header(pb::UploadHeader {
                task_id: task_id.into(),
                attempt,
                model: Some(pb::ModelRef {
                    sha256: sha256.clone(),
                    size: bytes.len() as u64,
                    name: String::new(),
                }),
            })),
        }];
        msgs.extend(bytes.chunks(limits::CHUNK_BYTES).map(|c| pb::UploadModelRequest {
            part: Some(pb::upload_model_request::Part::Chunk(c.to_vec())),
        }));
        for m in &msgs {
            self.audit("UploadModel", m)?;
        }
        tracing::info!(task = task_id, sha256 = %sha256, bytes = bytes.len(), "uploading Model_S (policy share_weights = true)");
        Ok(self.client.upload_model(tokio_stream::iter(msgs)).await?.into_inner())
    }

    /// Downloads a model into `dir/<sha256>`, resuming from `dir/<sha256>.part`, and verifies
    /// its hash. A resumed download that does not verify (the kept part was damaged) is
    /// discarded and fetched again from the start, once. `stop_after` cuts the download after
    /// that many bytes of this call (tests use it to simulate a broken connection). Returns the
    /// file and the bytes received.
    pub async fn fetch_model(
        &mut self,
        model: &pb::ModelRef,
        dir: &Path,
        stop_after: Option<u64>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(PathBuf, u64), CallError> {
        match self.fetch_once(model, dir, stop_after, progress).await {
            Err(e @ CallError::ResumedMismatch { .. }) => {
                tracing::warn!(error = %e, "fetching the model again from the start");
                self.fetch_once(model, dir, stop_after, progress).await
            }
            other => other,
        }
    }

    async fn fetch_once(
        &mut self,
        model: &pb::ModelRef,
        dir: &Path,
        stop_after: Option<u64>,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(PathBuf, u64), CallError> {
        let sha = model.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CallError::Download { sha256: sha, message: "not a sha256".into() });
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CallError::Io { path, source }
        };
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        let done = dir.join(&sha);
        if done.exists() {
            let bytes = tokio::fs::read(&done).await.map_err(io(&done))?;
            if hex::encode(Sha256::digest(&bytes)) == sha {
                return Ok((done, 0));
            }
            tracing::warn!(path = %done.display(), "cached model does not match its hash; fetching again");
            tokio::fs::remove_file(&done).await.map_err(io(&done))?;
        }
        let part = dir.join(format!("{sha}.part"));
        // Resume: the part file holds whole chunks received in order; hash what is there.
        let have = tokio::fs::read(&part).await.unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(&have);
        let mut offset = have.len() as u64;
        if offset > model.size {
            offset = 0;
            hasher = Sha256::new();
            let _ = tokio::fs::remove_file(&part).await;
        }
        if offset > 0 {
            tracing::info!(sha256 = %sha, offset, "resuming download");
        }
        let resumed_from = offset;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .await
            .map_err(io(&part))?;
        let req = pb::FetchModelRequest { sha256: sha.clone(), offset };
        self.audit("FetchModel", &req)?;
        let mut stream = self.client.fetch_model(req).await?.into_inner();
        let mut received = 0u64;
        while let Some(chunk) = stream.message().await? {
            if chunk.offset != offset || chunk.total_size != model.size {
                return Err(CallError::Download {
                    sha256: sha,
                    message: format!(
                        "chunk at {} (size {}), expected {offset} (size {})",
                        chunk.offset, chunk.total_size, model.size
                    ),
                });
            }
            file.write_all(&chunk.data).await.map_err(io(&part))?;
            file.flush().await.map_err(io(&part))?;
            faults::pause_at("download");
            hasher.update(&chunk.data);
            offset += chunk.data.len() as u64;
            received += chunk.data.len() as u64;
            progress(offset, model.size);
            if stop_after.is_some_and(|n| received >= n) && offset < model.size {
                return Err(CallError::Interrupted(sha));
            }
        }
        file.sync_all().await.map_err(io(&part))?;
        let got = hex::encode(hasher.finalize());
        if offset != model.size || got != sha {
            let _ = tokio::fs::remove_file(&part).await;
            let message =
                format!("received {offset} of {} bytes with sha256 {got}; discarded", model.size);
            return Err(if resumed_from > 0 {
                CallError::ResumedMismatch { sha256: sha, message }
            } else {
                CallError::Download { sha256: sha, message }
            });
        }
        tokio::fs::rename(&part, &done).await.map_err(io(&done))?;
        Ok((done, received))
    }
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
        .map(|k| match k.as_str() {
            "evaluate" => pb::TaskKind::Evaluate as i32,
            "finetune" => pb::TaskKind::Finetune as i32,
            "transfer" => pb::TaskKind::TransferTarget as i32,
            _ => pb::TaskKind::Train as i32,
        })
        .collect();
    let (lo, hi) = site.spacing_range;
    let ranges = lo.iter().all(|v| v.is_finite());
    pb::HelloRequest {
        capabilities: Some(pb::Capabilities {
            device: site.device_info.kind.into(),
            memory_bytes: shared::device::host_memory_bytes().unwrap_or(0),
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
            gpu_free_bytes: shared::device::free_memory_bytes(&site.device).unwrap_or(0),
            threads: rayon::current_num_threads() as u32,
            allowed_kinds: kinds,
            max_epochs: cfg.policy.max_epochs,
            max_hours: cfg.policy.max_hours,
            share_weights: cfg.policy.share_weights,
        }),
        dataset: Some(pb::DatasetSummary {
            train_cases: site.manifest.cases_in(shared::data::Split::Train).count() as u32,
            test_cases: site.manifest.cases_in(shared::data::Split::Test).count() as u32,
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
    /// Weights to upload before the result (a transfer source's Model_S).
    upload: Option<PathBuf>,
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
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "connection to the coordinator failed");
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
            if let Some(path) = &p.upload
                && let Err(e) = link.upload_model(&p.task_id, p.attempt, path).await
            {
                *pending = Some(p);
                return Err(e);
            }
            let req = pb::SubmitResultRequest {
                task_id: p.task_id.clone(),
                attempt: p.attempt,
                outcome: Some(p.outcome.clone().into_proto()),
            };
            match link.submit(req).await {
                Ok(recorded) => tracing::info!(task = %p.task_id, recorded, "result submitted"),
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
            let source =
                task.spec.as_ref().is_some_and(|s| s.kind == pb::TaskKind::TransferSource as i32);
            let upload = (source && matches!(outcome, Outcome::Result(_)))
                .then(|| exec::weights_path(site, &task.task_id, None));
            *pending = Some(Pending {
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                outcome,
                upload,
            });
        }
    }
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
    if let Some(code) = policy::check_policy(&site.policy, &spec, site.train_cases() * 64) {
        tracing::warn!(task = %task.task_id, reason = code.as_str_name(), "task refused by site policy");
        return Ok(Some(Outcome::Refusal(code)));
    }
    let progress =
        Arc::new(Mutex::new(pb::Progress { phase: "download".into(), ..Default::default() }));
    let cancelled = Arc::new(AtomicBool::new(false));

    // Heartbeats run beside the work, on their own connection clone.
    let hb = {
        let mut hb_link = link.clone();
        let progress = progress.clone();
        let cancelled = cancelled.clone();
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
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
                }
            }
        })
    };

    let result = async {
        let base = match &task.base {
            Some(model) => {
                let p = progress.clone();
                let mut on_bytes = move |done: u64, total: u64| {
                    let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                    g.phase = "download".into();
                    g.fraction = 0.05 * done as f64 / total.max(1) as f64;
                };
                let dir = cfg.storage.dir.join("models");
                match link.fetch_model(model, &dir, None, &mut on_bytes).await {
                    Ok((path, _)) => Some(path),
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
            None => None,
        };
        let site = site.clone();
        let task = task.clone();
        let progress = progress.clone();
        let stop = {
            let (stopping, cancelled) = (stopping.clone(), cancelled.clone());
            move || stopping.load(Ordering::SeqCst) || cancelled.load(Ordering::SeqCst)
        };
        // Training is CPU-bound: off the runtime.
        let outcome = tokio::task::spawn_blocking(move || {
            let mut on_progress = |p: pb::Progress| *progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
            exec::run_task(&site, &task, base.as_deref(), &mut on_progress, &stop)
        })
        .await
        .unwrap_or(Outcome::Failure(pb::FailureCode::Internal));
        Ok(Some(outcome))
    }
    .await;
    hb.abort();
    if cancelled.load(Ordering::SeqCst) {
        return Ok(None);
    }
    if let Ok(Some(o)) = &result {
        match o {
            Outcome::Result(_) => tracing::info!(task = %task.task_id, "task succeeded"),
            Outcome::Failure(c) => {
                tracing::warn!(task = %task.task_id, code = c.as_str_name(), "task failed")
            }
            Outcome::Refusal(c) => {
                tracing::warn!(task = %task.task_id, code = c.as_str_name(), "task refused")
            }
        }
    }
    result
}
