//! Batch normalisation on the CPU: the training-mode op with its fused backward, and the
//! inference-only per-channel affine.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous;

/// Batch statistics that the fused batch-norm op computes in its forward pass and reuses in
/// its backward pass; the caller reads them to update the running statistics.
#[derive(Debug, Default)]
pub struct BnStats {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// Biased variance per channel.
    pub var: Vec<f32>,
}

/// Training-mode batch normalisation `y = (x - mean) * inv_std * gamma + beta` over
/// `(batch, h, w)` as one op with a fused backward, on contiguous f32 CPU tensors.
#[derive(Debug)]
struct BatchNormTrain {
    eps: f32,
    /// Apply ReLU to the output (and mask the gradient by it) in the same pass.
    relu: bool,
    stats: std::sync::Arc<std::sync::Mutex<BnStats>>,
}

fn dims_bc_hw(layout: &Layout) -> Result<(usize, usize, usize)> {
    match layout.dims() {
        [b, c, h, w] => Ok((*b, *c, h * w)),
        d => candle_core::bail!("batch norm expects [b, c, h, w], got {d:?}"),
    }
}

/// `out = x * scale + shift`, then ReLU when `relu`: one channel plane of batch norm.
fn scale_shift(out: &mut [f32], x: &[f32], scale: f32, shift: f32, relu: bool) {
    if relu {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v * scale + shift).max(0.0);
        }
    } else {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}

/// Lanes of the vectorised sums: 16 f32 partial sums (one AVX-512 register, two AVX2 ones).
const LANES: usize = 16;
/// Elements summed in f32 lanes before the lanes are added into f64.
const BLOCK: usize = 4096;

/// `sum f(a[i], b[i], c[i])` over three equal slices, `f` giving two terms summed separately:
/// 16 independent f32 lanes per block of [`BLOCK`] elements (so the loop vectorises instead of
/// waiting on one running sum), blocks added in f64.
fn lane_sums2(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> (f32, f32),
) -> (f64, f64) {
    let (mut t0, mut t1) = (0f64, 0f64);
    for ((a, b), c) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(c.chunks(BLOCK)) {
        let (mut l0, mut l1) = ([0f32; LANES], [0f32; LANES]);
        let (ia, ib, ic) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
        let (ra, rb, rc) = (ia.remainder(), ib.remainder(), ic.remainder());
        for ((a, b), c) in ia.zip(ib).zip(ic) {
            for k in 0..LANES {
                let (u, v) = f(a[k], b[k], c[k]);
                l0[k] += u;
                l1[k] += v;
            }
        }
        for ((&a, &b), &c) in ra.iter().zip(rb).zip(rc) {
            let (u, v) = f(a, b, c);
            l0[0] += u;
            l1[0] += v;
        }
        t0 += l0.iter().map(|&v| v as f64).sum::<f64>();
        t1 += l1.iter().map(|&v| v as f64).sum::<f64>();
    }
    (t0, t1)
}

/// `sum f(x[i])` over one slice, vectorised as [`lane_sums2`].
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    lane_sums2(x, x, x, |v, _, _| (f(v), 0.0)).0
}

/// Per-channel sums of `f(x)` over `[b, c, hw]` data, in parallel over channels.
fn per_channel(
    x: &[f32],
    (b, c, hw): (usize, usize, usize),
    f: impl Fn(usize, &[f32]) -> f64 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| (0..b).map(|bi| f(ch, &x[(bi * c + ch) * hw..][..hw])).sum())
        .collect()
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "fedtune-batchnorm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::profile::span(|| format!("batchnorm fwd {}", super::plane(xl)));
        let dims = dims_bc_hw(xl)?;
        let (b, c, hw) = dims;
        let x = contiguous(xs, xl, "batch norm")?;
        let gamma = contiguous(gs, gl, "batch norm weight")?;
        let beta = contiguous(bs, bl, "batch norm bias")?;
        let n = (b * hw) as f64;
        let mean: Vec<f64> =
            per_channel(x, dims, |_, s| lane_sum(s, |v| v)).into_iter().map(|s| s / n).collect();
        let var: Vec<f64> = per_channel(x, dims, |ch, s| {
            let m = mean[ch] as f32;
            lane_sum(s, |v| (v - m) * (v - m))
        })
        .into_iter()
        .map(|s| s / n)
        .collect();
        let inv_std: Vec<f32> =
            var.iter().map(|&v| (1.0 / (v + self.eps as f64).sqrt()) as f32).collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(i, (yo, xi))| {
            let ch = i % c;
            let scale = inv_std[ch] * gamma[ch];
            let shift = beta[ch] - mean[ch] as f32 * scale;
            scale_shift(yo, xi, scale, shift, self.relu);
        });
        let mut stats = self.stats.lock().map_err(|_| candle_core::Error::msg("poisoned stats"))?;
        *stats = BnStats {
            mean: mean.iter().map(|&m| m as f32).collect(),
            var: var.iter().map(|&v| v as f32).collect(),
            inv_std,
        };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let (mean, inv_std) = {
            let s = self.stats.lock().map_err(|_| candle_core::Error::msg("poisoned stats"))?;
            (s.mean.clone(), s.inv_std.clone())
        };
        let sums = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
        let op = BatchNormBackward {
            relu: self.relu,
            gamma: gamma.to_vec1::<f32>()?,
            mean,
            inv_std,
            sums: sums.clone(),
        };
        let dx = x.contiguous()?.apply_op3_no_bwd(&res.contiguous()?, &grad.contiguous()?, &op)?;
        let (dgamma, dbeta) = std::mem::take(
            &mut *sums.lock().map_err(|_| candle_core::Error::msg("poisoned sums"))?,
        );
        let dev = x.device();
        let dg = Tensor::from_vec(dgamma, c, dev)?;
        let db = Tensor::from_vec(dbeta, c, dev)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// The backward pass of [`BatchNormTrain`] over `(x, y, dy)`, reading the tensors in place:
