//! Where voxels are in the patient: the voxel-to-world affine, and reorientation to fedtune's
//! one canonical voxel order.
//!
//! World coordinates follow NIfTI: RAS+ millimetres, `+x` toward the patient's right, `+y`
//! anterior, `+z` superior (DICOM's patient coordinates are LPS+: `x` and `y` negated).
//! [`Affine`] maps a voxel index `(i, j, k)` to RAS+ mm.
//!
//! **Canonical order** (what every volume is turned into before slicing) is **LPS**: voxel
//! index `i` increases toward the patient's left, `j` toward posterior, `k` toward superior.
//! That is the order of a standard axial DICOM CT (ImageOrientationPatient `1\0\0\0\1\0`,
//! slices by increasing height), ITK's default, and the radiological view when an axial slice
//! is shown with row 0 at the top: patient's right on the screen's left, anterior up.
//! In RAS+ terms its affine is `diag(-sx, -sy, sz)` plus an origin. The choice is the
//! closest permutation and flip of the stored axes (as nibabel's `as_closest_canonical`, with
//! LPS instead of RAS as the target); an oblique affine keeps its rotation.

/// Voxel index -> RAS+ millimetres: `world = m * [i, j, k] + t`, as 3 rows of `[m | t]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine(pub [[f64; 4]; 3]);

/// How far (in voxels) two grids may disagree and still be the same grid: 1 % of a voxel at
/// any corner of the volume.
pub const GRID_TOLERANCE_VOXELS: f64 = 0.01;

impl Affine {
    /// A canonical (LPS-ordered) axis-aligned grid with the given spacing and its first voxel
    /// at the world origin.
    pub fn lps(spacing: [f32; 3]) -> Self {
        let [x, y, z] = spacing.map(f64::from);
        Self([[-x, 0.0, 0.0, 0.0], [0.0, -y, 0.0, 0.0], [0.0, 0.0, z, 0.0]])
    }

    /// The world position of voxel index `v` (fractional indices allowed).
    pub fn apply(&self, v: [f64; 3]) -> [f64; 3] {
        let m = &self.0;
        std::array::from_fn(|r| m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2] + m[r][3])
    }

    /// Column `c` of the linear part: the world step of one voxel along axis `c`.
    pub fn column(&self, c: usize) -> [f64; 3] {
        std::array::from_fn(|r| self.0[r][c])
    }

    /// Voxel size along each axis (mm): the length of each column.
    pub fn spacing(&self) -> [f32; 3] {
        std::array::from_fn(|c| norm(self.column(c)) as f32)
    }

    /// Whether every entry is finite and the three columns span space.
    pub fn is_usable(&self) -> bool {
        let finite = self.0.iter().flatten().all(|v| v.is_finite());
        let det = det3(std::array::from_fn(|r| std::array::from_fn(|c| self.0[r][c])));
        finite && det.abs() > 1e-9 * self.spacing().iter().map(|&s| f64::from(s)).product::<f64>()
    }

    /// The largest distance, in voxels of the smaller spacing, between where `self` and
    /// `other` put the same corner voxel of a `dims` volume. The difference of two affines is
    /// affine, so its largest norm over the volume is at a corner.
    pub fn grid_distance(&self, other: &Self, dims: [usize; 3]) -> f64 {
        let mut worst = 0f64;
        for corner in 0..8 {
            let v: [f64; 3] = std::array::from_fn(|a| {
                if corner >> a & 1 == 1 { dims[a].saturating_sub(1) as f64 } else { 0.0 }
            });
            let (p, q) = (self.apply(v), other.apply(v));
            worst = worst.max(norm(std::array::from_fn(|r| p[r] - q[r])));
        }
        let voxel = self.spacing().into_iter().chain(other.spacing()).fold(f32::MAX, f32::min);
        worst / f64::from(voxel.max(f32::MIN_POSITIVE))
    }

    /// The orientation code of each voxel axis, nibabel style: the world direction each index
    /// increases toward (for example `"LPS"` or `"RAS"`).
    pub fn axis_codes(&self) -> String {
        let o = Orientation::of(self, [2, 2, 2]);
        (0..3)
            .map(|file_axis| {
                let a = o.canonical_axis_of(file_axis);
                // Canonical axes point L, P, S; a flipped one points the other way.
                let (pos, neg) = [('L', 'R'), ('P', 'A'), ('S', 'I')][a];
                if o.flip[a] { neg } else { pos }
            })
            .collect()
    }
}

