//! Dice, HD95 and the paired tests against reference values from medpy 0.5 and scipy 1.16.
//! Every number below was printed by `python3 site-agent/tests/reference/reference_values.py`.

use proptest::prelude::*;
use shared::metrics::stats::{WilcoxonMethod, summary, ttest_rel, wilcoxon};
use shared::metrics::{dice, edt_squared, hd95, surface};
use site_agent::data::read_labels;

const DIMS: [usize; 3] = [20, 24, 16];
const SPACING: [f32; 3] = [0.9, 1.1, 2.5];

fn mask(f: impl Fn(f64, f64, f64) -> bool) -> Vec<bool> {
    let mut m = Vec::new();
    for z in 0..DIMS[2] {
        for y in 0..DIMS[1] {
            for x in 0..DIMS[0] {
                m.push(f(x as f64, y as f64, z as f64));
            }
        }
    }
    m
}

fn ellipsoid(c: [f64; 3], r: [f64; 3]) -> Vec<bool> {
    mask(|x, y, z| {
        ((x - c[0]) / r[0]).powi(2) + ((y - c[1]) / r[1]).powi(2) + ((z - c[2]) / r[2]).powi(2)
            < 1.0
    })
}

fn boxed(lo: [usize; 3], hi: [usize; 3]) -> Vec<bool> {
    mask(|x, y, z| {
        let p = [x as usize, y as usize, z as usize];
        (0..3).all(|d| p[d] >= lo[d] && p[d] < hi[d])
    })
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn dice_and_hd95_match_medpy() {
    let cases = [
        (
            ellipsoid([9.5, 11.0, 7.0], [6.0, 7.0, 4.0]),
            boxed([5, 6, 3], [15, 17, 11]),
            0.7984886649874056,
            2.7313000567495327,
        ),
        (
            ellipsoid([2.0, 11.0, 7.0], [5.0, 6.0, 3.0]),
            boxed([0, 4, 4], [6, 18, 12]),
            0.5837615621788284,
            5.119570294468081,
        ),
        (
            boxed([1, 1, 1], [4, 5, 3]),
            ellipsoid([15.0, 18.0, 12.0], [3.0, 4.0, 2.5]),
            0.0,
            35.4012761805667,
        ),
    ];
    for (i, (pred, truth, want_dice, want_hd)) in cases.iter().enumerate() {
        let d = dice(pred, truth);
        let h = hd95(pred, truth, DIMS, SPACING).expect("both masks non-empty");
        assert!(close(d, *want_dice, 1e-12), "case {i}: dice {d} vs medpy {want_dice}");
        // Spacing is f32 (as NIfTI stores it) where medpy used the decimal, hence 1e-7.
        assert!(close(h, *want_hd, 1e-7), "case {i}: hd95 {h} vs medpy {want_hd}");
    }
}

#[test]
fn hd95_on_a_real_mask_matches_medpy() {
    let Some(path) = crate::testdata("nifti/standard.nii.gz") else { return };
    let v = read_labels(&path).expect("standard.nii.gz reads");
    let truth: Vec<bool> = v.data.iter().map(|&l| l > 0).collect();
    // Shift one voxel along the stored x, filling with background (numpy: shifted[1:] =
    // std[:-1]). The file is stored RAS and read as LPS, so stored +x is canonical -x.
    let [nx, _, _] = v.dims;
    let pred: Vec<bool> =
        (0..truth.len()).map(|i| if i % nx == nx - 1 { false } else { truth[i + 1] }).collect();
    assert!(close(dice(&pred, &truth), 0.20408163265306123, 1e-12));
    let h = hd95(&pred, &truth, v.dims, v.spacing()).expect("non-empty");
    assert!(close(h, 3.028737445999502, 1e-9), "hd95 {h}");
}

#[test]
fn empty_masks_follow_the_documented_rule() {
    let empty = vec![false; 8];
    let mut one = vec![false; 8];
    one[3] = true;
    assert_eq!(dice(&empty, &empty), 1.0);
    assert_eq!(hd95(&empty, &empty, [2, 2, 2], [1.0; 3]), Some(0.0));
    assert_eq!(dice(&one, &empty), 0.0);
    assert_eq!(hd95(&one, &empty, [2, 2, 2], [1.0; 3]), None);
    assert_eq!(hd95(&empty, &one, [2, 2, 2], [1.0; 3]), None);
}

/// The LCG of reference_values.py.
fn sample(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * scale
        })
        .collect()
}

fn shifted(v: Vec<f64>, by: f64) -> Vec<f64> {
    v.into_iter().map(|x| x + by).collect()
}

