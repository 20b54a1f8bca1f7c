//! The round and task state machine as pure functions over records, tested without I/O, and
//! round planning ([`plan`]).

use prost::Message;
use proto::pb;

use crate::store::{RoundRecord, RoundState, TaskRecord, TaskState};

pub mod fedavg;
pub mod plan;
pub mod tails;

pub use plan::{MAX_ARMS, Plan, PlanError, PlanInputs, SiteStanding};

/// What one task runs: its spec as that site gets it, and the models it uses.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskView {
    pub spec: pb::TaskSpec,
    /// The full model it starts from (none for a model trained from scratch).
    pub base: Option<String>,
    /// A federated step's global tail, applied over `base`.
    pub tail: Option<String>,
}

impl TaskView {
    /// Every model the task's site may fetch for it.
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = self.base.iter().chain(&self.tail).cloned().collect();
        for m in &self.spec.models {
            out.extend(m.base.iter().chain(&m.tail).map(|r| r.sha256.clone()));
        }
        out
    }
}

/// The task as its site gets it: a source runs the round's source spec from scratch; a
/// federated step names its step and the previous step's average; a cross-eval lists the
/// shared models and the site's own.
pub fn task_view(round: &RoundRecord, task: &TaskRecord) -> TaskView {
    if task.source {
        let spec = round.source_spec.as_deref().unwrap_or_default();
        return TaskView {
            spec: pb::TaskSpec::decode(spec).unwrap_or_default(),
            base: None,
            tail: None,
        };
    }
    let mut spec = pb::TaskSpec::decode(round.spec.as_slice()).unwrap_or_default();
    if let Some(fed) = spec.fed.as_mut() {
        fed.step = task.fed_step;
    }
    spec.models.retain(|m| m.shared || m.owner == task.site);
    TaskView { spec, base: round.base_sha256.clone(), tail: fedavg::tail_for(round, task) }
}

/// What a task may upload for one arm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upload {
    /// A source's Model_S: a full model.
    Full,
    /// A trained tail of `layers` layers over the round's base model `base`.
    Tail { base: String, layers: u32 },
}

impl Upload {
    /// Whether a stored model is what this upload must be (a retried upload).
    pub fn fits(&self, m: &crate::store::ModelRecord) -> bool {
        match self {
            Upload::Full => m.tail_of.is_none(),
            Upload::Tail { base, layers } => {
                m.tail_of.as_deref() == Some(base.as_str()) && m.tail_layers == *layers
            }
        }
    }

    /// The stored model's name.
    pub fn name(&self, task_id: &str, arm: u32) -> String {
        match self {
            Upload::Full => format!("model-s-{}", task_id.split('.').next().unwrap_or_default()),
            Upload::Tail { .. } => format!("tail-{task_id}.arm{arm}"),
        }
    }
}

/// What `task` may upload as arm `arm`, if anything: a source's Model_S (its one arm), a
/// federated step's trained tail (arm 1), a transfer target's Model_ST tail where the arm
/// says `share`.
pub fn upload_expected(round: &RoundRecord, task: &TaskRecord, arm: u32) -> Option<Upload> {
    if task.source {
        return (arm == 0).then_some(Upload::Full);
    }
    let base = round.base_sha256.clone()?;
    let spec = pb::TaskSpec::decode(round.spec.as_slice()).ok()?;
    if round.fed.is_some() {
        return (arm == 1).then_some(Upload::Tail { base, layers: spec.trainable_layers });
    }
    if spec.kind != pb::TaskKind::TransferTarget as i32 {
        return None;
    }
    let a = spec.arms.get(arm as usize)?;
    (a.kind == pb::ArmKind::Finetune as i32 && a.share)
        .then_some(Upload::Tail { base, layers: a.trainable_layers })
}

