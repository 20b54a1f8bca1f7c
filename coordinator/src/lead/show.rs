//! What the study lead's commands print: sites, rounds and results, as text and JSON.

use proto::pb;

use super::out;

/// When a site last called, in words: "online" within a minute (agents poll every 20 s by
/// default), else how long ago.
pub fn last_seen(now: i64, seen: i64) -> String {
    let ago = now - seen;
    match ago {
        _ if seen <= 0 => "never seen".into(),
        ..=60 => "online".into(),
        61..=3_600 => format!("last seen {} min ago", ago / 60),
        3_601..=172_800 => format!("last seen {} h ago", ago / 3_600),
        _ => format!("last seen {} days ago", ago / 86_400),
    }
}

/// What a site trains on, from its last Hello: `  cuda (NVIDIA H200, 139.8 GiB, policy cap
/// 40.0 GiB)` or `  cpu (16 threads)`.
pub(super) fn device_summary(c: &pb::Capabilities) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match c.device.as_str() {
        "" => String::new(),
        "cuda" => {
            let cap = if c.max_gpu_memory_bytes > 0 {
                format!(", policy cap {:.1} GiB", gib(c.max_gpu_memory_bytes))
            } else {
                String::new()
            };
            format!(
                "  cuda ({}, {:.1} GiB, {:.1} GiB free at hello{cap})",
                c.gpu_name,
                gib(c.gpu_memory_bytes),
                gib(c.gpu_free_bytes)
            )
        }
        other => format!("  {other} ({} threads)", c.threads),
    }
}

pub(super) fn task_state(s: i32) -> &'static str {
    match pb::TaskState::try_from(s).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Waiting => "waiting",
        pb::TaskState::Pending => "pending",
        pb::TaskState::Leased => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Refused => "refused",
        pb::TaskState::Cancelled => "cancelled",
        pb::TaskState::Unspecified => "?",
    }
}

pub fn round_state(s: i32) -> &'static str {
    match pb::RoundState::try_from(s).unwrap_or(pb::RoundState::Unspecified) {
        pb::RoundState::Running => "running",
        pb::RoundState::Completed => "completed",
        pb::RoundState::Failed => "failed",
        pb::RoundState::Cancelled => "cancelled",
        pb::RoundState::Unspecified => "?",
    }
}

/// One round in a line: id, study, task, state, start (`YYYY-MM-DD HH:MM UTC`), succeeded of all
/// sites.
pub fn round_line(r: &pb::RoundInfo) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let task = if spec.template.is_empty() {
        pb::TaskKind::try_from(spec.kind)
            .map(|k| k.as_str_name().trim_start_matches("TASK_KIND_").to_ascii_lowercase())
            .unwrap_or_else(|_| format!("kind {}", spec.kind))
    } else {
        spec.template.clone()
    };
    let started = shared::cert::utc(r.created_unix);
    let done = r.tasks.iter().filter(|t| t.state == pb::TaskState::Succeeded as i32).count();
    format!(
        "{}  {:<16} {:<12} {:<10} {started}  {done}/{} sites succeeded",
        r.round_id,
        r.study,
        task,
        round_state(r.state),
        r.tasks.len()
    )
}

pub(super) fn print_round(r: &pb::RoundInfo) {
    let reason = if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) };
    out(&format!("round {} of study {}: {}{reason}", r.round_id, r.study, round_state(r.state)));
    for t in &r.tasks {
        let progress = t
            .progress
            .as_ref()
            .filter(|_| t.state == pb::TaskState::Leased as i32)
            .map(|p| {
                format!(
                    " {} {:.0}% epoch {}/{} loss {:.3}",
                    p.phase,
                    p.fraction * 100.0,
                    p.epoch,
                    p.epochs,
                    p.loss
                )
            })
            .unwrap_or_default();
        let reason = if t.reason.is_empty() { String::new() } else { format!(" ({})", t.reason) };
        out(&format!(
            "  {:<16} {:<10} attempt {}{progress}{reason}",
            t.site,
            task_state(t.state),
            t.attempt
        ));
    }
}

/// Mean and SD of a slice (SD with n - 1).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    shared::metrics::stats::summary(v)
        .map(|s| (s.mean, s.sd.unwrap_or(0.0)))
        .unwrap_or((f64::NAN, 0.0))
}

