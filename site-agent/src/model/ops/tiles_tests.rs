//! The tiled passes against the same passes over the whole image in one tile.

use super::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    a.len() == b.len() && d.sqrt() <= 1e-6 * n.sqrt().max(1e-12)
}

/// Shapes with odd sizes, strides, paddings wider than the kernel's half and taps that read
/// only padding: every tile edge case of `im2col`'s row range.
fn geometries() -> Vec<(Geometry, usize)> {
    let mut v = Vec::new();
    for (channels, h, w, k, stride, pad, co) in [
        (3, 11, 7, 3, 1, 1, 4),
        (2, 9, 10, 3, 2, 1, 3),
        (4, 8, 8, 5, 1, 2, 2),
        (1, 5, 6, 3, 1, 3, 2),
        (2, 7, 5, 1, 2, 0, 3),
        (3, 6, 6, 3, 3, 0, 5),
    ] {
        v.push((Geometry { batch: 1, channels, h, w, k, stride, pad }, co));
    }
    v
}

#[test]
fn tiles_of_any_height_give_the_whole_image_result() {
    for (seed, (g, co)) in geometries().into_iter().enumerate() {
        let img = random(g.image_len(), seed as u64);
        let wt = random(co * g.patch(), seed as u64 ^ 7);
        let w = Mat::row_major(&wt, co, g.patch());
        let l = g.cols_len();
        let mut whole = vec![0f32; co * l];
        conv_image_then(&g, w, &img, &mut whole, g.out_h(), Parallelism::None, |_, _| {});
        let dy = random(co * l, seed as u64 ^ 9);
        let mut dw_whole = vec![0f32; co * g.patch()];
        filter_grad_image(&g, &dy, co, &img, &mut dw_whole, g.out_h(), Parallelism::None);
        for rows in 1..g.out_h() {
            let mut y = vec![f32::NAN; co * l];
            conv_image_then(&g, w, &img, &mut y, rows, Parallelism::None, |_, _| {});
            assert!(close(&y, &whole), "forward, {g:?}, tiles of {rows} rows");
            let mut dw = vec![0f32; co * g.patch()];
            filter_grad_image(&g, &dy, co, &img, &mut dw, rows, Parallelism::None);
            assert!(close(&dw, &dw_whole), "filter gradient, {g:?}, tiles of {rows} rows");
        }
    }
}

#[test]
fn tile_heights_follow_the_budget_and_stay_in_range() {
    let g =
        |channels, size| Geometry { batch: 4, channels, h: size, w: size, k: 3, stride: 1, pad: 1 };
    // 32 channels at 256x256: 288 x 256 floats (295 KB) per output row; 384 KB holds one,
    // but a tile has at least 256 pixels: one row.
    assert_eq!(g(32, 256).tile_rows(TILE_BYTES), 1);
    // 256 channels at 32x32: 295 KB per row, 256 pixels need 8 rows.
    assert_eq!(g(256, 32).tile_rows(TILE_BYTES), 8);
    // `tiny`'s first layer (8 channels at 32x32, 295 KB of columns) fits whole; `small`'s
    // (16 at 48x48, 663 KB) in tiles of 14 rows.
    assert_eq!(g(8, 32).tile_rows(TILE_BYTES), 32);
    assert_eq!(g(16, 48).tile_rows(TILE_BYTES), 14);
    for (gm, _) in geometries() {
        for budget in [0, 1, 100, TILE_BYTES, usize::MAX / 2] {
            let r = gm.tile_rows(budget);
            assert!((1..=gm.out_h()).contains(&r), "{gm:?} budget {budget}: {r}");
        }
    }
}
