//! Axial slicing: HU windowing, resampling to the model's pixel spacing, and back.
//!
//! A model with a pixel spacing (`SliceSpec::pixel_mm`) sees a square field of view of
//! `size x pixel_mm` millimetres centred on each slice's centre: the slice is resampled to that
//! spacing, cropped or padded (air, background) to `size`, whatever the case's own spacing and
//! matrix. Models without one (weights written before the field existed) stretch every slice to
//! `size` pixels. Both use pixel-centre alignment (PyTorch's `align_corners = false`), so a
//! slice resampled to the model's grid and back lines up with its own grid.

pub use shared::architecture::{SliceSpec, Window};

use super::{Image, Labels};

/// HU of what lies outside the scanned field of view: air.
const OUTSIDE_HU: f32 = -1024.0;

/// Where the model's `size x size` grid samples a slice of `n` pixels of `spacing` mm along one
/// axis.
pub fn to_model(spec: &SliceSpec, n: usize, spacing: f32) -> AxisMap {
    let model_mm = spec.pixel_mm.unwrap_or(n as f32 * spacing / spec.size as f32);
    AxisMap::centred(n, spacing, spec.size, model_mm)
}

/// Where a slice of `n` pixels of `spacing` mm samples the model's grid: the inverse of
/// [`to_model`].
pub fn from_model(spec: &SliceSpec, n: usize, spacing: f32) -> AxisMap {
    let model_mm = spec.pixel_mm.unwrap_or(n as f32 * spacing / spec.size as f32);
    AxisMap::centred(spec.size, model_mm, n, spacing)
}

/// One axis of a resampling: output pixel `o` reads input coordinate `scale * o + shift`
/// (pixel-centre indices: input pixel `i` covers `[i - 0.5, i + 0.5]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AxisMap {
    pub n_in: usize,
    pub n_out: usize,
    pub scale: f32,
    pub shift: f32,
}

impl AxisMap {
    /// Output pixels of `out_mm` laid over input pixels of `in_mm`, both grids centred on the
    /// same point.
    pub fn centred(n_in: usize, in_mm: f32, n_out: usize, out_mm: f32) -> Self {
        let scale = out_mm / in_mm;
        let shift = (n_in as f32 - 1.0) / 2.0 - (n_out as f32 - 1.0) / 2.0 * scale;
        Self { n_in, n_out, scale, shift }
    }

    fn coord(&self, o: usize) -> Option<f32> {
        let c = self.scale * o as f32 + self.shift;
        // Inside the input's extent (with a hair of slack for rounding at its edges).
        let edge = 0.5 + 1e-4;
        (c >= -edge && c <= self.n_in as f32 - 1.0 + edge).then_some(c)
    }

    /// The two input taps and the weight of the second, or `None` outside the input.
    fn linear(&self, o: usize) -> Option<(usize, usize, f32)> {
        let c = self.coord(o)?.max(0.0);
        let i0 = (c.floor() as usize).min(self.n_in - 1);
        let i1 = (i0 + 1).min(self.n_in - 1);
        Some((i0, i1, c - i0 as f32))
    }

    /// The nearest input pixel, or `None` outside the input.
    fn nearest(&self, o: usize) -> Option<usize> {
        let c = self.coord(o)?;
        Some(((c + 0.5).max(0.0) as usize).min(self.n_in - 1))
    }
}

/// Bilinear resampling of a row-major plane through `rows` (y) and `cols` (x); output pixels
/// outside the input take `fill`.
pub fn resample_bilinear(src: &[f32], rows: AxisMap, cols: AxisMap, fill: f32) -> Vec<f32> {
    let w = cols.n_in;
    debug_assert_eq!(src.len(), rows.n_in * w);
    let taps: Vec<_> = (0..cols.n_out).map(|x| cols.linear(x)).collect();
    let mut out = Vec::with_capacity(rows.n_out * cols.n_out);
    for y in 0..rows.n_out {
        let Some((y0, y1, fy)) = rows.linear(y) else {
            out.extend(std::iter::repeat_n(fill, cols.n_out));
            continue;
        };
        let (r0, r1) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
        out.extend(taps.iter().map(|t| match *t {
            Some((x0, x1, fx)) => {
                let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
                let bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
                top + (bottom - top) * fy
            }
            None => fill,
        }));
    }
    out
}

