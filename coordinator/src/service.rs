//! The gRPC services: `SiteService` for site certificates and `AdminService` for admin
//! certificates, over one shared [`Coordinator`].
//!
//! Every handler that changes state takes the coordinator's write lock, commits one sled
//! transaction, flushes, and only then answers; watchers and long polls wake on a version
//! counter.

use std::collections::HashSet;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use proto::limits;
use proto::pb::{self, admin_service_server::AdminService, site_service_server::SiteService};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::identity::{self, Identity, Role, valid_name};
use crate::rounds;
use crate::store::{
    ModelRecord, RoundRecord, RoundState, SiteRecord, Store, StoreError, StudyRecord, TaskRecord,
    TaskState,
};

/// Service errors, each mapped to one gRPC status in [`ServiceError::status`].
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl ServiceError {
    fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ServiceError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServiceError::PermissionDenied(_) => Status::permission_denied(msg),
            ServiceError::NotFound(_) => Status::not_found(msg),
            ServiceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServiceError::FailedPrecondition(_) => Status::failed_precondition(msg),
            ServiceError::AlreadyExists(_) => Status::already_exists(msg),
            // Storage trouble is the operator's, not the caller's: say so without details
            // that could help an attacker; the details go to the coordinator's log.
            ServiceError::Store(_) | ServiceError::Io { .. } => {
                tracing::error!(error = %msg, "storage error");
                Status::unavailable("the coordinator cannot write its data; try again later")
            }
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        e.status()
    }
}

type SResult<T> = Result<T, ServiceError>;

/// Limits and timings; every default is documented in `coordinator.toml` (see `config`).
#[derive(Clone, Debug)]
pub struct Limits {
    pub lease_seconds: u32,
    pub max_poll_seconds: u32,
    pub round_deadline_seconds: u32,
    pub max_attempts: u32,
}

pub fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Certificates revoked with `coordinator pki revoke`: a file re-read when it changes.
#[derive(Debug, Default)]
struct RevocationList {
    path: Option<PathBuf>,
    /// (modification time, fingerprints) of the last read.
    cached: StdMutex<(Option<SystemTime>, HashSet<String>)>,
}

impl RevocationList {
    fn contains(&self, fingerprint: &str) -> bool {
        let Some(path) = &self.path else { return false };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != mtime || mtime.is_none() {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the revocation list");
                String::new()
            });
            let set = text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned)
                .collect();
            *cached = (mtime, set);
        }
        cached.1.contains(fingerprint)
    }
}

/// The coordinator's shared state.
#[derive(Debug)]
pub struct Coordinator {
    store: Store,
    blobs: PathBuf,
    limits: Limits,
    revocations: RevocationList,
    /// Serialises read-modify-write changes, so a change sees the state the last one left.
    write: Mutex<()>,
    /// Bumped after every committed change; long polls and round watchers wait on it.
    changed: watch::Sender<u64>,
}

