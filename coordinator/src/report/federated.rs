//! The federated round (its steps, what each site received, Model_FT) and the weights bytes
//! every task of the study moved.

use std::collections::BTreeMap;

use proto::pb;
use serde::{Deserialize, Serialize};

use super::template_of;

pub(super) fn is_fedavg(r: &pb::RoundResults) -> bool {
    r.round
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .is_some_and(|s| s.kind == pb::TaskKind::Fedavg as i32)
}

/// One step of a federated round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FedStep {
    pub step: u32,
    pub sites: Vec<String>,
    pub cases: Vec<u32>,
    pub tail_sha256: String,
    pub tail_bytes: u64,
    /// Mean Dice (over organs and the sites' test cases) of the model each site received at
    /// the start of this step: Model_S at step 1, then the previous step's average.
    pub received_mean_dice: Option<f64>,
}

/// The latest completed federated round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Federated {
    pub round: String,
    pub rounds: u32,
    pub trainable_layers: u32,
    pub local_epochs: u32,
    pub keep_local_bn: bool,
    pub prox_mu: f64,
    pub steps: Vec<FedStep>,
    /// Model_FT: the last average (a tail over the base model).
    pub model_sha256: Option<String>,
    /// Sites that did not take part, with the reason.
    pub refused: Vec<(String, String)>,
}

pub(super) fn federated(r: &pb::RoundResults) -> Federated {
    let info = r.round.clone().unwrap_or_default();
    let spec = info.spec.clone().unwrap_or_default();
    let fed = info.fed.clone().unwrap_or_default();
    let fs = spec.fed.unwrap_or_default();
    // The received model's scores per step, from each task's arm 0. Results come in the
    // round's task order, one per succeeded task.
    let mut received: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    let succeeded = info.tasks.iter().filter(|t| t.state == pb::TaskState::Succeeded as i32);
    for (t, sr) in succeeded.zip(&r.results) {
        if let Some(arm) = sr.result.as_ref().and_then(|res| res.arms.first()) {
            received.entry(t.fed_step).or_default().extend(arm.scores.iter().map(|c| c.dice));
        }
    }
    let steps = fed
        .aggregates
        .iter()
        .map(|a| FedStep {
            step: a.step,
            sites: a.sites.clone(),
            cases: a.cases.clone(),
            tail_sha256: a.tail_sha256.clone(),
            tail_bytes: a.tail_bytes,
            received_mean_dice: received
                .get(&a.step)
                .filter(|v| !v.is_empty())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64),
        })
        .collect();
    let refused = info
        .tasks
        .iter()
        .filter(|t| {
            t.state == pb::TaskState::Refused as i32 || t.state == pb::TaskState::Failed as i32
        })
        .map(|t| (t.site.clone(), t.reason.clone()))
        .collect();
    Federated {
        round: info.round_id,
        rounds: fed.rounds,
        trainable_layers: spec.trainable_layers,
        local_epochs: spec.epochs,
        keep_local_bn: fs.keep_local_bn,
        prox_mu: fs.prox_mu,
        steps,
        model_sha256: fed.model.map(|m| m.sha256),
        refused,
    }
}

/// Weights bytes one task moved.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Traffic {
    pub round: String,
    pub template: String,
    pub site: String,
    /// A federated round's step (0 otherwise).
    pub step: u32,
    pub down: u64,
    pub up: u64,
}

/// Every task's weights bytes, rounds oldest first.
pub(super) fn traffic(results: &pb::StudyResults) -> Vec<Traffic> {
    let mut out = Vec::new();
    for r in &results.rounds {
        let Some(info) = &r.round else { continue };
        let template = template_of(r).to_owned();
        for t in &info.tasks {
            out.push(Traffic {
                round: info.round_id.clone(),
                template: if template.is_empty() { kind_name(info) } else { template.clone() },
                site: t.site.clone(),
                step: t.fed_step,
                down: t.bytes_down,
                up: t.bytes_up,
            });
        }
    }
    out
}

fn kind_name(info: &pb::RoundInfo) -> String {
    let kind = info.spec.as_ref().map_or(0, |s| s.kind);
    pb::TaskKind::try_from(kind)
        .map(|k| k.as_str_name().trim_start_matches("TASK_KIND_").to_ascii_lowercase())
        .unwrap_or_default()
}

pub(super) const FED_HEADER: [&str; 5] =
    ["step", "sites (training cases)", "Dice of the model received", "tail", "tail bytes"];

pub(super) fn fed_rows(f: &Federated) -> Vec<Vec<String>> {
    f.steps
        .iter()
        .map(|s| {
            let sites: Vec<String> =
                s.sites.iter().zip(&s.cases).map(|(n, c)| format!("{n} ({c})")).collect();
            vec![
                s.step.to_string(),
                sites.join(", "),
                s.received_mean_dice.map_or("-".into(), super::crosseval::dice3),
                s.tail_sha256.chars().take(12).collect(),
                s.tail_bytes.to_string(),
            ]
        })
        .collect()
}

pub(super) fn fed_title(f: &Federated) -> String {
    format!(
        "Federated fine-tuning (round {}; FedAvg of the last {} layers, {} steps of {} local epochs{}{})",
        f.round,
        f.trainable_layers,
        f.rounds,
        f.local_epochs,
        if f.keep_local_bn { "; FedBN: batch-norm statistics kept at each site" } else { "" },
        if f.prox_mu > 0.0 { format!("; FedProx mu = {}", f.prox_mu) } else { String::new() }
    )
}

pub(super) const TRAFFIC_HEADER: [&str; 6] = ["round", "task", "step", "site", "down", "up"];

/// Bytes in binary units.
pub(crate) fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// One row per task that moved weights, and a total per round.
pub(super) fn traffic_rows(t: &[Traffic]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rounds: Vec<&str> = t.iter().map(|x| x.round.as_str()).collect();
    rounds.dedup();
    for round in rounds {
        let mine: Vec<&Traffic> = t.iter().filter(|x| x.round == round).collect();
        let (down, up) = mine.iter().fold((0, 0), |(d, u), x| (d + x.down, u + x.up));
        for x in mine.iter().filter(|x| x.down + x.up > 0) {
            out.push(vec![
                x.round.clone(),
                x.template.clone(),
                if x.step > 0 { x.step.to_string() } else { String::new() },
                x.site.clone(),
                bytes(x.down),
                bytes(x.up),
            ]);
        }
        out.push(vec![
            round.to_owned(),
            mine.first().map(|x| x.template.clone()).unwrap_or_default(),
            String::new(),
            "total".into(),
            bytes(down),
            bytes(up),
        ]);
    }
    out
}
