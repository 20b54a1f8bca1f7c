//! Winograd F(2x2, 3x3) for the 3x3, stride-1, padding-1 convolutions of inference (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of output pixels is computed from the 4x4 block of input around it as
//! `A^T [ (G g G^T) . (B^T d B) ] A`: the 9 multiply-adds per output pixel, input channel and
//! output channel of a direct convolution become 4 (16 per 2x2 block), done as 16 GEMMs
//! `M[xi] = U[xi] @ V[xi]` of `[co, ci] @ [ci, tiles]`, one per position `xi` of the 4x4
//! transformed block. The transforms cost additions only (their coefficients are 0, +-1 and
//! +-1/2), so the result differs from the direct convolution's by rounding, about 1e-6 of the
//! output's scale in f32.
//!
//! Used where measured faster than im2col + GEMM ([`wins`], `examples/conv_shapes`): the
//! forward pass, the input gradient of a stride-1 convolution (itself a 3x3 convolution of the
//! output gradient) and the folded inference convolution of frozen layers and evaluation. The
//! filter gradient stays im2col + GEMM.
//!
//! The 4x4 input blocks overlap by two pixels, so each block of tile rows is transformed into
//! `V: [ci][16][tiles]` in a scratch buffer sized to stay in cache, multiplied into
//! `M: [co][16][tiles]`, and transformed back into the output rows it covers.

use gemm::Parallelism;

use super::gemm::{Mat, matmul, with_scratch};
use super::tiles::Geometry;

/// Positions of the transformed 4x4 block.
const XI: usize = 16;

/// Bytes that one block of tiles' transformed input and GEMM output (`16 * (ci + co)` floats a
/// tile) may take: they are written, multiplied and read back while in the core's cache.
const BLOCK_BYTES: usize = 1 << 20;

/// Floats between one channel's 16 rows and the next channel's beyond `16 * tiles`: without
/// them the rows a GEMM reads are a power of two apart (16 KB at 256 tiles) and evict each
/// other from the same cache sets; the filter gradient ran at half speed.
const SLAB_PAD: usize = 16;

/// Tiles a block has at least (the GEMMs' long side).
const BLOCK_MIN_TILES: usize = 64;

/// Whether a convolution is one this module computes: a 3x3 kernel, stride 1, padding 1.
pub(super) fn applies(g: &Geometry) -> bool {
    g.k == 3 && g.stride == 1 && g.pad == 1
}

/// Whether a convolution with `co` output channels runs here rather than through im2col +
/// GEMM: measured with `examples/conv_shapes` and a 2-core AVX-512 EPYC, Winograd is 1.3 to 1.7
/// times faster from 32 channels at 64x64, 64 at 32x32 and 128 at 16x16 up (every 3x3 layer
/// of `resnet103`), and 10 to 30 % slower on fewer channels or smaller images (the
/// transforms' rows are too short: `tiny` and `small`).
pub(super) fn wins(g: &Geometry, co: usize) -> bool {
    applies(g) && g.channels.min(co) >= 32 && g.channels * g.w >= 2048 && enabled()
}

/// `FEDTUNE_WINOGRAD=0` turns Winograd off (im2col + GEMM everywhere), read once: for
/// comparing the two on one machine.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FEDTUNE_WINOGRAD").map_or(true, |v| v.trim() != "0"))
}

/// `w: [co, ci, 3, 3]` -> `U: [16][co][ci]`, `U = G w G^T` per kernel with
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
pub(super) fn weights(w: &[f32], co: usize, ci: usize) -> Vec<f32> {
    let mut u = vec![0f32; XI * co * ci];
    for (n, g) in w.chunks_exact(9).enumerate().take(co * ci) {
        // Rows: G g (4x3).
        let mut gg = [[0f32; 3]; 4];
        for c in 0..3 {
            let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
            gg[0][c] = a;
            gg[1][c] = 0.5 * (a + b + d);
            gg[2][c] = 0.5 * (a - b + d);
            gg[3][c] = d;
        }
        // Columns: (G g) G^T (4x4).
        for (r, row) in gg.iter().enumerate() {
            let [a, b, d] = *row;
            let t = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
            for (c, v) in t.into_iter().enumerate() {
                u[(r * 4 + c) * co * ci + n] = v;
            }
        }
    }
    u
}