#[test]
fn wilcoxon_and_ttest_match_scipy() {
    let ties_x = vec![0.81, 0.75, 0.90, 0.66, 0.70, 0.88, 0.79, 0.91, 0.72, 0.85, 0.60, 0.77];
    let ties_y = vec![0.80, 0.70, 0.85, 0.66, 0.65, 0.83, 0.80, 0.86, 0.72, 0.80, 0.62, 0.70];
    let cases = [
        (
            "exact_n10",
            shifted(sample(10, 1, 0.2), 0.05),
            sample(10, 2, 0.2),
            WilcoxonMethod::Exact,
            16.0,
            0.275390625,
            1.2786485883993008,
            0.2330067355676271,
        ),
        (
            "exact_n20",
            shifted(sample(20, 3, 0.1), 0.03),
            sample(20, 4, 0.1),
            WilcoxonMethod::Exact,
            29.0,
            0.0031528472900390625,
            3.739174559939364,
            0.001389878284499295,
        ),
        (
            "ties_and_zeros",
            ties_x,
            ties_y,
            WilcoxonMethod::Asymptotic,
            4.5,
            0.018134455881494902,
            3.3031698675800896,
            0.007038292840216806,
        ),
        (
            "large_n60",
            shifted(sample(60, 5, 0.3), 0.02),
            sample(60, 6, 0.3),
            WilcoxonMethod::Asymptotic,
            713.0,
            0.13700324147532053,
            -1.5324078955167904,
            0.13076678514032256,
        ),
    ];
    for (name, x, y, method, stat, p, t, tp) in cases {
        let w = wilcoxon(&x, &y).expect(name);
        assert_eq!(w.method, method, "{name}");
        assert!(close(w.statistic, stat, 1e-12), "{name}: W {} vs {stat}", w.statistic);
        assert!(close(w.p_value, p, 1e-9), "{name}: p {} vs scipy {p}", w.p_value);
        let tt = ttest_rel(&x, &y).expect(name);
        assert!(close(tt.t, t, 1e-9), "{name}: t {} vs {t}", tt.t);
        assert!(close(tt.p_value, tp, 1e-7), "{name}: t-test p {} vs scipy {tp}", tt.p_value);
    }
}

#[test]
fn summary_uses_sample_sd_and_median() {
    let s = summary(&[1.0, 2.0, 4.0, 7.0]).expect("non-empty");
    assert_eq!(s.n, 4);
    assert!(close(s.mean, 3.5, 1e-15));
    assert!(close(s.sd.expect("n > 1"), 2.6457513110645907, 1e-12)); // numpy std(ddof=1)
    assert!(close(s.median, 3.0, 1e-15));
    assert!(wilcoxon(&[1.0, 2.0], &[1.0, 2.0]).is_err(), "all-zero differences are refused");
}

fn brute_force_edt(f: &[bool], dims: [usize; 3], sp: [f32; 3]) -> Vec<f64> {
    let coord = |i: usize| [i % dims[0], (i / dims[0]) % dims[1], i / (dims[0] * dims[1])];
    (0..f.len())
        .map(|i| {
            let a = coord(i);
            f.iter()
                .enumerate()
                .filter(|(_, on)| **on)
                .map(|(j, _)| {
                    let b = coord(j);
                    (0..3)
                        .map(|d| ((a[d] as f64 - b[d] as f64) * sp[d] as f64).powi(2))
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

proptest! {
    #[test]
    fn edt_equals_brute_force(
        dims in (1usize..7, 1usize..7, 1usize..6),
        bits in proptest::collection::vec(any::<bool>(), 252),
        sp in (0.3f32..3.0, 0.3f32..3.0, 0.3f32..4.0),
    ) {
        let dims = [dims.0, dims.1, dims.2];
        let n = dims.iter().product::<usize>();
        let f: Vec<bool> = bits[..n].iter().zip(0..).map(|(b, i)| *b && i % 3 == 0).collect();
        let sp = [sp.0, sp.1, sp.2];
        let got = edt_squared(&f, dims, sp);
        let want = brute_force_edt(&f, dims, sp);
        for (g, w) in got.iter().zip(&want) {
            prop_assert!(g == w || (g - w).abs() <= 1e-9 * w.max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn surface_is_mask_minus_face_erosion(bits in proptest::collection::vec(any::<bool>(), 64)) {
        let dims = [4, 4, 4];
        let s = surface(&bits, dims);
        for i in 0..64 {
            let (x, y, z) = (i % 4, (i / 4) % 4, i / 16);
            let inside = |x: isize, y: isize, z: isize| {
                (0..4).contains(&x) && (0..4).contains(&y) && (0..4).contains(&z)
                    && bits[(x + 4 * (y + 4 * z)) as usize]
            };
            let (x, y, z) = (x as isize, y as isize, z as isize);
            let eroded = inside(x, y, z) && inside(x - 1, y, z) && inside(x + 1, y, z)
                && inside(x, y - 1, z) && inside(x, y + 1, z) && inside(x, y, z - 1) && inside(x, y, z + 1);
            prop_assert_eq!(s[i], bits[i] && !eroded);
        }
    }
}
