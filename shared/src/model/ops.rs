//! Training ops: convolution through im2col + GEMM (cuDNN on CUDA), and a fused batch norm
//! (+ ReLU) on the CPU.
//!
//! candle 0.11's CPU convolution backward runs a direct `conv_transpose2d` loop for the input
//! gradient and a convolution with an HxW kernel for the weight gradient, about ten times slower
//! than PyTorch. Here a convolution is one [`CustomOp2`] whose passes work image by image,
//! in parallel over the batch, with the `gemm` crate (candle's own GEMM) for the products:
//!
//! - forward: `y[b] = W[co, ci*k*k] @ cols[b]`, `cols[b] = im2col(x[b])`;
//! - backward-data: `dcols[b] = W^T @ dy[b]`, then `dx[b] = col2im(dcols[b])`;
//! - backward-filter: `dW = sum_b dy[b] @ cols[b]^T`, recomputing `cols[b]`.
//!
//! The im2col columns of one image live in a per-thread scratch buffer that is reused from call
//! to call, so a training step neither keeps a `ci*k*k`-times copy of every activation alive
//! until the backward pass nor has the allocator hand back and re-fault tens of megabytes of
//! fresh pages per layer (the largest cost in the profile before this). Gradients are computed
//! only for the arguments that need them: frozen weights and detached inputs get none.
//!
//! Written here (not taken from a crate) because candle exposes no faster CPU path and these
//! loops are where training time goes; see ARCHITECTURE.md.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
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
    /// Rows of one image's im2col matrix: `channels * k * k`.
    fn patch(&self) -> usize {
        self.channels * self.k * self.k
    }
    fn image_len(&self) -> usize {
        self.channels * self.h * self.w
    }
    /// The same convolution for cuDNN, with `co` output channels.
    #[cfg(feature = "cuda")]
    fn cudnn(&self, co: usize) -> super::cudnn::ConvShape {
        super::cudnn::ConvShape {
            batch: self.batch,
            ci: self.channels,
            h: self.h,
            w: self.w,
            co,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
        }
    }
    /// A 1x1 convolution with stride 1 and no padding: the image is its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
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

