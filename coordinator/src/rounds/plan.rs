//! Round planning: from a study and the study lead's request to the round's record and one task
//! per site, with every refusal the request can earn. Pure: what it needs from the store (the
//! base model's config, how each site stands) comes in through [`PlanInputs`].

use std::collections::BTreeMap;

use prost::Message;
use proto::pb;
use shared::architecture::ModelConfig;

use crate::store::{FedState, RoundRecord, RoundState, StudyRecord, TaskRecord, TaskState};

/// The most arms one transfer task may run (and report).
pub const MAX_ARMS: usize = 64;
/// The most steps one federated round may run.
pub const MAX_FED_ROUNDS: u32 = 1000;
/// The longest round deadline a study lead may set: 90 days.
const MAX_DEADLINE_SECONDS: u32 = 90 * 86_400;

/// Why a round cannot start.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The request is wrong whatever the state: a bad spec or number.
    #[error("{0}")]
    Invalid(String),
    /// The request is fine but the consortium's state refuses it (a revoked site).
    #[error("{0}")]
    Precondition(String),
    /// Something the round needs is gone.
    #[error("{0}")]
    NotFound(String),
}

/// What planning reads besides the request.
#[derive(Debug)]
pub struct PlanInputs<'a> {
    pub study: &'a StudyRecord,
    /// The config name of the study's base model; `None` when it has none or the store no
    /// longer has it.
    pub base_config: Option<String>,
    /// How each of the study's sites stands.
    pub sites: BTreeMap<String, SiteStanding>,
    /// Used when the request leaves them 0.
    pub default_deadline_seconds: u32,
    pub default_max_attempts: u32,
    pub now_s: i64,
    pub now_ms: i64,
    /// The new round's id.
    pub id: String,
    /// Cross-eval rounds: every model of the study that can be scored (see
    /// `Coordinator::study_models`).
    pub models: Vec<pb::EvalModel>,
}

/// How a site stands for a new round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteStanding {
    /// Its task would fail at once.
    pub revoked: bool,
    /// What the study lead should know (revoked, never connected, not approved, silent).
    pub warnings: Vec<String>,
}

/// A planned round: its record, its tasks, and the warnings to give the study lead.
#[derive(Debug)]
pub struct Plan {
    pub round: RoundRecord,
    pub tasks: Vec<TaskRecord>,
    pub warnings: Vec<String>,
    pub kind: pb::TaskKind,
}

/// Epochs, batch size and learning rate within sane bounds.
pub fn check_spec_numbers(spec: &pb::TaskSpec) -> Result<(), String> {
    if spec.epochs > 10_000 || spec.batch_size > 4096 {
        return Err("epochs <= 10000 and batch_size <= 4096".into());
    }
    if !(spec.learning_rate.is_finite() && spec.learning_rate >= 0.0 && spec.learning_rate < 10.0) {
        return Err(format!("learning_rate = {} is not a learning rate", spec.learning_rate));
    }
    Ok(())
}