fn organs_json(organs: &[pb::OrganScores]) -> serde_json::Value {
    organs
        .iter()
        .map(|o| {
            serde_json::json!({
                "organ": o.organ,
                "cases": o.cases.iter().map(|c| serde_json::json!({
                    "case_index": c.case_index, "dice": c.dice, "hd95_mm": c.hd95_mm,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `results --json`: every site's scores per organ and case; `arms` holds a transfer target's
/// arms, or a finetune task's base model scored on the same cases before fine-tuning.
pub fn results_json(r: &pb::RoundResults) -> serde_json::Value {
    let round = r.round.as_ref();
    serde_json::json!({
        "round": round.map(|r| r.round_id.clone()),
        "study": round.map(|r| r.study.clone()),
        "state": round.map(|r| round_state(r.state)),
        "sites": r.results.iter().map(|s| {
            let res = s.result.clone().unwrap_or_default();
            serde_json::json!({
                "site": s.site,
                "device": res.device,
                "train_seconds": res.train_seconds,
                "cache_seconds": res.cache_seconds,
                "eval_seconds": res.eval_seconds,
                "epoch_losses": res.epoch_losses,
                "weights_sha256": res.weights_sha256,
                "organs": organs_json(&res.organs),
                "arms": res.arms.iter().map(|a| serde_json::json!({
                    "arm": crate::report::arm_name(a.spec.as_ref()),
                    "trainable_layers": a.trainable_layers,
                    "train_cases": a.train_cases,
                    "train_seconds": a.train_seconds,
                    "organs": organs_json(&a.organs),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// `mean ± SD` of Dice values; the mean alone for one case (no SD is defined), "-" for none.
fn dice_cell(v: &[f64]) -> String {
    match shared::metrics::stats::summary(v) {
        Some(s) => match s.sd {
            Some(sd) => format!("{:.3} ± {sd:.3}", s.mean),
            None => format!("{:.3}", s.mean),
        },
        None => "-".into(),
    }
}

/// One scored model of a task: its label, training seconds and scores.
struct Scored<'a> {
    label: String,
    train_seconds: f64,
    organs: &'a [pb::OrganScores],
}

/// Every model a task scored: the task's own (evaluate, train, finetune, a source's Model_S)
/// and each arm (a transfer target's arms, a finetune task's base model).
fn scored_models(res: &pb::TaskResult) -> Vec<Scored<'_>> {
    let mut out = Vec::new();
    // A task with a model of its own and a base arm is a finetune task with its baseline.
    let finetune_base = !res.organs.is_empty()
        && res
            .arms
            .iter()
            .any(|a| a.spec.as_ref().is_some_and(|s| s.kind == pb::ArmKind::Base as i32));
    if !res.organs.is_empty() {
        let label = if finetune_base { "fine-tuned" } else { "Dice" };
        out.push(Scored {
            label: label.into(),
            train_seconds: res.train_seconds,
            organs: &res.organs,
        });
    }
    for a in &res.arms {
        let kind = a.spec.as_ref().map_or(0, |s| s.kind);
        let mut label = if finetune_base && kind == pb::ArmKind::Base as i32 {
            "base model".to_string()
        } else {
            crate::report::arm_name(a.spec.as_ref()).to_string()
        };
        if kind == pb::ArmKind::Finetune as i32 {
            label.push_str(&format!(" k={}", a.trainable_layers));
        }
        if kind != pb::ArmKind::Base as i32 && a.spec.as_ref().is_some_and(|s| s.train_cases > 0) {
            label.push_str(&format!(" n={}", a.train_cases));
        }
        out.push(Scored { label, train_seconds: a.train_seconds, organs: &a.organs });
    }
    out
}

pub(super) fn print_results(r: &pb::RoundResults) {
    if let Some(round) = &r.round {
        out(&format!(
            "round {} of study {}: {}",
            round.round_id,
            round.study,
            round_state(round.state)
        ));
    }
    for s in &r.results {
        let Some(res) = &s.result else { continue };
        let models = scored_models(res);
        let eval: f64 = res.eval_seconds + res.arms.iter().map(|a| a.eval_seconds).sum::<f64>();
        let trained: Vec<String> = models
            .iter()
            .filter(|m| m.train_seconds > 0.0)
            .map(|m| format!("{} {:.1} s", m.label, m.train_seconds))
            .collect();
        let trained = if trained.is_empty() {
            String::new()
        } else {
            format!("training {}, ", trained.join(", "))
        };
        out(&format!("site {} ({}; {trained}evaluation {eval:.1} s)", s.site, res.device));
        if models.is_empty() {
            continue;
        }
        let mut header = format!("  {:<18}", "organ");
        for m in &models {
            header.push_str(&format!(" {:>15}", m.label));
        }
        out(&format!("{header} {:>8} {:>4}", "HD95 mm", "n"));
        // Organs in the order the first model lists them; HD95 and n of the first model.
        for o in models[0].organs {
            let mut line = format!("  {:<18}", o.organ);
            for m in &models {
                let dice: Vec<f64> = m
                    .organs
                    .iter()
                    .find(|x| x.organ == o.organ)
                    .map(|x| x.cases.iter().map(|c| c.dice).collect())
                    .unwrap_or_default();
                line.push_str(&format!(" {:>15}", dice_cell(&dice)));
            }
            let hd: Vec<f64> = o.cases.iter().filter_map(|c| c.hd95_mm).collect();
            let hd = if hd.is_empty() { "-".to_string() } else { format!("{:.1}", mean_sd(&hd).0) };
            out(&format!("{line} {hd:>8} {:>4}", o.cases.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_list_says_what_each_site_trains_on() {
        let cpu = pb::Capabilities { device: "cpu".into(), threads: 16, ..Default::default() };
        assert_eq!(device_summary(&cpu), "  cpu (16 threads)");
        let gib = 1u64 << 30;
        let gpu = pb::Capabilities {
            device: "cuda".into(),
            gpu_name: "NVIDIA H200".into(),
            gpu_memory_bytes: 140 * gib,
            gpu_free_bytes: 139 * gib,
            max_gpu_memory_bytes: 40 * gib,
            ..Default::default()
        };
        assert_eq!(
            device_summary(&gpu),
            "  cuda (NVIDIA H200, 140.0 GiB, 139.0 GiB free at hello, policy cap 40.0 GiB)"
        );
        assert_eq!(device_summary(&pb::Capabilities::default()), "", "an agent before devices");
    }

    #[test]
    fn results_list_every_model_a_task_scored() {
        let organ = |dice: &[f64]| {
            vec![pb::OrganScores {
                organ: "brainstem".into(),
                cases: dice
                    .iter()
                    .enumerate()
                    .map(|(i, d)| pb::CaseScore { case_index: i as u32, dice: *d, hd95_mm: None })
                    .collect(),
            }]
        };
        let arm = |kind: pb::ArmKind, k: u32, dice: &[f64]| pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: kind as i32, ..Default::default() }),
            trainable_layers: k,
            organs: organ(dice),
            ..Default::default()
        };
        // A transfer target: no model of its own, three arms.
        let transfer = pb::TaskResult {
            arms: vec![
                arm(pb::ArmKind::Base, 0, &[0.5, 0.6]),
                arm(pb::ArmKind::Scratch, 22, &[0.6, 0.7]),
                arm(pb::ArmKind::Finetune, 3, &[0.7]),
            ],
            ..Default::default()
        };
        let labels: Vec<String> = scored_models(&transfer).into_iter().map(|m| m.label).collect();
        assert_eq!(labels, ["Model_S", "Model_T", "Model_ST k=3"]);
        // A finetune task: its own model and the base model.
        let finetune = pb::TaskResult {
            organs: organ(&[0.7, 0.8]),
            arms: vec![arm(pb::ArmKind::Base, 0, &[0.5, 0.6])],
            ..Default::default()
        };
        let labels: Vec<String> = scored_models(&finetune).into_iter().map(|m| m.label).collect();
        assert_eq!(labels, ["fine-tuned", "base model"]);
        assert_eq!(dice_cell(&[0.7]), "0.700", "no SD for one case");
        assert_eq!(dice_cell(&[0.5, 0.7]), "0.600 ± 0.141");
        assert_eq!(dice_cell(&[]), "-");
    }

    #[test]
    fn last_seen_in_words() {
        let now = 1_000_000;
        assert_eq!(last_seen(now, 0), "never seen");
        assert_eq!(last_seen(now, now - 15), "online");
        assert_eq!(last_seen(now, now - 61), "last seen 1 min ago");
        assert_eq!(last_seen(now, now - 7_200), "last seen 2 h ago");
        assert_eq!(last_seen(now, now - 3 * 86_400), "last seen 3 days ago");
    }
}
