//! A replicated transfer study: each arm's mean Dice over replicates with a 95% interval, how
//! many replicates keep the order ST > T > S, and the paired tests on the pooled cases,
//! Holm-adjusted over organs.

use std::collections::BTreeMap;

use proto::pb;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Interval};

use super::{
    CaseScore, Comparison, Key, MODEL_S, MODEL_ST, MODEL_T, compare, completed, round_id, rows,
};

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
