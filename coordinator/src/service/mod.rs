//! The gRPC services: `SiteService` for site certificates and `AdminService` for admin
//! certificates, over one shared [`Coordinator`].
//!
//! Every handler that changes state takes the coordinator's write lock, commits one sled
//! transaction, flushes, and only then answers; watchers and long polls wake on a version
//! counter.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::pb;
use tokio::sync::{Mutex, watch};
use tonic::Request;

use crate::identity::{self, Identity, Role};
use crate::metrics::ServerMetrics;
use crate::rounds;
use crate::store::{RoundRecord, RoundState, SiteRecord, Store, StoreError, TaskRecord, TaskState};

type SResult<T> = Result<T, ServiceError>;

/// Limits and timings; every default is documented in `coordinator.toml` (see `config`).
#[derive(Clone, Debug)]
pub struct Limits {
    pub lease_seconds: u32,
    pub max_poll_seconds: u32,
    pub round_deadline_seconds: u32,
    pub max_attempts: u32,
    /// Longest an upload waits for its next chunk, or a download or watch for the client to
    /// take its next message.
    pub idle_seconds: u32,
}

pub fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Certificates revoked with `coordinator pki revoke`: the serial numbers of the CA's CRL, a
/// file re-read when it changes. (rustls refuses them at the handshake; this catches a
/// connection opened before the revocation, on its next call.)
#[derive(Debug, Default)]
struct RevocationList {
    path: Option<PathBuf>,
    /// (modification time, serial numbers) of the last read that succeeded.
    cached: StdMutex<(Option<SystemTime>, HashSet<String>)>,
}