impl Coordinator {
    pub fn new(
        store: Store,
        blobs: PathBuf,
        limits: Limits,
        revocation_list: Option<PathBuf>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            blobs,
            limits,
            revocations: RevocationList { path: revocation_list, ..Default::default() },
            write: Mutex::new(()),
            changed: watch::channel(0).0,
        })
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The caller's identity from its verified client certificate, refused when revoked or of
    /// the wrong role. Called by the interceptors of both services on every call.
    pub fn authenticate<T>(&self, req: &Request<T>, role: Role) -> SResult<Identity> {
        let certs = req.peer_certs().ok_or_else(|| {
            ServiceError::Unauthenticated(
                "no client certificate; connect with a bundle from `coordinator pki issue-site` or `issue-admin`"
                    .into(),
            )
        })?;
        let der = certs.first().ok_or_else(|| {
            ServiceError::Unauthenticated("the client certificate chain is empty".into())
        })?;
        let id = identity::from_der(der.as_ref()).map_err(ServiceError::Unauthenticated)?;
        if self.revocations.contains(&id.fingerprint) {
            return Err(ServiceError::PermissionDenied(format!(
                "the certificate of {} \"{}\" is revoked",
                id.role, id.name
            )));
        }
        if id.role == Role::Site
            && let Some(site) = self.store.site(&id.name)?
            && (site.revoked || site.revoked_fingerprints.contains(&id.fingerprint))
        {
            return Err(ServiceError::PermissionDenied(format!(
                "site \"{}\" is revoked; ask the study lead",
                id.name
            )));
        }
        if id.role != role {
            return Err(ServiceError::PermissionDenied(format!(
                "a {} certificate (\"{}\") cannot call the {} service",
                id.role,
                id.name,
                role.as_str()
            )));
        }
        Ok(id)
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    // === rounds ===

    /// Expires leases and applies round deadlines; run by the server's ticker.
    pub async fn tick(&self) -> SResult<()> {
        let _w = self.write.lock().await;
        let (now_ms, now_s) = (now_ms(), now_s());
        let mut changed = false;
        for mut round in self.store.rounds()? {
            if round.state != RoundState::Running {
                continue;
            }
            let mut tasks = self.store.round_tasks(&round)?;
            let mut dirty: Vec<usize> = Vec::new();
            for (i, t) in tasks.iter_mut().enumerate() {
                if rounds::expire_lease(t, now_ms, round.max_attempts) {
                    tracing::info!(task = %t.id, site = %t.site, state = ?t.state, "lease expired");
                    dirty.push(i);
                }
            }
            if rounds::apply_deadline(&round, &mut tasks, now_s) {
                dirty = (0..tasks.len()).collect();
            }
            let settled = rounds::settle(&mut round, &tasks);
            if settled || !dirty.is_empty() {
                let changed_tasks: Vec<&TaskRecord> = dirty.iter().map(|&i| &tasks[i]).collect();
                self.store.commit(settled.then_some(&round), &changed_tasks, None)?;
                changed = true;
            }
        }
        if changed {
            self.store.flush().await?;
            self.notify();
        }
        Ok(())
    }

    fn round_info(&self, round: &RoundRecord) -> SResult<pb::RoundInfo> {
        let tasks = self.store.round_tasks(round)?;
        let (state, reason) = match &round.state {
            RoundState::Running => (pb::RoundState::Running, String::new()),
            RoundState::Completed => (pb::RoundState::Completed, String::new()),
            RoundState::Failed { reason } => (pb::RoundState::Failed, reason.clone()),
            RoundState::Cancelled => (pb::RoundState::Cancelled, String::new()),
        };
        Ok(pb::RoundInfo {
            round_id: round.id.clone(),
            study: round.study.clone(),
            spec: pb::TaskSpec::decode(round.spec.as_slice()).ok(),
            state: state as i32,
            tasks: tasks
                .iter()
                .map(|t| {
                    let (state, reason) = match &t.state {
                        TaskState::Pending => (pb::TaskState::Pending, String::new()),
                        TaskState::Leased { .. } => (pb::TaskState::Leased, String::new()),
                        TaskState::Succeeded => (pb::TaskState::Succeeded, String::new()),
                        TaskState::Failed { reason } => (pb::TaskState::Failed, reason.clone()),
                        TaskState::Refused { reason } => (pb::TaskState::Refused, reason.clone()),
                        TaskState::Cancelled => (pb::TaskState::Cancelled, String::new()),
                    };
                    pb::TaskInfo {
                        task_id: t.id.clone(),
                        site: t.site.clone(),
                        state: state as i32,
                        attempt: t.attempt,
                        progress: pb::Progress::decode(t.progress.as_slice())
                            .ok()
                            .filter(|_| !t.progress.is_empty()),
                        reason,
                    }
                })
                .collect(),
            quorum: round.quorum,
            created_unix: round.created,
            deadline_unix: round.deadline,
            reason,
        })
    }

    fn model_ref(&self, sha256: &str) -> SResult<pb::ModelRef> {
        let m = self.store.model(sha256)?.ok_or_else(|| {
            ServiceError::NotFound(format!("model {sha256} is not stored on this coordinator"))
        })?;
        Ok(pb::ModelRef { sha256: m.sha256, size: m.size, name: m.name })
    }

    /// The next task for `site`: a pending task of a running round, or one this site holds a
    /// lease on (an agent that asks again has dropped it, e.g. after a restart).
    async fn lease_next(&self, site: &str) -> SResult<Option<pb::Task>> {
        let _w = self.write.lock().await;
        let mut tasks: Vec<TaskRecord> = self
            .store
            .tasks()?
            .into_iter()
            .filter(|t| t.site == site && !t.state.is_final())
            .collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        for mut task in tasks {
            let Some(round) = self.store.round(&task.round_id)? else { continue };
            if round.state != RoundState::Running || task.attempt >= round.max_attempts {
                continue;
            }
            task.attempt += 1;
            let lease = self.limits.lease_seconds;
            task.state = TaskState::Leased { deadline_ms: now_ms() + i64::from(lease) * 1000 };
            self.store.commit(None, &[&task], None)?;
            self.store.flush().await?;
            self.notify();
            let base = round.base_sha256.as_deref().map(|s| self.model_ref(s)).transpose()?;
            tracing::info!(task = %task.id, site, attempt = task.attempt, "task leased");
            return Ok(Some(pb::Task {
                task_id: task.id,
                attempt: task.attempt,
                round_id: round.id,
                spec: pb::TaskSpec::decode(round.spec.as_slice()).ok(),
                base,
                lease_seconds: lease,
            }));
        }
        Ok(None)
    }

    fn owned_task(&self, site: &str, task_id: &str) -> SResult<(TaskRecord, RoundRecord)> {
        let task = self
            .store
            .task(task_id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no task {task_id}")))?;
        if task.site != site {
            return Err(ServiceError::PermissionDenied(format!(
                "task {task_id} belongs to another site"
            )));
        }
        let round = self.store.round(&task.round_id)?.ok_or_else(|| {
            ServiceError::Store(StoreError::Corrupt {
                tree: "rounds",
                key: task.round_id.clone(),
                error: "round of a task is missing".into(),
            })
        })?;
        Ok((task, round))
    }
}

fn check_result(r: &pb::TaskResult) -> SResult<()> {
    let bad = |m: String| Err(ServiceError::InvalidArgument(m));
    if r.organs.len() > 256 {
        return bad(format!("{} organs in a result; at most 256", r.organs.len()));
    }
    for o in &r.organs {
        if o.organ.is_empty() || o.organ.len() > 64 {
            return bad("organ names are 1 to 64 characters".into());
        }
        if o.cases.len() > 100_000 {
            return bad(format!("{} cases for {}; at most 100000", o.cases.len(), o.organ));
        }
        for c in &o.cases {
            if !(0.0..=1.0).contains(&c.dice) {
                return bad(format!("Dice {} of {} is outside 0..1", c.dice, o.organ));
            }
            if let Some(h) = c.hd95_mm
                && !(h.is_finite() && h >= 0.0)
            {
                return bad(format!("HD95 {h} of {} is not a distance", o.organ));
            }
        }
    }
    for (name, v) in [
        ("train_seconds", r.train_seconds),
        ("cache_seconds", r.cache_seconds),
        ("eval_seconds", r.eval_seconds),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return bad(format!("{name} = {v} is not a duration"));
        }
    }
    Ok(())
}

