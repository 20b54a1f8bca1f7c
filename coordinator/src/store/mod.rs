//! The coordinator's state in sled: sites, models, studies, rounds, tasks and results.
//!
//! Records are JSON in one tree per noun; protocol sub-messages (task specs, capabilities,
//! results) are kept as their protobuf bytes. Every change that spans trees (a task and its
//! round and its result) is one sled transaction, and callers flush before they answer.

use serde::{Serialize, de::DeserializeOwned};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

mod index;
mod records;
pub use records::{
    AuditAnchorRecord, FedAggregate, FedState, ModelRecord, RoundRecord, RoundState, SiteRecord,
    StudyRecord, TaskRecord, TaskState,
};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored {tree} record {key} is unreadable ({error}); the data dir may be damaged")]
    Corrupt { tree: &'static str, key: String, error: String },
    #[error(
        "the database has schema version {found}, and this coordinator reads up to version \
         {SCHEMA_VERSION}: it was written by a newer coordinator; run that version (or restore \
         a backup this version made)"
    )]
    Schema { found: u32 },
}

/// The layout of the database this coordinator writes: its trees and their records. Kept in
/// the `meta` tree (`schema_version`, 4 bytes big-endian) and checked at every open; a
/// database without it (written before it was kept) is version 1. Version 2 added the task
/// indexes ([`index`]), built from the tasks when a version-1 database is opened.
pub const SCHEMA_VERSION: u32 = 2;

pub type StoreResult<T> = Result<T, StoreError>;

/// The database and its trees.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    sites: sled::Tree,
    models: sled::Tree,
    model_names: sled::Tree,
    studies: sled::Tree,
    rounds: sled::Tree,
    tasks: sled::Tree,
    results: sled::Tree,
    audit_anchors: sled::Tree,
    indexes: index::Indexes,
    /// Sites with a task written as pending since [`Store::take_woken`] was last called: the
    /// long polls to wake.
    woken: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    flusher: std::sync::Arc<Flusher>,
    /// Rounds decoded lately, each with the bytes it was decoded from (see
    /// [`Store::round_shared`]).
    decoded: std::sync::Arc<std::sync::Mutex<DecodedRounds>>,
}

/// Rounds decoded lately, by id, with the stored bytes each was decoded from.
type DecodedRounds = std::collections::HashMap<String, (sled::IVec, std::sync::Arc<RoundRecord>)>;

/// Group commit's counters: flushes asked for, the last one a finished flush covered, and the
/// one-at-a-time lock.
#[derive(Debug, Default)]
struct Flusher {
    requested: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    running: tokio::sync::Mutex<()>,
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        error: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize to JSON")
}

