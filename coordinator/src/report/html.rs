//! The report as one HTML page: the tables of the text report, box plots per organ and the
//! sweep plots (SVG, inline).

use std::fmt::Write as _;

use super::render::{HD95_HEADER, SCOPE_HEADER, hd95_rows, scope_rows, sweep_rows, training_rows};
use super::{
    MODEL_S, MODEL_ST, MODEL_T, Report, crosseval, federated as fed, finetune, replicates as reps,
};

/// A cross-site matrix as a table whose cells are coloured by Dice (red 0 to green 1).
fn heat_map(title: &str, m: &crosseval::CrossEval, organ: Option<&str>) -> String {
    let mut s = format!("<table class=\"heat\"><caption>{}</caption><thead><tr>", esc(title));
    for h in crosseval::matrix_header(m) {
        let _ = write!(s, "<th>{}</th>", esc(&h));
    }
    s.push_str("</tr></thead><tbody>");
    for model in &m.models {
        let _ = write!(s, "<tr><td>{}</td>", esc(model));
        for site in &m.sites {
            let cell = m.cell(model, site);
            let v = match organ {
                None => cell.map(|c| c.mean_dice),
                Some(o) => cell.and_then(|c| c.organs.get(o).copied()),
            };
            match v {
                Some(v) => {
                    let hue = (120.0 * v.clamp(0.0, 1.0)).round();
                    let _ = write!(
                        s,
                        "<td style=\"background:hsl({hue},65%,72%)\" title=\"{} at {}\">{v:.3}</td>",
                        esc(model),
                        esc(site)
                    );
                }
                None => s.push_str("<td class=\"absent\">-</td>"),
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>\n");
    s
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

pub(super) fn html(r: &Report) -> String {
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
                body.push_str(&super::plots::boxplot(&o.organ, &series));
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
        body.push_str(&super::plots::sweep(title, points, by_cases));
        body.push_str(&html_table(
            &["arm", if by_cases { "cases" } else { "layers" }, "Dice", "median", "n"],
            &sweep_rows(points, by_cases),
        ));
    }
    if let Some(rep) = &r.replicates {
        let _ = writeln!(body, "<h2>{}</h2>", esc(&reps::replicate_title(rep)));
        body.push_str(&html_table(&reps::REPLICATE_HEADER, &reps::replicate_rows(rep)));
    }
    if let Some(f) = &r.federated {
        let _ = writeln!(body, "<h2>{}</h2>", esc(&fed::fed_title(f)));
        body.push_str(&html_table(&fed::FED_HEADER, &fed::fed_rows(f)));
        for (site, why) in &f.refused {
            let _ = writeln!(body, "<p>{} took no part: {}.</p>", esc(site), esc(why));
        }
    }
    if let Some(m) = &r.cross_eval {
        let _ = writeln!(
            body,
            "<h2>Cross-site matrix</h2><p>Mean Dice of every model (rows) on every site's test \
             split (columns), round {}; colour from red (0) to green (1).</p>",
            esc(&m.round)
        );
        body.push_str(&heat_map("mean over organs", m, None));
        for a in &m.absent {
            let _ = writeln!(
                body,
                "<p>{} at {}: not scored; {}.</p>",
                esc(&a.model),
                esc(&a.site),
                esc(&a.reason)
            );
        }
        body.push_str("<div class=\"plots\">");
        for organ in &m.organs {
            body.push_str(&heat_map(organ, m, Some(organ)));
        }
        body.push_str("</div>");
    }
    if r.traffic.iter().any(|t| t.down + t.up > 0) {
        let _ = writeln!(
            body,
            "<h2>Weights moved per round and site</h2><p>{}</p>",
            r.model_bytes
                .map_or(String::new(), |b| format!("The whole base model is {}.", fed::bytes(b)))
        );
        body.push_str(&html_table(&fed::TRAFFIC_HEADER, &fed::traffic_rows(&r.traffic)));
    }
    let p = &r.provenance;
    let _ =
        writeln!(body, "<h2>Reproducibility</h2><p>{}</p>", esc(&super::provenance::summary(p)));
    body.push_str(&html_table(&super::provenance::SITES_HEADER, &super::provenance::site_rows(p)));
    body.push_str(&html_table(&super::provenance::ARMS_HEADER, &super::provenance::arm_rows(p)));
    let _ = writeln!(body, "<h2>Methods</h2><p>{}</p>", esc(&r.methods));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedtune report: {}</title>\n<style>\
body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
.plots{{display:flex;flex-wrap:wrap;gap:8px}}caption{{font-weight:bold}}td.absent{{color:#999}}</style></head>\n<body>\n{body}</body></html>\n",
        esc(&r.study)
    )
}
