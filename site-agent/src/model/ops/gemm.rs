//! The GEMM behind the CPU convolution (the `gemm` crate, candle's own), its per-thread
//! scratch buffers, and how work is split over a batch.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

thread_local! {
    /// im2col columns of one image, kept between calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer resized to `len`. The buffer is taken out of the
/// thread-local for the call, so a re-entrant call (rayon work-stealing) gets its own.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
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
pub(super) struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    pub(super) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }
    /// Rows of `cols` elements that start `rs` apart: a block of columns of a wider matrix.
    pub(super) fn rows_apart(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self { data, rows, cols, rs, cs: 1 }
    }
    pub(super) fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    /// Every element the view names lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a @ b` (or `dst += a @ b` with `accumulate`), `dst` row-major `[a.rows, b.cols]` with
/// rows `dst_rs` apart (`b.cols` for a whole matrix; more for a block of a wider one).
///
/// `gemm`'s kernels tile the output's rows by 16 (AVX2) or 64 (AVX-512) and its columns by 6,
/// so with few output rows (a layer's 16 to 64 channels) against many columns (its pixels) most
/// of each tile is wasted. Then the transposed product `dst^T = b^T @ a^T` is computed instead,
/// written through `dst`'s transposed strides: same result, full tiles.
#[allow(unsafe_code)]
pub(super) fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    par: Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    let fits = dst_rs >= n && (m - 1) * dst_rs + n <= dst.len();
    assert!(b.rows == k && fits && a.in_bounds() && b.in_bounds(), "matmul shapes");
    // (lhs, rhs, rows, cols, dst row stride, dst column stride) of the product gemm computes.
    let (lhs, rhs, rows, cols, drs, dcs) =
        if m < n { (b.t(), a.t(), n, m, 1, dst_rs) } else { (a, b, m, n, dst_rs, 1) };
    // SAFETY: the assertion above checks that every element `gemm` reads through `lhs` and
    // `rhs` (indices `r * rs + c * cs` for r < rows, c < cols of each view; transposing a view
    // swaps both) and every element it writes in `dst` (`i * dst_rs + j` for i < m, j < n,
    // which in the transposed case is `j * drs + i * dcs` with drs = 1, dcs = dst_rs) is inside
    // the borrowed slices, and `dst` is borrowed mutably, so it aliases neither input.
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
pub(super) fn batch_parallel(batch: usize) -> Option<Parallelism> {
    let threads = rayon::current_num_threads();
    if batch >= threads || threads == 1 { None } else { Some(Parallelism::Rayon(threads)) }
}

/// Runs `f(image index, scratch-free GEMM parallelism, chunk of out)` for every image.
pub(super) fn per_image(
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
