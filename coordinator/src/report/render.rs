//! The report in words: a table or Markdown, CSV with one row per scope, organ and arm (the
//! HTML page with the plots is the html module's). JSON is the [`Report`] itself.

use std::fmt::Write as _;

use shared::metrics::stats::Summary;

use super::{
    Comparison, MODEL_S, MODEL_ST, MODEL_T, Report, Scope, SweepPoint, Transfer, crosseval,
    federated as fed, finetune, replicates as reps,
};

fn mean_sd(s: Option<&Summary>) -> String {
    match s {
        Some(s) => format!("{:.3} ± {:.3}", s.mean, s.sd.unwrap_or(0.0)),
        None => "-".into(),
    }
}

/// `mean ± SD (median)`, as the methods text promises.
pub(super) fn mean_sd_median(s: Option<&Summary>) -> String {
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

pub(super) fn p_w(c: &Comparison) -> String {
    match &c.wilcoxon {
        Some(w) => format!("{} ({})", fmt_p(w.p_value), w.method),
        None => "-".into(),
    }
}

pub(super) fn p_t(c: &Comparison) -> String {
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

pub(super) fn scope_rows(s: &Scope) -> Vec<Vec<String>> {
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

pub(super) const SCOPE_HEADER: [&str; 8] = [
    "organ",
    "Model_S mean ± SD (median)",
    "Model_T mean ± SD (median)",
    "Model_ST mean ± SD (median)",
    "ST vs S Wilcoxon p",
    "ST vs S t-test p",
    "ST vs T Wilcoxon p",
    "ST vs T t-test p",
];

pub(super) fn hd95_rows(s: &Scope) -> Vec<Vec<String>> {
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

pub(super) const HD95_HEADER: [&str; 4] =
    ["organ", "Model_S HD95 mm", "Model_T HD95 mm", "Model_ST HD95 mm"];

pub(super) fn training_rows(t: &Transfer) -> Vec<Vec<String>> {
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

pub(super) fn sweep_rows(points: &[SweepPoint], by_cases: bool) -> Vec<Vec<String>> {
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

pub(super) fn text(r: &Report, md: bool) -> String {
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
    if let Some(rep) = &r.replicates {
        h(&mut s, 2, &reps::replicate_title(rep));
        table(&mut s, md, &reps::REPLICATE_HEADER, &reps::replicate_rows(rep));
    }
    if let Some(f) = &r.federated {
        h(&mut s, 2, &fed::fed_title(f));
        table(&mut s, md, &fed::FED_HEADER, &fed::fed_rows(f));
        if let Some(sha) = &f.model_sha256 {
            let _ = writeln!(s, "Model_FT: the step {} average, tail {sha}.", f.rounds);
        }
        for (site, why) in &f.refused {
            let _ = writeln!(s, "{site} took no part: {why}.");
        }
    }
    if let Some(m) = &r.cross_eval {
        h(&mut s, 2, &format!("Cross-site matrix: mean Dice over organs (round {})", m.round));
        let header = crosseval::matrix_header(m);
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(&mut s, md, &header, &crosseval::matrix_rows(m, None));
        for a in &m.absent {
            let _ = writeln!(s, "{} at {}: not scored; {}.", a.model, a.site, a.reason);
        }
        for organ in &m.organs {
            h(&mut s, 3, &format!("Cross-site matrix: {organ}"));
            table(&mut s, md, &header, &crosseval::matrix_rows(m, Some(organ)));
        }
    }
    if r.traffic.iter().any(|t| t.down + t.up > 0) {
        h(
            &mut s,
            3,
            &format!(
                "Weights moved per round and site{}",
                r.model_bytes.map_or(String::new(), |b| format!(
                    " (the whole base model is {})",
                    fed::bytes(b)
                ))
            ),
        );
        table(&mut s, md, &fed::TRAFFIC_HEADER, &fed::traffic_rows(&r.traffic));
    }
    h(&mut s, 3, "Reproducibility");
    let _ = writeln!(s, "{}", super::provenance::summary(&r.provenance));
    table(
        &mut s,
        md,
        &super::provenance::SITES_HEADER,
        &super::provenance::site_rows(&r.provenance),
    );
    table(&mut s, md, &super::provenance::ARMS_HEADER, &super::provenance::arm_rows(&r.provenance));
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

pub(super) fn csv(r: &Report) -> String {
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
    let blank = || std::iter::repeat_n(String::new(), 9);
    if let Some(m) = &r.cross_eval {
        for c in &m.cells {
            for (organ, v) in
                c.organs.iter().map(|(o, v)| (o.as_str(), *v)).chain([("mean", c.mean_dice)])
            {
                let head = ["cross-eval", &c.site, organ, &c.model, "", ""];
                row(head
                    .map(String::from)
                    .into_iter()
                    .chain([c.cases.to_string(), v.to_string()])
                    .chain(blank().take(8))
                    .collect());
            }
        }
    }
    if let Some(rep) = &r.replicates {
        for o in &rep.organs {
            for (arm, i) in &o.arms {
                let cmp = match arm.as_str() {
                    MODEL_S => Some(&o.st_vs_s),
                    MODEL_T => Some(&o.st_vs_t),
                    _ => None,
                };
                let w = cmp.and_then(|c| c.wilcoxon.as_ref());
                let head = ["replicates", "pooled", &o.organ, arm, "", ""];
                row(head
                    .map(String::from)
                    .into_iter()
                    .chain([i.n.to_string(), i.mean.to_string(), String::new(), String::new()])
                    .chain([
                        opt(w.map(|w| w.p_value)),
                        w.map_or(String::new(), |w| w.method.to_string()),
                        opt(cmp.and_then(|c| c.ttest.as_ref()).map(|t| t.p_value)),
                    ])
                    .chain(blank().take(3))
                    .collect());
            }
        }
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}