/// `REFUSAL_CODE_TOO_MANY_EPOCHS` -> `too many epochs`.
fn reason_name(code: &str, prefix: &str) -> String {
    code.strip_prefix(prefix).unwrap_or(code).to_lowercase().replace('_', " ")
}

fn identity_of<T>(req: &Request<T>) -> SResult<Identity> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| ServiceError::Unauthenticated("the call was not authenticated".into()))
}

// === impl SiteService ===

/// `SiteService` over a shared coordinator.
#[derive(Clone, Debug)]
pub struct SiteApi(pub Arc<Coordinator>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;
type RoundStream = Pin<Box<dyn Stream<Item = Result<pb::RoundInfo, Status>> + Send>>;

#[tonic::async_trait]
impl SiteService for SiteApi {
    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let _w = c.write.lock().await;
        let mut site = c.store.site(&id.name).map_err(ServiceError::from)?.unwrap_or_else(|| {
            tracing::info!(site = %id.name, "new site registered; it gets tasks once approved");
            SiteRecord { name: id.name.clone(), ..Default::default() }
        });
        site.last_seen = now_s();
        site.cert_not_after = id.not_after;
        site.capabilities = body.capabilities.map(|m| m.encode_to_vec()).unwrap_or_default();
        site.dataset = body.dataset.map(|m| m.encode_to_vec()).unwrap_or_default();
        c.store.put_site(&site).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::HelloResponse {
            site: id.name,
            approved: site.approved,
            certificate_days_left: (id.not_after - now_s()) / 86_400,
        }))
    }

    async fn next_task(
        &self,
        req: Request<pb::NextTaskRequest>,
    ) -> Result<Response<pb::NextTaskResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let site = c.store.site(&id.name).map_err(ServiceError::from)?;
        if !site.as_ref().is_some_and(|s| s.approved) {
            return Err(ServiceError::FailedPrecondition(format!(
                "site \"{}\" is not approved; the study lead runs `coordinator site approve {}`",
                id.name, id.name
            ))
            .into());
        }
        let wait = req.get_ref().wait_seconds.min(c.limits.max_poll_seconds);
        let until = tokio::time::Instant::now() + Duration::from_secs(u64::from(wait));
        let mut changed = c.changed.subscribe();
        loop {
            if let Some(task) = c.lease_next(&id.name).await? {
                return Ok(Response::new(pb::NextTaskResponse { task: Some(task) }));
            }
            if tokio::time::timeout_at(until, changed.changed()).await.is_err() {
                return Ok(Response::new(pb::NextTaskResponse { task: None }));
            }
        }
    }

    type FetchModelStream = ChunkStream;

    async fn fetch_model(
        &self,
        req: Request<pb::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let id = identity_of(&req)?;
        let c = self.0.clone();
        let pb::FetchModelRequest { sha256, offset } = req.into_inner();
        // A site may fetch a model only while it holds a task that uses it.
        let allowed = c.store.tasks().map_err(ServiceError::from)?.into_iter().any(|t| {
            t.site == id.name
                && matches!(t.state, TaskState::Leased { .. })
                && c.store.round(&t.round_id).ok().flatten().and_then(|r| r.base_sha256).as_deref()
                    == Some(sha256.as_str())
        });
        if !allowed {
            return Err(ServiceError::PermissionDenied(format!(
                "site \"{}\" holds no task that uses model {sha256}",
                id.name
            ))
            .into());
        }
        let path = c.blob_path(&sha256);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| ServiceError::Io { path: path.clone(), source })?;
        let total = file
            .metadata()
            .await
            .map_err(|source| ServiceError::Io { path: path.clone(), source })?
            .len();
        if offset > total {
            return Err(ServiceError::InvalidArgument(format!(
                "offset {offset} is past the end of model {sha256} ({total} bytes)"
            ))
            .into());
        }
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|source| ServiceError::Io { path: path.clone(), source })?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut pos = offset;
            let mut buf = vec![0u8; limits::CHUNK_BYTES];
            while pos < total {
                let n = match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("reading the model: {e}"))))
                            .await;
                        return;
                    }
                };
                let chunk =
                    pb::ModelChunk { offset: pos, data: buf[..n].to_vec(), total_size: total };
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the site went away
                }
                pos += n as u64;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let _w = c.write.lock().await;
        let (mut task, round) = c.owned_task(&id.name, &body.task_id)?;
        let lease = c.limits.lease_seconds;
        let current =
            matches!(task.state, TaskState::Leased { .. }) && task.attempt == body.attempt;
        if !current || round.state != RoundState::Running {
            return Ok(Response::new(pb::HeartbeatResponse { lease_seconds: 0, stop: true }));
        }
        task.state = TaskState::Leased { deadline_ms: now_ms() + i64::from(lease) * 1000 };
        if let Some(p) = body.progress {
            task.progress = p.encode_to_vec();
        }
        c.store.commit(None, &[&task], None).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        Ok(Response::new(pb::HeartbeatResponse { lease_seconds: lease, stop: false }))
    }

    async fn submit_result(
        &self,
        req: Request<pb::SubmitResultRequest>,
    ) -> Result<Response<pb::SubmitResultResponse>, Status> {
        let id = identity_of(&req)?;
        let c = &self.0;
        let body = req.into_inner();
        let _w = c.write.lock().await;
        let (mut task, mut round) = c.owned_task(&id.name, &body.task_id)?;
        if task.state.is_final() {
            // A retried submission (or a late one from an earlier lease): counted once.
            return Ok(Response::new(pb::SubmitResultResponse { recorded: false }));
        }
        if body.attempt == 0 || body.attempt > task.attempt {
            return Err(ServiceError::InvalidArgument(format!(
                "attempt {} of task {} was never leased",
                body.attempt, task.id
            ))
            .into());
        }
        let mut result_bytes = None;
        match body.outcome {
            Some(pb::submit_result_request::Outcome::Result(r)) => {
                check_result(&r)?;
                result_bytes = Some(r.encode_to_vec());
                task.state = TaskState::Succeeded;
            }
            Some(pb::submit_result_request::Outcome::Failure(code)) => {
                let code = pb::FailureCode::try_from(code).unwrap_or(pb::FailureCode::Unspecified);
                task.state = if code == pb::FailureCode::AgentShutdown {
                    // Released, not failed: the lease does not count as an attempt.
                    task.attempt -= 1;
                    TaskState::Pending
                } else {
                    TaskState::Failed { reason: reason_name(code.as_str_name(), "FAILURE_CODE_") }
                };
            }
            Some(pb::submit_result_request::Outcome::Refusal(code)) => {
                let code = pb::RefusalCode::try_from(code).unwrap_or(pb::RefusalCode::Unspecified);
                task.state =
                    TaskState::Refused { reason: reason_name(code.as_str_name(), "REFUSAL_CODE_") };
            }
            None => {
                return Err(
                    ServiceError::InvalidArgument("a submission needs an outcome".into()).into()
                );
            }
        }
        let mut tasks = c.store.round_tasks(&round).map_err(ServiceError::from)?;
        if let Some(t) = tasks.iter_mut().find(|t| t.id == task.id) {
            *t = task.clone();
        }
        let settled = rounds::settle(&mut round, &tasks);
        c.store
            .commit(
                settled.then_some(&round),
                &[&task],
                result_bytes.as_deref().map(|b| (task.id.as_str(), b)),
            )
            .map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(task = %task.id, site = %id.name, state = ?task.state, "result recorded");
        Ok(Response::new(pb::SubmitResultResponse { recorded: true }))
    }
}