/// Nearest-neighbour resampling (for label maps), aligned as [`resample_bilinear`].
fn resample_nearest<T: Copy>(src: &[T], rows: AxisMap, cols: AxisMap, fill: T) -> Vec<T> {
    let w = cols.n_in;
    debug_assert_eq!(src.len(), rows.n_in * w);
    let picks: Vec<_> = (0..cols.n_out).map(|x| cols.nearest(x)).collect();
    let mut out = Vec::with_capacity(rows.n_out * cols.n_out);
    for y in 0..rows.n_out {
        match rows.nearest(y) {
            Some(r) => {
                let row = &src[r * w..][..w];
                out.extend(picks.iter().map(|p| p.map_or(fill, |x| row[x])));
            }
            None => out.extend(std::iter::repeat_n(fill, cols.n_out)),
        }
    }
    out
}

/// Pixel-centre coordinate `i` of `n` mapped to [-1, 1].
fn unit_coord(i: usize, n: usize) -> f32 {
    (i as f32 + 0.5) / n as f32 * 2.0 - 1.0
}

/// Bilinear resize of a row-major `h x w` image to `oh x ow` (the whole extent stretched).
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    if h == oh && w == ow {
        return src.to_vec();
    }
    let stretch = |n: usize, m: usize| AxisMap::centred(n, 1.0, m, n as f32 / m as f32);
    resample_bilinear(src, stretch(h, oh), stretch(w, ow), 0.0)
}

/// Nearest-neighbour resize (for label maps) with the same alignment as [`resize_bilinear`].
pub fn resize_nearest<T: Copy + Default>(
    src: &[T],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<T> {
    let stretch = |n: usize, m: usize| AxisMap::centred(n, 1.0, m, n as f32 / m as f32);
    resample_nearest(src, stretch(h, oh), stretch(w, ow), T::default())
}

/// Every axial slice of `image` as model input: `[z][channel][size][size]`, flattened. The
/// channels are the adjacent slices, then (with `spec.position`) x, y and the slice's height.
pub fn slice_stack(image: &Image, spec: &SliceSpec) -> Vec<f32> {
    let [nx, ny, nz] = image.dims;
    let [sx, sy, _] = image.spacing();
    let (cols, rows) = (to_model(spec, nx, sx), to_model(spec, ny, sy));
    let s = spec.size;
    let half = (spec.in_channels / 2) as isize;
    let fill = spec.window.apply(OUTSIDE_HU);
    let windowed: Vec<Vec<f32>> = (0..nz)
        .map(|z| {
            let plane: Vec<f32> = image.slice(z).iter().map(|&v| spec.window.apply(v)).collect();
            resample_bilinear(&plane, rows, cols, fill)
        })
        .collect();
    let (xs, ys): (Vec<f32>, Vec<f32>) = if spec.position {
        let row: Vec<f32> = (0..s).map(|x| unit_coord(x, s)).collect();
        let xs = row.repeat(s);
        let ys = (0..s).flat_map(|y| std::iter::repeat_n(unit_coord(y, s), s)).collect();
        (xs, ys)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut out = Vec::with_capacity(nz * spec.channels() * s * s);
    for z in 0..nz as isize {
        for dz in -half..=half {
            let zz = (z + dz).clamp(0, nz as isize - 1) as usize;
            out.extend_from_slice(&windowed[zz]);
        }
        if spec.position {
            out.extend_from_slice(&xs);
            out.extend_from_slice(&ys);
            out.extend(std::iter::repeat_n(unit_coord(z as usize, nz), s * s));
        }
    }
    out
}

/// Every axial slice of `labels` as class indices (through `lut`, label value -> class) on the
/// model's grid (nearest neighbour, background outside the slice): `[z][size][size]`, flattened.
pub fn label_slices(labels: &Labels, spec: &SliceSpec, lut: &[u32]) -> Vec<u32> {
    let [nx, ny, nz] = labels.dims;
    let [sx, sy, _] = labels.spacing();
    let (cols, rows) = (to_model(spec, nx, sx), to_model(spec, ny, sy));
    let mut out = Vec::with_capacity(nz * spec.size * spec.size);
    for z in 0..nz {
        let classes: Vec<u32> =
            labels.slice(z).iter().map(|&l| lut.get(l as usize).copied().unwrap_or(0)).collect();
        out.extend(resample_nearest(&classes, rows, cols, 0));
    }
    out
}
