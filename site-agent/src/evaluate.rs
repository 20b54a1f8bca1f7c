//! Whole-volume prediction at the original grid and per-case scoring.
//!
//! Slices are predicted on the model's grid in batches; the logits are resampled bilinearly
//! back onto the slice's own pixels (the inverse of the slicing map, background outside the
//! model's field of view) before the arg-max, so labels land on the image's grid.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use shared::data::{Dataset, Image, Labels, resample_bilinear, slice_stack};
use shared::metrics::{LabelScore, score_labels};
use shared::model::Net;

use crate::train::TrainResult;

/// Slices per inference batch.
const INFER_BATCH: usize = 32;

/// Predicts a label map on `image`'s grid (`image` in canonical order, as the readers give).
pub fn predict(net: &Net, image: &Image) -> TrainResult<Labels> {
    let spec = net.config().slice_spec();
    let [nx, ny, nz] = image.dims;
    let [sx, sy, _] = image.spacing();
    let (cols, rows) = (spec.from_model(nx, sx), spec.from_model(ny, sy));
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