fn norm(v: [f64; 3]) -> f64 {
    (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt()
}

pub(super) fn det3(m: [[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// The permutation and flips that turn a stored volume into canonical LPS order, and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orientation {
    /// Dims of the stored volume.
    pub stored_dims: [usize; 3],
    /// Canonical axis `a` is stored axis `axis[a]`.
    pub axis: [usize; 3],
    /// Whether canonical axis `a` runs against its stored axis.
    pub flip: [bool; 3],
}

impl Orientation {
    /// The reorientation of a `dims` volume whose affine is `affine`. Each stored axis is
    /// matched to the world axis it is most nearly parallel to, largest components first, so
    /// an oblique affine gets the closest canonical order.
    pub fn of(affine: &Affine, dims: [usize; 3]) -> Self {
        // In LPS world coordinates the canonical axes are +x, +y, +z.
        let lps = |r: usize, c: usize| if r < 2 { -affine.0[r][c] } else { affine.0[r][c] };
        let mut axis = [usize::MAX; 3];
        let mut flip = [false; 3];
        let (mut world_free, mut stored_free) = ([true; 3], [true; 3]);
        for _ in 0..3 {
            let mut best = (f64::NEG_INFINITY, 0, 0);
            for w in (0..3).filter(|&w| world_free[w]) {
                for s in (0..3).filter(|&s| stored_free[s]) {
                    let v = lps(w, s).abs() / f64::from(affine.spacing()[s]).max(f64::MIN_POSITIVE);
                    if v > best.0 {
                        best = (v, w, s);
                    }
                }
            }
            let (_, w, s) = best;
            axis[w] = s;
            flip[w] = lps(w, s) < 0.0;
            world_free[w] = false;
            stored_free[s] = false;
        }
        Self { stored_dims: dims, axis, flip }
    }

    /// Whether the stored order is already canonical.
    pub fn is_identity(&self) -> bool {
        self.axis == [0, 1, 2] && self.flip == [false; 3]
    }

    fn canonical_axis_of(&self, stored_axis: usize) -> usize {
        self.axis.iter().position(|&s| s == stored_axis).expect("axis is a permutation")
    }

    /// Dims in canonical order.
    pub fn canonical_dims(&self) -> [usize; 3] {
        self.axis.map(|s| self.stored_dims[s])
    }

    /// The stored index of canonical voxel `c`.
    fn stored_index(&self, c: [usize; 3]) -> [usize; 3] {
        let mut s = [0; 3];
        for a in 0..3 {
            let n = self.stored_dims[self.axis[a]];
            s[self.axis[a]] = if self.flip[a] { n - 1 - c[a] } else { c[a] };
        }
        s
    }

    /// The affine of the canonical volume: canonical voxel `c` sits where stored voxel
    /// `stored_index(c)` sat.
    pub fn canonical_affine(&self, stored: &Affine) -> Affine {
        let origin = self.stored_index([0, 0, 0]).map(|v| v as f64);
        let t = stored.apply(origin);
        Affine(std::array::from_fn(|r| {
            let col = |a: usize| {
                let sign = if self.flip[a] { -1.0 } else { 1.0 };
                sign * stored.0[r][self.axis[a]]
            };
            [col(0), col(1), col(2), t[r]]
        }))
    }

    /// Reorders stored data (x fastest) into canonical order.
    pub fn to_canonical<T: Copy>(&self, stored: &[T]) -> Vec<T> {
        if self.is_identity() {
            return stored.to_vec();
        }
        let [sx, sy, _] = self.stored_dims;
        let mut out = Vec::with_capacity(stored.len());
        let [cx, cy, cz] = self.canonical_dims();
        for k in 0..cz {
            for j in 0..cy {
                for i in 0..cx {
                    let [a, b, c] = self.stored_index([i, j, k]);
                    out.push(stored[a + sx * (b + sy * c)]);
                }
            }
        }
        out
    }

    /// Puts canonical data (x fastest) back into the stored order.
    pub fn to_stored<T: Copy + Default>(&self, canonical: &[T]) -> Vec<T> {
        if self.is_identity() {
            return canonical.to_vec();
        }
        let [sx, sy, _] = self.stored_dims;
        let mut out = vec![T::default(); canonical.len()];
        let [cx, cy, cz] = self.canonical_dims();
        let mut n = 0;
        for k in 0..cz {
            for j in 0..cy {
                for i in 0..cx {
                    let [a, b, c] = self.stored_index([i, j, k]);
                    out[a + sx * (b + sy * c)] = canonical[n];
                    n += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
