//! The report's statistics against scipy, and its output formats.
//!
//! Reference values: `python3 coordinator/tests/reference/report_reference.py` (scipy 1.17.1),
//! which builds the same per-case Dice from the same formulas.

use coordinator::report::{self, Format, MODEL_S, MODEL_ST, MODEL_T};
use proto::pb;

const SITES: [(&str, u32); 2] = [("target-a", 7), ("target-b", 9)];
const ORGANS: [&str; 2] = ["brainstem", "parotid_l"];
const ARMS: [(&str, f64, u64, i32); 3] = [
    (MODEL_S, 0.50, 11, pb::ArmKind::Base as i32),
    (MODEL_T, 0.56, 23, pb::ArmKind::Scratch as i32),
    (MODEL_ST, 0.62, 37, pb::ArmKind::Finetune as i32),
];

type Reference = (&'static str, &'static str, f64, f64, f64, f64, f64, f64, f64);

/// scope/organ/comparison, Wilcoxon method, W, p, t, t-test p, then Model_ST's mean, SD and
/// median in that scope.
#[rustfmt::skip]
const SCIPY: [Reference; 12] = [
    ("pooled/brainstem/st_vs_s", "exact", 16.0, 0.005157470703125, 3.3726933025655206, 0.004185858805296444, 0.5974331740547907, 0.08813010039417042, 0.5863960552408416),
    ("pooled/brainstem/st_vs_t", "exact", 59.0, 0.668548583984375, 0.4559938297210598, 0.6549265768240605, 0.5974331740547907, 0.08813010039417042, 0.5863960552408416),
    ("pooled/parotid_l/st_vs_s", "asymptotic", 9.0, 0.032854219928643694, 2.3781460984043967, 0.03112492772735261, 0.5711035478111166, 0.10882938872719992, 0.5507091417957826),
    ("pooled/parotid_l/st_vs_t", "exact", 50.0, 0.375457763671875, 0.8833892865888702, 0.39096480308690496, 0.5711035478111166, 0.10882938872719992, 0.5507091417957826),
    ("target-a/brainstem/st_vs_s", "exact", 3.0, 0.078125, 1.8132451807088181, 0.11973554209834257, 0.6201933307132039, 0.09843268806410904, 0.563932004849273),
    ("target-a/brainstem/st_vs_t", "exact", 5.0, 0.15625, 1.570511293798929, 0.16735095315273368, 0.6201933307132039, 0.09843268806410904, 0.563932004849273),
    ("target-a/parotid_l/st_vs_s", "asymptotic", 0.0, 0.043114446783075355, 2.053655845043524, 0.08580666358030863, 0.6067239245133227, 0.09384889528399114, 0.5718214899765026),
    ("target-a/parotid_l/st_vs_t", "exact", 0.0, 0.015625, 4.149746076092852, 0.006012794453393517, 0.6067239245133227, 0.09384889528399114, 0.5718214899765026),
    ("target-b/brainstem/st_vs_s", "exact", 5.0, 0.0390625, 2.781841588850499, 0.023856674591859146, 0.579730829987136, 0.08056303779333757, 0.5874787831770236),
    ("target-b/brainstem/st_vs_t", "exact", 15.0, 0.42578125, -0.8571262988015762, 0.4163111745433944, 0.579730829987136, 0.08056303779333757, 0.5874787831770236),
    ("target-b/parotid_l/st_vs_s", "asymptotic", 5.0, 0.24886387493792206, 1.3032962085404969, 0.22872963236156973, 0.5433988103760674, 0.11673805931600242, 0.5269275595320492),
    ("target-b/parotid_l/st_vs_t", "exact", 16.0, 0.49609375, -0.663059257995497, 0.5259326633330299, 0.5433988103760674, 0.11673805931600242, 0.5269275595320492),
];