impl RevocationList {
    fn contains(&self, serial: &str) -> bool {
        let Some(path) = &self.path else { return false };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != mtime {
            // An unreadable CRL keeps the last list read (a half-copied file must not
            // reinstate anyone); it is tried again at the next call.
            match std::fs::read(path)
                .map_err(|e| e.to_string())
                .and_then(|pem| crate::identity::crl_serials(&pem))
            {
                Ok(set) => *cached = (mtime, set),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the CRL; keeping the last one read")
                }
            }
        }
        cached.1.contains(serial)
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
    /// Unix seconds of each site's last call, kept in memory (the store keeps the last hello).
    contact: StdMutex<std::collections::HashMap<String, i64>>,
    metrics: Arc<ServerMetrics>,
    /// One wake-up per site, for its long poll: a site's poll wakes when one of its tasks
    /// becomes pending, not at every change of any site (a thousand polls woken at every
    /// lease would each take the write lock).
    wakers: StdMutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Blobs whose bytes were hashed and matched their name, with the (size, modification
    /// time) they had then (see `verified_blob`).
    verified: Mutex<std::collections::HashMap<String, shared::weights::HashStamp>>,
}

impl Coordinator {
    pub fn new(
        store: Store,
        blobs: PathBuf,
        limits: Limits,
        crl: Option<PathBuf>,
        metrics: Arc<ServerMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            blobs,
            limits,
            revocations: RevocationList { path: crl, ..Default::default() },
            write: Mutex::new(()),
            changed: watch::channel(0).0,
            contact: Default::default(),
            metrics,
            verified: Default::default(),
            wakers: Default::default(),
        })
    }

    /// Whether a site may no longer be served: revoked with `site revoke`, or the certificate
    /// it last connected with is on the revocation list.
    fn site_revoked(&self, site: &SiteRecord) -> bool {
        site.revoked || self.certificate_revoked(site)
    }

    fn certificate_revoked(&self, site: &SiteRecord) -> bool {
        !site.serial.is_empty() && self.revocations.contains(&site.serial)
    }

    /// When a site last called, Unix seconds (0: never).
    fn last_contact(&self, site: &SiteRecord) -> i64 {
        let contact = self.contact.lock().unwrap_or_else(|e| e.into_inner());
        contact.get(&site.name).copied().unwrap_or(0).max(site.last_seen)
    }

    /// Makes every change so far durable, then wakes long polls and round watchers: what each
    /// change does before it answers.
    async fn durable(&self) -> SResult<()> {
        if let Err(e) = self.store.flush().await {
            // sled keeps a failed write's error until it is reopened: health says so.
            if matches!(e, crate::store::StoreError::Sled(sled::Error::Io(_))) {
                self.metrics.store_stopped();
            }
            return Err(e.into());
        }
        self.notify();
        let woken = self.store.take_woken();
        if !woken.is_empty() {
            let wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            for site in woken {
                if let Some(n) = wakers.get(&site) {
                    n.notify_waiters();
                }
            }
        }
        Ok(())
    }

    /// The wake-up of `site`'s long polls.
    fn waker(&self, site: &str) -> Arc<tokio::sync::Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.entry(site.to_owned()).or_default().clone()
    }

    /// The Prometheus text of the server's metrics, with the state gauges read now.
    pub fn metrics_text(&self) -> String {
        if let Err(e) = self.refresh_gauges() {
            tracing::warn!(error = %e, "metrics: reading the state gauges");
        }
        self.metrics.render()
    }

    fn refresh_gauges(&self) -> SResult<()> {
        let now = now_s();
        let sites = self.store.sites()?;
        let count = |f: &dyn Fn(&SiteRecord) -> bool| sites.iter().filter(|s| f(s)).count() as i64;
        let revoked = count(&|s| self.site_revoked(s));
        let approved = count(&|s| s.approved && !self.site_revoked(s));
        let pending = sites.len() as i64 - revoked - approved;
        let connected = count(&|s| now - self.last_contact(s) <= 60);
        let mut tasks: std::collections::BTreeMap<&'static str, i64> =
            ["waiting", "pending", "leased", "succeeded", "failed", "refused", "cancelled"]
                .into_iter()
                .map(|k| (k, 0))
                .collect();
        for t in self.store.tasks()? {
            *tasks.entry(t.state.metric_name()).or_default() += 1;
        }
        let mut rounds: std::collections::BTreeMap<&'static str, i64> =
            ["running", "completed", "failed", "cancelled"].into_iter().map(|k| (k, 0)).collect();
        for r in self.store.rounds()? {
            let k = match r.state {
                RoundState::Running => "running",
                RoundState::Completed => "completed",
                RoundState::Failed { .. } => "failed",
                RoundState::Cancelled => "cancelled",
            };
            *rounds.entry(k).or_default() += 1;
        }
        let v =
            |m: std::collections::BTreeMap<&'static str, i64>| m.into_iter().collect::<Vec<_>>();
        self.metrics.set_states(
            &[("approved", approved), ("pending", pending), ("revoked", revoked)],
            connected,
            &v(tasks),
            &v(rounds),
        );
        Ok(())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The caller's identity from its verified client certificate, refused when revoked or of
    /// the wrong role. Called by the interceptors of both services on every call.
    pub fn authenticate<T>(&self, req: &Request<T>, role: Role) -> SResult<Identity> {
        let certs = req.peer_certs().ok_or_else(|| {
            ServiceError::Unauthenticated(
                "no client certificate; connect with a certificate from `coordinator pki sign` (or a bundle from `pki issue-site` or `issue-admin`)"
                    .into(),
            )
        })?;
        let der = certs.first().ok_or_else(|| {
            ServiceError::Unauthenticated("the client certificate chain is empty".into())
        })?;
        let id = identity::from_der(der.as_ref()).map_err(ServiceError::Unauthenticated)?;
        if self.revocations.contains(&id.serial) {
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
        if id.role == Role::Site && role == Role::Site {
            self.contact.lock().unwrap_or_else(|e| e.into_inner()).insert(id.name.clone(), now_s());
            self.note_audit_head(&id.name, req.metadata());
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

    /// Keeps the audit-log head a site call carries (see `GetAuditAnchor`). A call without
    /// one, or with one that does not parse, is served all the same.
    fn note_audit_head(&self, site: &str, meta: &tonic::metadata::MetadataMap) {
        let text = |k| meta.get(k).and_then(|v| v.to_str().ok());
        let (Some(seq), Some(head)) =
            (text(proto::AUDIT_SEQ_HEADER), text(proto::AUDIT_HEAD_HEADER))
        else {
            return;
        };
        let (Ok(seq), true) =
            (seq.parse::<u64>(), head.len() == 64 && head.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            tracing::warn!(site, "a malformed audit head in a call's metadata; ignored");
            return;
        };
        let anchor = crate::store::AuditAnchorRecord { seq, head: head.into(), recorded: now_s() };
        match self.store.note_audit_anchor(site, &anchor) {
            Ok(Some(kept)) => tracing::warn!(
                site,
                reported = seq,
                kept = kept.seq,
                "the site reported an older audit-log entry than before: its log may have been \
                 cut or reset; `site-agent audit --verify` at the site compares it"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(site, error = %e, "could not keep the audit head"),
        }
    }

    // === rounds ===

    /// Expires leases, applies round deadlines and averages finished federated steps; run by
    /// the server's ticker.
    pub async fn tick(&self) -> SResult<()> {
        let result = async {
            self.tick_leases().await?;
            self.advance_federated().await
        }
        .await;
        if let Err(ServiceError::Store(StoreError::Sled(sled::Error::Io(_)))) = &result {
            self.metrics.store_stopped();
        }
        result
    }

    /// Whether the database still takes writes: one small write and a flush (sled refuses
    /// writes for good once one failed). Run by the ticker after a call was answered
    /// UNAVAILABLE or RESOURCE_EXHAUSTED; health follows it.
    pub async fn probe_store(&self) {
        if let Err(StoreError::Sled(sled::Error::Io(e))) = self.store.probe().await {
            tracing::error!(error = %e, "the database stopped after a failed write; health is NOT_SERVING until a restart");
            self.metrics.store_stopped();
        }
    }

    /// Expires ended leases, fails revoked sites' tasks and applies passed deadlines. Only
    /// the rounds something happened to are read: leases come from the index of leases by
    /// end time, a revoked site's tasks from the index by site.
    async fn tick_leases(&self) -> SResult<()> {
        let w = self.write.lock().await;
        let (now_ms, now_s) = (now_ms(), now_s());
        let mut affected = std::collections::BTreeSet::new();
        for id in self.store.expired_leases(now_ms)? {
            if let Some(t) = self.store.task(&id)? {
                affected.insert(t.round_id);
            }
        }
        let revoked: HashSet<String> = self
            .store
            .sites()?
            .into_iter()
            .filter(|s| self.site_revoked(s))
            .map(|s| s.name)
            .collect();
        for site in &revoked {
            for id in self.store.open_tasks_of_site(site)? {
                if let Some(t) = self.store.task(&id)? {
                    affected.insert(t.round_id);
                }
            }
        }
        for r in self.store.rounds()? {
            if r.state == RoundState::Running && now_s >= r.deadline {
                affected.insert(r.id);
            }
        }
        let mut changed = false;
        for round_id in affected {
            let Some(mut round) = self.store.round(&round_id)? else { continue };
            if round.state != RoundState::Running {
                continue;
            }
            let mut tasks = self.store.round_tasks(&round)?;
            let mut dirty: Vec<usize> = Vec::new();
            for (i, t) in tasks.iter_mut().enumerate() {
                if rounds::expire_lease(t, now_ms, round.max_attempts) {
                    tracing::info!(task = %t.id, site = %t.site, state = ?t.state, "lease expired");
                    self.metrics.lease_expired();
                    dirty.push(i);
                }
            }
            if rounds::fail_revoked(&mut tasks, |s| revoked.contains(s)) {
                tracing::warn!(round = %round.id, "the tasks of revoked sites failed");
                dirty = (0..tasks.len()).collect();
            }
            if rounds::apply_deadline(&round, &mut tasks, now_s)
                | rounds::release_waiting(&round, &mut tasks)
            {
                dirty = (0..tasks.len()).collect();
            }
            let settled = rounds::settle(&mut round, &tasks);
            if settled || !dirty.is_empty() {
                let changed_tasks: Vec<&TaskRecord> = dirty.iter().map(|&i| &tasks[i]).collect();
                self.store.commit(settled.then_some(&round), &changed_tasks, None)?;
                changed = true;
            }
        }
        drop(w);
        if changed {
            self.durable().await?;
        }
        Ok(())
    }

    /// The next task for `site`: a pending task of a running round, or one this site holds a
    /// lease on (an agent that asks again has dropped it, e.g. after a restart).
    async fn lease_next(&self, site: &str) -> SResult<Option<pb::Task>> {
        let w = self.write.lock().await;
        for id in self.store.open_tasks_of_site(site)? {
            let Some(mut task) = self.store.task(&id)? else { continue };
            if !matches!(task.state, TaskState::Pending | TaskState::Leased { .. }) {
                continue;
            }
            let Some(round) = self.store.round_shared(&task.round_id)? else { continue };
            if round.state != RoundState::Running || task.attempt >= round.max_attempts {
                continue;
            }
            task.attempt += 1;
            let lease = self.limits.lease_seconds;
            task.state = TaskState::Leased { deadline_ms: now_ms() + i64::from(lease) * 1000 };
            self.store.commit(None, &[&task], None)?;
            // Durable before the answer, but flushed without holding the write lock: leases
            // to other sites go on meanwhile, and concurrent flushes share one write.
            drop(w);
            self.durable().await?;
            // A transfer round's source task trains Model_S from scratch: no base.
            let view = rounds::task_view(&round, &task);
            let base = view.base.as_deref().map(|s| self.model_ref(s)).transpose()?;
            let tail = view.tail.as_deref().map(|s| self.model_ref(s)).transpose()?;
            tracing::info!(task = %task.id, site, attempt = task.attempt, "task leased");
            return Ok(Some(pb::Task {
                task_id: task.id,
                attempt: task.attempt,
                round_id: round.id.clone(),
                spec: Some(view.spec),
                base,
                lease_seconds: lease,
                tail,
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

fn identity_of<T>(req: &Request<T>) -> SResult<Identity> {
    req.extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| ServiceError::Unauthenticated("the call was not authenticated".into()))
}

mod admin;
mod backup;
mod blobs;
mod checks;
mod error;
mod federated;
mod feed;
mod records;
mod site;

pub use error::ServiceError;
use feed::{FedStream, Feed};

pub use checks::MAX_ARMS;
use checks::{check_result, reason_name};

pub use admin::AdminApi;
use records::model_info;
pub use site::SiteApi;
