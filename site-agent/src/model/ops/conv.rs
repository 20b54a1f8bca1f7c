//! The convolution op: forward, backward-data and backward-filter, through im2col + GEMM on
//! the CPU and cuDNN on CUDA.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::gemm::{Mat, batch_parallel, matmul, per_image, with_scratch};
use super::tiles::{
    Geometry, TILE_BYTES, col2im, conv_image_then, filter_grad_image, flipped_transpose,
};
use super::{contiguous, dims4, winograd};

/// `y = conv2d(x, w)` for `x: [b, ci, h, w]`, `w: [co, ci, k, k]`, no bias.
#[derive(Debug, Clone, Copy)]
pub(super) struct Conv2d {
    stride: usize,
    pad: usize,
}

impl Conv2d {
    pub(super) fn new(stride: usize, pad: usize) -> Self {
        Self { stride, pad }
    }

    /// `conv <pass> ci->co k s @hxw` for the op profile.
    pub(super) fn key(pass: &str, g: &Geometry, co: usize) -> String {
        format!("conv {pass} {}->{co} k{} s{} @{}x{}", g.channels, g.k, g.stride, g.h, g.w)
    }

    pub(super) fn geometry(&self, xl: &Layout, wl: &Layout) -> Result<(Geometry, usize)> {
        let [batch, channels, h, w] = dims4(xl, "conv2d input")?;
        let [co, ci, k, k2] = dims4(wl, "conv2d weight")?;
        if ci != channels
            || k != k2
            || self.stride == 0
            || h + 2 * self.pad < k
            || w + 2 * self.pad < k
        {
            candle_core::bail!(
                "conv2d: weight {co}x{ci}x{k}x{k2} (stride {}, padding {}) does not fit input \
                 {batch}x{channels}x{h}x{w}",
                self.stride,
                self.pad
            );
        }
        Ok((Geometry { batch, channels, h, w, k, stride: self.stride, pad: self.pad }, co))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "fedtune-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, co) = self.geometry(xl, wl)?;
        let _span = super::profile::span(|| Self::key("fwd", &g, co));
        let x = contiguous(xs, xl, "conv2d input")?;
        let y = convolve(&g, contiguous(ws, wl, "conv2d weight")?, co, x);
        Ok((CpuStorage::F32(y), Shape::from((g.batch, co, g.out_h(), g.out_w()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g, co) = self.geometry(xl, wl)?;
        crate::model::cudnn::forward(g.cudnn(co), xs, xl, ws, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                &w.contiguous()?,
                &ConvBackwardData { conv: *self, x: x.shape().clone() },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.contiguous()?.apply_op2_no_bwd(
                &grad,
                &ConvBackwardFilter { conv: *self, w: w.shape().clone() },
            )?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `conv2d(x, w)` for a batch `x` of geometry `g`, `w: [co, g.patch()]`: Winograd where it
/// wins ([`winograd::wins`]), im2col + GEMM a tile at a time elsewhere.
fn convolve(g: &Geometry, w: &[f32], co: usize, x: &[f32]) -> Vec<f32> {
    convolve_then(g, w, co, x, |_, _, _| {})
}

/// [`convolve`], then `after(image, y, pixels)` on each tile's (or block's) output pixels of
/// one image, every channel's `pixels` range of its output `y`, while they are in cache: the
/// fused inference epilogue.
pub(super) fn convolve_then(
    g: &Geometry,
    w: &[f32],
    co: usize,
    x: &[f32],
    after: impl Fn(usize, &mut [f32], std::ops::Range<usize>) + Sync,
) -> Vec<f32> {
    let l = g.cols_len();
    let mut y = vec![0f32; g.batch * co * l];
    let wino = winograd::wins(g, co).then(|| winograd::weights(w, co, g.channels));
    let (wm, tile) = (Mat::row_major(w, co, g.patch()), g.tile_rows(TILE_BYTES));
    per_image(&mut y, co * l, g.batch, |b, par, yb| {
        let img = &x[b * g.image_len()..][..g.image_len()];
        let after = |y: &mut [f32], pixels| after(b, y, pixels);
        match &wino {
            Some(u) => winograd::conv_image_then(g, u, co, img, yb, par, after),
            None => conv_image_then(g, wm, img, yb, tile, par, after),
        }
    });
    y
}

/// `dx` from `(dy, w)`: `dx[b] = col2im(W^T @ dy[b])`.
#[derive(Debug)]
struct ConvBackwardData {
    conv: Conv2d,
    /// Shape of the forward input.
    x: Shape,
}

impl CustomOp2 for ConvBackwardData {
    fn name(&self) -> &'static str {
        "fedtune-conv2d-backward-data"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, co) = self.conv.geometry(&Layout::contiguous(self.x.clone()), wl)?;
        let _span = super::profile::span(|| Conv2d::key("bwd-data", &g, co));
        let dy = contiguous(gs, gl, "conv2d output gradient")?;
        let l = g.cols_len();
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        let w = contiguous(ws, wl, "conv2d weight")?;
        if g.stride == 1 && g.pad < g.k {
            // dx = conv(dy, w turned and transposed, padding k - 1 - pad): the forward path,
            // tiled, instead of a short GEMM into 9x columns and col2im.
            let gd =
                Geometry { channels: co, h: g.out_h(), w: g.out_w(), pad: g.k - 1 - g.pad, ..g };
            let wf = flipped_transpose(w, co, g.channels, g.k);
            let dx = convolve(&gd, &wf, g.channels, dy);
            return Ok((CpuStorage::F32(dx), self.x.clone()));
        }
        let wt = Mat::row_major(w, co, g.patch()).t();
        let mut dx = vec![0f32; g.batch * g.image_len()];
        per_image(&mut dx, g.image_len(), g.batch, |b, par, dxb| {
            let dyb = Mat::row_major(&dy[b * co * l..][..co * l], co, l);
            if g.is_pointwise() {
                matmul(dxb, g.h * g.w, wt, dyb, false, par);
            } else {
                with_scratch(g.patch() * l, |dcols| {
                    matmul(dcols, l, wt, dyb, false, par);
                    col2im(&g, dcols, dxb);
                });
            }
        });
        Ok((CpuStorage::F32(dx), self.x.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g, co) = self.conv.geometry(&Layout::contiguous(self.x.clone()), wl)?;
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        crate::model::cudnn::backward_data(g.cudnn(co), gs, gl, ws, wl)
    }
}

/// `dw` from `(x, dy)`: `dW = sum_b dy[b] @ im2col(x[b])^T`.
#[derive(Debug)]
struct ConvBackwardFilter {
    conv: Conv2d,
    /// Shape of the weight.
    w: Shape,
}

impl CustomOp2 for ConvBackwardFilter {
    fn name(&self) -> &'static str {
        "fedtune-conv2d-backward-filter"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, co) = self.conv.geometry(xl, &Layout::contiguous(self.w.clone()))?;
        let _span = super::profile::span(|| Conv2d::key("bwd-filter", &g, co));
        let x = contiguous(xs, xl, "conv2d input")?;
        let dy = contiguous(gs, gl, "conv2d output gradient")?;
        let (l, p) = (g.cols_len(), g.patch());
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        let tile = g.tile_rows(TILE_BYTES);
        // Winograd accumulates 16 transformed values per kernel, im2col + GEMM its 9 taps.
        let wino = winograd::wins(&g, co);
        let len = if wino { 16 * co * g.channels } else { co * p };
        let add_image = |acc: &mut [f32], b: usize, par: Parallelism| {
            let img = &x[b * g.image_len()..][..g.image_len()];
            let dyb = &dy[b * co * l..][..co * l];
            if wino {
                winograd::filter_grad_image(&g, dyb, co, img, acc, par);
            } else {
                filter_grad_image(&g, dyb, co, img, acc, tile, par);
            }
        };
        let dw = match batch_parallel(g.batch) {
            None => (0..g.batch)
                .into_par_iter()
                .fold(
                    || vec![0f32; len],
                    |mut acc, b| {
                        add_image(&mut acc, b, Parallelism::None);
                        acc
                    },
                )
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                })
                .unwrap_or_else(|| vec![0f32; len]),
            Some(par) => {
                let mut acc = vec![0f32; len];
                (0..g.batch).for_each(|b| add_image(&mut acc, b, par));
                acc
            }
        };
        let dw = if wino { winograd::filter_from(&dw, co, g.channels) } else { dw };
        Ok((CpuStorage::F32(dw), self.w.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (g, co) = self.conv.geometry(xl, &Layout::contiguous(self.w.clone()))?;
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        crate::model::cudnn::backward_filter(g.cudnn(co), xs, xl, gs, gl)
    }
}

/// Whether cuDNN may use TF32 tensor cores for fp32 convolutions (`FEDTUNE_TF32=1`, CUDA
/// builds only); off, CPU and GPU agree to fp32 rounding.
pub fn tf32_allowed() -> bool {
    #[cfg(feature = "cuda")]
    {
        crate::model::cudnn::tf32_allowed()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// A square-kernel 2-D convolution without bias, differentiable in both arguments.
///
/// With f32 it runs as im2col + GEMM on the CPU, and as cuDNN forward, backward-data and
/// backward-filter calls on CUDA (`cuda` feature, [`crate::model::cudnn`]); elsewhere it is candle's
/// `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let ours = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if !ours || x.dtype() != candle_core::DType::F32 {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d { stride, pad })
}
