//! Convolution for training on the CPU as im2col + GEMM.
//!
//! candle 0.11's CPU convolution backward runs a direct `conv_transpose2d` loop for the input
//! gradient and a convolution with an HxW kernel for the weight gradient, about ten times slower
//! than PyTorch. Here a convolution is `im2col` (a [`CustomOp1`] whose backward is `col2im`)
//! followed by a batched matrix product, so candle's autograd differentiates the product with
//! its GEMM (the `gemm` crate) and only the cheap, memory-bound rearrangements are ours:
//!
//! - forward: `y[b] = W[co, ci*k*k] @ cols[b]`, `cols = im2col(x)`;
//! - backward-data: `dcols[b] = W^T @ dy[b]`, then `dx = col2im(dcols)`;
//! - backward-filter: `dW = sum_b dy[b] @ cols[b]^T`.
//!
//! Written here (not taken from a crate) because candle exposes no faster CPU path and these
//! loops are where training time goes; see ARCHITECTURE.md.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a 2-D convolution over one `[channels, h, w]` image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    fn cols_len(&self) -> usize {
        self.out_h() * self.out_w()
    }
    /// The output index range `[lo, hi)` along one axis for kernel offset `ki`, where the input
    /// index `o * stride + ki - pad` is inside `0..n`.
    fn valid(&self, n: usize, n_out: usize, ki: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if ki >= self.pad { 0 } else { (self.pad - ki).div_ceil(s) };
        // o * s + ki - pad <= n - 1  <=>  o <= (n - 1 + pad - ki) / s
        let hi = if n + self.pad > ki { ((n - 1 + self.pad - ki) / s + 1).min(n_out) } else { 0 };
        (lo.min(hi), hi)
    }
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `[b, c, h, w]` -> `[b, c*k*k, out_h*out_w]`.
#[derive(Debug)]
struct Im2Col(Geometry);

/// `[b, c*k*k, out_h*out_w]` -> `[b, c, h, w]`, summing overlapping taps (the adjoint of im2col).
#[derive(Debug)]
struct Col2Im(Geometry);

fn im2col(g: &Geometry, x: &[f32]) -> Vec<f32> {
    let (oh, ow, l, kk) = (g.out_h(), g.out_w(), g.cols_len(), g.k * g.k);
    let mut out = vec![0f32; g.batch * g.channels * kk * l];
    out.par_chunks_mut(kk * l).enumerate().for_each(|(bc, block)| {
        let img = &x[bc * g.h * g.w..(bc + 1) * g.h * g.w];
        for ki in 0..g.k {
            let (y0, y1) = g.valid(g.h, oh, ki);
            for kj in 0..g.k {
                let (x0, x1) = g.valid(g.w, ow, kj);
                if x0 == x1 {
                    continue; // this tap only ever reads padding
                }
                let row = &mut block[(ki * g.k + kj) * l..][..l];
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.pad;
                    let src = &img[iy * g.w..(iy + 1) * g.w];
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    if g.stride == 1 {
                        let ix0 = x0 + kj - g.pad;
                        dst[x0..x1].copy_from_slice(&src[ix0..ix0 + (x1 - x0)]);
                    } else {
                        for ox in x0..x1 {
                            dst[ox] = src[ox * g.stride + kj - g.pad];
                        }
                    }
                }
            }
        }
    });
    out
}

