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
use std::fmt::Write as _;

pub mod finetune;

use proto::pb;
use serde::{Deserialize, Serialize};
use shared::metrics::stats::{self, Summary, TTest, Wilcoxon};

pub const MODEL_S: &str = "Model_S";
pub const MODEL_T: &str = "Model_T";
pub const MODEL_ST: &str = "Model_ST";

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
    /// The methods, in words.
    pub methods: String,
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

/// Every per-case score of the transfer-template rounds' target results.
fn case_scores(r: &pb::RoundResults) -> Vec<CaseScore> {
    let mut out = Vec::new();
    for sr in &r.results {
        let Some(res) = &sr.result else { continue };
        for arm in &res.arms {
            for o in &arm.organs {
                for c in &o.cases {
                    out.push(CaseScore {
                        round: round_id(r),
                        template: template_of(r).to_owned(),
                        site: sr.site.clone(),
                        arm: arm_name(arm.spec.as_ref()).to_owned(),
                        trainable_layers: arm.trainable_layers,
                        train_cases: arm.train_cases,
                        organ: o.organ.clone(),
                        case_index: c.case_index,
                        dice: c.dice,
                        hd95_mm: c.hd95_mm,
                    });
                }
            }
        }
    }
    out
}

type Key = (String, u32); // (site, case index)

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
            for o in &arm.organs {
                if !out.contains(&o.organ) {
                    out.push(o.organ.clone());
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
    let mut training = Vec::new();
    let (mut k, mut total) = (0, 0);
    for sr in &r.results {
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
    let source_site = info.tasks.iter().find(|t| t.source).map(|t| t.site.clone());
    // Model_S, where this round trained it: the source site's own result.
    if let Some(src) = &source_site
        && let Some(res) = r.results.iter().find(|x| &x.site == src).and_then(|x| x.result.as_ref())
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
    Report {
        study,
        transfer: latest("transfer").map(|r| transfer(r, &cases)),
        sweep: latest("sweep").map(|r| sweep_points(r, &cases)).unwrap_or_default(),
        cases_sweep: latest("cases-sweep").map(|r| sweep_points(r, &cases)).unwrap_or_default(),
        finetune: tuned.map(|r| finetune::finetune(r, &cases)),
        cases,
        methods: METHODS.to_owned(),
    }
}

// === rendering ===

/// Output formats of `coordinator report`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Md,
    Csv,
    Json,
    Html,
}

pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Table => text(r, false),
        Format::Md => text(r, true),
        Format::Csv => csv(r),
        Format::Json => serde_json::to_string_pretty(r).expect("reports serialise"),
        Format::Html => html(r),
    }
}

fn mean_sd(s: Option<&Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} ± {:.3}", s.mean, s.sd.unwrap_or(0.0)),
        None => "-".into(),
    }
}

/// `mean ± SD (median)`, as the methods text promises.
fn mean_sd_median(s: Option<&Summary>) -> String {
    match s {
        Some(s) => format!("{} ({:.3})", mean_sd(Some(s)), s.median),
        None => "-".into(),
    }
}

/// A p-value with four decimals, or in scientific notation below 0.0001 (never "0.0000").
pub(crate) fn fmt_p(p: f64) -> String {
    if !p.is_finite() {
        "-".into()
    } else if p >= 1e-4 {
        format!("{p:.4}")
    } else {
        format!("{p:.1e}")
    }
}

fn p_w(c: &Comparison) -> String {
    match &c.wilcoxon {
        Some(w) => format!("{} ({})", fmt_p(w.p_value), w.method),
        None => "-".into(),
    }
}

fn p_t(c: &Comparison) -> String {
    match &c.ttest {
        Some(t) if t.p_value.is_finite() => fmt_p(t.p_value),
        _ => "-".into(),
    }
}

