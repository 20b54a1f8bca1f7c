//! A hook for the fault tests in `tests/`: stop at a named point so that a test can kill the
//! process there (SIGKILL, from outside) and check what survives.
//!
//! With `FEDTUNE_TEST_PAUSE_AT=POINT` and `FEDTUNE_TEST_PAUSE_DIR=DIR` set, the agent writes
//! the file `DIR/POINT` on reaching `POINT` and then sleeps until it is killed. Points:
//! - `download`: the first chunk of a model is on disk, the rest is not;
//! - `train`: the first training step of a task is done;
//! - `submit`: the result request is in the audit log, not yet sent.
//!
//! The hook is compiled only with the `test-hooks` feature, which the `tests` crate turns on
//! (so `cargo test --workspace` builds the binary with it); a production build has an empty
//! `pause_at`, and the variables do nothing.

#[cfg(feature = "test-hooks")]
use std::sync::OnceLock;

#[cfg(feature = "test-hooks")]
fn armed() -> Option<&'static (String, std::path::PathBuf)> {
    static ARMED: OnceLock<Option<(String, std::path::PathBuf)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let point = std::env::var("FEDTUNE_TEST_PAUSE_AT").ok()?;
            let dir = std::env::var_os("FEDTUNE_TEST_PAUSE_DIR")?;
            Some((point, dir.into()))
        })
        .as_ref()
}

/// Stops here for good when the test hook names `point`.
#[cfg(feature = "test-hooks")]
pub fn pause_at(point: &str) {
    if let Some((p, dir)) = armed()
        && p == point
    {
        tracing::warn!(point, "test hook: pausing here until killed");
        let _ = std::fs::write(dir.join(point), b"");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// A production build: no hook.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn pause_at(_point: &str) {}