fn col2im(g: &Geometry, cols: &[f32]) -> Vec<f32> {
    let (oh, ow, l, kk) = (g.out_h(), g.out_w(), g.cols_len(), g.k * g.k);
    let mut out = vec![0f32; g.batch * g.channels * g.h * g.w];
    out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(bc, img)| {
        let block = &cols[bc * kk * l..(bc + 1) * kk * l];
        for ki in 0..g.k {
            let (y0, y1) = g.valid(g.h, oh, ki);
            for kj in 0..g.k {
                let (x0, x1) = g.valid(g.w, ow, kj);
                if x0 == x1 {
                    continue; // this tap only ever reads padding
                }
                let row = &block[(ki * g.k + kj) * l..][..l];
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.pad;
                    let dst = &mut img[iy * g.w..(iy + 1) * g.w];
                    let src = &row[oy * ow..(oy + 1) * ow];
                    if g.stride == 1 {
                        let ix0 = x0 + kj - g.pad;
                        for (d, s) in dst[ix0..ix0 + (x1 - x0)].iter_mut().zip(&src[x0..x1]) {
                            *d += s;
                        }
                    } else {
                        for ox in x0..x1 {
                            dst[ox * g.stride + kj - g.pad] += src[ox];
                        }
                    }
                }
            }
        }
    });
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "fedtune-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let x = contiguous(storage, layout, "im2col")?;
        let out = im2col(g, x);
        let shape = Shape::from((g.batch, g.channels * g.k * g.k, g.cols_len()));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "fedtune-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let cols = contiguous(storage, layout, "col2im")?;
        let out = col2im(g, cols);
        Ok((CpuStorage::F32(out), Shape::from((g.batch, g.channels, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// A square-kernel 2-D convolution without bias, differentiable in both arguments.
///
/// On the CPU with f32 it runs as im2col + GEMM; elsewhere it is candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (batch, channels, h, wd) = x.dims4()?;
    let (co, ci, k, k2) = w.dims4()?;
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || k != k2 || ci != channels {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    if h + 2 * pad < k || wd + 2 * pad < k || stride == 0 {
        candle_core::bail!("conv2d: kernel {k} does not fit input {h}x{wd} with padding {pad}");
    }
    let g = Geometry { batch, channels, h, w: wd, k, stride, pad };
    let cols = if k == 1 && stride == 1 && pad == 0 {
        x.reshape((batch, channels, h * wd))?
    } else {
        x.contiguous()?.apply_op1(Im2Col(g))?
    };
    let y = w.reshape((co, ci * k * k))?.broadcast_matmul(&cols)?;
    y.reshape((batch, co, g.out_h(), g.out_w()))
}

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
        let dims = dims_bc_hw(xl)?;
        let (b, c, hw) = dims;
        let x = contiguous(xs, xl, "batch norm")?;
        let gamma = contiguous(gs, gl, "batch norm weight")?;
        let beta = contiguous(bs, bl, "batch norm bias")?;
        let n = (b * hw) as f64;
        let mean: Vec<f64> = per_channel(x, dims, |_, s| s.iter().map(|&v| v as f64).sum())
            .into_iter()
            .map(|s| s / n)
            .collect();
        let var: Vec<f64> = per_channel(x, dims, |ch, s| {
            let m = mean[ch];
            s.iter().map(|&v| (v as f64 - m).powi(2)).sum()
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
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let dims = (b, c, hw);
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dy = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        if self.relu {
            // d relu: the gradient passes where the output is positive.
            let y = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            dy.par_iter_mut().zip(y.par_iter()).for_each(|(d, &y)| {
                if y <= 0.0 {
                    *d = 0.0;
                }
            });
        }
        let g = gamma.to_vec1::<f32>()?;
        let (mean, inv_std) = {
            let s = self.stats.lock().map_err(|_| candle_core::Error::msg("poisoned stats"))?;
            (s.mean.clone(), s.inv_std.clone())
        };
        // dbeta = sum dy; dgamma = sum dy * xhat.
        let dbeta = per_channel(&dy, dims, |_, s| s.iter().map(|&v| v as f64).sum());
        let dgamma = {
            let sums: Vec<f64> = (0..c)
                .into_par_iter()
                .map(|ch| {
                    (0..b)
                        .map(|bi| {
                            let o = (bi * c + ch) * hw;
                            xv[o..o + hw]
                                .iter()
                                .zip(&dy[o..o + hw])
                                .map(|(&xv, &d)| ((xv - mean[ch]) * inv_std[ch] * d) as f64)
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            sums
        };
        let n = (b * hw) as f32;
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, out)| {
            let ch = i % c;
            let o = i * hw;
            let k = g[ch] * inv_std[ch] / n;
            let (db, dg) = (dbeta[ch] as f32, dgamma[ch] as f32);
            for ((d, &xv), &gy) in out.iter_mut().zip(&xv[o..o + hw]).zip(&dy[o..o + hw]) {
                let xhat = (xv - mean[ch]) * inv_std[ch];
                *d = k * (n * gy - db - xhat * dg);
            }
        });
        let dev = x.device();
        let dx = Tensor::from_vec(dx, (b, c, h, w), dev)?;
        let dg = Tensor::from_vec(dgamma.iter().map(|&v| v as f32).collect::<Vec<_>>(), c, dev)?;
        let db = Tensor::from_vec(dbeta.iter().map(|&v| v as f32).collect::<Vec<_>>(), c, dev)?;
        Ok((Some(dx), Some(dg), Some(db)))
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