/// One image's convolution `y[co, h*w]` from `img[ci, h, w]` with transformed weights `u`
/// ([`weights`]), then `after(y, pixels)` on each block's output pixels (every channel's
/// `pixels` range of `y`) while they are in cache, as [`super::tiles::conv_image_then`].
pub(super) fn conv_image_then(
    g: &Geometry,
    u: &[f32],
    co: usize,
    img: &[f32],
    y: &mut [f32],
    par: Parallelism,
    after: impl Fn(&mut [f32], std::ops::Range<usize>),
) {
    let (ci, h, w) = (g.channels, g.h, g.w);
    let tw = w.div_ceil(2);
    each_block(g, co, img, par, |tiles, t, slab, v, m| {
        for xi in 0..XI {
            let ux = Mat::row_major(&u[xi * co * ci..][..co * ci], co, ci);
            let vx = Mat::rows_apart(&v[xi * t..], ci, t, slab);
            matmul(&mut m[xi * t..], slab, ux, vx, false, par);
        }
        over_channels(par, tw, y, h * w, m, slab, |rows, yc, mc| {
            for i in tiles.clone() {
                rows.output(mc, t, (i - tiles.start) * tw, yc, h, w, i);
            }
        });
        after(y, (2 * tiles.start * w).min(h * w)..(2 * tiles.end * w).min(h * w));
    });
}

/// One image's filter gradient in the transformed domain: `du[xi][co][ci] += sum over tiles
/// of (A dY A^T)[xi][co] * (B^T d B)[xi][ci]`, the adjoint of [`conv_image_then`]'s
/// `y = A^T (U . V) A` in `U` (16 GEMMs of `[co, tiles] @ [tiles, ci]`, long in the summed
/// dimension). [`filter_from`] takes `du` back to `[co, ci, 3, 3]`.
pub(super) fn filter_grad_image(
    g: &Geometry,
    dy: &[f32],
    co: usize,
    img: &[f32],
    du: &mut [f32],
    par: Parallelism,
) {
    let (ci, h, w) = (g.channels, g.h, g.w);
    let tw = w.div_ceil(2);
    each_block(g, co, img, par, |tiles, t, slab, v, m| {
        over_channels(par, tw, m, slab, dy, h * w, |rows, mc, dyc| {
            for i in tiles.clone() {
                rows.grad_output(dyc, h, w, i, mc, t, (i - tiles.start) * tw);
            }
        });
        for xi in 0..XI {
            let mx = Mat::rows_apart(&m[xi * t..], co, t, slab);
            let vx = Mat::rows_apart(&v[xi * t..], ci, t, slab).t();
            matmul(&mut du[xi * co * ci..][..co * ci], ci, mx, vx, true, par);
        }
    });
}

/// `du: [16][co][ci]` -> `[co, ci, 3, 3]`: `G^T du G` per kernel, the adjoint of [`weights`].
pub(super) fn filter_from(du: &[f32], co: usize, ci: usize) -> Vec<f32> {
    let n = co * ci;
    // G^T applied to 4 values: the adjoint of G's rows.
    let gt =
        |d: [f32; 4]| [d[0] + 0.5 * (d[1] + d[2]), 0.5 * (d[1] - d[2]), 0.5 * (d[1] + d[2]) + d[3]];
    let mut out = vec![0f32; n * 9];
    for (k, o) in out.chunks_exact_mut(9).enumerate() {
        let col = |c: usize| gt(std::array::from_fn(|r| du[(r * 4 + c) * n + k]));
        let cols = [col(0), col(1), col(2), col(3)];
        for r in 0..3 {
            let row = gt(std::array::from_fn(|c| cols[c][r]));
            o[r * 3..r * 3 + 3].copy_from_slice(&row);
        }
    }
    out
}

