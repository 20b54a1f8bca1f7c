//! The cross-site matrix: every model of the study (Model_S, each target's Model_ST, Model_FT)
//! on every site's test split, from the latest completed cross-eval round; a model a site did
//! not score is listed with the reason.

use std::collections::{BTreeMap, BTreeSet};

use proto::pb;
use serde::{Deserialize, Serialize};

use super::{CaseScore, organ_order, rows};

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
    let organs = organ_order(r);
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

pub(super) fn dice3(v: f64) -> String {
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