/// `dx` is its output, `(dgamma, dbeta)` land in `sums`.
#[derive(Debug)]
struct BatchNormBackward {
    relu: bool,
    gamma: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    sums: std::sync::Arc<std::sync::Mutex<(Vec<f32>, Vec<f32>)>>,
}

impl candle_core::CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "fedtune-batchnorm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _span = super::profile::span(|| format!("batchnorm bwd {}", super::plane(xl)));
        let dims = dims_bc_hw(xl)?;
        let (b, c, hw) = dims;
        let x = contiguous(xs, xl, "batch norm backward input")?;
        let y = contiguous(ys, yl, "batch norm backward output")?;
        let dy = contiguous(gs, gl, "batch norm backward gradient")?;
        if y.len() != x.len() || dy.len() != x.len() || self.mean.len() != c {
            candle_core::bail!("batch norm backward: shapes do not match");
        }
        // The gradient that reaches the normalised output: dy, masked by ReLU where fused.
        let relu = self.relu;
        // dbeta = sum g; dgamma = sum g * xhat, per channel.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, s) = (self.mean[ch], self.inv_std[ch]);
                let (mut db, mut dg) = (0f64, 0f64);
                for bi in 0..b {
                    let plane = (bi * c + ch) * hw..(bi * c + ch + 1) * hw;
                    let (x, y, dy) = (&x[plane.clone()], &y[plane.clone()], &dy[plane]);
                    let (pb, pg) = lane_sums2(x, y, dy, |xi, yi, di| {
                        let gi = if relu && yi <= 0.0 { 0.0 } else { di };
                        (gi, gi * (xi - m) * s)
                    });
                    db += pb;
                    dg += pg;
                }
                (db, dg)
            })
            .collect();
        let n = (b * hw) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, out)| {
            let ch = plane % c;
            let o = plane * hw;
            let (m, s) = (self.mean[ch], self.inv_std[ch]);
            let k = self.gamma[ch] * s / n;
            let (db, dg) = (sums[ch].0 as f32, sums[ch].1 as f32);
            let (xp, yp, dp) = (&x[o..o + hw], &y[o..o + hw], &dy[o..o + hw]);
            for (((d, &xi), &yi), &di) in out.iter_mut().zip(xp).zip(yp).zip(dp) {
                let gi = if relu && yi <= 0.0 { 0.0 } else { di };
                *d = k * (n * gi - db - (xi - m) * s * dg);
            }
        });
        let mut slot = self.sums.lock().map_err(|_| candle_core::Error::msg("poisoned sums"))?;
        *slot = (
            sums.iter().map(|&(_, dg)| dg as f32).collect(),
            sums.iter().map(|&(db, _)| db as f32).collect(),
        );
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// The output of [`batch_norm_train`] and the batch statistics it used.
#[derive(Debug)]
pub struct BnOutput {
    pub y: Tensor,
    pub mean: Vec<f32>,
    /// Biased variance per channel.
    pub var: Vec<f32>,
}

/// Training-mode batch normalisation (optionally followed by ReLU) with a fused backward on the
/// CPU; returns the output and the batch statistics (mean, biased variance). `None` where the fused op does not apply
/// (another device or dtype), so the caller falls back to tensor ops.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Option<BnOutput>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    let stats = std::sync::Arc::new(std::sync::Mutex::new(BnStats::default()));
    let op = BatchNormTrain { eps: eps as f32, relu, stats: stats.clone() };
    let y = x.contiguous()?.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let s = stats.lock().map_err(|_| candle_core::Error::msg("poisoned stats"))?;
    Ok(Some(BnOutput { y, mean: s.mean.clone(), var: s.var.clone() }))
}

/// Inference-only per-channel `y = x * scale[c] + shift[c]` (batch norm with running statistics
/// folded in), optionally followed by ReLU, in one pass. It has no backward: it is used only
/// where no graph is recorded (frozen layers and inference).
#[derive(Debug)]
struct ChannelAffine {
    scale: Vec<f32>,
    shift: Vec<f32>,
    relu: bool,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "fedtune-channel-affine"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _span = super::profile::span(|| format!("bn-affine {}", super::plane(layout)));
        let (_, c, hw) = dims_bc_hw(layout)?;
        let x = contiguous(storage, layout, "channel affine")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(i, (yo, xi))| {
            scale_shift(yo, xi, self.scale[i % c], self.shift[i % c], self.relu);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

/// `x * scale[c] + shift[c]` (then ReLU if asked) for inference on contiguous f32 CPU tensors;
/// `None` elsewhere, so the caller falls back to tensor ops.
pub fn channel_affine(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    relu: bool,
) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || x.rank() != 4 {
        return Ok(None);
    }
    let op = ChannelAffine { scale: scale.to_vec1::<f32>()?, shift: shift.to_vec1::<f32>()?, relu };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}