/// Runs `f(tile rows, tiles, slab, V, M)` for each block of tile rows of one image: `V`
/// (`[ci][16][tiles]`, channels `slab` apart) holds the block's transformed input, `M` room for
/// `[co][16][tiles]` laid out the same way.
/// Each channel's 16 rows are contiguous, so the transforms split over channels (on rayon's
/// threads when the GEMMs are multi-threaded: a batch smaller than the thread count); the
/// GEMM for position `xi` reads every channel's row `xi`, 16 rows apart.
fn each_block(
    g: &Geometry,
    co: usize,
    img: &[f32],
    par: Parallelism,
    mut f: impl FnMut(std::ops::Range<usize>, usize, usize, &[f32], &mut [f32]),
) {
    let (ci, h, w) = (g.channels, g.h, g.w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let per_tile = XI * (ci + co) * std::mem::size_of::<f32>();
    let want = (BLOCK_BYTES / per_tile).max(BLOCK_MIN_TILES);
    let block_rows = want.div_ceil(tw).clamp(1, th);
    let most = block_rows * tw;
    with_scratch((ci + co) * (XI * most + SLAB_PAD), |scratch| {
        let (v, m) = scratch.split_at_mut(ci * (XI * most + SLAB_PAD));
        for i0 in (0..th).step_by(block_rows) {
            let i1 = (i0 + block_rows).min(th);
            let t = (i1 - i0) * tw;
            let slab = XI * t + SLAB_PAD;
            let (v, m) = (&mut v[..ci * slab], &mut m[..co * slab]);
            over_channels(par, tw, v, slab, img, h * w, |rows, vc, plane| {
                for i in i0..i1 {
                    rows.input(plane, h, w, i, vc, t, (i - i0) * tw);
                }
            });
            f(i0..i1, t, slab, v, m);
        }
    });
}

/// `f(rows, out chunk, in chunk)` for each channel's chunks of `out` and `input`, with row
/// buffers per thread: on rayon's threads when `par` is multi-threaded, else in turn.
fn over_channels(
    par: Parallelism,
    tw: usize,
    out: &mut [f32],
    out_len: usize,
    input: &[f32],
    in_len: usize,
    f: impl Fn(&mut Rows, &mut [f32], &[f32]) + Sync,
) {
    use rayon::prelude::*;
    match par {
        Parallelism::Rayon(n) if n != 1 => out
            .par_chunks_mut(out_len)
            .zip(input.par_chunks(in_len))
            .for_each_init(|| Rows::new(tw), |rows, (o, i)| f(rows, o, i)),
        _ => {
            let mut rows = Rows::new(tw);
            for (o, i) in out.chunks_mut(out_len).zip(input.chunks(in_len)) {
                f(&mut rows, o, i);
            }
        }
    }
}

/// Row buffers for one row of tiles. Every step is a loop over zipped slices (or pairs of
/// columns, for the stride-2 steps), which the compiler vectorises without bounds checks.
struct Rows {
    tw: usize,
    /// Input rows 2i-1 .. 2i+2 of the zero-padded plane, `2 * tw + 2` columns each (padded
    /// column q is input column q - 1).
    d: [Vec<f32>; 4],
    /// `B^T d`: the four rows combined, same layout.
    r: [Vec<f32>; 4],
    /// `A^T M` for one output row, per column of the 4x4 block.
    s: [Vec<f32>; 4],
    /// One output row's pixels `(2j, 2j + 1)` as pairs.
    y: Vec<[f32; 2]>,
}

/// `out[j] = f(a[j], b[j])` over the shortest of the three.
fn zip2(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = f(a, b);
    }
}

/// `out[j] = f(a[j], b[j], c[j])` over the shortest of the four.
fn zip3(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *o = f(a, b, c);
    }
}

impl Rows {
    fn new(tw: usize) -> Self {
        let padded = || vec![0f32; 2 * tw + 2];
        let row = || vec![0f32; tw];
        Self {
            tw,
            d: [padded(), padded(), padded(), padded()],
            r: [padded(), padded(), padded(), padded()],
            s: [row(), row(), row(), row()],
            y: vec![[0.0; 2]; tw],
        }
    }