/// Plans a round of `body` over `inputs.study`.
pub fn plan(body: pb::StartRoundRequest, inputs: &PlanInputs<'_>) -> Result<Plan, PlanError> {
    let study = inputs.study;
    let bad = PlanError::Invalid;
    let spec = body.spec.ok_or_else(|| bad("a round needs a task spec".into()))?;
    let kind = pb::TaskKind::try_from(spec.kind).unwrap_or(pb::TaskKind::Unspecified);
    // Model_S is the study's base model, or is trained by the round's source site when the
    // study has none yet. A source site never runs the target arms.
    let source = (!body.source_site.is_empty()).then_some(body.source_site.as_str());
    if let Some(site) = source {
        if kind != pb::TaskKind::TransferTarget {
            return Err(bad("a source site is for transfer rounds".into()));
        }
        if !study.sites.iter().any(|s| s == site) {
            return Err(bad(format!(
                "source site \"{site}\" is not one of study {}'s sites ({})",
                study.name,
                study.sites.join(", ")
            )));
        }
        if study.sites.len() < 2 {
            return Err(bad("a transfer round needs a target site besides the source".into()));
        }
    }
    // Each replicate of a replicated study trains its own Model_S.
    let trains_source = source.is_some() && (study.base_sha256.is_empty() || spec.replicate > 0);
    if spec.replicate > spec.replicates || (spec.replicates > 0 && spec.replicate == 0) {
        return Err(bad(format!(
            "replicate {} of {}: replicates are numbered 1 to their count",
            spec.replicate, spec.replicates
        )));
    }
    for s in &body.sites {
        if !study.sites.contains(s) {
            return Err(bad(format!(
                "site \"{s}\" is not one of study {}'s sites ({})",
                study.name,
                study.sites.join(", ")
            )));
        }
    }
    let source_spec = if trains_source {
        let mut ss = body.source_spec.clone().unwrap_or_default();
        ss.kind = pb::TaskKind::TransferSource as i32;
        ss.arms.clear();
        if ss.config.is_empty() {
            ss.config = spec.config.clone();
        }
        check_spec_numbers(&ss).map_err(bad)?;
        Some(ss)
    } else {
        None
    };
    // Model_S's config, to check the arms' k against (and to default it).
    let config_name = match &source_spec {
        Some(ss) => Some(if ss.config.is_empty() { "small".to_owned() } else { ss.config.clone() }),
        None if kind == pb::TaskKind::Train => None,
        None => {
            if study.base_sha256.is_empty() {
                return Err(bad(format!(
                    "study {} has no base model: push one and create the study with --base, or name a --source site that trains Model_S",
                    study.name
                )));
            }
            Some(inputs.base_config.clone().ok_or_else(|| {
                PlanError::NotFound(format!("the study's base model {} is gone", study.base_sha256))
            })?)
        }
    };
    let config = config_name
        .map(|name| {
            ModelConfig::preset(&name)
                .map_err(|_| bad(format!("config \"{name}\": use tiny, small or resnet103")))
        })
        .transpose()?;
    let base_layers = config.as_ref().map_or(0, |c| c.num_layers() as u32);
    let mut spec = spec;
    if let Some(config) = &config {
        // k = 0: the paper's share of the layers.
        for arm in spec
            .arms
            .iter_mut()
            .filter(|a| a.kind == pb::ArmKind::Finetune as i32 && a.trainable_layers == 0)
        {
            arm.trainable_layers = config.default_trainable_layers() as u32;
        }
        if kind == pb::TaskKind::Fedavg && spec.trainable_layers == 0 {
            spec.trainable_layers = config.default_trainable_layers() as u32;
        }
    }
    if kind == pb::TaskKind::CrossEval {
        if inputs.models.is_empty() {
            return Err(PlanError::Precondition(format!(
                "study {} has no model to score yet: run a transfer round first",
                study.name
            )));
        }
        spec.models = inputs.models.clone();
    }
    check_kind(kind, &spec, base_layers)?;
    check_spec_numbers(&spec).map_err(bad)?;
    // One task per study site (or per site named); a source site that does not train
    // Model_S has none.
    let named = |s: &str| body.sites.is_empty() || body.sites.iter().any(|n| n == s);
    let sites: Vec<&String> = study
        .sites
        .iter()
        .filter(|s| trains_source || source != Some(s.as_str()))
        .filter(|s| named(s) || (trains_source && source == Some(s.as_str())))
        .collect();
    let n = sites.len() as u32;
    let quorum = if body.quorum == 0 { n } else { body.quorum };
    if quorum > n {
        return Err(bad(format!("quorum {quorum} is more than the round's {n} sites")));
    }
    let standing: Vec<&SiteStanding> = sites.iter().filter_map(|s| inputs.sites.get(*s)).collect();
    let warnings: Vec<String> = standing.iter().flat_map(|s| s.warnings.clone()).collect();
    let revoked: Vec<&String> = sites
        .iter()
        .copied()
        .filter(|s| inputs.sites.get(*s).is_some_and(|st| st.revoked))
        .collect();
    if let Some(s) = source.filter(|s| trains_source && revoked.iter().any(|r| r == s)) {
        return Err(PlanError::Precondition(format!(
            "the source site {s} is revoked: it cannot train Model_S; reinstate it \
             (`coordinator site approve {s} --reinstate`) or name another --source"
        )));
    }
    let usable = n - revoked.len() as u32;
    if quorum > usable {
        return Err(PlanError::Precondition(format!(
            "site(s) {} of study {} are revoked, so their tasks would fail at once and the \
             quorum of {quorum} cannot be met by the other {usable}: reinstate them \
             (`coordinator site approve NAME --reinstate`) or pass --quorum {usable}",
            revoked.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            study.name
        )));
    }
    if body.deadline_seconds > MAX_DEADLINE_SECONDS {
        return Err(bad(format!(
            "deadline_seconds = {} is more than {} days; a round that long is a mistake",
            body.deadline_seconds,
            MAX_DEADLINE_SECONDS / 86_400
        )));
    }
    let deadline = if body.deadline_seconds == 0 {
        inputs.default_deadline_seconds
    } else {
        body.deadline_seconds
    };
    let max_attempts = if body.max_attempts == 0 {
        inputs.default_max_attempts
    } else {
        body.max_attempts.min(100)
    };
    let id = inputs.id.clone();
    let fed = (kind == pb::TaskKind::Fedavg).then(|| {
        let f = spec.fed.unwrap_or_default();
        FedState {
            rounds: f.rounds,
            step: 1,
            keep_local_bn: f.keep_local_bn,
            prox_mu: f.prox_mu,
            participants: sites.iter().map(|s| (*s).clone()).collect(),
            aggregates: Vec::new(),
        }
    });
    let tasks: Vec<TaskRecord> = sites
        .iter()
        .map(|s| {
            let is_source = trains_source && source == Some(s.as_str());
            TaskRecord {
                id: if fed.is_some() { format!("{id}.s1.{s}") } else { format!("{id}.{s}") },
                fed_step: u32::from(fed.is_some()),
                round_id: id.clone(),
                site: (*s).clone(),
                // Targets wait for Model_S when the source trains it.
                state: if trains_source && !is_source {
                    TaskState::Waiting
                } else {
                    TaskState::Pending
                },
                attempt: 0,
                progress: Vec::new(),
                source: is_source,
                ..Default::default()
            }
        })
        .collect();
    let round = RoundRecord {
        id,
        study: study.name.clone(),
        spec: spec.encode_to_vec(),
        // Set when the source site uploads Model_S.
        base_sha256: (kind != pb::TaskKind::Train && !trains_source)
            .then(|| study.base_sha256.clone()),
        quorum,
        max_attempts,
        created: inputs.now_s,
        created_ms: inputs.now_ms,
        deadline: inputs.now_s + i64::from(deadline),
        state: RoundState::Running,
        tasks: tasks.iter().map(|t| t.id.clone()).collect(),
        source_spec: source_spec.map(|s| s.encode_to_vec()),
        fed,
    };
    Ok(Plan { round, tasks, warnings, kind })
}

