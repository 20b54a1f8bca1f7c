//! Tests of the shared crate: metrics against medpy and scipy, NIfTI against real files,
//! manifests, the model and its weights, and the CPU training ops against candle's own.
//! Hostile input: the readers and parsers answer damaged and arbitrary bytes without panicking.

mod cuda;
mod hostile;
mod manifest;
mod metrics;
mod model;
mod nifti;
mod ops;

use std::path::PathBuf;

/// `../shared/testdata` beside the repository, or `None` (tests then skip with a message).
pub(crate) fn testdata(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is absent (the shared test data lives beside the repo)",
            p.display()
        );
        None
    }
}