fn lcg(seed: u64, n: u32) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn dice(site_i: usize, organ_i: usize, arm_i: usize) -> Vec<f64> {
    let (_, base, seed, _) = ARMS[arm_i];
    let u = lcg(seed * (site_i as u64 + 1) * 7919 + 1000 * organ_i as u64, SITES[site_i].1);
    u.into_iter().map(|v| base + (v - 0.5) * 0.3).collect()
}

fn values(site_i: usize, organ_i: usize, arm_i: usize) -> Vec<f64> {
    let v = dice(site_i, organ_i, arm_i);
    if arm_i == 2 && organ_i == 1 {
        let s = dice(site_i, organ_i, 0);
        return v.iter().enumerate().map(|(i, x)| if i % 4 == 0 { s[i] } else { *x }).collect();
    }
    v
}

/// Site `si`'s per-case scores of arm `ai`, one row per organ and case.
fn rows(si: usize, ai: usize, hd95_mm: Option<f64>) -> Vec<pb::CaseScore> {
    ORGANS
        .iter()
        .enumerate()
        .flat_map(|(oi, organ)| {
            values(si, oi, ai).into_iter().enumerate().map(move |(i, d)| pb::CaseScore {
                organ: (*organ).into(),
                case_index: i as u32,
                dice: d,
                hd95_mm,
            })
        })
        .collect()
}

