//! A study's report from its results: per organ and arm, Dice mean ± SD, median and n, per
//! site and pooled over sites; paired Wilcoxon signed-rank and paired t-tests of Model_ST
//! against Model_S and Model_T; training time per arm; Dice against the number of retrained
//! layers (sweep rounds) and against the training-set size (cases-sweep rounds); and for the
//! latest finetune round, the base model against the fine-tuned one ([`finetune`]).
//!
//! The statistics are `shared::metrics::stats` (checked against scipy). Pairs are matched by
//! (site, case index), the only case key that leaves a site. The JSON form carries every
//! per-case Dice, so any p-value here can be recomputed from it.

use std::collections::BTreeMap;

pub mod crosseval;
pub mod federated;
pub mod finetune;
mod html;
mod plots;
pub mod provenance;
pub(crate) mod render;
pub mod replicates;

use proto::pb;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Summary, TTest, Wilcoxon};

pub const MODEL_S: &str = "Model_S";
pub const MODEL_T: &str = "Model_T";
pub const MODEL_ST: &str = "Model_ST";
pub const MODEL_FT: &str = "Model_FT";

/// Paired tests of one arm against another on the same cases.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    /// Pairs compared.
    pub n: usize,
    pub wilcoxon: Option<Wilcoxon>,
    pub ttest: Option<TTest>,
    /// Why a test is missing (too few pairs, all differences zero).
    pub note: Option<String>,
}

/// One organ's row: a summary per arm (S, T, ST) and Model_ST's comparisons.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrganRow {
    pub organ: String,
    /// Keyed by arm name (Model_S, Model_T, Model_ST).
    pub dice: BTreeMap<String, Summary>,
    /// HD95 in mm over the cases where it is defined (both masks non-empty), by arm.
    pub hd95_mm: BTreeMap<String, Summary>,
    pub st_vs_s: Comparison,
    pub st_vs_t: Comparison,
}

/// One site's table, or the pooled one (`scope = "pooled"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Scope {
    pub scope: String,
    pub test_cases: usize,
    pub organs: Vec<OrganRow>,
}

/// One arm's training at one site.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Training {
    pub site: String,
    pub arm: String,
    pub trainable_layers: u32,
    pub train_cases: u32,
    pub train_slices: u32,
    pub train_seconds: f64,
    pub cache_seconds: f64,
    pub epochs: usize,
}

/// The three-arm comparison of the study's latest completed transfer round.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Transfer {
    pub round: String,
    /// The site that trained Model_S in this round, if one did.
    pub source_site: Option<String>,
    /// Layers fine-tuned for Model_ST, and the model's layer count.
    pub trainable_layers: u32,
    pub total_layers: u32,
    pub sites: Vec<Scope>,
    pub pooled: Scope,
    pub training: Vec<Training>,
    /// Mean training seconds of Model_ST over Model_T, per site (cache building included).
    pub st_over_t_time: BTreeMap<String, f64>,
}

/// A point of a sweep: one organ (or "mean" over organs) for one arm setting, pooled over
/// sites.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepPoint {
    pub arm: String,
    /// Layers trained (0 for Model_S).
    pub trainable_layers: u32,
    /// Training cases (0 for Model_S).
    pub train_cases: u32,
    pub organ: String,
    pub dice: Summary,
}

/// Per-case Dice and HD95 of one arm: what every statistic here is computed from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseScore {
    pub round: String,
    pub template: String,
    pub site: String,
    pub arm: String,
    pub trainable_layers: u32,
    pub train_cases: u32,
    pub organ: String,
    pub case_index: u32,
    pub dice: f64,
    pub hd95_mm: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub study: String,
    pub transfer: Option<Transfer>,
    /// Dice against k (the latest completed sweep round).
    pub sweep: Vec<SweepPoint>,
    /// Dice against the training-set size (the latest completed cases-sweep round).
    pub cases_sweep: Vec<SweepPoint>,
    /// The latest completed finetune round: base model vs fine-tuned.
    #[serde(default)]
    pub finetune: Option<finetune::Finetune>,
    pub cases: Vec<CaseScore>,
    /// The latest completed cross-eval round: every model on every site.
    #[serde(default)]
    pub cross_eval: Option<crosseval::CrossEval>,
    /// The latest completed federated round.
    #[serde(default)]
    pub federated: Option<federated::Federated>,
    /// Weights bytes every task of the study moved.
    #[serde(default)]
    pub traffic: Vec<federated::Traffic>,
    /// The size of the study's base model (Model_S), the unit a full-model transfer moves.
    #[serde(default)]
    pub model_bytes: Option<u64>,
    /// The latest replicated transfer study (two or more replicates).
    #[serde(default)]
    pub replicates: Option<replicates::Replicates>,
    /// The methods, in words.
    pub methods: String,
    /// Weights hashes, hyperparameters, seeds, devices, versions and dates.
    #[serde(default)]
    pub provenance: provenance::Provenance,
}

