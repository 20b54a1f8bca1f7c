//! `cat([upsample_nearest(x, h, w), skip], channels)`: the input of a decoder's fuse layer, as
//! one CPU op with its own backward.
//!
//! candle 0.11 builds this from two ops whose backward passes are slow on the CPU: the
//! upsampling's gradient is a grouped convolution with one group per channel (candle's own
//! convolution, group by group), and the concatenation's gradient materialises zeros and adds
//! a narrowed copy for each input. At `resnet103`'s last fuse layer (64 + 32 channels at
//! 256x256, batch 4) the pair took 0.6 s per backward pass. Here the forward writes each output
//! plane once and the backward sums each source pixel's block of output gradient, in parallel
//! over planes. The nearest-neighbour rule is candle's (`src = floor(dst * in / out)`), so any
//! sizes work, not only integer factors (candle's backward refuses the others).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, dims4};

/// Source index of each output index along one axis (candle's rule).
fn nearest(src: usize, dst: usize) -> Vec<usize> {
    let scale = src as f64 / dst as f64;
    (0..dst).map(|i| usize::min(src - 1, (i as f64 * scale) as usize)).collect()
}

#[derive(Debug)]
struct UpCat;

impl CustomOp2 for UpCat {
    fn name(&self) -> &'static str {
        "fedtune-upsample-cat"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, cx, hx, wx] = dims4(xl, "upsample-cat input")?;
        let [bs, cs, h, w] = dims4(sl, "upsample-cat skip")?;
        if b != bs || hx == 0 || wx == 0 {
            candle_core::bail!("upsample-cat: input {:?} and skip {:?}", xl.dims(), sl.dims());
        }
        let _span = super::profile::span(|| format!("upsample-cat {cx}+{cs}@{h}x{w}"));
        let (x, skip) = (contiguous(xs, xl, "upsample-cat input")?, contiguous(ss, sl, "skip")?);
        let (rows, cols) = (nearest(hx, h), nearest(wx, w));
        let c = cx + cs;
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(plane, o)| {
            let (bi, ch) = (plane / c, plane % c);
            if ch < cx {
                let src = &x[(bi * cx + ch) * hx * wx..][..hx * wx];
                for (orow, &sy) in o.chunks_exact_mut(w).zip(&rows) {
                    let srow = &src[sy * wx..][..wx];
                    for (v, &sx) in orow.iter_mut().zip(&cols) {
                        *v = srow[sx];
                    }
                }
            } else {
                o.copy_from_slice(&skip[(bi * cs + ch - cx) * h * w..][..h * w]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        skip: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, cx, hx, wx) = x.dims4()?;
        let cs = skip.dim(1)?;
        let dx = if x.track_op() {
            Some(grad.contiguous()?.apply_op1_no_bwd(&UpsampleGrad { cx, hx, wx })?)
        } else {
            None
        };
        let ds = if skip.track_op() { Some(grad.narrow(1, cx, cs)?.contiguous()?) } else { None };
        Ok((dx, ds))
    }
}

/// The gradient of the upsampled part: each source pixel sums the output gradient of the
/// pixels that copied it.
#[derive(Debug)]
struct UpsampleGrad {
    cx: usize,
    hx: usize,
    wx: usize,
}

impl CustomOp1 for UpsampleGrad {
    fn name(&self) -> &'static str {
        "fedtune-upsample-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let [b, c, h, w] = dims4(gl, "upsample-cat gradient")?;
        let (cx, hx, wx) = (self.cx, self.hx, self.wx);
        let _span = super::profile::span(|| format!("upsample-grad {cx}@{h}x{w}"));
        let g = contiguous(gs, gl, "upsample-cat gradient")?;
        let (rows, cols) = (nearest(hx, h), nearest(wx, w));
        let mut dx = vec![0f32; b * cx * hx * wx];
        dx.par_chunks_mut(hx * wx).enumerate().for_each(|(plane, d)| {
            let (bi, ch) = (plane / cx, plane % cx);
            let src = &g[(bi * c + ch) * h * w..][..h * w];
            for (grow, &sy) in src.chunks_exact(w).zip(&rows) {
                let drow = &mut d[sy * wx..][..wx];
                for (v, &sx) in grow.iter().zip(&cols) {
                    drow[sx] += v;
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, cx, hx, wx))))
    }
}

/// `cat([upsample_nearest2d(x, h, w), skip], 1)` where `skip` is `[b, cs, h, w]`: one op on
/// contiguous f32 CPU tensors, candle's ops elsewhere.
pub fn upsample_cat(x: &Tensor, skip: &Tensor) -> Result<Tensor> {
    let (h, w) = (skip.dim(2)?, skip.dim(3)?);
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !f32_cpu(x) || !f32_cpu(skip) || x.rank() != 4 || skip.rank() != 4 {
        return Tensor::cat(&[x.upsample_nearest2d(h, w)?, skip.clone()], 1);
    }
    x.contiguous()?.apply_op2(&skip.contiguous()?, UpCat)
}
