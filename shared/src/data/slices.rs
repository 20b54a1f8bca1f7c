//! Axial slicing: HU windowing, resizing to the model's in-plane size, and back.
//!
//! Resampling uses pixel-centre alignment (PyTorch's `align_corners = false`), so a slice
//! resized down and up again lines up with the original grid.

use serde::{Deserialize, Serialize};

use super::{Image, Labels};

/// A Hounsfield-unit window mapped to [-1, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub lo: f32,
    pub hi: f32,
}

impl Window {
    pub fn apply(&self, hu: f32) -> f32 {
        (hu.clamp(self.lo, self.hi) - self.lo) / (self.hi - self.lo) * 2.0 - 1.0
    }
}

/// How volumes become model inputs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SliceSpec {
    /// Square in-plane size the model sees.
    pub size: usize,
    /// 1 (the slice alone) or an odd count of adjacent slices centred on it (edges repeat).
    pub in_channels: usize,
    pub window: Window,
    /// Three position channels (x, y, height) after the slices; see
    /// [`crate::model::ModelConfig::position_channels`].
    pub position: bool,
}

impl SliceSpec {
    /// Input channels per slice: the adjacent slices, plus three when `position` is on.
    pub fn channels(&self) -> usize {
        self.in_channels + if self.position { 3 } else { 0 }
    }
}

/// Pixel-centre coordinate `i` of `n` mapped to [-1, 1].
fn unit_coord(i: usize, n: usize) -> f32 {
    (i as f32 + 0.5) / n as f32 * 2.0 - 1.0
}

/// Source coordinate and weights for one output index of a linear resize.
fn linear_taps(out: usize, n_in: usize, n_out: usize) -> (usize, usize, f32) {
    let scale = n_in as f32 / n_out as f32;
    let src = ((out as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n_in - 1);
    let i1 = (i0 + 1).min(n_in - 1);
    (i0, i1, src - i0 as f32)
}

/// Bilinear resize of a row-major `h x w` image to `oh x ow`.
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    debug_assert_eq!(src.len(), h * w);
    if h == oh && w == ow {
        return src.to_vec();
    }
    let cols: Vec<_> = (0..ow).map(|x| linear_taps(x, w, ow)).collect();
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let (y0, y1, fy) = linear_taps(y, h, oh);
        let (r0, r1) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
        for &(x0, x1, fx) in &cols {
            let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
            out.push(top + (bottom - top) * fy);
        }
    }
    out
}

/// Nearest-neighbour resize (for label maps) with the same alignment as [`resize_bilinear`].
pub fn resize_nearest<T: Copy>(src: &[T], h: usize, w: usize, oh: usize, ow: usize) -> Vec<T> {
    debug_assert_eq!(src.len(), h * w);
    let pick = |o: usize, n_in: usize, n_out: usize| {
        (((o as f32 + 0.5) * n_in as f32 / n_out as f32) as usize).min(n_in - 1)
    };
    let cols: Vec<usize> = (0..ow).map(|x| pick(x, w, ow)).collect();
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let row = &src[pick(y, h, oh) * w..][..w];
        out.extend(cols.iter().map(|&x| row[x]));
    }
    out
}

/// Every axial slice of `image` as model input: `[z][channel][size][size]`, flattened. The
/// channels are the adjacent slices, then (with `spec.position`) x, y and the slice's height.
pub fn slice_stack(image: &Image, spec: &SliceSpec) -> Vec<f32> {
    let [nx, ny, nz] = image.dims;
    let s = spec.size;
    let half = (spec.in_channels / 2) as isize;
    let windowed: Vec<Vec<f32>> = (0..nz)
        .map(|z| {
            let plane: Vec<f32> = image.slice(z).iter().map(|&v| spec.window.apply(v)).collect();
            resize_bilinear(&plane, ny, nx, s, s)
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

/// Every axial slice of `labels` as class indices (through `lut`, label value -> class),
/// resized to `size x size` by nearest neighbour: `[z][size][size]`, flattened.
pub fn label_slices(labels: &Labels, size: usize, lut: &[u32]) -> Vec<u32> {
    let [nx, ny, nz] = labels.dims;
    let mut out = Vec::with_capacity(nz * size * size);
    for z in 0..nz {
        let classes: Vec<u32> =
            labels.slice(z).iter().map(|&l| lut.get(l as usize).copied().unwrap_or(0)).collect();
        out.extend(resize_nearest(&classes, ny, nx, size, size));
    }
    out
}
