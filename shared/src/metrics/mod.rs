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
