//! The report's reproducibility record: when and by which coordinator it was made, each
//! site's device and agent version, and per round its hyperparameters (the task spec as the
//! protocol's JSON), seeds, dates and, per site and arm, the weights' sha256 (and the uploaded
//! tail's), so that any number in the report can be traced to the weights that made it.

use proto::pb;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub generated_utc: String,
    pub coordinator_version: String,
    pub base_sha256: String,
    pub sites: Vec<SiteRecord>,
    pub rounds: Vec<RoundRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub site: String,
    pub agent_version: String,
    /// "cpu", or the GPU's name and memory, from the site's last Hello.
    pub device: String,
    pub threads: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: String,
    pub kind: String,
    pub state: String,
    pub created_utc: String,
    pub seed: u64,
    /// The task spec, every hyperparameter included (the protocol's JSON mapping).
    pub spec: serde_json::Value,
    /// A transfer round's source task spec.
    #[serde(default)]
    pub source_spec: Option<serde_json::Value>,
    pub arms: Vec<ArmRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmRecord {
    pub site: String,
    /// The device the task ran on ("cpu" or "cuda").
    pub device: String,
    pub arm: String,
    pub trainable_layers: u32,
    pub train_cases: u32,
    pub epochs: usize,
    pub weights_sha256: String,
    #[serde(default)]
    pub tail_sha256: String,
}

fn kind_name(spec: Option<&pb::TaskSpec>) -> String {
    pb::TaskKind::try_from(spec.map_or(0, |s| s.kind))
        .map(|k| k.as_str_name().trim_start_matches("TASK_KIND_").to_ascii_lowercase())
        .unwrap_or_default()
}

/// The record of `results`.
pub fn provenance(results: &pb::StudyResults) -> Provenance {
    let sites = results
        .sites
        .iter()
        .map(|s| {
            let c = s.capabilities.clone().unwrap_or_default();
            let device = if c.gpu_name.is_empty() {
                "cpu".to_owned()
            } else {
                format!(
                    "{} ({:.0} GiB)",
                    c.gpu_name,
                    c.gpu_memory_bytes as f64 / f64::from(1u32 << 30)
                )
            };
            SiteRecord {
                site: s.name.clone(),
                agent_version: s.agent_version.clone(),
                device,
                threads: c.threads,
            }
        })
        .collect();
    let rounds = results
        .rounds
        .iter()
        .filter_map(|r| {
            let info = r.round.as_ref()?;
            let arms = r
                .results
                .iter()
                .flat_map(|s| {
                    let res = s.result.clone().unwrap_or_default();
                    res.arms
                        .iter()
                        .map(|a| ArmRecord {
                            site: s.site.clone(),
                            device: res.device.clone(),
                            arm: if a.model.is_empty() {
                                super::arm_name(a.spec.as_ref()).to_owned()
                            } else {
                                a.model.clone()
                            },
                            trainable_layers: a.trainable_layers,
                            train_cases: a.train_cases,
                            epochs: a.epoch_losses.len(),
                            weights_sha256: a.weights_sha256.clone(),
                            tail_sha256: a.tail_sha256.clone(),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            Some(RoundRecord {
                round: info.round_id.clone(),
                kind: kind_name(info.spec.as_ref()),
                state: pb::RoundState::try_from(info.state)
                    .map(|s| {
                        s.as_str_name().trim_start_matches("ROUND_STATE_").to_ascii_lowercase()
                    })
                    .unwrap_or_default(),
                created_utc: shared::cert::utc(info.created_unix),
                seed: info.spec.as_ref().map_or(0, |s| s.seed),
                spec: serde_json::to_value(info.spec.clone().unwrap_or_default())
                    .unwrap_or_default(),
                source_spec: info.source_spec.as_ref().and_then(|s| serde_json::to_value(s).ok()),
                arms,
            })
        })
        .collect();
    Provenance {
        generated_utc: if results.generated_unix > 0 {
            shared::cert::utc(results.generated_unix)
        } else {
            String::new()
        },
        coordinator_version: results.coordinator_version.clone(),
        base_sha256: results
            .study
            .as_ref()
            .and_then(|s| s.base.as_ref())
            .map(|b| b.sha256.clone())
            .unwrap_or_default(),
        sites,
        rounds,
    }
}

pub(super) const SITES_HEADER: [&str; 4] = ["site", "agent version", "device", "threads"];
pub(super) const ARMS_HEADER: [&str; 8] =
    ["round", "kind", "seed", "site", "arm", "k", "cases", "weights sha256"];

pub(super) fn site_rows(p: &Provenance) -> Vec<Vec<String>> {
    p.sites
        .iter()
        .map(|s| {
            vec![s.site.clone(), s.agent_version.clone(), s.device.clone(), s.threads.to_string()]
        })
        .collect()
}

/// One row per round, site and trained arm (arms that trained nothing have no weights).
pub(super) fn arm_rows(p: &Provenance) -> Vec<Vec<String>> {
    p.rounds
        .iter()
        .flat_map(|r| {
            r.arms.iter().filter(|a| !a.weights_sha256.is_empty()).map(move |a| {
                vec![
                    r.round.clone(),
                    r.kind.clone(),
                    r.seed.to_string(),
                    a.site.clone(),
                    a.arm.clone(),
                    a.trainable_layers.to_string(),
                    a.train_cases.to_string(),
                    a.weights_sha256.clone(),
                ]
            })
        })
        .collect()
}

/// The sentence above the tables.
pub(super) fn summary(p: &Provenance) -> String {
    let when =
        if p.generated_utc.is_empty() { "Made" } else { &format!("Made {}", p.generated_utc) };
    format!(
        "{when} by coordinator {}{}. Every round's task spec (epochs, learning rates, batch \
         size, seed, layers) is in report.json under provenance.rounds.",
        if p.coordinator_version.is_empty() {
            "(version not recorded)"
        } else {
            &p.coordinator_version
        },
        if p.base_sha256.is_empty() {
            String::new()
        } else {
            format!("; base model sha256 {}", p.base_sha256)
        }
    )
}