const METHODS: &str = "Dice per organ and test case; mean ± sample SD (n - 1), median and n per arm. \
Model_ST is compared with Model_S and with Model_T on the same cases (paired by site and case index): \
two-sided Wilcoxon signed-rank test (zero differences dropped; exact null distribution for up to 50 pairs \
without ties, else the normal approximation with tie correction and no continuity correction; as \
scipy.stats.wilcoxon) and two-sided paired t-test (scipy.stats.ttest_rel). Pooled rows use every target \
site's cases together.";

/// The name of an arm: Model_S, Model_T or Model_ST.
pub fn arm_name(spec: Option<&pb::ArmSpec>) -> &'static str {
    match spec.map(|s| pb::ArmKind::try_from(s.kind).unwrap_or(pb::ArmKind::Unspecified)) {
        Some(pb::ArmKind::Base) => MODEL_S,
        Some(pb::ArmKind::Scratch) => MODEL_T,
        Some(pb::ArmKind::Finetune) => MODEL_ST,
        _ => "?",
    }
}

fn template_of(r: &pb::RoundResults) -> &str {
    r.round.as_ref().and_then(|r| r.spec.as_ref()).map_or("", |s| s.template.as_str())
}

fn completed(r: &pb::RoundResults) -> bool {
    r.round.as_ref().is_some_and(|r| r.state == pb::RoundState::Completed as i32)
}

fn round_id(r: &pb::RoundResults) -> String {
    r.round.as_ref().map(|r| r.round_id.clone()).unwrap_or_default()
}

/// The one place the report reads per-case scores off the wire: every row of every arm of
/// every site's result in round `r`, the arm named by `name` (a site's arms in order), except
/// the source site's (whose one arm trained Model_S: see the training table).
fn rows(
    r: &pb::RoundResults,
    template: &str,
    name: impl Fn(&pb::ArmResult) -> String,
) -> Vec<CaseScore> {
    let source = r.round.as_ref().and_then(|i| i.tasks.iter().find(|t| t.source));
    let mut out = Vec::new();
    for sr in &r.results {
        if source.is_some_and(|t| t.site == sr.site) {
            continue;
        }
        let Some(res) = &sr.result else { continue };
        for arm in &res.arms {
            let arm_name = name(arm);
            out.extend(arm.scores.iter().map(|c| CaseScore {
                round: round_id(r),
                template: template.to_owned(),
                site: sr.site.clone(),
                arm: arm_name.clone(),
                trainable_layers: arm.trainable_layers,
                train_cases: arm.train_cases,
                organ: c.organ.clone(),
                case_index: c.case_index,
                dice: c.dice,
                hd95_mm: c.hd95_mm,
            }));
        }
    }
    out
}

/// Every per-case score of a transfer-template round's target results.
fn case_scores(r: &pb::RoundResults) -> Vec<CaseScore> {
    rows(r, template_of(r), |a| arm_name(a.spec.as_ref()).to_owned())
}

pub(crate) type Key = (String, u32); // (site, case index)

fn by_case<'a>(
    cases: impl Iterator<Item = &'a CaseScore>,
    arm: &str,
    organ: &str,
) -> BTreeMap<Key, f64> {
    cases
        .filter(|c| c.arm == arm && c.organ == organ)
        .map(|c| ((c.site.clone(), c.case_index), c.dice))
        .collect()
}

