//! What a consortium learns beyond one target: the cross-site matrix (every model of the study
//! on every site's test split), the federated round (its steps and Model_FT), the weights
//! bytes each round moved, and a replicated transfer study's statistics over seeds.

use std::collections::{BTreeMap, BTreeSet};

use proto::pb;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Interval};

use super::{
    CaseScore, Comparison, Key, MODEL_S, MODEL_ST, MODEL_T, compare, completed, round_id, rows,
    template_of,
};

/// One model on one site's test split: mean Dice per organ over its cases, and their mean.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Cell {
    pub model: String,
    pub site: String,
    pub cases: usize,
    /// Mean over organs of the per-organ mean Dice.
    pub mean_dice: f64,
    pub organs: BTreeMap<String, f64>,
}

/// A model a site did not score, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AbsentCell {
    pub model: String,
    pub site: String,
    pub reason: String,
}

/// The latest completed cross-eval round: rows are models, columns sites.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CrossEval {
    pub round: String,
    pub models: Vec<String>,
    pub sites: Vec<String>,
    pub organs: Vec<String>,
    pub cells: Vec<Cell>,
    pub absent: Vec<AbsentCell>,
}

impl CrossEval {
    pub fn cell(&self, model: &str, site: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.model == model && c.site == site)
    }
}

pub(super) fn is_cross_eval(r: &pb::RoundResults) -> bool {
    r.round
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .is_some_and(|s| s.kind == pb::TaskKind::CrossEval as i32)
}

pub(super) fn is_fedavg(r: &pb::RoundResults) -> bool {
    r.round
        .as_ref()
        .and_then(|i| i.spec.as_ref())
        .is_some_and(|s| s.kind == pb::TaskKind::Fedavg as i32)
}

/// Every score of a cross-eval round, the arm named by the model scored.
pub(super) fn cross_eval_cases(r: &pb::RoundResults) -> Vec<CaseScore> {
    rows(r, "cross-eval", |a| a.model.clone())
}

pub(super) fn cross_eval(r: &pb::RoundResults, cases: &[CaseScore]) -> CrossEval {
    let info = r.round.clone().unwrap_or_default();
    let spec = info.spec.clone().unwrap_or_default();
    let mine: Vec<&CaseScore> = cases.iter().filter(|c| c.round == info.round_id).collect();
    let mut sites: Vec<String> = info.tasks.iter().map(|t| t.site.clone()).collect();
    sites.sort();
    sites.dedup();
    let mut organs: Vec<String> = Vec::new();
    for c in &mine {
        if !organs.contains(&c.organ) {
            organs.push(c.organ.clone());
        }
    }
    let models: Vec<String> = spec.models.iter().map(|m| m.label.clone()).collect();
    let mut cells = Vec::new();
    let mut absent = Vec::new();
    for m in &spec.models {
        for site in &sites {
            let here: Vec<&&CaseScore> =
                mine.iter().filter(|c| c.arm == m.label && &c.site == site).collect();
            if here.is_empty() {
                let task = info.tasks.iter().find(|t| &t.site == site);
                let reason = if !m.shared && &m.owner != site {
                    format!(
                        "{}'s policy does not share weights: its model was scored only at {}",
                        m.owner, m.owner
                    )
                } else {
                    match task {
                        Some(t) if !t.reason.is_empty() => {
                            format!("the task at {site}: {}", t.reason)
                        }
                        Some(_) => format!("the task at {site} did not succeed"),
                        None => format!("{site} had no task"),
                    }
                };
                absent.push(AbsentCell { model: m.label.clone(), site: site.clone(), reason });
                continue;
            }
            let mut per_organ = BTreeMap::new();
            for o in &organs {
                let v: Vec<f64> = here.iter().filter(|c| &c.organ == o).map(|c| c.dice).collect();
                if !v.is_empty() {
                    per_organ.insert(o.clone(), v.iter().sum::<f64>() / v.len() as f64);
                }
            }
            let n = here.iter().map(|c| c.case_index).collect::<BTreeSet<_>>().len();
            let mean = per_organ.values().sum::<f64>() / per_organ.len().max(1) as f64;
            cells.push(Cell {
                model: m.label.clone(),
                site: site.clone(),
                cases: n,
                mean_dice: mean,
                organs: per_organ,
            });
        }
    }
    CrossEval { round: info.round_id, models, sites, organs, cells, absent }
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

/// One organ over the replicates of a series.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicateRow {
    pub organ: String,
    /// Per arm: the replicates' pooled mean Dice, their mean and 95% t interval.
    pub arms: BTreeMap<String, Interval>,
    /// Per arm: each replicate's pooled mean Dice, in replicate order.
    pub per_replicate: BTreeMap<String, Vec<f64>>,
    /// Replicates whose pooled means order Model_ST > Model_T > Model_S for this organ.
    pub ordered: usize,
    /// Paired tests on the pooled cases, each case's Dice averaged over replicates first.
    pub st_vs_s: Comparison,
    pub st_vs_t: Comparison,
    /// Holm-adjusted Wilcoxon p-values over the organs (one family per comparison).
    pub holm_st_vs_s: Option<f64>,
    pub holm_st_vs_t: Option<f64>,
}