/// One image `[c, h, w]` -> its im2col matrix `[c*k*k, out_h*out_w]`, written over `out`
/// (every element, padding taps included, so `out` may hold anything before).
fn im2col(g: &Geometry, img: &[f32], out: &mut [f32]) {
    let (oh, ow, l, kk) = (g.out_h(), g.out_w(), g.cols_len(), g.k * g.k);
    for (plane, block) in img.chunks_exact(g.h * g.w).zip(out.chunks_exact_mut(kk * l)) {
        for ki in 0..g.k {
            let (y0, y1) = g.valid(g.h, oh, ki);
            for kj in 0..g.k {
                let (x0, x1) = g.valid(g.w, ow, kj);
                let row = &mut block[(ki * g.k + kj) * l..][..l];
                if x0 == x1 || y0 == y1 {
                    row.fill(0.0); // this tap only ever reads padding
                    continue;
                }
                row[..y0 * ow].fill(0.0);
                row[y1 * ow..].fill(0.0);
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.pad;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    dst[..x0].fill(0.0);
                    dst[x1..].fill(0.0);
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
    }
}

/// The adjoint of [`im2col`] for one image: `[c*k*k, out_h*out_w]` -> `[c, h, w]`, summing
/// overlapping taps into `img`, which must be zero on entry.
fn col2im(g: &Geometry, cols: &[f32], img: &mut [f32]) {
    let (oh, ow, l, kk) = (g.out_h(), g.out_w(), g.cols_len(), g.k * g.k);
    for (plane, block) in img.chunks_exact_mut(g.h * g.w).zip(cols.chunks_exact(kk * l)) {
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
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
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
    }
}

thread_local! {
    /// im2col columns of one image, kept between calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer resized to `len`. The buffer is taken out of the
/// thread-local for the call, so a re-entrant call (rayon work-stealing) gets its own.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
    out
}

/// A read-only matrix view: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }
    fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Every element the view names lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a @ b` (or `dst += a @ b` with `accumulate`), `dst` row-major `[a.rows, b.cols]`.
///
/// `gemm`'s kernels tile the output's rows by 16 (AVX2) or 64 (AVX-512) and its columns by 6,
/// so with few output rows (a layer's 16 to 64 channels) against many columns (its pixels) most
/// of each tile is wasted. Then the transposed product `dst^T = b^T @ a^T` is computed instead,
/// written through `dst`'s transposed strides: same result, full tiles.
#[allow(unsafe_code)]
fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool, par: Parallelism) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(b.rows == k && dst.len() == m * n && a.in_bounds() && b.in_bounds(), "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    // (lhs, rhs, rows, cols, dst row stride, dst column stride) of the product gemm computes.
    let (lhs, rhs, rows, cols, drs, dcs) =
        if m < n { (b.t(), a.t(), n, m, 1, n) } else { (a, b, m, n, n, 1) };
    // SAFETY: the assertion above checks that every element `gemm` reads through `lhs` and
    // `rhs` (indices `r * rs + c * cs` for r < rows, c < cols of each view; transposing a view
    // swaps both) and every element it writes in `dst` (`i * n + j` for i < m, j < n, which in
    // the transposed case is `j * drs + i * dcs` with drs = 1, dcs = n) is inside the borrowed
    // slices, and `dst` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            rows,
            cols,
            k,
            dst.as_mut_ptr(),
            dcs as isize,
            drs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Splits work over the batch when there are at least as many images as threads (each image's
/// GEMM single-threaded); otherwise runs images in turn with a multi-threaded GEMM.
fn batch_parallel(batch: usize) -> Option<Parallelism> {
    let threads = rayon::current_num_threads();
    if batch >= threads || threads == 1 { None } else { Some(Parallelism::Rayon(threads)) }
}

/// Runs `f(image index, scratch-free GEMM parallelism, chunk of out)` for every image.
fn per_image(
    out: &mut [f32],
    chunk: usize,
    batch: usize,
    f: impl Fn(usize, Parallelism, &mut [f32]) + Sync,
) {
    match batch_parallel(batch) {
        None => out.par_chunks_mut(chunk).enumerate().for_each(|(b, o)| f(b, Parallelism::None, o)),
        Some(par) => out.chunks_mut(chunk).enumerate().for_each(|(b, o)| f(b, par, o)),
    }
}

fn dims4(layout: &Layout, what: &str) -> Result<[usize; 4]> {
    match layout.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        d => candle_core::bail!("{what}: expected a 4-D tensor, got {d:?}"),
    }
}

/// `y = conv2d(x, w)` for `x: [b, ci, h, w]`, `w: [co, ci, k, k]`, no bias.
#[derive(Debug, Clone, Copy)]
struct Conv2d {
    stride: usize,
    pad: usize,
}

impl Conv2d {
    fn geometry(&self, xl: &Layout, wl: &Layout) -> Result<(Geometry, usize)> {
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
        let x = contiguous(xs, xl, "conv2d input")?;
        let wt = Mat::row_major(contiguous(ws, wl, "conv2d weight")?, co, g.patch());
        let l = g.cols_len();
        let mut y = vec![0f32; g.batch * co * l];
        per_image(&mut y, co * l, g.batch, |b, par, yb| {
            let img = &x[b * g.image_len()..][..g.image_len()];
            if g.is_pointwise() {
                matmul(yb, wt, Mat::row_major(img, g.channels, l), false, par);
            } else {
                with_scratch(g.patch() * l, |cols| {
                    im2col(&g, img, cols);
                    matmul(yb, wt, Mat::row_major(cols, g.patch(), l), false, par);
                });
            }
        });
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
        super::cudnn::forward(g.cudnn(co), xs, xl, ws, wl)
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
        let dy = contiguous(gs, gl, "conv2d output gradient")?;
        let l = g.cols_len();
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        let wt = Mat::row_major(contiguous(ws, wl, "conv2d weight")?, co, g.patch()).t();
        let mut dx = vec![0f32; g.batch * g.image_len()];
        per_image(&mut dx, g.image_len(), g.batch, |b, par, dxb| {
            let dyb = Mat::row_major(&dy[b * co * l..][..co * l], co, l);
            if g.is_pointwise() {
                matmul(dxb, wt, dyb, false, par);
            } else {
                with_scratch(g.patch() * l, |dcols| {
                    matmul(dcols, wt, dyb, false, par);
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
        super::cudnn::backward_data(g.cudnn(co), gs, gl, ws, wl)
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
        let x = contiguous(xs, xl, "conv2d input")?;
        let dy = contiguous(gs, gl, "conv2d output gradient")?;
        let (l, p) = (g.cols_len(), g.patch());
        if gl.dims() != [g.batch, co, g.out_h(), g.out_w()] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match", gl.dims());
        }
        let add_image = |acc: &mut [f32], b: usize, par: Parallelism| {
            let img = &x[b * g.image_len()..][..g.image_len()];
            let dyb = Mat::row_major(&dy[b * co * l..][..co * l], co, l);
            if g.is_pointwise() {
                matmul(acc, dyb, Mat::row_major(img, g.channels, l).t(), true, par);
            } else {
                with_scratch(p * l, |cols| {
                    im2col(&g, img, cols);
                    matmul(acc, dyb, Mat::row_major(cols, p, l).t(), true, par);
                });
            }
        };
        let dw = match batch_parallel(g.batch) {
            None => (0..g.batch)
                .into_par_iter()
                .fold(
                    || vec![0f32; co * p],
                    |mut acc, b| {
                        add_image(&mut acc, b, Parallelism::None);
                        acc
                    },
                )
                .reduce_with(|mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                })
                .unwrap_or_else(|| vec![0f32; co * p]),
            Some(par) => {
                let mut acc = vec![0f32; co * p];
                (0..g.batch).for_each(|b| add_image(&mut acc, b, par));
                acc
            }
        };
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
        super::cudnn::backward_filter(g.cudnn(co), xs, xl, gs, gl)
    }
}

/// Whether cuDNN may use TF32 tensor cores for fp32 convolutions (`FEDTUNE_TF32=1`, CUDA
/// builds only); off, CPU and GPU agree to fp32 rounding.
pub fn tf32_allowed() -> bool {
    #[cfg(feature = "cuda")]
    {
        super::cudnn::tf32_allowed()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// A square-kernel 2-D convolution without bias, differentiable in both arguments.
///
/// With f32 it runs as im2col + GEMM on the CPU, and as cuDNN forward, backward-data and
/// backward-filter calls on CUDA (`cuda` feature, [`super::cudnn`]); elsewhere it is candle's
/// `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let ours = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if !ours || x.dtype() != candle_core::DType::F32 {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2d { stride, pad })
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
        let g = |i: usize| if relu && y[i] <= 0.0 { 0.0 } else { dy[i] };
        // dbeta = sum g; dgamma = sum g * xhat, per channel.
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, s) = (self.mean[ch], self.inv_std[ch]);
                let (mut db, mut dg) = (0f64, 0f64);
                for bi in 0..b {
                    let o = (bi * c + ch) * hw;
                    let (mut pb, mut pg) = (0f32, 0f32);
                    for (i, &xi) in (o..o + hw).zip(&x[o..o + hw]) {
                        let gi = g(i);
                        pb += gi;
                        pg += gi * (xi - m) * s;
                    }
                    db += pb as f64;
                    dg += pg as f64;
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
            for (j, d) in out.iter_mut().enumerate() {
                let xhat = (x[o + j] - m) * s;
                *d = k * (n * g(o + j) - db - xhat * dg);
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

/// `relu(a + b)` for the end of a residual block: one pass forward, one backward (the same
/// masked gradient for both arguments).
#[derive(Debug)]
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "fedtune-add-relu"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if al.shape() != bl.shape() {
            candle_core::bail!("add_relu: shapes {:?} and {:?} differ", al.dims(), bl.dims());
        }
        let a = contiguous(a_s, al, "add_relu")?;
        let b = contiguous(b_s, bl, "add_relu")?;
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(1 << 14).zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14))).for_each(
            |(y, (a, b))| {
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    *y = (a + b).max(0.0);
                }
            },
        );
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = grad.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &ReluMask)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `grad` where `y > 0`, else 0: the backward of a ReLU from its output.
#[derive(Debug)]
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "fedtune-relu-mask"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(gs, gl, "relu mask")?;
        let y = contiguous(ys, yl, "relu mask")?;
        if g.len() != y.len() {
            candle_core::bail!("relu mask: shapes {:?} and {:?} differ", gl.dims(), yl.dims());
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14).zip(y.par_chunks(1 << 14))).for_each(
            |(o, (g, y))| {
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = if y > 0.0 { g } else { 0.0 };
                }
            },
        );
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// `relu(a + b)`, fused on contiguous f32 CPU tensors, candle ops elsewhere.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !a.device().is_cpu() || a.dtype() != candle_core::DType::F32 || a.shape() != b.shape() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}