/// Returns an expired lease to Pending, or fails the task once `max_attempts` leases expired.
/// Returns whether the task changed.
pub fn expire_lease(task: &mut TaskRecord, now_ms: i64, max_attempts: u32) -> bool {
    let TaskState::Leased { deadline_ms } = task.state else { return false };
    if deadline_ms > now_ms {
        return false;
    }
    task.state = if task.attempt >= max_attempts {
        // Out of attempts: the site kept taking the task and going silent.
        TaskState::Failed { reason: format!("lease expired {} times", task.attempt) }
    } else {
        // Back in the queue for the site's next poll.
        TaskState::Pending
    };
    true
}

/// Fails every unfinished task once the round's deadline has passed. Returns whether any
/// task changed.
pub fn apply_deadline(round: &RoundRecord, tasks: &mut [TaskRecord], now_s: i64) -> bool {
    if round.state != RoundState::Running || now_s < round.deadline {
        return false;
    }
    let mut changed = false;
    for t in tasks.iter_mut().filter(|t| !t.state.is_final()) {
        t.state = TaskState::Failed { reason: "round deadline passed".into() };
        changed = true;
    }
    changed
}

/// Moves a transfer round's waiting target tasks on once its source task is final: to
/// Pending when the source succeeded and Model_S is known (`round.base_sha256`), else to
/// Failed. Returns whether any task changed.
pub fn release_waiting(round: &RoundRecord, tasks: &mut [TaskRecord]) -> bool {
    let Some(source) = tasks.iter().find(|t| t.source) else { return false };
    if !source.state.is_final() {
        return false;
    }
    let next = if source.state == TaskState::Succeeded && round.base_sha256.is_some() {
        TaskState::Pending
    } else {
        TaskState::Failed {
            reason: format!("the source site {} did not deliver Model_S", source.site),
        }
    };
    let mut changed = false;
    for t in tasks.iter_mut().filter(|t| t.state == TaskState::Waiting) {
        t.state = next.clone();
        changed = true;
    }
    changed
}

/// Fails the unfinished tasks of revoked sites: they will not be served again, so the round
/// need not wait for its deadline. Returns whether any task changed.
pub fn fail_revoked(tasks: &mut [TaskRecord], revoked: impl Fn(&str) -> bool) -> bool {
    let mut changed = false;
    for t in tasks.iter_mut().filter(|t| !t.state.is_final() && revoked(&t.site)) {
        t.state = TaskState::Failed { reason: format!("site {} was revoked", t.site) };
        changed = true;
    }
    changed
}

