//! Parameter-holding building blocks: a bias-free convolution and batch normalisation.
//!
//! Every forward takes `track`: when false the parameters are read detached, so frozen layers
//! and inference build no autograd graph.

use candle_core::{D, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::ModelResult;

/// Momentum of the running statistics (PyTorch's default).
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

fn read(v: &Var, track: bool) -> Tensor {
    if track { v.as_tensor().clone() } else { v.as_detached_tensor() }
}

/// Deterministic parameter initialisation from one seed per tensor.
#[derive(Debug)]
pub(super) struct Init {
    rng: ChaCha8Rng,
}

impl Init {
    pub(super) fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// He (Kaiming) normal initialisation over fan-in.
    pub(super) fn kaiming(&mut self, shape: &[usize], gain: f32, dev: &Device) -> ModelResult<Var> {
        let fan_in: usize = shape[1..].iter().product();
        let std = gain * (2.0 / fan_in as f32).sqrt();
        let normal = Normal::new(0.0f32, std).expect("positive std");
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut self.rng)).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?)
    }
}

pub(super) fn constant(n: usize, value: f32, dev: &Device) -> ModelResult<Var> {
    Ok(Var::from_tensor(&Tensor::full(value, n, dev)?)?)
}

/// Per-channel sums of `[b, c, h, w]` as `[1, c, 1, 1]`, reducing the contiguous spatial axis
/// first: candle's reductions over strided axes are several times slower.
pub(super) fn channel_sums(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.sum(2)?.sum_keepdim(0)?.reshape((1, c, 1, 1))
}

/// Batch normalisation over (N, H, W) with running statistics.
#[derive(Debug)]
pub(super) struct BatchNorm {
    pub(super) weight: Var,
    pub(super) bias: Var,
    pub(super) running_mean: Var,
    pub(super) running_var: Var,
}

impl BatchNorm {
    pub(super) fn new(c: usize, dev: &Device) -> ModelResult<Self> {
        Ok(Self {
            weight: constant(c, 1.0, dev)?,
            bias: constant(c, 0.0, dev)?,
            running_mean: constant(c, 0.0, dev)?,
            running_var: constant(c, 1.0, dev)?,
        })
    }

    /// `train`: normalise with batch statistics and update the running ones; else use the
    /// running statistics. `relu` applies ReLU to the output (fused on the CPU).
    pub(super) fn forward(
        &self,
        x: &Tensor,
        train: bool,
        track: bool,
        relu: bool,
    ) -> ModelResult<Tensor> {
        let c = x.dim(1)?;
        let (w, b) = (read(&self.weight, track), read(&self.bias, track));
        if train {
            let n = x.elem_count() / c;
            let unbiased = n as f64 / (n.max(2) - 1) as f64;
            let (y, m, v) = match super::ops::batch_norm_train(x, &w, &b, BN_EPS, relu)? {
                Some(super::ops::BnOutput { y, mean, var }) => {
                    let dev = x.device();
                    (y, Tensor::from_vec(mean, c, dev)?, Tensor::from_vec(var, c, dev)?)
                }
                None => {
                    let mean = (channel_sums(x)? / n as f64)?;
                    let xc = x.broadcast_sub(&mean)?;
                    let var = (channel_sums(&xc.sqr()?)? / n as f64)?;
                    let scale =
                        w.reshape((1, c, 1, 1))?.broadcast_div(&(&var + BN_EPS)?.sqrt()?)?;
                    let y = xc.broadcast_mul(&scale)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?;
                    let y = if relu { y.relu()? } else { y };
                    (y, mean.detach().flatten_all()?, var.detach().flatten_all()?)
                }
            };
            let v = (v * unbiased)?;
            let rm = ((self.running_mean.as_detached_tensor() * (1.0 - BN_MOMENTUM))?
                + (m * BN_MOMENTUM)?)?;
            let rv = ((self.running_var.as_detached_tensor() * (1.0 - BN_MOMENTUM))?
                + (v * BN_MOMENTUM)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
            Ok(y)
        } else {
            let (scale, shift) = self.folded(track)?;
            if !track && let Some(y) = super::ops::channel_affine(x, &scale, &shift, relu)? {
                return Ok(y);
            }
            let y = x
                .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
                .broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
            Ok(if relu { y.relu()? } else { y })
        }
    }
}

impl BatchNorm {
    /// The running-statistics normalisation as a per-channel `(scale, shift)`.
    pub(super) fn folded(&self, track: bool) -> ModelResult<(Tensor, Tensor)> {
        let (w, b) = (read(&self.weight, track), read(&self.bias, track));
        let scale = w.div(&(self.running_var.as_detached_tensor() + BN_EPS)?.sqrt()?)?;
        let shift = b.sub(&self.running_mean.as_detached_tensor().mul(&scale)?)?;
        Ok((scale, shift))
    }
}

/// A bias-free 2-D convolution with "same" padding.
#[derive(Debug)]
pub(super) struct Conv {
    pub(super) weight: Var,
    pub(super) stride: usize,
}

impl Conv {
    /// Inference: `relu?(bn(conv(x)) (+ residual))` with `bn`'s running statistics as a
    /// `(scale, shift)` folded into one pass; `None` where the fused op does not run (not the
    /// CPU, not f32).
    pub(super) fn forward_folded(
        &self,
        x: &Tensor,
        (scale, shift): (&Tensor, &Tensor),
        residual: Option<&Tensor>,
        relu: bool,
    ) -> ModelResult<Option<Tensor>> {
        let w = self.weight.as_detached_tensor();
        let k = w.dim(D::Minus1)?;
        let op = super::ops::conv2d_folded;
        Ok(op(x, &w, self.stride, k / 2, scale, shift, residual, relu)?)
    }

    pub(super) fn forward(&self, x: &Tensor, track: bool) -> ModelResult<Tensor> {
        let w = read(&self.weight, track);
        let k = w.dim(D::Minus1)?;
        Ok(super::ops::conv2d(x, &w, self.stride, k / 2)?)
    }
}

pub(super) fn tracked(v: &Var, track: bool) -> Tensor {
    read(v, track)
}
