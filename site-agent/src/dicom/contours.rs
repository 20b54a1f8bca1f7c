//! Plane geometry shared by import and export: filling polygons at pixel centres with the
//! even-odd rule, and tracing a mask's boundary into polygons that fill back to the same mask.
//!
//! Coordinates are pixel indices: pixel `(x, y)` has its centre at `(x, y)` and covers
//! `[x - 0.5, x + 0.5] x [y - 0.5, y + 0.5]`. Written here rather than taken from a crate:
//! image libraries trace contours through pixel centres (OpenCV's `findContours`, imageproc),
//! which shrinks a mask by half a pixel when it is filled again; tracing pixel edges instead
//! makes export followed by import give back exactly the mask that was exported.

/// Fills `polygons` (closed; the last point joins the first) on a `w x h` plane with the
/// even-odd rule: a pixel is inside when a ray from its centre crosses the polygons' edges an
/// odd number of times, so a contour inside another is a hole and overlapping contours cancel.
/// A centre exactly on an edge counts as inside on its left and bottom edges only.
pub fn fill_even_odd(polygons: &[Vec<[f64; 2]>], w: usize, h: usize) -> Vec<bool> {
    let mut mask = vec![false; w * h];
    let mut xs = Vec::new();
    for y in 0..h {
        let yc = y as f64;
        xs.clear();
        for poly in polygons {
            let n = poly.len();
            for i in 0..n {
                let (a, b) = (poly[i], poly[(i + 1) % n]);
                // Half-open in y, so a vertex on the scan line is counted once.
                if (a[1] <= yc) != (b[1] <= yc) {
                    xs.push(a[0] + (yc - a[1]) * (b[0] - a[0]) / (b[1] - a[1]));
                }
            }
        }
        xs.sort_by(f64::total_cmp);
        let row = &mut mask[y * w..(y + 1) * w];
        for pair in xs.chunks_exact(2) {
            // Pixels whose centre x is in [x0, x1).
            let start = pair[0].ceil().max(0.0);
            let end = pair[1].ceil().min(w as f64);
            if start < end {
                row[start as usize..end as usize].fill(true);
            }
        }
    }
    mask
}

/// The boundary of a `w x h` mask as closed polygons along pixel edges, outer boundaries
/// counter-clockwise and holes clockwise (in x-right, y-down pixel coordinates: the mask is on
/// each edge's left), with straight runs merged into one edge. [`fill_even_odd`] of the result
/// is the mask.
pub fn trace_boundaries(mask: &[bool], w: usize, h: usize) -> Vec<Vec<[f64; 2]>> {
    let inside = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize]
    };
    // Corner (cx, cy) is at pixel coordinates (cx - 0.5, cy - 0.5); corners form a (w+1) x (h+1)
    // grid. Each boundary edge goes from one corner to the next with the mask on its left.
    let cw = w + 1;
    let corner = |cx: usize, cy: usize| cy * cw + cx;
    let mut out_edges: Vec<[u32; 2]> = vec![[u32::MAX; 2]; cw * (h + 1)];
    let mut edges: Vec<(usize, usize)> = Vec::new();
    let mut add = |from: usize, to: usize, out: &mut Vec<[u32; 2]>| {
        let slot = &mut out[from];
        let id = edges.len() as u32;
        if slot[0] == u32::MAX {
            slot[0] = id
        } else {
            slot[1] = id
        }
        edges.push((from, to));
    };
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            // y grows downward, so "mask on the left" runs: top edge right-to-left, left edge
            // top-to-bottom, bottom edge left-to-right, right edge bottom-to-top.
            if !inside(xi, yi - 1) {
                add(corner(x + 1, y), corner(x, y), &mut out_edges);
            }
            if !inside(xi - 1, yi) {
                add(corner(x, y), corner(x, y + 1), &mut out_edges);
            }
            if !inside(xi, yi + 1) {
                add(corner(x, y + 1), corner(x + 1, y + 1), &mut out_edges);
            }
            if !inside(xi + 1, yi) {
                add(corner(x + 1, y + 1), corner(x + 1, y), &mut out_edges);
            }
        }
    }
    let mut used = vec![false; edges.len()];
    let mut loops = Vec::new();
    for start in 0..edges.len() {
        if used[start] {
            continue;
        }
        let mut ring: Vec<usize> = Vec::new();
        let mut e = start;
        loop {
            used[e] = true;
            let (from, to) = edges[e];
            ring.push(from);
            // At a corner two regions touch diagonally; either unused edge closes a loop.
            let next = out_edges[to].into_iter().find(|&n| n != u32::MAX && !used[n as usize]);
            match next {
                Some(n) => e = n as usize,
                None => break,
            }
        }
        loops.push(simplify(&ring, cw));
    }
    loops
}