/// Settles a running round once every task is final: Completed when at least `quorum` tasks
/// succeeded, Failed otherwise. Returns whether the round changed.
/// Federated rounds settle step by step instead (see [`fedavg::step`]).
pub fn settle(round: &mut RoundRecord, tasks: &[TaskRecord]) -> bool {
    if round.fed.is_some() {
        return false;
    }
    if round.state != RoundState::Running || !tasks.iter().all(|t| t.state.is_final()) {
        return false;
    }
    let succeeded = tasks.iter().filter(|t| t.state == TaskState::Succeeded).count() as u32;
    round.state = if succeeded >= round.quorum {
        RoundState::Completed
    } else {
        RoundState::Failed {
            reason: format!(
                "{succeeded} of {} sites succeeded; the quorum is {}",
                tasks.len(),
                round.quorum
            ),
        }
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState, attempt: u32) -> TaskRecord {
        TaskRecord {
            id: "t".into(),
            round_id: "r".into(),
            site: "s".into(),
            state,
            attempt,
            progress: Vec::new(),
            source: false,
            ..Default::default()
        }
    }

    fn round(quorum: u32, deadline: i64) -> RoundRecord {
        RoundRecord {
            id: "r".into(),
            study: "st".into(),
            spec: Vec::new(),
            base_sha256: None,
            quorum,
            max_attempts: 3,
            created: 0,
            created_ms: 0,
            deadline,
            state: RoundState::Running,
            tasks: vec!["t".into()],
            source_spec: None,
            fed: None,
        }
    }

    #[test]
    fn a_revoked_sites_unfinished_task_fails_and_the_round_settles_by_quorum() {
        let mut r = round(1, 1000);
        let mut tasks =
            vec![task(TaskState::Succeeded, 1), task(TaskState::Leased { deadline_ms: 5 }, 1)];
        tasks[1].site = "gone".into();
        assert!(!fail_revoked(&mut tasks, |s| s == "nobody"));
        assert!(!settle(&mut r, &tasks), "the other site still runs");
        assert!(fail_revoked(&mut tasks, |s| s == "gone"));
        assert!(
            matches!(&tasks[1].state, TaskState::Failed { reason } if reason.contains("revoked"))
        );
        assert_eq!(tasks[0].state, TaskState::Succeeded, "a final task is left as it is");
        assert!(!fail_revoked(&mut tasks, |s| s == "gone"), "once");
        assert!(settle(&mut r, &tasks));
        assert_eq!(r.state, RoundState::Completed, "1 of 2 meets the quorum of 1");
    }

    #[test]
    fn waiting_targets_follow_their_source() {
        let mut r = round(3, 1000);
        let mut src = task(TaskState::Leased { deadline_ms: 5 }, 1);
        src.source = true;
        let mut tasks = vec![src, task(TaskState::Waiting, 0), task(TaskState::Waiting, 0)];
        assert!(!release_waiting(&r, &mut tasks), "the source is still running");
        assert!(!settle(&mut r, &tasks), "waiting tasks are not final");
        tasks[0].state = TaskState::Succeeded;
        r.base_sha256 = Some("ab".into());
        assert!(release_waiting(&r, &mut tasks));
        assert!(tasks[1..].iter().all(|t| t.state == TaskState::Pending));
        assert!(!release_waiting(&r, &mut tasks), "released once");

        let mut tasks = vec![tasks[0].clone(), task(TaskState::Waiting, 0)];
        tasks[0].state = TaskState::Refused { reason: "sharing not allowed".into() };
        assert!(release_waiting(&r, &mut tasks));
        assert!(
            matches!(&tasks[1].state, TaskState::Failed { reason } if reason.contains("Model_S"))
        );
        let mut r2 = round(2, 1000);
        assert!(settle(&mut r2, &tasks));
        assert!(matches!(r2.state, RoundState::Failed { .. }));
    }

    #[test]
    fn leases_expire_back_to_pending_then_fail() {
        let mut t = task(TaskState::Leased { deadline_ms: 100 }, 1);
        assert!(!expire_lease(&mut t, 99, 3));
        assert!(expire_lease(&mut t, 100, 3));
        assert_eq!(t.state, TaskState::Pending);
        let mut t = task(TaskState::Leased { deadline_ms: 100 }, 3);
        assert!(expire_lease(&mut t, 200, 3));
        assert!(matches!(t.state, TaskState::Failed { .. }));
        let mut t = task(TaskState::Succeeded, 1);
        assert!(!expire_lease(&mut t, 200, 3));
    }

    #[test]
    fn rounds_settle_by_quorum_once_all_tasks_are_final() {
        let mut r = round(2, 1000);
        let mut tasks = vec![task(TaskState::Succeeded, 1), task(TaskState::Pending, 0)];
        assert!(!settle(&mut r, &tasks));
        tasks[1].state = TaskState::Failed { reason: "x".into() };
        assert!(settle(&mut r, &tasks));
        assert!(matches!(r.state, RoundState::Failed { .. }));
        let mut r = round(1, 1000);
        assert!(settle(&mut r, &tasks));
        assert_eq!(r.state, RoundState::Completed);
        assert!(!settle(&mut r, &tasks), "a settled round stays settled");
    }

    #[test]
    fn the_deadline_fails_unfinished_tasks() {
        let r = round(1, 1000);
        let mut tasks =
            vec![task(TaskState::Succeeded, 1), task(TaskState::Leased { deadline_ms: 5 }, 1)];
        assert!(!apply_deadline(&r, &mut tasks, 999));
        assert!(apply_deadline(&r, &mut tasks, 1000));
        assert_eq!(tasks[0].state, TaskState::Succeeded);
        assert!(matches!(tasks[1].state, TaskState::Failed { .. }));
    }
}