/// A replicated transfer study: the latest series with at least two completed replicates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Replicates {
    pub series: String,
    pub rounds: Vec<String>,
    pub seeds: Vec<u64>,
    pub organs: Vec<ReplicateRow>,
}

pub(super) const REPLICATE_METHODS: &str = "Replicates: the transfer study run once per seed \
(Model_S, Model_T and Model_ST retrained each time). Per organ and arm, each replicate's mean Dice \
over the pooled target test cases; their mean over replicates with a two-sided 95% Student t interval \
(n - 1 degrees of freedom); the count of replicates ordering Model_ST > Model_T > Model_S. The paired \
tests use the pooled cases with each case's Dice first averaged over replicates (a case counts once, \
so pairs stay independent), and their Wilcoxon p-values are Holm-adjusted over the organs, Model_ST vs \
Model_S and Model_ST vs Model_T each a family.";

fn series_of(r: &pb::RoundResults) -> Option<(String, u32, u64)> {
    let spec = r.round.as_ref()?.spec.as_ref()?;
    (spec.replicates > 1 && spec.template == "transfer")
        .then(|| (spec.series.clone(), spec.replicate, spec.seed))
}

pub(super) fn replicates(results: &pb::StudyResults) -> Option<Replicates> {
    let latest = results.rounds.iter().rev().filter(|r| completed(r)).find_map(series_of)?.0;
    let mut members: Vec<(&pb::RoundResults, u32, u64)> = results
        .rounds
        .iter()
        .filter(|r| completed(r))
        .filter_map(|r| series_of(r).filter(|s| s.0 == latest).map(|s| (r, s.1, s.2)))
        .collect();
    members.sort_by_key(|m| m.1);
    if members.len() < 2 {
        return None;
    }
    let per: Vec<Vec<CaseScore>> = members
        .iter()
        .map(|(r, _, _)| rows(r, "transfer", |a| super::arm_name(a.spec.as_ref()).to_owned()))
        .collect();
    let mut organs: Vec<String> = Vec::new();
    for c in per.iter().flatten() {
        if !organs.contains(&c.organ) {
            organs.push(c.organ.clone());
        }
    }
    let arms = [MODEL_S, MODEL_T, MODEL_ST];
    let mut rows_out: Vec<ReplicateRow> = organs
        .iter()
        .map(|organ| {
            let mut per_replicate: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut case_sum: BTreeMap<&str, BTreeMap<Key, (f64, usize)>> = BTreeMap::new();
            for cases in &per {
                for arm in arms {
                    let v: Vec<&CaseScore> =
                        cases.iter().filter(|c| c.arm == arm && &c.organ == organ).collect();
                    if v.is_empty() {
                        continue;
                    }
                    per_replicate
                        .entry(arm.to_owned())
                        .or_default()
                        .push(v.iter().map(|c| c.dice).sum::<f64>() / v.len() as f64);
                    for c in v {
                        let e = case_sum
                            .entry(arm)
                            .or_default()
                            .entry((c.site.clone(), c.case_index))
                            .or_default();
                        e.0 += c.dice;
                        e.1 += 1;
                    }
                }
            }
            let mean_of = |arm: &str| -> BTreeMap<Key, f64> {
                case_sum
                    .get(arm)
                    .map(|m| m.iter().map(|(k, (s, n))| (k.clone(), s / *n as f64)).collect())
                    .unwrap_or_default()
            };
            let (s, t, st) = (mean_of(MODEL_S), mean_of(MODEL_T), mean_of(MODEL_ST));
            let get = |arm: &str| per_replicate.get(arm).cloned().unwrap_or_default();
            let (vs, vt, vst) = (get(MODEL_S), get(MODEL_T), get(MODEL_ST));
            let ordered = (0..vs.len().min(vt.len()).min(vst.len()))
                .filter(|&i| vst[i] > vt[i] && vt[i] > vs[i])
                .count();
            ReplicateRow {
                organ: organ.clone(),
                arms: per_replicate
                    .iter()
                    .filter_map(|(a, v)| Some((a.clone(), stats::mean_ci95(v)?)))
                    .collect(),
                per_replicate,
                ordered,
                st_vs_s: compare(&st, &s),
                st_vs_t: compare(&st, &t),
                holm_st_vs_s: None,
                holm_st_vs_t: None,
            }
        })
        .collect();
    let p = |c: &Comparison| c.wilcoxon.as_ref().map_or(f64::NAN, |w| w.p_value);
    let adj_s = stats::holm(&rows_out.iter().map(|r| p(&r.st_vs_s)).collect::<Vec<_>>());
    let adj_t = stats::holm(&rows_out.iter().map(|r| p(&r.st_vs_t)).collect::<Vec<_>>());
    for (r, (a, b)) in rows_out.iter_mut().zip(adj_s.into_iter().zip(adj_t)) {
        r.holm_st_vs_s = a.is_finite().then_some(a);
        r.holm_st_vs_t = b.is_finite().then_some(b);
    }
    Some(Replicates {
        series: latest,
        rounds: members.iter().map(|m| round_id(m.0)).collect(),
        seeds: members.iter().map(|m| m.2).collect(),
        organs: rows_out,
    })
}

