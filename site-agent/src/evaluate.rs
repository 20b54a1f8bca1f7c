//! Whole-volume prediction at the original grid and per-case scoring.
//!
//! Slices are predicted on the model's grid in batches; the logits are resampled bilinearly
//! back onto the slice's own pixels (the inverse of the slicing map, background outside the
//! model's field of view) before the arg-max, so labels land on the image's grid.

use crate::data::{Dataset, Image, Labels, from_model, resample_bilinear, slice_stack};
use crate::model::Net;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use shared::metrics::{dice, hd95};

use crate::train::TrainResult;

/// Slices per inference batch.
const INFER_BATCH: usize = 32;

/// Predicts a label map on `image`'s grid (`image` in canonical order, as the readers give).
pub fn predict(net: &Net, image: &Image) -> TrainResult<Labels> {
    let spec = net.config().slice_spec();
    let [nx, ny, nz] = image.dims;
    let [sx, sy, _] = image.spacing();
    let (cols, rows) = (from_model(&spec, nx, sx), from_model(&spec, ny, sy));
    let s = spec.size;
    let stack = slice_stack(image, &spec);
    let inputs = Tensor::from_vec(stack, (nz, spec.channels(), s, s), net.device())?;
    let class_to_label = net.organs().class_to_label();
    let classes = class_to_label.len();
    let plane = nx * ny;
    let mut data = Vec::with_capacity(plane * nz);
    let mut start = 0;
    while start < nz {
        let len = INFER_BATCH.min(nz - start);
        let logits = net.infer(&inputs.narrow(0, start, len)?)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        for slice in logits.chunks_exact(classes * s * s) {
            // Background wins outside the field of view: its logit is high, the others low.
            let mut best = vec![f32::NEG_INFINITY; plane];
            let mut arg = vec![0u16; plane];
            for (c, class_logits) in slice.chunks_exact(s * s).enumerate() {
                let fill = if c == 0 { f32::MAX } else { f32::MIN };
                let up = resample_bilinear(class_logits, rows, cols, fill);
                for (i, &v) in up.iter().enumerate() {
                    if v > best[i] {
                        best[i] = v;
                        arg[i] = class_to_label[c];
                    }
                }
            }
            data.extend(arg);
        }
        start += len;
    }
    Ok(image.with_data(data))
}

/// Scores of one test case, keyed by its index in the split (never its identifier).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseScores {
    pub case_index: usize,
    pub scores: Vec<LabelScore>,
}

/// Predicts and scores every case of `data` for every organ of the map.
pub fn evaluate(net: &Net, data: &Dataset) -> TrainResult<Vec<CaseScores>> {
    let _span = tracing::info_span!("evaluate", cases = data.cases.len()).entered();
    let labels = data.organs.labels();
    data.cases
        .iter()
        .enumerate()
        .map(|(case_index, case)| {
            let pred = predict(net, &case.image)?;
            let scores = score_labels(&case.labels, &pred, &labels)
                .expect("a prediction is made on its image's grid");
            Ok(CaseScores { case_index, scores })
        })
        .collect()
}

/// Dice of `label` for every case, in case order.
pub fn dice_of(cases: &[CaseScores], label: u16) -> Vec<f64> {
    cases
        .iter()
        .filter_map(|c| c.scores.iter().find(|s| s.label == label).map(|s| s.dice))
        .collect()
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