pub(crate) fn study() -> pb::StudyResults {
    let results = SITES
        .iter()
        .enumerate()
        .map(|(si, (site, _))| pb::SiteResult {
            site: (*site).into(),
            result: Some(pb::TaskResult {
                device: "cpu".into(),
                arms: ARMS
                    .iter()
                    .enumerate()
                    .map(|(ai, (_, _, _, kind))| pb::ArmResult {
                        spec: Some(pb::ArmSpec { kind: *kind, ..Default::default() }),
                        trainable_layers: [0, 22, 3][ai],
                        train_cases: [0, 5, 5][ai],
                        train_seconds: [0.0, 30.0, 6.0][ai],
                        scores: rows(si, ai, Some(2.0)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })
        .collect();
    let round = pb::RoundInfo {
        round_id: "r1".into(),
        study: "npc".into(),
        spec: Some(pb::TaskSpec { template: "transfer".into(), ..Default::default() }),
        state: pb::RoundState::Completed as i32,
        ..Default::default()
    };
    pb::StudyResults {
        study: Some(pb::StudyInfo { name: "npc".into(), ..Default::default() }),
        rounds: vec![pb::RoundResults { round: Some(round), results }],
        ..Default::default()
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1e-3), "{what}: {a} vs scipy {b}");
}

#[test]
fn statistics_match_scipy() {
    let r = report::build(&study());
    let t = r.transfer.as_ref().expect("a transfer section");
    assert_eq!(t.pooled.test_cases, 16);
    assert_eq!((t.trainable_layers, t.total_layers), (3, 22));
    assert!((t.st_over_t_time["target-a"] - 0.2).abs() < 1e-12);
    let mut checked = 0;
    for (key, method, w, p, tt, tp, mean, sd, median) in SCIPY {
        let mut parts = key.split('/');
        let (scope, organ, cmp) =
            (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let sc = if scope == "pooled" {
            &t.pooled
        } else {
            t.sites.iter().find(|s| s.scope == scope).unwrap()
        };
        let row = sc.organs.iter().find(|o| o.organ == organ).unwrap();
        let c = if cmp == "st_vs_s" { &row.st_vs_s } else { &row.st_vs_t };
        let wil = c.wilcoxon.as_ref().unwrap_or_else(|| panic!("{key}: no Wilcoxon"));
        assert_eq!(wil.method.to_string(), method, "{key}");
        close(wil.statistic, w, &format!("{key} W"));
        close(wil.p_value, p, &format!("{key} p"));
        let ttest = c.ttest.as_ref().unwrap();
        close(ttest.t, tt, &format!("{key} t"));
        close(ttest.p_value, tp, &format!("{key} t-test p"));
        let st = &row.dice[MODEL_ST];
        close(st.mean, mean, &format!("{key} mean"));
        close(st.sd.unwrap(), sd, &format!("{key} sd"));
        close(st.median, median, &format!("{key} median"));
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn json_reproduces_every_p_value() {
    let r = report::build(&study());
    let json: serde_json::Value =
        serde_json::from_str(&report::render(&r, Format::Json)).expect("JSON");
    let cases = json["cases"].as_array().expect("per-case scores");
    assert_eq!(cases.len(), 3 * 2 * 16);
    // Recompute the pooled brainstem ST vs S test from the JSON alone.
    let pick = |arm: &str| -> Vec<f64> {
        let mut v: Vec<(String, u64, f64)> = cases
            .iter()
            .filter(|c| c["arm"] == arm && c["organ"] == "brainstem")
            .map(|c| {
                (
                    c["site"].as_str().unwrap().to_owned(),
                    c["case_index"].as_u64().unwrap(),
                    c["dice"].as_f64().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        v.into_iter().map(|x| x.2).collect()
    };
    let w = shared::metrics::stats::wilcoxon(&pick(MODEL_ST), &pick(MODEL_S)).unwrap();
    let p =
        json["transfer"]["pooled"]["organs"][0]["st_vs_s"]["wilcoxon"]["p_value"].as_f64().unwrap();
    assert_eq!(w.p_value, p);
    close(p, SCIPY[0].3, "pooled brainstem p from JSON");
}

#[test]
fn csv_md_table_and_html_render() {
    let r = report::build(&study());
    let csv = report::render(&r, Format::Csv);
    let mut rd = csv::Reader::from_reader(csv.as_bytes());
    let header = rd.headers().unwrap().clone();
    assert_eq!(&header[0], "section");
    let rows: Vec<csv::StringRecord> = rd.records().map(|r| r.expect("a CSV row")).collect();
    // 3 scopes x 2 organs x 3 arms.
    assert_eq!(rows.len(), 18);
    let pooled_s = rows
        .iter()
        .find(|r| &r[1] == "pooled" && &r[2] == "brainstem" && &r[3] == MODEL_S)
        .unwrap();
    let p: f64 = pooled_s[10].parse().unwrap();
    close(p, SCIPY[0].3, "CSV p");

    let html = report::render(&r, Format::Html);
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), ORGANS.len(), "one box plot per organ");
    for organ in ORGANS {
        assert!(html.contains(&format!(">\n{organ}\n</text>")), "{organ}'s plot is titled");
    }
    assert!(!html.contains("could not be drawn"));
    assert!(html.contains("whiskers: the most extreme case within 1.5 IQR"), "the rule is stated");
    let md = report::render(&r, Format::Md);
    assert!(md.contains("Model_ST mean ± SD (median)"), "{md}");
    assert!(md.contains("| brainstem") && md.contains("0.0052 (exact)"), "{md}");
    let table = report::render(&r, Format::Table);
    assert!(table.contains("Site target-b (n = 9 test cases)"));
    // Every case has HD95 2.0 mm here.
    assert!(table.contains("2.0 ± 0.0 (n = 16)"), "{table}");
    let hd_n: usize = pooled_s[15].parse().unwrap();
    assert_eq!(hd_n, 16);
}

#[test]
fn a_study_without_rounds_says_what_to_do() {
    let mut s = study();
    s.rounds.clear();
    let r = report::build(&s);
    assert!(r.transfer.is_none());
    assert!(report::render(&r, Format::Table).contains("--task transfer"));
    assert_eq!(report::render(&r, Format::Html).matches("<svg").count(), 0);
}

/// A finetune round whose sites scored the base model before fine-tuning: the same per-case
/// Dice as Model_S and Model_ST above, so the paired tests are scipy's ST-vs-S values.
fn with_finetune_round() -> pb::StudyResults {
    let mut s = study();
    let results = SITES
        .iter()
        .enumerate()
        .map(|(si, (site, _))| pb::SiteResult {
            site: (*site).into(),
            result: Some(pb::TaskResult {
                arms: vec![
                    pb::ArmResult {
                        spec: Some(pb::ArmSpec {
                            kind: pb::ArmKind::Base as i32,
                            ..Default::default()
                        }),
                        scores: rows(si, 0, None),
                        ..Default::default()
                    },
                    pb::ArmResult {
                        spec: Some(pb::ArmSpec {
                            kind: pb::ArmKind::Finetune as i32,
                            trainable_layers: 3,
                            ..Default::default()
                        }),
                        trainable_layers: 3,
                        train_seconds: 12.0,
                        scores: rows(si, 2, None),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
        })
        .collect();
    let round = pb::RoundInfo {
        round_id: "r2".into(),
        study: "npc".into(),
        spec: Some(pb::TaskSpec {
            kind: pb::TaskKind::Finetune as i32,
            trainable_layers: 3,
            ..Default::default()
        }),
        state: pb::RoundState::Completed as i32,
        ..Default::default()
    };
    s.rounds.push(pb::RoundResults { round: Some(round), results });
    s
}

#[test]
fn a_finetune_round_is_reported_against_its_base_model() {
    let r = report::build(&with_finetune_round());
    let f = r.finetune.as_ref().expect("a finetune section");
    assert_eq!((f.round.as_str(), f.trainable_layers, f.test_cases), ("r2", 3, 16));
    let brainstem = f.organs.iter().find(|o| o.organ == "brainstem").expect("brainstem");
    let w = brainstem.finetuned_vs_base.wilcoxon.as_ref().expect("a Wilcoxon test");
    close(w.p_value, SCIPY[0].3, "fine-tuned vs base, pooled brainstem p");
    close(brainstem.finetuned.as_ref().expect("dice").mean, SCIPY[0].6, "fine-tuned mean");
    let table = report::render(&r, Format::Table);
    assert!(
        table.contains("Fine-tuning: the base model vs its last 3 layers fine-tuned"),
        "{table}"
    );
    assert!(table.contains("0.0052 (exact)"), "{table}");
    let csv = report::render(&r, Format::Csv);
    assert_eq!(csv.lines().filter(|l| l.starts_with("finetune,pooled,")).count(), 4, "{csv}");
    assert!(report::render(&r, Format::Html).contains("<h2>Fine-tuning: the base model"));
    // The per-case scores of both models are in the JSON, to recompute the tests.
    let json: serde_json::Value =
        serde_json::from_str(&report::render(&r, Format::Json)).expect("JSON");
    let cases = json["cases"].as_array().expect("cases");
    assert_eq!(cases.iter().filter(|c| c["template"] == "finetune").count(), 2 * 2 * 16);
}

#[test]
fn the_training_time_table_has_a_model_s_row() {
    // A pushed base model: a row that says Model_S was trained before the study.
    let r = report::build(&study());
    let table = report::render(&r, Format::Table);
    let row = table.lines().find(|l| l.contains("(base model)")).expect("a Model_S row");
    assert!(row.contains(MODEL_S) && row.contains("trained before the study"), "{row}");
    // Model_S trained by the round's source site: its own time.
    let mut s = study();
    let round = s.rounds[0].round.as_mut().expect("round");
    round.tasks.push(pb::TaskInfo { site: "source".into(), source: true, ..Default::default() });
    s.rounds[0].results.push(pb::SiteResult {
        site: "source".into(),
        result: Some(pb::TaskResult {
            arms: vec![pb::ArmResult {
                spec: Some(pb::ArmSpec { kind: pb::ArmKind::Scratch as i32, ..Default::default() }),
                train_seconds: 41.5,
                train_slices: 480,
                epoch_losses: vec![0.9, 0.5],
                trainable_layers: 22,
                // Model_S on the source's own test cases: not a target's score.
                scores: rows(0, 1, None),
                ..Default::default()
            }],
            ..Default::default()
        }),
    });
    let r = report::build(&s);
    let t = r.transfer.as_ref().expect("transfer");
    assert!(t.sites.iter().all(|x| x.scope != "source"), "the source is no target");
    assert!(r.cases.iter().all(|c| c.site != "source"));
    let first = &t.training[0];
    assert_eq!((first.site.as_str(), first.arm.as_str()), ("source", MODEL_S));
    assert_eq!((first.train_seconds, first.epochs, first.trainable_layers), (41.5, 2, 22));
    let table = report::render(&r, Format::Table);
    assert!(!table.contains("(base model)"));
    assert!(
        table
            .lines()
            .any(|l| l.contains("source") && l.contains("480 slices") && l.contains("41.5")),
        "{table}"
    );
}

/// Replicate `i` (1-based) of 3: the base study with every Dice of arm `ai` moved by
/// `shift(i, ai)`, as its own transfer round of one series.
fn replicate(i: u32, shift: impl Fn(u32, usize) -> f64) -> pb::RoundResults {
    let mut r = study().rounds.remove(0);
    for sr in &mut r.results {
        for (ai, arm) in sr.result.as_mut().unwrap().arms.iter_mut().enumerate() {
            for c in &mut arm.scores {
                c.dice = (c.dice + shift(i, ai)).clamp(0.0, 1.0);
            }
        }
    }
    let info = r.round.as_mut().unwrap();
    info.round_id = format!("rep{i}");
    let spec = info.spec.as_mut().unwrap();
    (spec.replicate, spec.replicates, spec.series, spec.seed) =
        (i, 3, "s1".into(), 16 + u64::from(i));
    r
}

#[test]
fn replicates_give_intervals_order_counts_and_holm_adjusted_tests() {
    // Replicate 2 has Model_T ahead of Model_ST (by lowering ST): the order holds in 2 of 3.
    let shift = |i: u32, ai: usize| match (i, ai) {
        (2, 2) => -0.2,
        (3, _) => 0.01 * ai as f64,
        _ => 0.0,
    };
    let rounds: Vec<pb::RoundResults> = (1..=3).map(|i| replicate(i, shift)).collect();
    let results = pb::StudyResults {
        study: Some(pb::StudyInfo { name: "npc".into(), ..Default::default() }),
        rounds: rounds.clone(),
        ..Default::default()
    };
    let r = report::build(&results);
    let rep = r.replicates.as_ref().expect("a replicates section");
    assert_eq!(rep.rounds, ["rep1", "rep2", "rep3"]);
    assert_eq!(rep.seeds, [17, 18, 19]);
    // Each replicate's pooled mean per arm, by hand.
    let pooled = |round: &pb::RoundResults, ai: usize, organ: &str| -> f64 {
        let v: Vec<f64> = round
            .results
            .iter()
            .flat_map(|sr| sr.result.as_ref().unwrap().arms[ai].scores.iter())
            .filter(|c| c.organ == organ)
            .map(|c| c.dice)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let mut p_s = Vec::new();
    for row in &rep.organs {
        for (ai, arm) in [MODEL_S, MODEL_T, MODEL_ST].into_iter().enumerate() {
            let means: Vec<f64> = rounds.iter().map(|x| pooled(x, ai, &row.organ)).collect();
            assert_eq!(row.per_replicate[arm].len(), 3);
            for (a, b) in row.per_replicate[arm].iter().zip(&means) {
                close(*a, *b, &format!("{} {arm} replicate mean", row.organ));
            }
            let ci = shared::metrics::stats::mean_ci95(&means).unwrap();
            close(row.arms[arm].lo, ci.lo, "interval");
            close(row.arms[arm].hi, ci.hi, "interval");
        }
        let order = |x: &pb::RoundResults| {
            let m = |ai| pooled(x, ai, &row.organ);
            m(2) > m(1) && m(1) > m(0)
        };
        assert_eq!(row.ordered, rounds.iter().filter(|x| order(x)).count(), "{}", row.organ);
        // Each case once, its Dice averaged over the replicates.
        assert_eq!(row.st_vs_s.n, 16);
        p_s.push(row.st_vs_s.wilcoxon.as_ref().unwrap().p_value);
    }
    assert!(rep.organs.iter().any(|o| o.ordered == 2), "replicate 2 breaks the order");
    let adj = shared::metrics::stats::holm(&p_s);
    for (row, a) in rep.organs.iter().zip(adj) {
        close(row.holm_st_vs_s.unwrap(), a, "Holm");
        assert!(row.holm_st_vs_s.unwrap() >= row.st_vs_s.wilcoxon.as_ref().unwrap().p_value);
    }
    let text = report::render(&r, Format::Table);
    assert!(text.contains("Replicates: 3 runs of the transfer study (seeds 17, 18, 19)"), "{text}");
    assert!(report::render(&r, Format::Md).contains("| ST > T > S |"));
    // One replicate is no series.
    let one = pb::StudyResults { rounds: vec![rounds[0].clone()], ..results };
    assert!(report::build(&one).replicates.is_none());
}

/// The report records what made each number: versions, devices, seeds, task specs and the
/// sha256 of every trained arm's weights, in JSON and in the rendered text.
#[test]
fn the_report_records_weights_hashes_hyperparameters_and_versions() {
    let mut results = study();
    results.coordinator_version = "9.9.9".into();
    results.generated_unix = 1_796_000_000;
    results.sites = vec![pb::SiteInfo {
        name: "target-a".into(),
        agent_version: "1.2.3".into(),
        capabilities: Some(pb::Capabilities { threads: 2, ..Default::default() }),
        ..Default::default()
    }];
    let round = &mut results.rounds[0];
    let info = round.round.as_mut().expect("round");
    info.spec = Some(pb::TaskSpec {
        template: "transfer".into(),
        epochs: 7,
        seed: 23,
        learning_rate: 0.02,
        ..Default::default()
    });
    let sha = "ab".repeat(32);
    let first = &mut round.results[0];
    let res = first.result.as_mut().expect("result");
    res.device = "cpu".into();
    res.arms[1].weights_sha256 = sha.clone();
    let site = first.site.clone();
    let r = report::build(&results);
    let p = &r.provenance;
    assert_eq!(p.coordinator_version, "9.9.9");
    assert_eq!(p.generated_utc, shared::cert::utc(1_796_000_000));
    assert_eq!(p.sites[0].agent_version, "1.2.3");
    assert_eq!(p.rounds[0].seed, 23);
    assert_eq!(p.rounds[0].spec["epochs"], 7);
    // The protocol's JSON mapping: lowerCamelCase names, 64-bit integers as strings.
    assert_eq!(p.rounds[0].spec["learningRate"], 0.02);
    assert_eq!(p.rounds[0].spec["seed"], "23");
    let arm = p.rounds[0].arms.iter().find(|a| a.weights_sha256 == sha).expect("the trained arm");
    assert_eq!((arm.site.as_str(), arm.device.as_str()), (site.as_str(), "cpu"));
    let md = report::render(&r, report::Format::Md);
    assert!(md.contains("Reproducibility") && md.contains(&sha) && md.contains("9.9.9"), "{md}");
    let html = report::render(&r, report::Format::Html);
    assert!(html.contains(&sha) && html.contains("1.2.3"));
    let json: serde_json::Value =
        serde_json::from_str(&report::render(&r, report::Format::Json)).expect("json");
    assert_eq!(json["provenance"]["rounds"][0]["seed"], 23);
}
