//! Reorientation: codes, round trips and the canonical affine.

use super::{Affine, Orientation};

fn affine(m: [[f64; 3]; 3], t: [f64; 3]) -> Affine {
    Affine(std::array::from_fn(|r| [m[r][0], m[r][1], m[r][2], t[r]]))
}

#[test]
fn axis_codes_match_nibabel() {
    // nibabel.aff2axcodes of the same matrices.
    let check = |m, want: &str| assert_eq!(affine(m, [0.0; 3]).axis_codes(), want);
    check([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "RAS");
    check([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]], "LPS");
    check([[-2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]], "LAS");
    check([[0.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], "AIR");
    // Oblique: 20 degrees about z still reads as the closest axes.
    let (c, s) = (20f64.to_radians().cos(), 20f64.to_radians().sin());
    check([[-c, s, 0.0], [-s, -c, 0.0], [0.0, 0.0, 1.0]], "LPS");
}

#[test]
fn every_orientation_round_trips_and_lands_on_the_same_world_grid() {
    let dims = [3, 4, 5];
    let data: Vec<u32> = (0..60).collect();
    let base = Affine::lps([0.5, 0.7, 2.0]);
    let perms = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    for perm in perms {
        for flips in 0..8 {
            // A stored volume that is the canonical one permuted and flipped.
            let stored_dims = perm.map(|a| dims[a]);
            let flip: [bool; 3] = std::array::from_fn(|a| flips >> a & 1 == 1);
            // stored axis s holds canonical axis perm[s].
            let mut axis = [0; 3];
            for (s, &a) in perm.iter().enumerate() {
                axis[a] = s;
            }
            let o = Orientation { stored_dims, axis, flip };
            let stored = o.to_stored(&data);
            // The stored volume's affine: canonical affine seen through the inverse mapping.
            let mut m = [[0.0; 4]; 3];
            let mut origin = [0.0; 3];
            for a in 0..3 {
                if flip[a] {
                    origin[a] = (dims[a] - 1) as f64;
                }
            }
            let t = base.apply(origin);
            for (r, row) in m.iter_mut().enumerate() {
                for a in 0..3 {
                    row[axis[a]] = if flip[a] { -base.0[r][a] } else { base.0[r][a] };
                }
                row[3] = t[r];
            }
            let stored_affine = Affine(m);
            let found = Orientation::of(&stored_affine, stored_dims);
            assert_eq!(found, o, "perm {perm:?} flips {flip:?}");
            assert_eq!(found.canonical_dims(), dims);
            assert_eq!(found.to_canonical(&stored), data);
            let back = found.canonical_affine(&stored_affine);
            assert!(back.grid_distance(&base, dims) < 1e-9, "{back:?} vs {base:?}");
        }
    }
}

#[test]
fn grid_distance_is_in_voxels_at_the_worst_corner() {
    let a = Affine::lps([1.0, 1.0, 2.0]);
    let mut b = a;
    b.0[2][3] += 0.5; // half a millimetre up: half a voxel of the 1 mm axes
    assert!((a.grid_distance(&b, [10, 10, 10]) - 0.5).abs() < 1e-12);
    let mut c = a;
    c.0[0][0] *= 1.01; // 1 % larger x spacing: 0.09 mm off at the far corner (index 9)
    assert!((a.grid_distance(&c, [10, 10, 10]) - 0.09).abs() < 1e-9);
}

#[test]
fn singular_affines_are_unusable() {
    assert!(Affine::lps([1.0, 1.0, 1.0]).is_usable());
    let mut a = Affine::lps([1.0, 1.0, 1.0]);
    a.0[2][2] = 0.0;
    assert!(!a.is_usable());
    a.0[2][2] = f64::NAN;
    assert!(!a.is_usable());
}
