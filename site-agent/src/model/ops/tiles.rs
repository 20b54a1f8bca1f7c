//! The convolution's geometry and inner loops: im2col over a tile of output rows, its adjoint
//! col2im, and the per-image passes that run a tile at a time through a per-thread scratch
//! buffer.

use gemm::Parallelism;

use super::gemm::{Mat, matmul, with_scratch};

/// Geometry of a 2-D convolution over one `[channels, h, w]` image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl Geometry {
    pub(super) fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub(super) fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    pub(super) fn cols_len(&self) -> usize {
        self.out_h() * self.out_w()
    }
    /// Rows of one image's im2col matrix: `channels * k * k`.
    pub(super) fn patch(&self) -> usize {
        self.channels * self.k * self.k
    }
    pub(super) fn image_len(&self) -> usize {
        self.channels * self.h * self.w
    }
    /// The same convolution for cuDNN, with `co` output channels.
    #[cfg(feature = "cuda")]
    fn cudnn(&self, co: usize) -> crate::model::cudnn::ConvShape {
        crate::model::cudnn::ConvShape {
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
    pub(super) fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
    /// The output index range `[lo, hi)` along one axis for kernel offset `ki`, where the input
    /// index `o * stride + ki - pad` is inside `0..n`.
    pub(super) fn valid(&self, n: usize, n_out: usize, ki: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if ki >= self.pad { 0 } else { (self.pad - ki).div_ceil(s) };
        // o * s + ki - pad <= n - 1  <=>  o <= (n - 1 + pad - ki) / s
        let hi = if n + self.pad > ki { ((n - 1 + self.pad - ki) / s + 1).min(n_out) } else { 0 };
        (lo.min(hi), hi)
    }
}

/// Bytes of im2col columns that one tile of output rows may take: a tile's columns are written
/// and then read by the GEMM while they are still in the core's L2 cache. Whole-image columns
/// of a 32-channel 256x256 layer are 75 MB (9 times the activation), which went to memory and
/// back at every pass.
pub(super) const TILE_BYTES: usize = 384 << 10;

/// Output pixels a tile has at least: the GEMM runs poorly on fewer (a 256-channel 32x32 layer
/// has 295 KB of columns per output row). Measured on a 2-core AVX-512 EPYC with
/// `examples/conv_shapes` (bench/RESULTS.md): from 64 to 256 pixels the passes are within the
/// machine's noise; 1024 gains at most 5 % in the forward pass of the 32- and 64-channel layers
/// and costs the filter gradient 2.5 times (176 -> 69 GFLOP/s at 32 channels).
const TILE_MIN_PIXELS: usize = 256;

impl Geometry {
    /// Output rows per tile: as many as fit in `budget` bytes of im2col columns, but at least
    /// [`TILE_MIN_PIXELS`] output pixels (the GEMM's long side), and at least one row.
    pub(super) fn tile_rows(&self, budget: usize) -> usize {
        let row = self.patch() * self.out_w() * std::mem::size_of::<f32>();
        let least = TILE_MIN_PIXELS.div_ceil(self.out_w().max(1));
        (budget / row.max(1)).max(least).clamp(1, self.out_h().max(1))
    }
}

/// Output rows `rows` of one image `[c, h, w]` -> their im2col matrix
/// `[c*k*k, rows.len()*out_w]`, written over `out` (every element, padding taps included, so
/// `out` may hold anything before).
pub(super) fn im2col(g: &Geometry, img: &[f32], rows: std::ops::Range<usize>, out: &mut [f32]) {
    let (oh, ow, kk) = (g.out_h(), g.out_w(), g.k * g.k);
    let l = rows.len() * ow;
    for (plane, block) in img.chunks_exact(g.h * g.w).zip(out.chunks_exact_mut(kk * l)) {
        for ki in 0..g.k {
            let (y0, y1) = g.valid(g.h, oh, ki);
            let (y0, y1) = (y0.clamp(rows.start, rows.end), y1.clamp(rows.start, rows.end));
            for kj in 0..g.k {
                let (x0, x1) = g.valid(g.w, ow, kj);
                let row = &mut block[(ki * g.k + kj) * l..][..l];
                if x0 == x1 || y0 == y1 {
                    row.fill(0.0); // this tap only reads padding in these rows
                    continue;
                }
                row[..(y0 - rows.start) * ow].fill(0.0);
                row[(y1 - rows.start) * ow..].fill(0.0);
                for oy in y0..y1 {
                    let iy = oy * g.stride + ki - g.pad;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let at = (oy - rows.start) * ow;
                    let dst = &mut row[at..at + ow];
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
pub(super) fn col2im(g: &Geometry, cols: &[f32], img: &mut [f32]) {
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

/// One image's convolution `y[co, oh*ow] = w[co, patch] @ im2col(img)`, a tile of `tile_rows`
/// output rows at a time through this thread's scratch columns (a 1x1 convolution with stride
/// 1 reads the image as its own columns), then `after(y, pixels)` on each tile's output pixels
/// (every channel's `pixels` range of `y`) while they are still in cache: the fused inference
/// epilogue.
pub(super) fn conv_image_then(
    g: &Geometry,
    w: Mat<'_>,
    img: &[f32],
    y: &mut [f32],
    tile_rows: usize,
    par: Parallelism,
    after: impl Fn(&mut [f32], std::ops::Range<usize>),
) {
    let (ow, l, p) = (g.out_w(), g.cols_len(), g.patch());
    if g.is_pointwise() {
        matmul(y, l, w, Mat::row_major(img, g.channels, l), false, par);
        after(y, 0..l);
        return;
    }
    each_tile(g, img, tile_rows, |rows, cols| {
        let t = rows.len() * ow;
        matmul(&mut y[rows.start * ow..], l, w, Mat::row_major(cols, p, t), false, par);
        after(y, rows.start * ow..rows.end * ow);
    });
}

/// `dw[co, patch] += dy[co, oh*ow] @ im2col(img)^T` for one image, a tile of output rows at a
/// time.
pub(super) fn filter_grad_image(
    g: &Geometry,
    dy: &[f32],
    co: usize,
    img: &[f32],
    dw: &mut [f32],
    tile_rows: usize,
    par: Parallelism,
) {
    let (ow, l, p) = (g.out_w(), g.cols_len(), g.patch());
    if g.is_pointwise() {
        let x = Mat::row_major(img, g.channels, l).t();
        matmul(dw, p, Mat::row_major(dy, co, l), x, true, par);
        return;
    }
    each_tile(g, img, tile_rows, |rows, cols| {
        let t = rows.len() * ow;
        let dyt = Mat::rows_apart(&dy[rows.start * ow..], co, t, l);
        matmul(dw, p, dyt, Mat::row_major(cols, p, t).t(), true, par);
    });
}

/// Runs `f(rows, columns)` for each tile of `tile_rows` output rows of one image, with the
/// tile's im2col columns (`[patch, rows.len() * out_w]`) in this thread's scratch buffer.
fn each_tile(
    g: &Geometry,
    img: &[f32],
    tile_rows: usize,
    mut f: impl FnMut(std::ops::Range<usize>, &[f32]),
) {
    let (oh, ow, p) = (g.out_h(), g.out_w(), g.patch());
    with_scratch(p * tile_rows.min(oh) * ow, |scratch| {
        for r0 in (0..oh).step_by(tile_rows) {
            let rows = r0..(r0 + tile_rows).min(oh);
            let cols = &mut scratch[..p * rows.len() * ow];
            im2col(g, img, rows.clone(), cols);
            f(rows, cols);
        }
    });
}

/// `w: [co, ci, k, k]` -> `[ci, co, k, k]` with each kernel turned by 180 degrees: the weight
/// that makes the input gradient of a stride-1 convolution a convolution of the output
/// gradient (padding `k - 1 - pad`).
pub(super) fn flipped_transpose(w: &[f32], co: usize, ci: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0f32; w.len()];
    for o in 0..co {
        for i in 0..ci {
            let src = &w[(o * ci + i) * kk..][..kk];
            let dst = &mut out[(i * co + o) * kk..][..kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "tiles_tests.rs"]
mod tests;
