//! Cross-entropy plus soft Dice over the foreground classes.

use candle_core::{D, DType, Tensor};

use super::ModelResult;

/// Smoothing of the soft Dice ratio, so classes absent from a batch give a finite loss.
const DICE_SMOOTH: f64 = 1.0;

/// One-hot encoding `[b, classes, h, w]` (f32) of class indices `[b, h, w]` (u32).
pub fn one_hot(targets: &Tensor, classes: usize) -> ModelResult<Tensor> {
    let ids =
        Tensor::arange(0u32, classes as u32, targets.device())?.reshape((1, classes, 1, 1))?;
    Ok(targets.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(DType::F32)?)
}

/// `cross_entropy + dice_weight * (1 - mean soft Dice of the foreground classes)`, with soft
/// Dice pooled over the batch.
pub fn loss(logits: &Tensor, targets: &Tensor, dice_weight: f64) -> ModelResult<Tensor> {
    let (b, classes, h, w) = logits.dims4()?;
    let target = one_hot(targets, classes)?;
    let logp = candle_nn::ops::log_softmax(logits, 1)?;
    let ce = (logp.mul(&target)?.sum_all()? * (-1.0 / (b * h * w) as f64))?;
    if dice_weight == 0.0 || classes < 2 {
        return Ok(ce);
    }
    let p = logp.exp()?;
    let inter = p.mul(&target)?.sum((0, 2, 3))?;
    let denom = (p.sum((0, 2, 3))? + target.sum((0, 2, 3))?)?;
    let dice = ((inter * 2.0)? + DICE_SMOOTH)?.div(&(denom + DICE_SMOOTH)?)?;
    let fg = dice.narrow(D::Minus1, 1, classes - 1)?.mean_all()?;
    Ok((ce + ((1.0 - fg)? * dice_weight)?)?)
}
