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
    // A federated round has a task per site and step.
    let progress = match &r.fed {
        Some(f) => format!(
            "step {}/{}, {done}/{} tasks succeeded",
            f.step.min(f.rounds),
            f.rounds,
            r.tasks.len()
        ),
        None => format!("{done}/{} sites succeeded", r.tasks.len()),
    };
    format!(
        "{}  {:<16} {:<12} {:<10} {started}  {progress}",
        r.round_id,
        r.study,
        task,
        round_state(r.state)
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
        let step = if t.fed_step > 0 { format!("step {} ", t.fed_step) } else { String::new() };
        let moved = if t.bytes_down + t.bytes_up > 0 {
            format!(
                " [{} down, {} up]",
                crate::report::federated::bytes(t.bytes_down),
                crate::report::federated::bytes(t.bytes_up)
            )
        } else {
            String::new()
        };
        out(&format!(
            "  {step}{:<16} {:<10} attempt {}{progress}{reason}{moved}",
            t.site,
            task_state(t.state),
            t.attempt
        ));
    }
    if let Some(f) = &r.fed {
        out(&format!("  federated: step {} of {}", f.step.min(f.rounds), f.rounds));
        for a in &f.aggregates {
            let cases: Vec<String> =
                a.sites.iter().zip(&a.cases).map(|(s, n)| format!("{s} ({n} cases)")).collect();
            out(&format!(
                "    step {}: averaged {} -> tail {} ({})",
                a.step,
                cases.join(", "),
                &a.tail_sha256[..a.tail_sha256.len().min(12)],
                crate::report::federated::bytes(a.tail_bytes)
            ));
        }
        if let Some(m) = &f.model {
            out(&format!("  Model_FT: {} ({}, a tail over the base model)", m.name, m.sha256));
        }
    }
}

fn scores_json(scores: &[pb::CaseScore]) -> serde_json::Value {
    scores
        .iter()
        .map(|c| {
            serde_json::json!({
                "organ": c.organ, "case_index": c.case_index, "dice": c.dice, "hd95_mm": c.hd95_mm,
            })
        })
        .collect()
}