/// Corner ids to pixel coordinates, dropping corners where the boundary runs straight on.
fn simplify(ring: &[usize], cw: usize) -> Vec<[f64; 2]> {
    let pt = |id: usize| [(id % cw) as f64 - 0.5, (id / cw) as f64 - 0.5];
    let n = ring.len();
    (0..n)
        .filter(|&i| {
            let (a, b, c) = (pt(ring[(i + n - 1) % n]), pt(ring[i]), pt(ring[(i + 1) % n]));
            (b[0] - a[0]) * (c[1] - b[1]) - (b[1] - a[1]) * (c[0] - b[0]) != 0.0
        })
        .map(|i| pt(ring[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_of(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let w = rows[0].len();
        (rows.iter().flat_map(|r| r.chars().map(|c| c == '#')).collect(), w, rows.len())
    }

    #[test]
    fn a_square_fills_the_pixels_whose_centres_it_holds() {
        // Corners at pixel coordinates 0.5..3.5: centres 1, 2 and 3.
        let sq = vec![[0.5, 0.5], [3.5, 0.5], [3.5, 3.5], [0.5, 3.5]];
        let m = fill_even_odd(&[sq], 5, 5);
        let want: Vec<bool> =
            (0..25).map(|i| (1..=3).contains(&(i % 5)) && (1..=3).contains(&(i / 5))).collect();
        assert_eq!(m, want);
    }

    #[test]
    fn a_contour_inside_another_is_a_hole() {
        let outer = vec![[-0.5, -0.5], [4.5, -0.5], [4.5, 4.5], [-0.5, 4.5]];
        let inner = vec![[1.5, 1.5], [2.5, 1.5], [2.5, 2.5], [1.5, 2.5]];
        let m = fill_even_odd(&[outer, inner], 5, 5);
        assert_eq!(m.iter().filter(|&&b| b).count(), 24);
        assert!(!m[2 * 5 + 2]);
    }

    #[test]
    fn traced_boundaries_fill_back_to_the_mask() {
        let cases = [
            vec!["#"],
            vec!["....", ".##.", ".##.", "...."],
            // A ring (a hole), two islands, and a diagonal touch.
            vec!["#####.", "#...#.", "#.#.#.", "#...#.", "#####.", "......"],
            vec!["#.", ".#"],
            vec!["##..##", "#.##.#", ".####.", "##..##"],
        ];
        for rows in cases {
            let (mask, w, h) = mask_of(&rows);
            let polys = trace_boundaries(&mask, w, h);
            assert_eq!(fill_even_odd(&polys, w, h), mask, "{rows:?} -> {polys:?}");
        }
        // A square's boundary is one loop of its 4 corners.
        let (mask, w, h) = mask_of(&["....", ".##.", ".##.", "...."]);
        assert_eq!(
            trace_boundaries(&mask, w, h),
            vec![vec![[0.5, 0.5], [0.5, 2.5], [2.5, 2.5], [2.5, 0.5]]]
        );
    }

    #[test]
    fn random_masks_round_trip() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let (w, h) = (rng.random_range(1..12), rng.random_range(1..12));
            let p = rng.random_range(0.1..0.9);
            let mask: Vec<bool> = (0..w * h).map(|_| rng.random_bool(p)).collect();
            let polys = trace_boundaries(&mask, w, h);
            assert_eq!(fill_even_odd(&polys, w, h), mask);
        }
    }
}