/// Paired tests of `x` against `y` on the cases both have.
pub fn compare(x: &BTreeMap<Key, f64>, y: &BTreeMap<Key, f64>) -> Comparison {
    let (a, b): (Vec<f64>, Vec<f64>) =
        x.iter().filter_map(|(k, vx)| y.get(k).map(|vy| (*vx, *vy))).unzip();
    let w = stats::wilcoxon(&a, &b);
    let t = stats::ttest_rel(&a, &b);
    let note = match (&w, &t) {
        (Err(e), _) | (_, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    Comparison { n: a.len(), wilcoxon: w.ok(), ttest: t.ok(), note }
}

fn scope(name: &str, cases: &[&CaseScore], organs: &[String]) -> Scope {
    let test_cases = cases
        .iter()
        .map(|c| (c.site.as_str(), c.case_index))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let organs = organs
        .iter()
        .map(|organ| {
            let s = by_case(cases.iter().copied(), MODEL_S, organ);
            let t = by_case(cases.iter().copied(), MODEL_T, organ);
            let st = by_case(cases.iter().copied(), MODEL_ST, organ);
            let mut dice = BTreeMap::new();
            let mut hd95_mm = BTreeMap::new();
            for (arm, m) in [(MODEL_S, &s), (MODEL_T, &t), (MODEL_ST, &st)] {
                if let Some(sum) = stats::summary(&m.values().copied().collect::<Vec<_>>()) {
                    dice.insert(arm.to_owned(), sum);
                }
                let hd: Vec<f64> = cases
                    .iter()
                    .filter(|c| c.arm == arm && &c.organ == organ)
                    .filter_map(|c| c.hd95_mm)
                    .collect();
                if let Some(sum) = stats::summary(&hd) {
                    hd95_mm.insert(arm.to_owned(), sum);
                }
            }
            OrganRow {
                organ: organ.clone(),
                dice,
                hd95_mm,
                st_vs_s: compare(&st, &s),
                st_vs_t: compare(&st, &t),
            }
        })
        .collect();
    Scope { scope: name.to_owned(), test_cases, organs }
}

/// Organs in the order the results list them.
fn organ_order(r: &pb::RoundResults) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for sr in &r.results {
        for arm in sr.result.iter().flat_map(|r| &r.arms) {
            for c in &arm.scores {
                if !out.contains(&c.organ) {
                    out.push(c.organ.clone());
                }
            }
        }
    }
    out
}

fn transfer(r: &pb::RoundResults, cases: &[CaseScore]) -> Transfer {
    let info = r.round.clone().unwrap_or_default();
    let organs = organ_order(r);
    let mine: Vec<&CaseScore> = cases.iter().filter(|c| c.round == info.round_id).collect();
    let mut sites: Vec<String> = mine.iter().map(|c| c.site.clone()).collect();
    sites.sort();
    sites.dedup();
    let per_site = sites
        .iter()
        .map(|s| {
            let c: Vec<&CaseScore> = mine.iter().copied().filter(|c| &c.site == s).collect();
            scope(s, &c, &organs)
        })
        .collect();
    let source_site = info.tasks.iter().find(|t| t.source).map(|t| t.site.clone());
    let mut training = Vec::new();
    let (mut k, mut total) = (0, 0);
    for sr in r.results.iter().filter(|sr| source_site.as_deref() != Some(sr.site.as_str())) {
        for arm in sr.result.iter().flat_map(|r| &r.arms) {
            let name = arm_name(arm.spec.as_ref());
            match name {
                MODEL_ST => k = arm.trainable_layers,
                MODEL_T => total = arm.trainable_layers,
                _ => continue,
            }
            training.push(Training {
                site: sr.site.clone(),
                arm: name.to_owned(),
                trainable_layers: arm.trainable_layers,
                train_cases: arm.train_cases,
                train_slices: arm.train_slices,
                train_seconds: arm.train_seconds,
                cache_seconds: arm.cache_seconds,
                epochs: arm.epoch_losses.len(),
            });
        }
    }
    // Model_S, where this round trained it: the source site's one arm.
    if let Some(src) = &source_site
        && let Some(res) = r
            .results
            .iter()
            .find(|x| &x.site == src)
            .and_then(|x| x.result.as_ref())
            .and_then(|r| r.arms.last())
    {
        training.insert(
            0,
            Training {
                site: src.clone(),
                arm: MODEL_S.to_owned(),
                trainable_layers: total,
                train_cases: 0,
                train_slices: res.train_slices,
                train_seconds: res.train_seconds,
                cache_seconds: res.cache_seconds,
                epochs: res.epoch_losses.len(),
            },
        );
    }
    let time = |site: &str, arm: &str| {
        training.iter().find(|t| t.site == site && t.arm == arm).map(|t| t.train_seconds)
    };
    let st_over_t_time = sites
        .iter()
        .filter_map(|s| Some((s.clone(), time(s, MODEL_ST)? / time(s, MODEL_T)?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    Transfer {
        round: info.round_id.clone(),
        source_site,
        trainable_layers: k,
        total_layers: total,
        sites: per_site,
        pooled: scope("pooled", &mine, &organs),
        training,
        st_over_t_time,
    }
}

/// Pooled summaries per arm setting and organ (plus "mean": each case's mean over organs).
fn sweep_points(r: &pb::RoundResults, cases: &[CaseScore]) -> Vec<SweepPoint> {
    let id = round_id(r);
    let mine: Vec<&CaseScore> = cases.iter().filter(|c| c.round == id).collect();
    let mut groups: BTreeMap<(u32, u32, String), Vec<&CaseScore>> = BTreeMap::new();
    for c in &mine {
        let (k, n) = if c.arm == MODEL_S { (0, 0) } else { (c.trainable_layers, c.train_cases) };
        groups.entry((n, k, c.arm.clone())).or_default().push(c);
    }
    let organs = organ_order(r);
    let mut out = Vec::new();
    for ((n, k, arm), cs) in groups {
        for organ in &organs {
            let v: Vec<f64> = cs.iter().filter(|c| &c.organ == organ).map(|c| c.dice).collect();
            if let Some(dice) = stats::summary(&v) {
                out.push(SweepPoint {
                    arm: arm.clone(),
                    trainable_layers: k,
                    train_cases: n,
                    organ: organ.clone(),
                    dice,
                });
            }
        }
        let mut per_case: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        for c in &cs {
            per_case.entry((c.site.clone(), c.case_index)).or_default().push(c.dice);
        }
        let means: Vec<f64> =
            per_case.values().map(|v| v.iter().sum::<f64>() / v.len() as f64).collect();
        if let Some(dice) = stats::summary(&means) {
            out.push(SweepPoint {
                arm,
                trainable_layers: k,
                train_cases: n,
                organ: "mean".into(),
                dice,
            });
        }
    }
    out
}

/// Builds the report from a study's results: the latest completed round of each template.
pub fn build(results: &pb::StudyResults) -> Report {
    let study = results.study.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let latest =
        |t: &str| results.rounds.iter().rev().find(|r| completed(r) && template_of(r) == t);
    let mut cases = Vec::new();
    for r in [latest("transfer"), latest("sweep"), latest("cases-sweep")].into_iter().flatten() {
        cases.extend(case_scores(r));
    }
    let tuned = results.rounds.iter().rev().find(|r| completed(r) && finetune::is_finetune(r));
    if let Some(r) = tuned {
        cases.extend(finetune::case_scores(r));
    }
    let cross = results.rounds.iter().rev().find(|r| completed(r) && crosseval::is_cross_eval(r));
    if let Some(r) = cross {
        cases.extend(crosseval::cross_eval_cases(r));
    }
    let fed = results.rounds.iter().rev().find(|r| completed(r) && federated::is_fedavg(r));
    let replicates = replicates::replicates(results);
    let mut methods = METHODS.to_owned();
    if replicates.is_some() {
        methods = format!("{methods} {}", replicates::REPLICATE_METHODS);
    }
    Report {
        study,
        transfer: latest("transfer").map(|r| transfer(r, &cases)),
        sweep: latest("sweep").map(|r| sweep_points(r, &cases)).unwrap_or_default(),
        cases_sweep: latest("cases-sweep").map(|r| sweep_points(r, &cases)).unwrap_or_default(),
        finetune: tuned.map(|r| finetune::finetune(r, &cases)),
        cross_eval: cross.map(|r| crosseval::cross_eval(r, &cases)),
        federated: fed.map(federated::federated),
        traffic: federated::traffic(results),
        model_bytes: results.study.as_ref().and_then(|s| s.base.as_ref()).map(|b| b.size),
        replicates,
        cases,
        methods,
        provenance: provenance::provenance(results),
    }
}

/// Output formats of `coordinator report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Md,
    Csv,
    Json,
    Html,
}

/// The report in `format`.
pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Table => render::text(r, false),
        Format::Md => render::text(r, true),
        Format::Csv => render::csv(r),
        Format::Json => serde_json::to_string_pretty(r).expect("reports serialise"),
        Format::Html => html::html(r),
    }
}
