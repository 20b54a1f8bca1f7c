//! Bounds on what a site reports: scores, durations and arms a result may hold.

use proto::pb;

use super::{SResult, ServiceError};

fn check_scores(scores: &[pb::CaseScore]) -> SResult<()> {
    let bad = |m: String| Err(ServiceError::InvalidArgument(m));
    for c in scores {
        if c.organ.is_empty() || c.organ.len() > 64 {
            return bad("organ names are 1 to 64 characters".into());
        }
        if !(0.0..=1.0).contains(&c.dice) {
            return bad(format!("Dice {} of {} is outside 0..1", c.dice, c.organ));
        }
        if let Some(h) = c.hd95_mm
            && !(h.is_finite() && h >= 0.0)
        {
            return bad(format!("HD95 {h} of {} is not a distance", c.organ));
        }
    }
    let organs: std::collections::BTreeSet<&str> =
        scores.iter().map(|c| c.organ.as_str()).collect();
    if organs.len() > 256 {
        return bad(format!("{} organs in a result; at most 256", organs.len()));
    }
    Ok(())
}

fn check_durations(d: [(&str, f64); 3]) -> SResult<()> {
    for (name, v) in d {
        if !(v.is_finite() && v >= 0.0) {
            return Err(ServiceError::InvalidArgument(format!("{name} = {v} is not a duration")));
        }
    }
    Ok(())
}

pub use crate::rounds::MAX_ARMS;

pub(super) fn check_result(r: &pb::TaskResult) -> SResult<()> {
    if r.arms.is_empty() {
        return Err(ServiceError::InvalidArgument(
            "a result reports at least one arm (the model it scored)".into(),
        ));
    }
    if r.arms.len() > MAX_ARMS {
        return Err(ServiceError::InvalidArgument(format!(
            "{} arms in a result; at most {MAX_ARMS}",
            r.arms.len()
        )));
    }
    for a in &r.arms {
        check_scores(&a.scores)?;
        check_durations([
            ("train_seconds", a.train_seconds),
            ("cache_seconds", a.cache_seconds),
            ("eval_seconds", a.eval_seconds),
        ])?;
    }
    Ok(())
}

/// `REFUSAL_CODE_TOO_MANY_EPOCHS` -> `too many epochs`.
pub(super) fn reason_name(code: &str, prefix: &str) -> String {
    code.strip_prefix(prefix).unwrap_or(code).to_lowercase().replace('_', " ")
}