/// `results --json`: every site's arms (the models its task scored, in order), each with its
/// training figures and its scores as one row per organ and case index.
pub fn results_json(r: &pb::RoundResults) -> serde_json::Value {
    let round = r.round.as_ref();
    serde_json::json!({
        "round": round.map(|r| r.round_id.clone()),
        "study": round.map(|r| r.study.clone()),
        "state": round.map(|r| round_state(r.state)),
        "sites": r.results.iter().map(|s| {
            let res = s.result.clone().unwrap_or_default();
            let labels = arm_labels(r, &s.site, &res);
            serde_json::json!({
                "site": s.site,
                "device": res.device,
                "arms": res.arms.iter().zip(labels).map(|(a, label)| serde_json::json!({
                    "arm": label,
                    "trainable_layers": a.trainable_layers,
                    "train_cases": a.train_cases,
                    "train_slices": a.train_slices,
                    "train_seconds": a.train_seconds,
                    "cache_seconds": a.cache_seconds,
                    "eval_seconds": a.eval_seconds,
                    "epoch_losses": a.epoch_losses,
                    "weights_sha256": a.weights_sha256,
                    "scores": scores_json(&a.scores),
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

/// What each arm of `site`'s result is, in words: in a transfer round Model_S, Model_T and
/// Model_ST (with k, and n when the arm used fewer training cases); the source's Model_S; a
/// finetune task's base and fine-tuned models; what a plain train or evaluate task scored.
fn arm_labels(r: &pb::RoundResults, site: &str, res: &pb::TaskResult) -> Vec<String> {
    let round = r.round.as_ref();
    let source = round.is_some_and(|i| i.tasks.iter().any(|t| t.source && t.site == site));
    let task_kind = round.and_then(|i| i.spec.as_ref()).map_or(0, |s| s.kind);
    let transfer = task_kind == pb::TaskKind::TransferTarget as i32;
    res.arms
        .iter()
        .map(|a| {
            let kind = pb::ArmKind::try_from(a.spec.as_ref().map_or(0, |s| s.kind))
                .unwrap_or(pb::ArmKind::Unspecified);
            let mut label = match kind {
                _ if !a.model.is_empty() => a.model.clone(),
                _ if source => "Model_S (trained)".to_owned(),
                _ if transfer => crate::report::arm_name(a.spec.as_ref()).to_owned(),
                pb::ArmKind::Base => "base model".to_owned(),
                pb::ArmKind::Scratch => "trained".to_owned(),
                pb::ArmKind::Finetune => "fine-tuned".to_owned(),
                pb::ArmKind::Unspecified => "?".to_owned(),
            };
            if kind == pb::ArmKind::Finetune {
                label.push_str(&format!(" k={}", a.trainable_layers));
            }
            if kind != pb::ArmKind::Base && a.spec.as_ref().is_some_and(|s| s.train_cases > 0) {
                label.push_str(&format!(" n={}", a.train_cases));
            }
            label
        })
        .collect()
}

/// Dice of `organ` in `scores`, in case order.
fn dice_of(scores: &[pb::CaseScore], organ: &str) -> Vec<f64> {
    scores.iter().filter(|c| c.organ == organ).map(|c| c.dice).collect()
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
        let labels = arm_labels(r, &s.site, res);
        let eval: f64 = res.arms.iter().map(|a| a.eval_seconds).sum();
        let trained: Vec<String> = res
            .arms
            .iter()
            .zip(&labels)
            .filter(|(a, _)| a.train_seconds > 0.0)
            .map(|(a, label)| format!("{label} {:.1} s", a.train_seconds))
            .collect();
        let trained = if trained.is_empty() {
            String::new()
        } else {
            format!("training {}, ", trained.join(", "))
        };
        out(&format!("site {} ({}; {trained}evaluation {eval:.1} s)", s.site, res.device));
        let Some(first) = res.arms.first() else { continue };
        let mut header = format!("  {:<18}", "organ");
        for label in &labels {
            header.push_str(&format!(" {label:>15}"));
        }
        out(&format!("{header} {:>8} {:>4}", "HD95 mm", "n"));
        // Organs in the order the first arm lists them; HD95 and n of the first arm.
        let mut organs: Vec<&str> = Vec::new();
        for c in &first.scores {
            if !organs.contains(&c.organ.as_str()) {
                organs.push(&c.organ);
            }
        }
        for organ in organs {
            let mut line = format!("  {organ:<18}");
            for a in &res.arms {
                line.push_str(&format!(" {:>15}", dice_cell(&dice_of(&a.scores, organ))));
            }
            let rows: Vec<&pb::CaseScore> =
                first.scores.iter().filter(|c| c.organ == organ).collect();
            let hd: Vec<f64> = rows.iter().filter_map(|c| c.hd95_mm).collect();
            let hd = match shared::metrics::stats::summary(&hd) {
                Some(s) => format!("{:.1}", s.mean),
                None => "-".to_string(),
            };
            out(&format!("{line} {hd:>8} {:>4}", rows.len()));
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
    fn results_label_every_model_a_task_scored() {
        let arm = |kind: pb::ArmKind, k: u32| pb::ArmResult {
            spec: Some(pb::ArmSpec { kind: kind as i32, ..Default::default() }),
            trainable_layers: k,
            ..Default::default()
        };
        let round = |kind: pb::TaskKind, source: Option<&str>| pb::RoundResults {
            round: Some(pb::RoundInfo {
                spec: Some(pb::TaskSpec { kind: kind as i32, ..Default::default() }),
                tasks: source
                    .map(|s| pb::TaskInfo { site: s.into(), source: true, ..Default::default() })
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let transfer = pb::TaskResult {
            arms: vec![
                arm(pb::ArmKind::Base, 0),
                arm(pb::ArmKind::Scratch, 22),
                arm(pb::ArmKind::Finetune, 3),
            ],
            ..Default::default()
        };
        let r = round(pb::TaskKind::TransferTarget, Some("src"));
        assert_eq!(arm_labels(&r, "a", &transfer), ["Model_S", "Model_T", "Model_ST k=3"]);
        let source =
            pb::TaskResult { arms: vec![arm(pb::ArmKind::Scratch, 22)], ..Default::default() };
        assert_eq!(arm_labels(&r, "src", &source), ["Model_S (trained)"]);
        let finetune = pb::TaskResult {
            arms: vec![arm(pb::ArmKind::Base, 0), arm(pb::ArmKind::Finetune, 2)],
            ..Default::default()
        };
        let r = round(pb::TaskKind::Finetune, None);
        assert_eq!(arm_labels(&r, "a", &finetune), ["base model", "fine-tuned k=2"]);
        let rows = |organ: &str, dice: &[f64]| -> Vec<pb::CaseScore> {
            dice.iter()
                .enumerate()
                .map(|(i, d)| pb::CaseScore {
                    organ: organ.into(),
                    case_index: i as u32,
                    dice: *d,
                    hd95_mm: None,
                })
                .collect()
        };
        let mut scores = rows("brainstem", &[0.5, 0.7]);
        scores.extend(rows("mandible", &[0.9]));
        assert_eq!(dice_of(&scores, "brainstem"), [0.5, 0.7]);
        assert_eq!(dice_cell(&dice_of(&scores, "mandible")), "0.900", "no SD for one case");
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
