//! The latest completed finetune round: the base model against the model with its last k
//! layers fine-tuned, on the same test cases at each site (the agent scores the base model
//! before it trains), per organ, pooled over sites, with paired tests.

use std::collections::BTreeMap;

use proto::pb;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Summary};

use super::render::{mean_sd_median, p_t, p_w};
use super::{CaseScore, Comparison, by_case, compare, round_id};

/// The arm names of a finetune round's scores.
pub const BASE: &str = "base model";
pub const FINETUNED: &str = "fine-tuned";

/// One organ: the two models' Dice and the paired tests of fine-tuned against base.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinetuneRow {
    pub organ: String,
    pub base: Option<Summary>,
    pub finetuned: Option<Summary>,
    pub finetuned_vs_base: Comparison,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Finetune {
    pub round: String,
    pub trainable_layers: u32,
    pub sites: Vec<String>,
    /// Test cases pooled over sites.
    pub test_cases: usize,
    pub organs: Vec<FinetuneRow>,
    /// Training seconds per site.
    pub train_seconds: BTreeMap<String, f64>,
}

/// A plain finetune round (not a transfer template).
pub(super) fn is_finetune(r: &pb::RoundResults) -> bool {
    r.round
        .as_ref()
        .and_then(|r| r.spec.as_ref())
        .is_some_and(|s| s.kind == pb::TaskKind::Finetune as i32 && s.template.is_empty())
}

fn trainable_layers(r: &pb::RoundResults) -> u32 {
    r.round.as_ref().and_then(|r| r.spec.as_ref()).map_or(0, |s| s.trainable_layers)
}

/// Per-case scores of both models (the base model, scored first, and the fine-tuned one).
pub(super) fn case_scores(r: &pb::RoundResults) -> Vec<CaseScore> {
    let kind = |a: &pb::ArmResult| a.spec.as_ref().map_or(0, |s| s.kind);
    super::rows(r, "finetune", |a| {
        if kind(a) == pb::ArmKind::Base as i32 { BASE } else { FINETUNED }.to_owned()
    })
}

pub(super) fn finetune(r: &pb::RoundResults, cases: &[CaseScore]) -> Finetune {
    let id = round_id(r);
    let mine: Vec<&CaseScore> = cases.iter().filter(|c| c.round == id).collect();
    let mut organs: Vec<String> = Vec::new();
    let mut sites: Vec<String> = Vec::new();
    for c in &mine {
        if !organs.contains(&c.organ) {
            organs.push(c.organ.clone());
        }
        if !sites.contains(&c.site) {
            sites.push(c.site.clone());
        }
    }
    let test_cases = mine
        .iter()
        .map(|c| (c.site.as_str(), c.case_index))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let summary =
        |m: &BTreeMap<(String, u32), f64>| stats::summary(&m.values().copied().collect::<Vec<_>>());
    let organs = organs
        .into_iter()
        .map(|organ| {
            let base = by_case(mine.iter().copied(), BASE, &organ);
            let tuned = by_case(mine.iter().copied(), FINETUNED, &organ);
            FinetuneRow {
                base: summary(&base),
                finetuned: summary(&tuned),
                finetuned_vs_base: compare(&tuned, &base),
                organ,
            }
        })
        .collect();
    let train_seconds = r
        .results
        .iter()
        .filter(|s| sites.contains(&s.site))
        .filter_map(|s| Some((s.site.clone(), s.result.as_ref()?.arms.last()?.train_seconds)))
        .collect();
    Finetune {
        round: id,
        trainable_layers: trainable_layers(r),
        sites,
        test_cases,
        organs,
        train_seconds,
    }
}

pub(super) const HEADER: [&str; 6] =
    ["organ", "base model Dice", "fine-tuned Dice", "n", "p Wilcoxon", "p t-test"];

pub(super) fn rows(f: &Finetune) -> Vec<Vec<String>> {
    f.organs
        .iter()
        .map(|o| {
            vec![
                o.organ.clone(),
                mean_sd_median(o.base.as_ref()),
                mean_sd_median(o.finetuned.as_ref()),
                o.finetuned_vs_base.n.to_string(),
                p_w(&o.finetuned_vs_base),
                p_t(&o.finetuned_vs_base),
            ]
        })
        .collect()
}

/// The section's title.
pub(super) fn title(f: &Finetune) -> String {
    format!(
        "Fine-tuning: the base model vs its last {} layers fine-tuned at each site (round {}; \
         n = {} test cases pooled over {}; paired by site and case)",
        f.trainable_layers,
        f.round,
        f.test_cases,
        f.sites.join(", ")
    )
}