impl Store {
    pub fn open(path: &std::path::Path) -> StoreResult<Self> {
        let db = sled::Config::new().path(path).open()?;
        let meta = db.open_tree("meta")?;
        let found = match meta.get("schema_version")? {
            Some(v) => <[u8; 4]>::try_from(v.as_ref()).map(u32::from_be_bytes).map_err(|_| {
                StoreError::Corrupt {
                    tree: "meta",
                    key: "schema_version".into(),
                    error: "not 4 bytes".into(),
                }
            })?,
            // A database this coordinator just made, or one written before the version was
            // kept (version 1): both get their indexes built below.
            None => 1,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::Schema { found });
        }
        let store = Self {
            sites: db.open_tree("sites")?,
            models: db.open_tree("models")?,
            model_names: db.open_tree("model_names")?,
            studies: db.open_tree("studies")?,
            rounds: db.open_tree("rounds")?,
            tasks: db.open_tree("tasks")?,
            results: db.open_tree("results")?,
            audit_anchors: db.open_tree("audit_anchors")?,
            indexes: index::Indexes {
                by_site: db.open_tree("index_site_tasks")?,
                by_round: db.open_tree("index_round_tasks")?,
                leases: db.open_tree("index_leases")?,
            },
            woken: Default::default(),
            flusher: Default::default(),
            decoded: Default::default(),
            db,
        };
        if found < SCHEMA_VERSION {
            store.indexes.rebuild(&store.tasks)?;
            meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            store.db.flush()?;
        }
        Ok(store)
    }

    /// Writes the time into `meta` and flushes: fails once sled has stopped after a failed
    /// write.
    pub async fn probe(&self) -> StoreResult<()> {
        self.db
            .open_tree("meta")?
            .insert("probed_unix", &shared::cert::now_unix().to_be_bytes())?;
        self.flush().await
    }

    /// The database itself, for backups.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every change so far durable. Concurrent callers share flushes (group commit):
    /// one runs at a time, and a caller whose changes a flush begun after them has already
    /// made durable returns without starting another. sled's own `flush_async` is not used: concurrent
    /// calls of it can wait forever (sled issue #1308, open for 0.34), which a thousand agents
    /// found here; its blocking `flush` runs on the blocking pool instead.
    pub async fn flush(&self) -> StoreResult<()> {
        use std::sync::atomic::Ordering;
        let f = &self.flusher;
        // Taken after the caller's writes: a flush that starts later covers them.
        let mine = f.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _one = f.running.lock().await;
        if f.done.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let upto = f.requested.load(Ordering::SeqCst);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(e)))??;
        f.done.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        tree: &sled::Tree,
        name: &'static str,
        key: &str,
    ) -> StoreResult<Option<T>> {
        tree.get(key)?.map(|v| decode(name, key.as_bytes(), &v)).transpose()
    }

    fn all<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> StoreResult<Vec<T>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(name, &k, &v)
            })
            .collect()
    }

    // === sites ===

    /// Keeps `anchor` for `site` unless a higher entry is already kept; returns the kept one
    /// it replaced or refused when that one is not on the same chain position (a site that
    /// reports a lower sequence number than before has a cut or reset log). Written without a
    /// flush: sled writes it out within its flush interval.
    pub fn note_audit_anchor(
        &self,
        site: &str,
        anchor: &AuditAnchorRecord,
    ) -> StoreResult<Option<AuditAnchorRecord>> {
        let mut lower = None;
        self.audit_anchors.fetch_and_update(site, |old| {
            let kept: Option<AuditAnchorRecord> = old.and_then(|b| serde_json::from_slice(b).ok());
            match kept {
                Some(k) if k.seq > anchor.seq => {
                    lower = Some(k.clone());
                    Some(encode(&k))
                }
                _ => Some(encode(anchor)),
            }
        })?;
        Ok(lower)
    }

    pub fn audit_anchor(&self, site: &str) -> StoreResult<Option<AuditAnchorRecord>> {
        Self::get(&self.audit_anchors, "audit_anchors", site)
    }

    pub fn site(&self, name: &str) -> StoreResult<Option<SiteRecord>> {
        Self::get(&self.sites, "sites", name)
    }
    pub fn sites(&self) -> StoreResult<Vec<SiteRecord>> {
        Self::all(&self.sites, "sites")
    }
    pub fn put_site(&self, site: &SiteRecord) -> StoreResult<()> {
        self.sites.insert(&site.name, encode(site))?;
        Ok(())
    }

    // === models ===

    pub fn model(&self, sha256: &str) -> StoreResult<Option<ModelRecord>> {
        Self::get(&self.models, "models", sha256)
    }
    /// A model by name or by sha256.
    pub fn model_by_ref(&self, name_or_sha: &str) -> StoreResult<Option<ModelRecord>> {
        if let Some(m) = self.model(name_or_sha)? {
            return Ok(Some(m));
        }
        match self.model_names.get(name_or_sha)? {
            Some(sha) => self.model(&String::from_utf8_lossy(&sha)),
            None => Ok(None),
        }
    }
    pub fn models(&self) -> StoreResult<Vec<ModelRecord>> {
        Self::all(&self.models, "models")
    }
    pub fn put_model(&self, m: &ModelRecord) -> StoreResult<()> {
        (&self.models, &self.model_names)
            .transaction(|(models, names)| {
                models.insert(m.sha256.as_bytes(), encode(m))?;
                names.insert(m.name.as_bytes(), m.sha256.as_bytes())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_error)
    }

    // === studies ===

    pub fn study(&self, name: &str) -> StoreResult<Option<StudyRecord>> {
        Self::get(&self.studies, "studies", name)
    }
    pub fn studies(&self) -> StoreResult<Vec<StudyRecord>> {
        Self::all(&self.studies, "studies")
    }
    pub fn put_study(&self, s: &StudyRecord) -> StoreResult<()> {
        self.studies.insert(&s.name, encode(s))?;
        Ok(())
    }

    // === rounds and tasks ===

    pub fn round(&self, id: &str) -> StoreResult<Option<RoundRecord>> {
        Self::get(&self.rounds, "rounds", id)
    }
    /// A round, decoded once while its stored bytes stay the same: a round of a thousand
    /// sites lists a thousand task ids, and every lease reads its round.
    pub fn round_shared(&self, id: &str) -> StoreResult<Option<std::sync::Arc<RoundRecord>>> {
        let Some(raw) = self.rounds.get(id)? else { return Ok(None) };
        let mut cache = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bytes, round)) = cache.get(id)
            && *bytes == raw
        {
            return Ok(Some(round.clone()));
        }
        let round: std::sync::Arc<RoundRecord> =
            std::sync::Arc::new(decode("rounds", id.as_bytes(), &raw)?);
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(id.to_owned(), (raw, round.clone()));
        Ok(Some(round))
    }
    pub fn rounds(&self) -> StoreResult<Vec<RoundRecord>> {
        Self::all(&self.rounds, "rounds")
    }
    pub fn task(&self, id: &str) -> StoreResult<Option<TaskRecord>> {
        Self::get(&self.tasks, "tasks", id)
    }
    pub fn tasks(&self) -> StoreResult<Vec<TaskRecord>> {
        Self::all(&self.tasks, "tasks")
    }
    pub fn round_tasks(&self, round: &RoundRecord) -> StoreResult<Vec<TaskRecord>> {
        round
            .tasks
            .iter()
            .map(|id| {
                self.task(id)?.ok_or_else(|| StoreError::Corrupt {
                    tree: "tasks",
                    key: id.clone(),
                    error: format!("task of round {} is missing", round.id),
                })
            })
            .collect()
    }
    /// `pb::TaskResult` bytes of a succeeded task.
    pub fn result(&self, task_id: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.results.get(task_id)?.map(|v| v.to_vec()))
    }

    /// Writes a round and its tasks (and a task's result) in one transaction, with the
    /// tasks' index entries.
    pub fn commit(
        &self,
        round: Option<&RoundRecord>,
        tasks: &[&TaskRecord],
        result: Option<(&str, &[u8])>,
    ) -> StoreResult<()> {
        let ix = &self.indexes;
        (&self.rounds, &self.tasks, &self.results, &ix.by_site, &ix.by_round, &ix.leases)
            .transaction(|(r, t, res, by_site, by_round, leases)| {
                if let Some(round) = round {
                    r.insert(round.id.as_bytes(), encode(round))?;
                }
                for task in tasks {
                    let old = t.insert(task.id.as_bytes(), encode(*task))?;
                    index::reindex([by_site, by_round, leases], old.as_deref(), task)?;
                }
                if let Some((id, bytes)) = result {
                    res.insert(id.as_bytes(), bytes)?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_error)?;
        let pending = tasks.iter().filter(|t| t.state == TaskState::Pending);
        self.woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pending.map(|t| t.site.clone()));
        Ok(())
    }

    /// The sites that got a pending task since the last call.
    pub fn take_woken(&self) -> std::collections::HashSet<String> {
        std::mem::take(&mut *self.woken.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The ids of `site`'s unfinished tasks (waiting, pending or leased), in id order.
    pub fn open_tasks_of_site(&self, site: &str) -> StoreResult<Vec<String>> {
        self.indexes
            .by_site
            .scan_prefix(index::prefix(site))
            .keys()
            .map(|k| Ok(index::task_of(&k?, false)))
            .collect()
    }

    /// Whether any task of the round but `except` is unfinished.
    pub fn round_has_open_tasks(&self, round_id: &str, except: &str) -> StoreResult<bool> {
        for k in self.indexes.by_round.scan_prefix(index::prefix(round_id)).keys() {
            if index::task_of(&k?, false) != except {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The ids of leased tasks whose lease ended at or before `now_ms`, soonest first.
    pub fn expired_leases(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.indexes
            .leases
            .range(..index::lease_key(now_ms.saturating_add(1), ""))
            .keys()
            .map(|k| Ok(index::task_of(&k?, true)))
            .collect()
    }
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_audit_anchor_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("open");
        let anchor =
            |seq: u64, head: &str| AuditAnchorRecord { seq, head: head.into(), recorded: 1 };
        assert_eq!(store.audit_anchor("a").expect("read"), None);
        assert_eq!(store.note_audit_anchor("a", &anchor(5, "h5")).expect("note"), None);
        assert_eq!(store.note_audit_anchor("a", &anchor(7, "h7")).expect("note"), None);
        // A lower entry (a cut or reset log) does not replace what the site reported before.
        let kept = store.note_audit_anchor("a", &anchor(2, "x2")).expect("note");
        assert_eq!(kept, Some(anchor(7, "h7")));
        assert_eq!(store.audit_anchor("a").expect("read"), Some(anchor(7, "h7")));
        assert_eq!(store.audit_anchor("b").expect("read"), None, "per site");
    }
}
