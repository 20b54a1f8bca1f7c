//! The records the store keeps, one type per noun, as JSON.

use serde::{Deserialize, Serialize};

/// A site as the coordinator knows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    pub approved: bool,
    pub revoked: bool,
    /// Fingerprints of certificates revoked through the admin API.
    #[serde(default)]
    pub revoked_fingerprints: Vec<String>,
    pub last_seen: i64,
    pub cert_not_after: i64,
    /// sha256 of the certificate the site last said hello with, to tell when
    /// `pki revoke` put it on the revocation list.
    #[serde(default)]
    pub fingerprint: String,
    /// Serial number (hex) of that certificate, as the CA's CRL lists it.
    #[serde(default)]
    pub serial: String,
    /// The agent version its last Hello gave (at most 64 printable characters).
    #[serde(default)]
    pub agent_version: String,
    /// `pb::Capabilities` and `pb::DatasetSummary` bytes from the last Hello.
    pub capabilities: Vec<u8>,
    pub dataset: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRecord {
    pub sha256: String,
    pub size: u64,
    pub name: String,
    pub created: i64,
    pub config: String,
    pub layers: u32,
    /// A tail file: the sha256 of the model it applies to, and how many last layers it holds.
    #[serde(default)]
    pub tail_of: Option<String>,
    #[serde(default)]
    pub tail_layers: u32,
}

impl ModelRecord {
    /// The record of a stored weights file: its sha256, size, name and what its manifest says.
    pub fn of(
        sha256: String,
        size: u64,
        name: String,
        created: i64,
        m: &shared::weights::WeightsManifest,
    ) -> Self {
        Self {
            sha256,
            size,
            name,
            created,
            config: m.config.name.clone(),
            layers: m.layers.len() as u32,
            tail_of: m.tail.as_ref().map(|t| t.base_sha256.clone()),
            tail_layers: m.tail.as_ref().map_or(0, |t| t.layers as u32),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudyRecord {
    pub name: String,
    /// Empty for a study without a pushed base model (its transfer rounds train Model_S).
    pub base_sha256: String,
    pub sites: Vec<String>,
    pub created: i64,
}

/// Round lifecycle: Running -> Completed | Failed | Cancelled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundState {
    #[default]
    Running,
    Completed,
    Failed {
        reason: String,
    },
    Cancelled,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundRecord {
    pub id: String,
    pub study: String,
    /// `pb::TaskSpec` bytes.
    pub spec: Vec<u8>,
    pub base_sha256: Option<String>,
    pub quorum: u32,
    pub max_attempts: u32,
    pub created: i64,
    /// Unix milliseconds of creation, to order rounds started within a second (0 in records
    /// written before it was kept).
    #[serde(default)]
    pub created_ms: i64,
    /// Unix seconds.
    pub deadline: i64,
    pub state: RoundState,
    pub tasks: Vec<String>,
    /// Transfer rounds with a source site: the source task's `pb::TaskSpec` bytes.
    #[serde(default)]
    pub source_spec: Option<Vec<u8>>,
    /// Federated rounds: which step runs and what each finished step averaged.
    #[serde(default)]
    pub fed: Option<FedState>,
}

/// A federated round's progress: R steps, each one task per participant then an average.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FedState {
    pub rounds: u32,
    /// The step running now (1-based).
    pub step: u32,
    pub keep_local_bn: bool,
    pub prox_mu: f64,
    /// The sites that take part, in order.
    pub participants: Vec<String>,
    /// One per finished step, in order.
    pub aggregates: Vec<FedAggregate>,
}

/// One averaging of a federated round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FedAggregate {
    pub step: u32,
    pub tail_sha256: String,
    pub sites: Vec<String>,
    pub cases: Vec<u32>,
    pub tail_bytes: u64,
}

/// Task lifecycle: Pending -> Leased -> Succeeded | Failed | Refused; Cancelled with its
/// round; an expired lease returns to Pending while attempts remain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// A transfer round's target task, until the source site uploads Model_S.
    Waiting,
    #[default]
    Pending,
    /// `deadline_ms`: Unix milliseconds when the lease ends unless renewed.
    Leased {
        deadline_ms: i64,
    },
    Succeeded,
    Failed {
        reason: String,
    },
    Refused {
        reason: String,
    },
    Cancelled,
}

impl TaskState {
    /// The state's name as a metric label.
    pub fn metric_name(&self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Pending => "pending",
            TaskState::Leased { .. } => "leased",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed { .. } => "failed",
            TaskState::Refused { .. } => "refused",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl TaskState {
    pub fn is_final(&self) -> bool {
        !matches!(self, TaskState::Waiting | TaskState::Pending | TaskState::Leased { .. })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub round_id: String,
    pub site: String,
    pub state: TaskState,
    /// Leases handed out so far; the current lease's number.
    pub attempt: u32,
    /// `pb::Progress` bytes from the last heartbeat.
    #[serde(default)]
    pub progress: Vec<u8>,
    /// The source site's task of a transfer round (it runs the round's `source_spec`).
    #[serde(default)]
    pub source: bool,
    /// Weights bytes sent to the site for this task (FetchModel) and received (UploadModel).
    #[serde(default)]
    pub bytes_down: u64,
    #[serde(default)]
    pub bytes_up: u64,
    /// A federated round's step this task belongs to (1-based; 0 otherwise).
    #[serde(default)]
    pub fed_step: u32,
    /// What the site uploaded for this task: arm index -> sha256.
    #[serde(default)]
    pub uploads: std::collections::BTreeMap<u32, String>,
}

/// The newest head of a site's audit log the site reported (see `GetAuditAnchor`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAnchorRecord {
    pub seq: u64,
    /// The entry's hash, hex.
    pub head: String,
    pub recorded: i64,
}

impl RoundRecord {
    /// When the round was created, in Unix milliseconds, for ordering.
    pub fn created_millis(&self) -> i64 {
        if self.created_ms > 0 { self.created_ms } else { self.created.saturating_mul(1000) }
    }
}
