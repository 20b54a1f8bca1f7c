//! Cross-entropy plus soft Dice over the foreground classes present in the batch.
//!
//! Classes absent from a batch's targets are left to the cross-entropy: with them in the Dice
//! mean, each would reward predicting nothing of it anywhere (its smoothed Dice is highest at
//! zero probability), and small organs seen in few slices stopped being predicted at all.
//!
//! On the CPU the loss is one op ([`SegLoss`]) that computes the value and its gradient with
//! respect to the logits in two passes over the pixels; elsewhere, and as the reference it is
//! tested against, it is [`loss_reference`] in candle tensor ops (about fifteen ops, several of
//! them strided reductions over the class axis).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ModelResult;

/// Smoothing of the soft Dice ratio, so classes absent from a batch give a finite loss.
const DICE_SMOOTH: f64 = 1.0;

/// One-hot encoding `[b, classes, h, w]` (f32) of class indices `[b, h, w]` (u32).
pub fn one_hot(targets: &Tensor, classes: usize) -> ModelResult<Tensor> {
    let ids =
        Tensor::arange(0u32, classes as u32, targets.device())?.reshape((1, classes, 1, 1))?;
    Ok(targets.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(DType::F32)?)
}

/// `cross_entropy + dice_weight * (1 - mean soft Dice of the foreground classes present in
/// the targets)`, with soft Dice pooled over the batch. `logits`: `[b, classes, h, w]`; `targets`: `[b, h, w]` u32.
pub fn loss(logits: &Tensor, targets: &Tensor, dice_weight: f64) -> ModelResult<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && targets.dtype() == DType::U32 {
        let op = SegLoss { dice_weight, grad: Arc::new(Mutex::new(Vec::new())) };
        return Ok(logits.contiguous()?.apply_op2(&targets.contiguous()?, op)?);
    }
    loss_reference(logits, targets, dice_weight)
}

/// [`loss`] in candle tensor ops: any device, and the reference for the fused op's tests.
pub fn loss_reference(logits: &Tensor, targets: &Tensor, dice_weight: f64) -> ModelResult<Tensor> {
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
    // Only the foreground classes present in the batch's targets.
    let present =
        target.sum((0, 2, 3))?.narrow(D::Minus1, 1, classes - 1)?.gt(0f64)?.to_dtype(DType::F32)?;
    // On the device throughout (no read-back to the host per step): with no foreground class
    // present, `any` is 0 and the loss is the cross-entropy alone.
    let count = present.sum_all()?;
    let any = count.clamp(0f32, 1f32)?;
    let fg = dice
        .narrow(D::Minus1, 1, classes - 1)?
        .mul(&present)?
        .sum_all()?
        .div(&count.maximum(1f32)?)?;
    Ok((ce + ((1.0 - fg)?.mul(&any)? * dice_weight)?)?)
}

/// The fused loss: value in the forward pass, `d loss / d logits` kept for the backward pass.
///
/// With `p = softmax(z)` per pixel, `t` the one-hot target, `N` pixels, `P` the foreground
/// classes present in the targets and `F = |P|`, `I_c = sum p_c t_c`, `D_c = sum p_c + sum t_c`
/// and `s` the smoothing:
/// - cross-entropy `-(1/N) sum log p_t` has gradient `(p - t) / N`;
/// - `w (1 - (1/F) sum_{c in P} (2 I_c + s) / (D_c + s))` has `dL/dp_c = -(w/F) (2 t_c (D_c +
///   s) - (2 I_c + s)) / (D_c + s)^2` for `c in P` (0 for the others), taken through the
///   softmax as `p_j (g_j - sum_c p_c g_c)`.
#[derive(Debug)]
struct SegLoss {
    dice_weight: f64,
    grad: Arc<Mutex<Vec<f32>>>,
}

/// Per-image sums of the forward pass.
#[derive(Clone, Default)]
struct Sums {
    nll: f64,
    inter: Vec<f64>,
    prob: Vec<f64>,
    count: Vec<f64>,
}