// === rendering helpers, shared by the text, CSV and HTML forms ===

fn dice3(v: f64) -> String {
    format!("{v:.3}")
}

/// The matrix header: the model, then one column per site.
pub(super) fn matrix_header(m: &CrossEval) -> Vec<String> {
    std::iter::once("model".to_owned()).chain(m.sites.iter().cloned()).collect()
}

/// One row per model: its Dice at each site (`organ`: one organ's mean; `None`: the mean over
/// organs); "-" where it was not scored.
pub(super) fn matrix_rows(m: &CrossEval, organ: Option<&str>) -> Vec<Vec<String>> {
    m.models
        .iter()
        .map(|model| {
            std::iter::once(model.clone())
                .chain(m.sites.iter().map(|site| {
                    let cell = m.cell(model, site);
                    let v = match organ {
                        None => cell.map(|c| c.mean_dice),
                        Some(o) => cell.and_then(|c| c.organs.get(o).copied()),
                    };
                    v.map_or("-".into(), dice3)
                }))
                .collect()
        })
        .collect()
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
                s.received_mean_dice.map_or("-".into(), dice3),
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

pub(super) const REPLICATE_HEADER: [&str; 6] =
    ["organ", "Model_S", "Model_T", "Model_ST", "ST > T > S", "p ST vs S / ST vs T (Holm)"];

fn interval(i: Option<&Interval>) -> String {
    i.map_or("-".into(), |i| format!("{:.3} [{:.3}, {:.3}]", i.mean, i.lo, i.hi))
}

pub(super) fn replicate_rows(r: &Replicates) -> Vec<Vec<String>> {
    let p = |v: Option<f64>| v.map_or("-".into(), super::render::fmt_p);
    r.organs
        .iter()
        .map(|o| {
            vec![
                o.organ.clone(),
                interval(o.arms.get(MODEL_S)),
                interval(o.arms.get(MODEL_T)),
                interval(o.arms.get(MODEL_ST)),
                format!("{} of {}", o.ordered, r.rounds.len()),
                format!("{} / {}", p(o.holm_st_vs_s), p(o.holm_st_vs_t)),
            ]
        })
        .collect()
}

pub(super) fn replicate_title(r: &Replicates) -> String {
    format!(
        "Replicates: {} runs of the transfer study (seeds {}), pooled target test cases; mean Dice with 95% interval over replicates",
        r.rounds.len(),
        r.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    )
}