/// A table as aligned text or Markdown.
fn table(out: &mut String, md: bool, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let width: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = width[i].saturating_sub(c.chars().count());
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        if md { format!("| {} |", padded.join(" | ")) } else { padded.join("  ") }
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    if md {
        let sep: Vec<String> = width
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    "-".repeat(*w)
                } else {
                    format!("{}:", "-".repeat(w.saturating_sub(1)))
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", sep.join(" | "));
    }
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

fn scope_rows(s: &Scope) -> Vec<Vec<String>> {
    s.organs
        .iter()
        .map(|o| {
            vec![
                o.organ.clone(),
                mean_sd_median(o.dice.get(MODEL_S)),
                mean_sd_median(o.dice.get(MODEL_T)),
                mean_sd_median(o.dice.get(MODEL_ST)),
                p_w(&o.st_vs_s),
                p_t(&o.st_vs_s),
                p_w(&o.st_vs_t),
                p_t(&o.st_vs_t),
            ]
        })
        .collect()
}

const SCOPE_HEADER: [&str; 8] = [
    "organ",
    "Model_S mean ± SD (median)",
    "Model_T mean ± SD (median)",
    "Model_ST mean ± SD (median)",
    "ST vs S Wilcoxon p",
    "ST vs S t-test p",
    "ST vs T Wilcoxon p",
    "ST vs T t-test p",
];

fn hd95_rows(s: &Scope) -> Vec<Vec<String>> {
    s.organs
        .iter()
        .map(|o| {
            let cell = |arm: &str| match o.hd95_mm.get(arm) {
                Some(h) => format!("{:.1} ± {:.1} (n = {})", h.mean, h.sd.unwrap_or(0.0), h.n),
                None => "-".into(),
            };
            vec![o.organ.clone(), cell(MODEL_S), cell(MODEL_T), cell(MODEL_ST)]
        })
        .collect()
}

const HD95_HEADER: [&str; 4] = ["organ", "Model_S HD95 mm", "Model_T HD95 mm", "Model_ST HD95 mm"];

fn training_rows(t: &Transfer) -> Vec<Vec<String>> {
    // Model_S trained before the study (a pushed base model): no time to show, but a row
    // that says so rather than none.
    let base = t.source_site.is_none().then(|| {
        let mut row = vec!["(base model)".to_string(), MODEL_S.to_string()];
        row.extend(["-", "-", "-", "trained before the study", "-", ""].map(String::from));
        row
    });
    base.into_iter()
        .chain(t.training.iter().map(|x| {
            vec![
                x.site.clone(),
                x.arm.clone(),
                x.trainable_layers.to_string(),
                // The source's training split size is not reported; its slices are.
                if x.train_cases == 0 {
                    format!("{} slices", x.train_slices)
                } else {
                    x.train_cases.to_string()
                },
                x.epochs.to_string(),
                format!("{:.1}", x.train_seconds),
                format!("{:.1}", x.cache_seconds),
                if x.arm == MODEL_ST {
                    t.st_over_t_time.get(&x.site).map_or("-".into(), |r| format!("{r:.2}"))
                } else {
                    String::new()
                },
            ]
        }))
        .collect()
}

fn sweep_rows(points: &[SweepPoint], by_cases: bool) -> Vec<Vec<String>> {
    points
        .iter()
        .filter(|p| p.organ == "mean")
        .map(|p| {
            vec![
                p.arm.clone(),
                if by_cases { p.train_cases.to_string() } else { p.trainable_layers.to_string() },
                mean_sd(Some(&p.dice)),
                format!("{:.3}", p.dice.median),
                p.dice.n.to_string(),
            ]
        })
        .collect()
}

fn text(r: &Report, md: bool) -> String {
    let mut s = String::new();
    let h = |s: &mut String, level: usize, title: &str| {
        if md {
            let _ = writeln!(s, "\n{} {title}\n", "#".repeat(level));
        } else {
            let _ = writeln!(s, "\n{title}");
        }
    };
    if md {
        let _ = writeln!(s, "# Study {}", r.study);
    } else {
        let _ = writeln!(s, "Study {}", r.study);
    }
    match &r.transfer {
        None if r.finetune.is_some() => {}
        None => {
            let _ = writeln!(
                s,
                "\nNo completed transfer round yet: run `coordinator round start {} --task transfer`.",
                r.study
            );
        }
        Some(t) => {
            h(
                &mut s,
                2,
                &format!(
                    "Dice, all target sites pooled (n = {} test cases; round {}; Model_ST = last {} of {} layers fine-tuned{})",
                    t.pooled.test_cases,
                    t.round,
                    t.trainable_layers,
                    t.total_layers,
                    t.source_site
                        .as_ref()
                        .map_or(String::new(), |s| format!("; Model_S trained at {s}"))
                ),
            );
            table(&mut s, md, &SCOPE_HEADER, &scope_rows(&t.pooled));
            h(&mut s, 3, "HD95, all target sites pooled (cases where both masks are non-empty)");
            table(&mut s, md, &HD95_HEADER, &hd95_rows(&t.pooled));
            for site in &t.sites {
                h(&mut s, 3, &format!("Site {} (n = {} test cases)", site.scope, site.test_cases));
                table(&mut s, md, &SCOPE_HEADER, &scope_rows(site));
            }
            h(&mut s, 3, "Training time");
            table(
                &mut s,
                md,
                &["site", "arm", "layers", "cases", "epochs", "seconds", "cache s", "ST / T"],
                &training_rows(t),
            );
        }
    }
    if let Some(f) = &r.finetune {
        h(&mut s, 2, &finetune::title(f));
        table(&mut s, md, &finetune::HEADER, &finetune::rows(f));
    }
    if !r.sweep.is_empty() {
        h(&mut s, 3, "Dice against layers retrained (mean over organs, pooled; 0 = Model_S)");
        table(&mut s, md, &["arm", "layers", "Dice", "median", "n"], &sweep_rows(&r.sweep, false));
    }
    if !r.cases_sweep.is_empty() {
        h(&mut s, 3, "Dice against training cases per site (mean over organs, pooled)");
        table(
            &mut s,
            md,
            &["arm", "cases", "Dice", "median", "n"],
            &sweep_rows(&r.cases_sweep, true),
        );
    }
    h(&mut s, 3, "Methods");
    let _ = writeln!(s, "{}", r.methods);
    s
}

fn opt_num(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or(String::new(), |v| v.to_string())
}

/// The CSV's n, mean, sd, median and, where given, the comparison's p-values and method.
fn summary_cells(d: &Summary, cmp: Option<&Comparison>) -> [String; 7] {
    let w = cmp.and_then(|c| c.wilcoxon.as_ref());
    [
        d.n.to_string(),
        d.mean.to_string(),
        opt_num(d.sd),
        d.median.to_string(),
        opt_num(w.map(|w| w.p_value)),
        w.map_or(String::new(), |w| w.method.to_string()),
        opt_num(cmp.and_then(|c| c.ttest.as_ref()).map(|t| t.p_value)),
    ]
}

fn csv(r: &Report) -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut row = |cells: Vec<String>| {
        let _ = w.write_record(&cells);
    };
    row([
        "section",
        "scope",
        "organ",
        "arm",
        "trainable_layers",
        "train_cases",
        "n",
        "mean",
        "sd",
        "median",
        "st_vs_arm_wilcoxon_p",
        "wilcoxon_method",
        "st_vs_arm_ttest_p",
        "hd95_mean_mm",
        "hd95_sd_mm",
        "hd95_n",
    ]
    .map(String::from)
    .to_vec());
    let opt = opt_num;
    if let Some(t) = &r.transfer {
        for sc in t.sites.iter().chain([&t.pooled]) {
            for o in &sc.organs {
                for arm in [MODEL_S, MODEL_T, MODEL_ST] {
                    let Some(d) = o.dice.get(arm) else { continue };
                    let cmp = match arm {
                        MODEL_S => Some(&o.st_vs_s),
                        MODEL_T => Some(&o.st_vs_t),
                        _ => None,
                    };
                    row(vec![
                        "transfer".into(),
                        sc.scope.clone(),
                        o.organ.clone(),
                        arm.into(),
                        match arm {
                            MODEL_S => "0".into(),
                            MODEL_T => t.total_layers.to_string(),
                            _ => t.trainable_layers.to_string(),
                        },
                        String::new(),
                    ]
                    .into_iter()
                    .chain(summary_cells(d, cmp))
                    .chain([
                        opt(o.hd95_mm.get(arm).map(|h| h.mean)),
                        opt(o.hd95_mm.get(arm).and_then(|h| h.sd)),
                        o.hd95_mm.get(arm).map_or(String::new(), |h| h.n.to_string()),
                    ])
                    .collect());
                }
            }
        }
    }
    if let Some(f) = &r.finetune {
        for o in &f.organs {
            for (arm, d, layers) in [
                (finetune::BASE, &o.base, 0),
                (finetune::FINETUNED, &o.finetuned, f.trainable_layers),
            ] {
                let Some(d) = d else { continue };
                // As for transfer: the comparison sits on the row of the arm compared against.
                let cmp = (arm == finetune::BASE).then_some(&o.finetuned_vs_base);
                let head = ["finetune", "pooled", &o.organ, arm, &layers.to_string(), ""];
                row(head
                    .map(String::from)
                    .into_iter()
                    .chain(summary_cells(d, cmp))
                    .chain([String::new(), String::new(), String::new()])
                    .collect());
            }
        }
    }
    for (section, points) in [("sweep", &r.sweep), ("cases-sweep", &r.cases_sweep)] {
        for p in points {
            row(vec![
                section.into(),
                "pooled".into(),
                p.organ.clone(),
                p.arm.clone(),
                p.trainable_layers.to_string(),
                p.train_cases.to_string(),
                p.dice.n.to_string(),
                p.dice.mean.to_string(),
                opt(p.dice.sd),
                p.dice.median.to_string(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", esc(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>\n");
    s
}

fn html(r: &Report) -> String {
    let mut body = String::new();
    let _ = writeln!(body, "<h1>Study {}</h1>", esc(&r.study));
    if let Some(f) = &r.finetune {
        let _ = writeln!(body, "<h2>{}</h2>", esc(&finetune::title(f)));
        body.push_str(&html_table(&finetune::HEADER, &finetune::rows(f)));
    }
    match &r.transfer {
        None if r.finetune.is_some() => {}
        None => body.push_str("<p>No completed transfer round yet.</p>"),
        Some(t) => {
            let _ = writeln!(
                body,
                "<h2>Dice, all target sites pooled</h2><p>n = {} test cases; round {}; Model_ST = last {} of {} layers fine-tuned{}.</p>",
                t.pooled.test_cases,
                esc(&t.round),
                t.trainable_layers,
                t.total_layers,
                t.source_site
                    .as_ref()
                    .map_or(String::new(), |s| format!("; Model_S trained at {}", esc(s)))
            );
            body.push_str(&html_table(&SCOPE_HEADER, &scope_rows(&t.pooled)));
            body.push_str("<h3>HD95 (mm), pooled, cases where both masks are non-empty</h3>");
            body.push_str(&html_table(&HD95_HEADER, &hd95_rows(&t.pooled)));
            body.push_str(
                "<h2>Dice per organ (box plots, pooled)</h2><p>Box: first quartile, median, third \
                 quartile; whiskers: the most extreme case within 1.5 IQR of the box; dots: every \
                 case.</p><div class=\"plots\">",
            );
            for o in &t.pooled.organs {
                let series: Vec<(&str, Vec<f64>)> = [MODEL_S, MODEL_T, MODEL_ST]
                    .into_iter()
                    .map(|arm| {
                        let v = r
                            .cases
                            .iter()
                            .filter(|c| c.round == t.round && c.arm == arm && c.organ == o.organ)
                            .map(|c| c.dice)
                            .collect();
                        (arm, v)
                    })
                    .collect();
                body.push_str(&crate::plots::boxplot(&o.organ, &series));
            }
            body.push_str("</div>");
            for site in &t.sites {
                let _ = writeln!(
                    body,
                    "<h3>Site {} (n = {} test cases)</h3>",
                    esc(&site.scope),
                    site.test_cases
                );
                body.push_str(&html_table(&SCOPE_HEADER, &scope_rows(site)));
            }
            body.push_str("<h3>Training time</h3>");
            body.push_str(&html_table(
                &["site", "arm", "layers", "cases", "epochs", "seconds", "cache s", "ST / T"],
                &training_rows(t),
            ));
        }
    }
    for (title, points, by_cases) in [
        ("Dice against layers retrained (0 = Model_S)", &r.sweep, false),
        ("Dice against training cases per site", &r.cases_sweep, true),
    ] {
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(body, "<h2>{}</h2>", esc(title));
        body.push_str(&crate::plots::sweep(title, points, by_cases));
        body.push_str(&html_table(
            &["arm", if by_cases { "cases" } else { "layers" }, "Dice", "median", "n"],
            &sweep_rows(points, by_cases),
        ));
    }
    let _ = writeln!(body, "<h2>Methods</h2><p>{}</p>", esc(&r.methods));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedtune report: {}</title>\n<style>\
body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
.plots{{display:flex;flex-wrap:wrap;gap:8px}}</style></head>\n<body>\n{body}</body></html>\n",
        esc(&r.study)
    )
}