// === impl AdminService ===

/// `AdminService` over a shared coordinator.
#[derive(Clone, Debug)]
pub struct AdminApi(pub Arc<Coordinator>);

fn site_info(s: &SiteRecord) -> pb::SiteInfo {
    pb::SiteInfo {
        name: s.name.clone(),
        approved: s.approved,
        revoked: s.revoked,
        last_seen_unix: s.last_seen,
        capabilities: pb::Capabilities::decode(s.capabilities.as_slice())
            .ok()
            .filter(|_| !s.capabilities.is_empty()),
        dataset: pb::DatasetSummary::decode(s.dataset.as_slice())
            .ok()
            .filter(|_| !s.dataset.is_empty()),
        certificate_not_after_unix: s.cert_not_after,
    }
}

fn model_info(m: &ModelRecord) -> pb::ModelInfo {
    pb::ModelInfo {
        model: Some(pb::ModelRef { sha256: m.sha256.clone(), size: m.size, name: m.name.clone() }),
        created_unix: m.created,
        config: m.config.clone(),
        layers: m.layers,
    }
}

impl AdminApi {
    async fn receive_model(
        &self,
        mut stream: Streaming<pb::PushModelRequest>,
    ) -> SResult<ModelRecord> {
        let c = &self.0;
        let header = match stream.next().await {
            Some(Ok(pb::PushModelRequest {
                part: Some(pb::push_model_request::Part::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(ServiceError::InvalidArgument(format!("upload: {s}"))),
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "an upload starts with its header".into(),
                ));
            }
        };
        if !valid_name(&header.name) {
            return Err(ServiceError::InvalidArgument(format!(
                "model name \"{}\": use 1 to 63 lowercase letters, digits and '-'",
                header.name
            )));
        }
        if header.size == 0 || header.size > limits::MAX_MODEL_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "model size {} is outside 1..={}",
                header.size,
                limits::MAX_MODEL_BYTES
            )));
        }
        if header.sha256.len() != 64 || !header.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::InvalidArgument("sha256 must be 64 hex digits".into()));
        }
        let sha = header.sha256.to_ascii_lowercase();
        let tmp_dir = c.blobs.join("tmp");
        let io = |path: &std::path::Path| {
            let path = path.to_owned();
            move |source| ServiceError::Io { path, source }
        };
        tokio::fs::create_dir_all(&tmp_dir).await.map_err(io(&tmp_dir))?;
        let tmp = tmp_dir.join(format!("upload-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(io(&tmp))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut bytes = Vec::new();
            while let Some(msg) = stream.next().await {
                let msg = msg.map_err(|s| ServiceError::InvalidArgument(format!("upload: {s}")))?;
                let Some(pb::push_model_request::Part::Chunk(chunk)) = msg.part else {
                    return Err(ServiceError::InvalidArgument(
                        "a second header in one upload".into(),
                    ));
                };
                if chunk.len() > limits::CHUNK_BYTES {
                    return Err(ServiceError::InvalidArgument(format!(
                        "chunk of {} bytes; at most {}",
                        chunk.len(),
                        limits::CHUNK_BYTES
                    )));
                }
                size += chunk.len() as u64;
                if size > header.size {
                    return Err(ServiceError::InvalidArgument(format!(
                        "more bytes than the header's size {}",
                        header.size
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io(&tmp))?;
                bytes.extend_from_slice(&chunk);
            }
            if size != header.size {
                return Err(ServiceError::InvalidArgument(format!(
                    "upload ended at {size} of {} bytes",
                    header.size
                )));
            }
            let got = hex::encode(hasher.finalize());
            if got != sha {
                return Err(ServiceError::InvalidArgument(format!(
                    "sha256 of the upload is {got}, the header said {sha}"
                )));
            }
            let manifest = shared::weights::read_manifest(&bytes).map_err(|e| {
                ServiceError::InvalidArgument(format!("not a fedtune weights file: {e}"))
            })?;
            file.sync_all().await.map_err(io(&tmp))?;
            Ok(manifest)
        }
        .await;
        let manifest = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let dest = c.blob_path(&sha);
        tokio::fs::rename(&tmp, &dest).await.map_err(io(&dest))?;
        if let Ok(dir) = tokio::fs::File::open(&c.blobs).await {
            let _ = dir.sync_all().await;
        }
        Ok(ModelRecord {
            sha256: sha,
            size: header.size,
            name: header.name,
            created: now_s(),
            config: manifest.config.name.clone(),
            layers: manifest.layers.len() as u32,
        })
    }

    fn round(&self, id: &str) -> SResult<RoundRecord> {
        self.0.store.round(id)?.ok_or_else(|| ServiceError::NotFound(format!("no round {id}")))
    }
}

fn admin<T>(req: &Request<T>) -> SResult<Identity> {
    identity_of(req)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn push_model(
        &self,
        req: Request<Streaming<pb::PushModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let who = admin(&req)?;
        let record = self.receive_model(req.into_inner()).await?;
        let c = &self.0;
        let _w = c.write.lock().await;
        c.store.put_model(&record).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        tracing::info!(admin = %who.name, model = %record.name, sha256 = %record.sha256, "model stored");
        Ok(Response::new(model_info(&record)))
    }

    async fn list_models(
        &self,
        req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        admin(&req)?;
        let models = self.0.store.models().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.iter().map(model_info).collect(),
        }))
    }

    async fn list_sites(
        &self,
        req: Request<pb::ListSitesRequest>,
    ) -> Result<Response<pb::ListSitesResponse>, Status> {
        admin(&req)?;
        let sites = self.0.store.sites().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListSitesResponse { sites: sites.iter().map(site_info).collect() }))
    }

    async fn approve_site(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteInfo>, Status> {
        let who = admin(&req)?;
        let name = req.into_inner().name;
        if !valid_name(&name) {
            return Err(ServiceError::InvalidArgument(format!(
                "\"{name}\" is not a valid site name"
            ))
            .into());
        }
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut site = c
            .store
            .site(&name)
            .map_err(ServiceError::from)?
            .unwrap_or_else(|| SiteRecord { name: name.clone(), ..Default::default() });
        site.approved = true;
        site.revoked = false;
        c.store.put_site(&site).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, site = %name, "site approved");
        Ok(Response::new(site_info(&site)))
    }

    async fn revoke_site(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteInfo>, Status> {
        let who = admin(&req)?;
        let name = req.into_inner().name;
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut site = c
            .store
            .site(&name)
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(format!("no site \"{name}\"")))?;
        site.approved = false;
        site.revoked = true;
        c.store.put_site(&site).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        tracing::warn!(admin = %who.name, site = %name, "site revoked");
        Ok(Response::new(site_info(&site)))
    }

    async fn create_study(
        &self,
        req: Request<pb::CreateStudyRequest>,
    ) -> Result<Response<pb::StudyInfo>, Status> {
        admin(&req)?;
        let body = req.into_inner();
        let c = &self.0;
        if !valid_name(&body.name) {
            return Err(ServiceError::InvalidArgument(format!(
                "\"{}\" is not a valid study name",
                body.name
            ))
            .into());
        }
        let _w = c.write.lock().await;
        if c.store.study(&body.name).map_err(ServiceError::from)?.is_some() {
            return Err(
                ServiceError::AlreadyExists(format!("study \"{}\" exists", body.name)).into()
            );
        }
        let model =
            c.store.model_by_ref(&body.base_model).map_err(ServiceError::from)?.ok_or_else(
                || {
                    ServiceError::NotFound(format!(
                        "no model \"{}\"; push it with `coordinator model push FILE --name NAME`",
                        body.base_model
                    ))
                },
            )?;
        if body.sites.is_empty() {
            return Err(
                ServiceError::InvalidArgument("a study needs at least one site".into()).into()
            );
        }
        let mut sites = body.sites.clone();
        sites.sort();
        sites.dedup();
        for s in &sites {
            if c.store.site(s).map_err(ServiceError::from)?.is_none() {
                return Err(ServiceError::NotFound(format!(
                    "no site \"{s}\"; it appears once its agent connects or the study lead approves it"
                ))
                .into());
            }
        }
        let study = StudyRecord {
            name: body.name,
            base_sha256: model.sha256.clone(),
            sites,
            created: now_s(),
        };
        c.store.put_study(&study).map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::StudyInfo {
            name: study.name,
            base: Some(c.model_ref(&model.sha256)?),
            sites: study.sites,
            created_unix: study.created,
        }))
    }

    async fn list_studies(
        &self,
        req: Request<pb::ListStudiesRequest>,
    ) -> Result<Response<pb::ListStudiesResponse>, Status> {
        admin(&req)?;
        let c = &self.0;
        let studies = c.store.studies().map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListStudiesResponse {
            studies: studies
                .into_iter()
                .map(|s| pb::StudyInfo {
                    base: c.model_ref(&s.base_sha256).ok(),
                    name: s.name,
                    sites: s.sites,
                    created_unix: s.created,
                })
                .collect(),
        }))
    }

    async fn start_round(
        &self,
        req: Request<pb::StartRoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        let who = admin(&req)?;
        let body = req.into_inner();
        let c = &self.0;
        let _w = c.write.lock().await;
        let study = c
            .store
            .study(&body.study)
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(format!("no study \"{}\"", body.study)))?;
        let spec = body
            .spec
            .ok_or_else(|| ServiceError::InvalidArgument("a round needs a task spec".into()))?;
        let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
        let base =
            c.store.model(&study.base_sha256).map_err(ServiceError::from)?.ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "the study's base model {} is gone",
                    study.base_sha256
                ))
            })?;
        let bad = |m: String| Status::from(ServiceError::InvalidArgument(m));
        match kind {
            pb::TaskKind::Unspecified => {
                return Err(bad("task kind: use evaluate, finetune or train".into()));
            }
            pb::TaskKind::Finetune => {
                if spec.trainable_layers == 0 || spec.trainable_layers > base.layers {
                    return Err(bad(format!(
                        "trainable_layers = {}; the base model has {} layers",
                        spec.trainable_layers, base.layers
                    )));
                }
            }
            pb::TaskKind::Train => {
                if !spec.config.is_empty()
                    && shared::model::ModelConfig::preset(&spec.config).is_err()
                {
                    return Err(bad(format!(
                        "config \"{}\": use tiny, small or resnet103",
                        spec.config
                    )));
                }
            }
            pb::TaskKind::Evaluate => {}
        }
        if spec.epochs > 10_000 || spec.batch_size > 4096 {
            return Err(bad("epochs <= 10000 and batch_size <= 4096".into()));
        }
        if !(spec.learning_rate.is_finite()
            && spec.learning_rate >= 0.0
            && spec.learning_rate < 10.0)
        {
            return Err(bad(format!(
                "learning_rate = {} is not a learning rate",
                spec.learning_rate
            )));
        }
        let n = study.sites.len() as u32;
        let quorum = if body.quorum == 0 { n } else { body.quorum };
        if quorum > n {
            return Err(bad(format!("quorum {quorum} is more than the study's {n} sites")));
        }
        let deadline = if body.deadline_seconds == 0 {
            c.limits.round_deadline_seconds
        } else {
            body.deadline_seconds
        };
        let max_attempts =
            if body.max_attempts == 0 { c.limits.max_attempts } else { body.max_attempts.min(100) };
        let id = format!("r{}-{:06x}", now_s(), rand::random::<u32>() & 0xff_ffff);
        let tasks: Vec<TaskRecord> = study
            .sites
            .iter()
            .map(|s| TaskRecord {
                id: format!("{id}.{s}"),
                round_id: id.clone(),
                site: s.clone(),
                state: TaskState::Pending,
                attempt: 0,
                progress: Vec::new(),
            })
            .collect();
        let round = RoundRecord {
            id: id.clone(),
            study: study.name.clone(),
            spec: spec.encode_to_vec(),
            base_sha256: (kind != pb::TaskKind::Train).then(|| study.base_sha256.clone()),
            quorum,
            max_attempts,
            created: now_s(),
            deadline: now_s() + i64::from(deadline),
            state: RoundState::Running,
            tasks: tasks.iter().map(|t| t.id.clone()).collect(),
        };
        c.store
            .commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)
            .map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, round = %id, study = %study.name, kind = ?kind, "round started");
        Ok(Response::new(c.round_info(&round)?))
    }

    async fn get_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        admin(&req)?;
        let round = self.round(&req.get_ref().round_id)?;
        Ok(Response::new(self.0.round_info(&round)?))
    }

    type WatchRoundStream = RoundStream;

    async fn watch_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<Self::WatchRoundStream>, Status> {
        admin(&req)?;
        let id = req.into_inner().round_id;
        self.round(&id)?;
        let c = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut changed = c.changed.subscribe();
            let mut last = None;
            loop {
                let info = c.store.round(&id).map_err(ServiceError::from).and_then(|r| {
                    let r = r.ok_or_else(|| ServiceError::NotFound(format!("no round {id}")))?;
                    c.round_info(&r)
                });
                let info = match info {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let done = info.state != pb::RoundState::Running as i32;
                if last.as_ref() != Some(&info) {
                    if tx.send(Ok(info.clone())).await.is_err() {
                        return; // the watcher went away
                    }
                    last = Some(info);
                }
                if done || changed.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_round(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundInfo>, Status> {
        let who = admin(&req)?;
        let c = &self.0;
        let _w = c.write.lock().await;
        let mut round = self.round(&req.get_ref().round_id)?;
        if round.state != RoundState::Running {
            return Err(ServiceError::FailedPrecondition(format!(
                "round {} is not running",
                round.id
            ))
            .into());
        }
        let mut tasks = c.store.round_tasks(&round).map_err(ServiceError::from)?;
        for t in tasks.iter_mut().filter(|t| !t.state.is_final()) {
            t.state = TaskState::Cancelled;
        }
        round.state = RoundState::Cancelled;
        c.store
            .commit(Some(&round), &tasks.iter().collect::<Vec<_>>(), None)
            .map_err(ServiceError::from)?;
        c.store.flush().await.map_err(ServiceError::from)?;
        c.notify();
        tracing::info!(admin = %who.name, round = %round.id, "round cancelled");
        Ok(Response::new(c.round_info(&round)?))
    }

    async fn get_results(
        &self,
        req: Request<pb::RoundRequest>,
    ) -> Result<Response<pb::RoundResults>, Status> {
        admin(&req)?;
        let c = &self.0;
        let round = self.round(&req.get_ref().round_id)?;
        let mut results = Vec::new();
        for t in c.store.round_tasks(&round).map_err(ServiceError::from)? {
            if let Some(bytes) = c.store.result(&t.id).map_err(ServiceError::from)? {
                let result = pb::TaskResult::decode(bytes.as_slice()).map_err(|e| {
                    ServiceError::Store(StoreError::Corrupt {
                        tree: "results",
                        key: t.id.clone(),
                        error: e.to_string(),
                    })
                })?;
                results.push(pb::SiteResult { site: t.site, result: Some(result) });
            }
        }
        Ok(Response::new(pb::RoundResults { round: Some(c.round_info(&round)?), results }))
    }
}
