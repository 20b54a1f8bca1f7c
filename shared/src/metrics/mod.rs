//! Segmentation metrics and paired statistics.
//!
//! - [`dice`] and [`hd95`] follow medpy's `dc` and `hd95`: the surface of a mask is the mask minus
//!   its erosion with face connectivity (voxels on the volume's edge count as surface), distances
//!   come from an exact Euclidean distance transform with the voxel spacing, and HD95 is the 95th
//!   percentile (linear interpolation) of both directed surface distance sets pooled.
//! - [`stats`]: summary statistics, the paired Wilcoxon signed-rank test and the paired t-test,
//!   matching scipy.

mod distance;
pub mod stats;

pub use distance::{edt_squared, hd95, surface};

use serde::{Deserialize, Serialize};

use crate::data::Labels;

/// Dice coefficient of two boolean masks: 1 when both are empty.
pub fn dice(a: &[bool], b: &[bool]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let (mut inter, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += x as usize;
        nb += y as usize;
        inter += (x && y) as usize;
    }
    if na + nb == 0 { 1.0 } else { 2.0 * inter as f64 / (na + nb) as f64 }
}

/// Scores of one label value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    pub label: u16,
    pub dice: f64,
    /// `None` when exactly one of the two masks is empty (undefined).
    pub hd95_mm: Option<f64>,
}

/// Why two label volumes cannot be compared.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    #[error(
        "truth has shape {truth:?} but prediction has shape {pred:?}; both must be on the same grid"
    )]
    ShapeMismatch { truth: [usize; 3], pred: [usize; 3] },
}

/// Every label value present in either volume (background excluded), ascending.
pub fn present_labels(truth: &Labels, pred: &Labels) -> Vec<u16> {
    let mut seen = vec![false; 65536];
    for &l in truth.data.iter().chain(&pred.data) {
        seen[l as usize] = true;
    }
    (1..=u16::MAX).filter(|&l| seen[l as usize]).collect()
}

/// Dice and HD95 per label; spacing comes from `truth`.
pub fn score_labels(
    truth: &Labels,
    pred: &Labels,
    labels: &[u16],
) -> Result<Vec<LabelScore>, MetricsError> {
    if truth.dims != pred.dims {
        return Err(MetricsError::ShapeMismatch { truth: truth.dims, pred: pred.dims });
    }
    Ok(labels
        .iter()
        .map(|&label| {
            let a: Vec<bool> = pred.data.iter().map(|&l| l == label).collect();
            let b: Vec<bool> = truth.data.iter().map(|&l| l == label).collect();
            LabelScore {
                label,
                dice: dice(&a, &b),
                hd95_mm: hd95(&a, &b, truth.dims, truth.spacing()),
            }
        })
        .collect())
}