impl Sums {
    fn new(classes: usize) -> Self {
        Self {
            nll: 0.0,
            inter: vec![0.0; classes],
            prob: vec![0.0; classes],
            count: vec![0.0; classes],
        }
    }
    fn merge(mut self, o: Self) -> Self {
        self.nll += o.nll;
        for (a, b) in
            [(&mut self.inter, &o.inter), (&mut self.prob, &o.prob), (&mut self.count, &o.count)]
        {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
        self
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::msg("seg loss: poisoned gradient slot")
}

impl CustomOp2 for SegLoss {
    fn name(&self) -> &'static str {
        "fedtune-seg-loss"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, classes, hw) = match ll.dims() {
            &[b, c, h, w] => (b, c, h * w),
            d => candle_core::bail!("loss: logits must be [b, classes, h, w], got {d:?}"),
        };
        if tl.dims().iter().product::<usize>() != b * hw || tl.dims().first() != Some(&b) {
            candle_core::bail!("loss: targets {:?} do not match logits {:?}", tl.dims(), ll.dims());
        }
        let (Some((l0, l1)), Some((t0, t1))) = (ll.contiguous_offsets(), tl.contiguous_offsets())
        else {
            candle_core::bail!("loss: inputs must be contiguous");
        };
        let z = &ls.as_slice::<f32>()?[l0..l1];
        let t = &ts.as_slice::<u32>()?[t0..t1];
        if let Some(&bad) = t.iter().find(|&&v| v as usize >= classes) {
            candle_core::bail!("loss: label {bad} is outside the model's {classes} classes");
        }
        // Pass 1: softmax per pixel into `p` (becomes the gradient), and the sums.
        let mut p = vec![0f32; z.len()];
        let sums = p
            .par_chunks_mut(classes * hw)
            .zip(z.par_chunks(classes * hw))
            .zip(t.par_chunks(hw))
            .map(|((p, z), t)| {
                let mut s = Sums::new(classes);
                let mut pc = vec![0f32; classes];
                let mut pixel = vec![0f32; classes];
                for (i, &ti) in t.iter().enumerate() {
                    let ti = ti as usize;
                    let mut max = f32::NEG_INFINITY;
                    for c in 0..classes {
                        pixel[c] = z[c * hw + i];
                        max = max.max(pixel[c]);
                    }
                    let mut denom = 0f32;
                    for v in pixel.iter_mut() {
                        *v = (*v - max).exp();
                        denom += *v;
                    }
                    let inv = 1.0 / denom;
                    for c in 0..classes {
                        let pv = pixel[c] * inv;
                        p[c * hw + i] = pv;
                        pc[c] += pv;
                    }
                    s.nll -= ((z[ti * hw + i] - max) - denom.ln()) as f64;
                    s.inter[ti] += p[ti * hw + i] as f64;
                    s.count[ti] += 1.0;
                }
                s.prob.iter_mut().zip(&pc).for_each(|(a, &b)| *a += b as f64);
                s
            })
            .reduce(|| Sums::new(classes), Sums::merge);
        let n = (b * hw) as f64;
        let mut value = sums.nll / n;
        // dL/dp_c for c >= 1 is a_c * t_c - b_c with these per-class constants.
        let (mut a, mut bc) = (vec![0f32; classes], vec![0f32; classes]);
        let present: Vec<usize> = (1..classes).filter(|&c| sums.count[c] > 0.0).collect();
        if self.dice_weight != 0.0 && !present.is_empty() {
            let f = present.len() as f64;
            let mut dice_sum = 0.0;
            for &c in &present {
                let d = sums.prob[c] + sums.count[c] + DICE_SMOOTH;
                let num = 2.0 * sums.inter[c] + DICE_SMOOTH;
                dice_sum += num / d;
                a[c] = (-(self.dice_weight / f) * 2.0 / d) as f32;
                bc[c] = (-(self.dice_weight / f) * num / (d * d)) as f32;
            }
            value += self.dice_weight * (1.0 - dice_sum / f);
        }
        // Pass 2: the gradient in place of `p`.
        let inv_n = (1.0 / n) as f32;
        let dice_grad = |c: usize, ti: usize| {
            if c == 0 { 0.0 } else { (if c == ti { a[c] } else { 0.0 }) - bc[c] }
        };
        p.par_chunks_mut(classes * hw).zip(t.par_chunks(hw)).for_each(|(p, t)| {
            for (i, &ti) in t.iter().enumerate() {
                let ti = ti as usize;
                let dot: f32 = (1..classes).map(|c| p[c * hw + i] * dice_grad(c, ti)).sum();
                for c in 0..classes {
                    let pv = p[c * hw + i];
                    let onehot = if c == ti { 1.0 } else { 0.0 };
                    p[c * hw + i] = (pv - onehot) * inv_n + pv * (dice_grad(c, ti) - dot);
                }
            }
        });
        *self.grad.lock().map_err(|_| poisoned())? = p;
        Ok((CpuStorage::F32(vec![value as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = std::mem::take(&mut *self.grad.lock().map_err(|_| poisoned())?);
        if g.len() != logits.elem_count() {
            candle_core::bail!("loss: backward run twice or before the forward pass");
        }
        let g = Tensor::from_vec(g, logits.shape(), logits.device())?;
        Ok((Some(g.broadcast_mul(grad)?), None))
    }
}
