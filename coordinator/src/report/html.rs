//! The report as one HTML page: the tables of the text report, box plots per organ and the
//! sweep plots (SVG, inline).

use std::fmt::Write as _;

use super::render::{HD95_HEADER, SCOPE_HEADER, hd95_rows, scope_rows, sweep_rows, training_rows};
use super::{MODEL_S, MODEL_ST, MODEL_T, Report, finetune};

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
    let _ = writeln!(body, "<h2>Methods</h2><p>{}</p>", esc(&r.methods));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedtune report: {}</title>\n<style>\
body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}\
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
.plots{{display:flex;flex-wrap:wrap;gap:8px}}</style></head>\n<body>\n{body}</body></html>\n",
        esc(&r.study)
    )
}