    /// Transforms tile row `i` of one channel's `[h, w]` plane: `V[xi][tile] = (B^T d B)[xi]`
    /// for its `tw` tiles, written at `v[xi * stride + at ..][..tw]`, with
    /// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    #[allow(clippy::too_many_arguments)]
    fn input(
        &mut self,
        plane: &[f32],
        h: usize,
        w: usize,
        i: usize,
        v: &mut [f32],
        stride: usize,
        at: usize,
    ) {
        let tw = self.tw;
        for (a, d) in self.d.iter_mut().enumerate() {
            // Padded row 2i + a is input row 2i + a - 1.
            match (2 * i + a).checked_sub(1).filter(|&y| y < h) {
                Some(y) => {
                    d[0] = 0.0;
                    d[1..=w].copy_from_slice(&plane[y * w..(y + 1) * w]);
                    d[w + 1..].fill(0.0);
                }
                None => d.fill(0.0),
            }
        }
        let [d0, d1, d2, d3] = &self.d;
        let [r0, r1, r2, r3] = &mut self.r;
        zip2(r0, d0, d2, |a, b| a - b);
        zip2(r1, d1, d2, |a, b| a + b);
        zip2(r2, d2, d1, |a, b| a - b);
        zip2(r3, d1, d3, |a, b| a - b);
        for (a, r) in self.r.iter().enumerate() {
            // The tile's columns 2j .. 2j+3 are the pairs j and j + 1.
            let (pairs, _) = r.as_chunks::<2>();
            let (now, next) = (&pairs[..tw], &pairs[1..=tw]);
            let mut out = v[(a * 4) * stride + at..].chunks_mut(stride).map(|c| &mut c[..tw]);
            let mut put = |f: fn(&[f32; 2], &[f32; 2]) -> f32| {
                let o = out.next().expect("four rows of V per row of B^T d");
                for ((o, p), q) in o.iter_mut().zip(now).zip(next) {
                    *o = f(p, q);
                }
            };
            put(|p, q| p[0] - q[0]);
            put(|p, q| p[1] + q[0]);
            put(|p, q| q[0] - p[1]);
            put(|p, q| p[1] - q[1]);
        }
    }

    /// Output-gradient tile row `i` of one channel's `[h, w]` plane: `A dY A^T` of each 2x2
    /// block (zero beyond the plane's edge), the 4x4 that [`Self::output`]'s adjoint gives,
    /// written at `m[xi * stride + at ..][..tw]`.
    #[allow(clippy::too_many_arguments)]
    fn grad_output(
        &mut self,
        dyc: &[f32],
        h: usize,
        w: usize,
        i: usize,
        m: &mut [f32],
        stride: usize,
        at: usize,
    ) {
        let tw = self.tw;
        for (a, d) in self.d[..2].iter_mut().enumerate() {
            match Some(2 * i + a).filter(|&y| y < h) {
                Some(y) => {
                    d[..w].copy_from_slice(&dyc[y * w..(y + 1) * w]);
                    d[w..].fill(0.0);
                }
                None => d.fill(0.0),
            }
        }
        // A dY, A = [[1, 0], [1, 1], [1, -1], [0, -1]]: rows d0, d0 + d1, d0 - d1, -d1.
        let [d0, d1, _, _] = &self.d;
        let [r0, r1, r2, r3] = &mut self.r;
        r0.copy_from_slice(d0);
        zip2(r1, d0, d1, |a, b| a + b);
        zip2(r2, d0, d1, |a, b| a - b);
        zip2(r3, d1, d1, |a, _| -a);
        for (a, r) in self.r.iter().enumerate() {
            // (A dY) A^T: each row's pair (p, q) becomes p, p + q, p - q, -q.
            let pairs = &r.as_chunks::<2>().0[..tw];
            let mut out = m[(a * 4) * stride + at..].chunks_mut(stride).map(|c| &mut c[..tw]);
            let mut put = |f: fn(&[f32; 2]) -> f32| {
                let o = out.next().expect("four rows of M per row of A dY");
                for (o, p) in o.iter_mut().zip(pairs) {
                    *o = f(p);
                }
            };
            put(|p| p[0]);
            put(|p| p[0] + p[1]);
            put(|p| p[0] - p[1]);
            put(|p| -p[1]);
        }
    }