/// What each task kind requires of its spec; `base_layers` is Model_S's depth (0 when none).
fn check_kind(kind: pb::TaskKind, spec: &pb::TaskSpec, base_layers: u32) -> Result<(), PlanError> {
    let bad = PlanError::Invalid;
    match kind {
        pb::TaskKind::Unspecified | pb::TaskKind::TransferSource => {
            return Err(bad(
                "task kind: use evaluate, finetune, train, transfer, fedavg or cross-eval".into(),
            ));
        }
        pb::TaskKind::Finetune => {
            if spec.trainable_layers == 0 || spec.trainable_layers > base_layers {
                return Err(bad(format!(
                    "trainable_layers = {}; the base model has {base_layers} layers",
                    spec.trainable_layers
                )));
            }
        }
        pb::TaskKind::Train => {
            if !spec.config.is_empty() && ModelConfig::preset(&spec.config).is_err() {
                return Err(bad(format!(
                    "config \"{}\": use tiny, small or resnet103",
                    spec.config
                )));
            }
        }
        pb::TaskKind::TransferTarget => {
            if spec.arms.is_empty() || spec.arms.len() > MAX_ARMS {
                return Err(bad(format!(
                    "a transfer round runs 1 to {MAX_ARMS} arms, not {}",
                    spec.arms.len()
                )));
            }
            for (i, arm) in spec.arms.iter().enumerate() {
                let ak = pb::ArmKind::try_from(arm.kind).unwrap_or(pb::ArmKind::Unspecified);
                if ak == pb::ArmKind::Unspecified {
                    return Err(bad(format!("arm {i}: kind is base, scratch or finetune")));
                }
                if ak == pb::ArmKind::Finetune
                    && (arm.trainable_layers == 0 || arm.trainable_layers > base_layers)
                {
                    return Err(bad(format!(
                        "arm {i}: trainable_layers = {}; Model_S has {base_layers} layers",
                        arm.trainable_layers
                    )));
                }
                check_spec_numbers(&pb::TaskSpec {
                    epochs: arm.epochs,
                    learning_rate: arm.learning_rate,
                    ..Default::default()
                })
                .map_err(|m| bad(format!("arm {i}: {m}")))?;
            }
        }
        pb::TaskKind::Fedavg => {
            let fed = spec.fed.unwrap_or_default();
            if fed.rounds == 0 || fed.rounds > MAX_FED_ROUNDS {
                return Err(bad(format!(
                    "a federated round runs 1 to {MAX_FED_ROUNDS} steps (--rounds), not {}",
                    fed.rounds
                )));
            }
            if !(fed.prox_mu.is_finite() && (0.0..1000.0).contains(&fed.prox_mu)) {
                return Err(bad(format!("prox_mu = {} is not in 0..1000", fed.prox_mu)));
            }
            if spec.trainable_layers == 0 || spec.trainable_layers > base_layers {
                return Err(bad(format!(
                    "trainable_layers = {}; the base model has {base_layers} layers",
                    spec.trainable_layers
                )));
            }
        }
        pb::TaskKind::Evaluate | pb::TaskKind::CrossEval => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(base: &str) -> StudyRecord {
        StudyRecord {
            name: "s".into(),
            base_sha256: base.into(),
            sites: vec!["src".into(), "a".into(), "b".into()],
            created: 0,
        }
    }

    fn transfer(source: &str) -> pb::StartRoundRequest {
        pb::StartRoundRequest {
            study: "s".into(),
            spec: Some(pb::TaskSpec {
                kind: pb::TaskKind::TransferTarget as i32,
                config: "tiny".into(),
                arms: vec![pb::ArmSpec {
                    kind: pb::ArmKind::Finetune as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            source_site: source.into(),
            ..Default::default()
        }
    }

    fn run(
        body: pb::StartRoundRequest,
        study: &StudyRecord,
        revoked: &[&str],
    ) -> Result<Plan, PlanError> {
        let sites = study
            .sites
            .iter()
            .map(|s| {
                let revoked = revoked.contains(&s.as_str());
                let warnings = if revoked { vec![format!("{s} revoked")] } else { vec![] };
                (s.clone(), SiteStanding { revoked, warnings })
            })
            .collect();
        plan(
            body,
            &PlanInputs {
                study,
                base_config: Some("tiny".into()),
                sites,
                default_deadline_seconds: 600,
                default_max_attempts: 3,
                now_s: 1000,
                now_ms: 1_000_000,
                id: "r1".into(),
                models: Vec::new(),
            },
        )
    }

    #[test]
    fn a_source_that_trains_model_s_holds_the_targets_back() {
        let p = run(transfer("src"), &study(""), &[]).unwrap();
        let states: Vec<(&str, bool, &TaskState)> =
            p.tasks.iter().map(|t| (t.site.as_str(), t.source, &t.state)).collect();
        assert_eq!(
            states,
            [
                ("src", true, &TaskState::Pending),
                ("a", false, &TaskState::Waiting),
                ("b", false, &TaskState::Waiting)
            ]
        );
        assert_eq!(p.round.base_sha256, None);
        assert_eq!(p.round.deadline, 1600);
        // k = 0 became the paper's share of tiny's layers.
        let spec = pb::TaskSpec::decode(p.round.spec.as_slice()).unwrap();
        let tiny = ModelConfig::preset("tiny").unwrap();
        assert_eq!(spec.arms[0].trainable_layers as usize, tiny.default_trainable_layers());
    }

    #[test]
    fn with_a_base_model_the_source_runs_nothing() {
        let p = run(transfer("src"), &study("abc"), &[]).unwrap();
        let sites: Vec<&str> = p.tasks.iter().map(|t| t.site.as_str()).collect();
        assert_eq!(sites, ["a", "b"]);
        assert!(p.tasks.iter().all(|t| t.state == TaskState::Pending));
        assert_eq!(p.round.base_sha256.as_deref(), Some("abc"));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let s = study("");
        let mut no_base = transfer("");
        no_base.source_site.clear();
        assert!(
            matches!(run(no_base, &s, &[]), Err(PlanError::Invalid(m)) if m.contains("no base model"))
        );
        let mut q = transfer("src");
        q.quorum = 4;
        assert!(matches!(run(q, &s, &[]), Err(PlanError::Invalid(m)) if m.contains("quorum 4")));
        assert!(matches!(run(transfer("src"), &s, &["src"]),
            Err(PlanError::Precondition(m)) if m.contains("source site src is revoked")));
        assert!(matches!(run(transfer("src"), &s, &["a"]),
            Err(PlanError::Precondition(m)) if m.contains("quorum of 3")));
        let mut lower = transfer("src");
        lower.quorum = 2;
        let p = run(lower, &s, &["a"]).unwrap();
        assert_eq!(p.warnings, ["a revoked"]);
        let mut far = transfer("src");
        far.deadline_seconds = MAX_DEADLINE_SECONDS + 1;
        assert!(matches!(run(far, &s, &[]), Err(PlanError::Invalid(m)) if m.contains("days")));
        assert!(matches!(run(transfer("elsewhere"), &s, &[]),
            Err(PlanError::Invalid(m)) if m.contains("not one of study s's sites")));
    }
}
