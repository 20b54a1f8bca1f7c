//! Whole-volume prediction at the original grid and per-case scoring.
//!
//! Slices are predicted at the model's size in batches; the logits are resized bilinearly back
//! to the slice's own in-plane size before the arg-max, so labels land on the image's grid.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use shared::data::{Dataset, Image, Labels, Volume, slice_stack};
use shared::metrics::{LabelScore, score_labels};
use shared::model::Net;

use crate::train::TrainResult;

/// Slices per inference batch.
const INFER_BATCH: usize = 32;

/// Predicts a label map on `image`'s grid.
pub fn predict(net: &Net, image: &Image) -> TrainResult<Labels> {
    let spec = net.config().slice_spec();
    let [nx, ny, nz] = image.dims;
    let s = spec.size;
    let stack = slice_stack(image, &spec);
    let inputs = Tensor::from_vec(stack, (nz, spec.channels(), s, s), net.device())?;
    let class_to_label = net.organs().class_to_label();
    let mut data = Vec::with_capacity(nx * ny * nz);
    let mut start = 0;
    while start < nz {
        let len = INFER_BATCH.min(nz - start);
        let logits = net.infer(&inputs.narrow(0, start, len)?)?;
        let logits =
            if (ny, nx) == (s, s) { logits } else { logits.upsample_bilinear2d(ny, nx, false)? };
        let classes = logits.argmax(1)?.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        data.extend(classes.into_iter().map(|c| class_to_label[c as usize]));
        start += len;
    }
    Ok(Volume { dims: image.dims, spacing: image.spacing, data })
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
