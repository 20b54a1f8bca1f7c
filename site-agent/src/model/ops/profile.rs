//! Opt-in wall-clock time per CPU op and shape (`site-agent bench --profile`): where a
//! training step or an evaluation spends its time, by op and by layer shape.
//!
//! Off (the default) a span is one relaxed atomic load. On, each op call records its wall time
//! under a key naming the op and its shape (`conv fwd 32->32 k3 s1 @256x256`); ops run their
//! own threads inside the call, so the time is the op's share of the step, not CPU time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<String, (u64, Duration)>>> = Mutex::new(None);

/// Turns recording on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Time spent in one op at one shape.
#[derive(Clone, Debug, Serialize)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub seconds: f64,
}

/// Records the time until it is dropped, when recording is on.
#[derive(Debug)]
#[must_use = "the span records when it is dropped"]
pub(crate) struct Span(Option<(String, Instant)>);

/// Starts timing an op; `key` is only built when recording is on.
pub(crate) fn span(key: impl FnOnce() -> String) -> Span {
    Span(ENABLED.load(Ordering::Relaxed).then(|| (key(), Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((key, start)) = self.0.take() {
            let spent = start.elapsed();
            let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let entry = table.get_or_insert_with(HashMap::new).entry(key).or_default();
            entry.0 += 1;
            entry.1 += spent;
        }
    }
}

/// What was recorded since the last call, slowest first, and clears it.
pub fn take() -> Vec<OpTime> {
    let table = TABLE.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    let mut v: Vec<OpTime> = table
        .into_iter()
        .map(|(op, (calls, t))| OpTime { op, calls, seconds: t.as_secs_f64() })
        .collect();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.op.cmp(&b.op)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_record_only_when_enabled_and_take_clears() {
        let _ = take();
        drop(span(|| "off".into()));
        enable(true);
        drop(span(|| "x".into()));
        drop(span(|| "x".into()));
        enable(false);
        drop(span(|| "off".into()));
        // Other tests may run ops meanwhile: look only at this test's keys.
        let t = take();
        let x: Vec<_> = t.iter().filter(|o| o.op == "x").map(|o| o.calls).collect();
        assert_eq!(x, [2], "{t:?}");
        assert!(!t.iter().any(|o| o.op == "off"), "{t:?}");
        assert!(!take().iter().any(|o| o.op == "x"));
    }
}
