//! Surfaces, the exact Euclidean distance transform and HD95.
//!
//! The distance transform is the separable lower-envelope algorithm of Felzenszwalb and
//! Huttenlocher (2012), run along each axis with that axis' spacing; it is exact, like scipy's
//! `distance_transform_edt`. Written here because no maintained crate offers an anisotropic
//! exact 3-D EDT.

/// Surface voxels of a mask: mask voxels with a face neighbour outside the mask or outside the
/// volume (medpy: `mask ^ binary_erosion(mask, connectivity 1)`).
pub fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = dims;
    let at = |x: usize, y: usize, z: usize| mask[x + nx * (y + ny * z)];
    let mut out = vec![false; mask.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if !at(x, y, z) {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && at(x - 1, y, z)
                    && at(x + 1, y, z)
                    && at(x, y - 1, z)
                    && at(x, y + 1, z)
                    && at(x, y, z - 1)
                    && at(x, y, z + 1);
                out[x + nx * (y + ny * z)] = !interior;
            }
        }
    }
    out
}

/// 1-D squared distance transform of `f` (0 at features, infinity elsewhere) with sample
/// spacing `s`, written into `out`. `v` and `zs` are scratch buffers of `f.len()` and
/// `f.len() + 1`.
fn dt1d(f: &[f64], s: f64, out: &mut [f64], v: &mut [usize], zs: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        let xq = q as f64 * s;
        let mut sv = f64::NEG_INFINITY;
        while k >= 0 {
            let p = v[k as usize];
            let xp = p as f64 * s;
            sv = ((f[q] + xq * xq) - (f[p] + xp * xp)) / (2.0 * (xq - xp));
            if sv <= zs[k as usize] {
                k -= 1;
            } else {
                break;
            }
        }
        k += 1;
        v[k as usize] = q;
        zs[k as usize] = if k == 0 { f64::NEG_INFINITY } else { sv };
        zs[k as usize + 1] = f64::INFINITY;
    }
    if k < 0 {
        out.fill(f64::INFINITY);
        return;
    }
    let mut j = 0usize;
    for (p, o) in out.iter_mut().enumerate() {
        let xp = p as f64 * s;
        while zs[j + 1] < xp {
            j += 1;
        }
        let d = xp - v[j] as f64 * s;
        *o = d * d + f[v[j]];
    }
}

/// Squared Euclidean distance (mm²) from every voxel to the nearest `true` voxel of `features`;
/// infinity everywhere when there is none.
pub fn edt_squared(features: &[bool], dims: [usize; 3], spacing: [f32; 3]) -> Vec<f64> {
    let mut g: Vec<f64> = features.iter().map(|&f| if f { 0.0 } else { f64::INFINITY }).collect();
    let [nx, ny, nz] = dims;
    let strides = [1, nx, nx * ny];
    let longest = nx.max(ny).max(nz);
    let (mut line, mut out) = (vec![0.0; longest], vec![0.0; longest]);
    let (mut v, mut zs) = (vec![0usize; longest], vec![0.0; longest + 1]);
    for axis in 0..3 {
        let n = dims[axis];
        let stride = strides[axis];
        let s = spacing[axis] as f64;
        // Every line along `axis` starts at a voxel whose coordinate on `axis` is 0.
        for start in 0..g.len() {
            if (start / stride) % n != 0 {
                continue;
            }
            for i in 0..n {
                line[i] = g[start + i * stride];
            }
            dt1d(&line[..n], s, &mut out[..n], &mut v[..n], &mut zs[..n + 1]);
            for i in 0..n {
                g[start + i * stride] = out[i];
            }
        }
    }
    g
}

/// The bounding box of `true` voxels in either mask, grown by one voxel and clamped.
fn joint_bbox(a: &[bool], b: &[bool], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let [nx, ny, _] = dims;
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut any = false;
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        if x || y {
            any = true;
            let c = [i % nx, (i / nx) % ny, i / (nx * ny)];
            for d in 0..3 {
                lo[d] = lo[d].min(c[d]);
                hi[d] = hi[d].max(c[d]);
            }
        }
    }
    any.then(|| {
        let mut out_lo = [0; 3];
        let mut out_hi = [0; 3];
        for d in 0..3 {
            out_lo[d] = lo[d].saturating_sub(1);
            out_hi[d] = (hi[d] + 1).min(dims[d] - 1);
        }
        (out_lo, out_hi)
    })
}

fn crop(m: &[bool], dims: [usize; 3], lo: [usize; 3], cdims: [usize; 3]) -> Vec<bool> {
    let mut out = Vec::with_capacity(cdims.iter().product());
    for z in 0..cdims[2] {
        for y in 0..cdims[1] {
            let row = lo[0] + dims[0] * (lo[1] + y + dims[1] * (lo[2] + z));
            out.extend_from_slice(&m[row..row + cdims[0]]);
        }
    }
    out
}

/// numpy's default (linear) percentile of unsorted values.
pub(crate) fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let (i, f) = (pos.floor() as usize, pos - pos.floor());
    if i + 1 < values.len() { values[i] + (values[i + 1] - values[i]) * f } else { values[i] }
}

/// The 95th-percentile symmetric Hausdorff distance in mm between the surfaces of two masks.
/// Both empty: `Some(0.0)`; exactly one empty: `None` (undefined).
pub fn hd95(a: &[bool], b: &[bool], dims: [usize; 3], spacing: [f32; 3]) -> Option<f64> {
    let (ea, eb) = (!a.iter().any(|&x| x), !b.iter().any(|&x| x));
    match (ea, eb) {
        (true, true) => return Some(0.0),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    // Crop to both masks plus a one-voxel margin: voxels on the crop's edge are then either
    // background or on the volume's edge, so surfaces and distances are unchanged.
    let (lo, hi) = joint_bbox(a, b, dims).expect("both masks are non-empty");
    let cdims = [hi[0] - lo[0] + 1, hi[1] - lo[1] + 1, hi[2] - lo[2] + 1];
    let (a, b) = (crop(a, dims, lo, cdims), crop(b, dims, lo, cdims));
    let (sa, sb) = (surface(&a, cdims), surface(&b, cdims));
    let (da, db) = (edt_squared(&sa, cdims, spacing), edt_squared(&sb, cdims, spacing));
    let mut pooled: Vec<f64> = sa
        .iter()
        .zip(&db)
        .filter(|(s, _)| **s)
        .map(|(_, d)| d.sqrt())
        .chain(sb.iter().zip(&da).filter(|(s, _)| **s).map(|(_, d)| d.sqrt()))
        .collect();
    Some(percentile(&mut pooled, 95.0))
}