    /// Output tile row `i` of one channel: `Y = A^T M A` with `A^T = [[1, 1, 1, 0],
    /// [0, 1, -1, -1]]` from `m[xi * stride + at ..][..tw]`, written to output rows 2i and
    /// 2i+1 of the `[h, w]` plane `yc` (clipped at its edges).
    #[allow(clippy::too_many_arguments)]
    fn output(
        &mut self,
        m: &[f32],
        stride: usize,
        at: usize,
        yc: &mut [f32],
        h: usize,
        w: usize,
        i: usize,
    ) {
        let tw = self.tw;
        let mx: [&[f32]; XI] = std::array::from_fn(|xi| &m[xi * stride + at..][..tw]);
        for dy in 0..2 {
            let oy = 2 * i + dy;
            if oy >= h {
                break;
            }
            // Rows combined: s[b] = m[b] + m[4+b] + m[8+b] (row 0) or m[4+b] - m[8+b] - m[12+b].
            for (b, sb) in self.s.iter_mut().enumerate() {
                if dy == 0 {
                    zip3(sb, mx[b], mx[4 + b], mx[8 + b], |p, q, r| p + q + r);
                } else {
                    zip3(sb, mx[4 + b], mx[8 + b], mx[12 + b], |p, q, r| p - q - r);
                }
            }
            let [s0, s1, s2, s3] = &self.s;
            for ((((y, &s0), &s1), &s2), &s3) in self.y.iter_mut().zip(s0).zip(s1).zip(s2).zip(s3) {
                *y = [s0 + s1 + s2, s1 - s2 - s3];
            }
            let out = &mut yc[oy * w..(oy + 1) * w];
            let (pairs, last) = out.as_chunks_mut::<2>();
            for (o, y) in pairs.iter_mut().zip(&self.y) {
                *o = *y;
            }
            if let Some(o) = last.first_mut() {
                *o = self.y[tw - 1][0];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tiles::{
        conv_image_then as im2col_conv, filter_grad_image as direct_filter_grad,
    };

    fn pseudo(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0) - 1.0).collect()
    }

    /// The Winograd convolution gives im2col + GEMM's values, odd sizes (clipped last tiles)
    /// and blocks of several tile rows included.
    #[test]
    fn matches_the_direct_convolution() {
        for (ci, co, h, w) in [(1, 1, 1, 1), (3, 5, 7, 9), (8, 4, 2, 33), (16, 24, 40, 6)] {
            let g = Geometry { batch: 1, channels: ci, h, w, k: 3, stride: 1, pad: 1 };
            assert!(applies(&g));
            let (img, wt) = (pseudo(ci * h * w, 1), pseudo(co * ci * 9, 2));
            let mut direct = vec![0f32; co * h * w];
            let wm = Mat::row_major(&wt, co, ci * 9);
            im2col_conv(&g, wm, &img, &mut direct, 1, Parallelism::None, |_, _| {});
            let u = weights(&wt, co, ci);
            // In turn, and with the transforms split over channels on rayon's threads.
            for par in [Parallelism::None, Parallelism::Rayon(2)] {
                let mut wino = vec![f32::NAN; co * h * w];
                let seen = std::cell::RefCell::new(Vec::new());
                conv_image_then(&g, &u, co, &img, &mut wino, par, |_, px| {
                    seen.borrow_mut().push(px)
                });
                let scale = direct.iter().fold(0f32, |s, v| s.max(v.abs()));
                let diff = direct.iter().zip(&wino).fold(0f32, |s, (a, b)| s.max((a - b).abs()));
                assert!(scale > 0.01 && diff <= 1e-5 * scale, "{ci}->{co} {h}x{w}: off by {diff}");
                // The epilogue saw every output pixel once, in order.
                let seen = seen.into_inner();
                let covered: Vec<usize> = seen.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..h * w).collect::<Vec<_>>(), "{ci}->{co} {h}x{w}");
            }
        }
    }

    /// The filter gradient through the transformed domain is im2col + GEMM's, summed over two
    /// images into one accumulator as the batch is.
    #[test]
    fn filter_gradient_matches_the_direct_one() {
        for (ci, co, h, w) in [(1, 1, 1, 1), (3, 5, 7, 9), (8, 4, 2, 33), (16, 24, 40, 6)] {
            let g = Geometry { batch: 1, channels: ci, h, w, k: 3, stride: 1, pad: 1 };
            let mut direct = vec![0f32; co * ci * 9];
            let mut du = [vec![0f32; XI * co * ci], vec![0f32; XI * co * ci]];
            for seed in [3, 4] {
                let (img, dy) = (pseudo(ci * h * w, seed), pseudo(co * h * w, seed + 10));
                direct_filter_grad(&g, &dy, co, &img, &mut direct, 1, Parallelism::None);
                filter_grad_image(&g, &dy, co, &img, &mut du[0], Parallelism::None);
                filter_grad_image(&g, &dy, co, &img, &mut du[1], Parallelism::Rayon(2));
            }
            let scale = direct.iter().fold(0f32, |s, v| s.max(v.abs()));
            for du in &du {
                let wino = filter_from(du, co, ci);
                let diff = direct.iter().zip(&wino).fold(0f32, |s, (a, b)| s.max((a - b).abs()));
                assert!(scale > 0.01 && diff <= 1e-5 * scale, "{ci}->{co} {h}x{w}: off by {diff}");
            }
        }
    }
}
