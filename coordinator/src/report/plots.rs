//! SVG plots for the HTML report, drawn with plotters (SVG backend, no system fonts: the
//! browser renders the text).

use plotters::prelude::*;

use super::{MODEL_S, MODEL_ST, MODEL_T, SweepPoint};

/// A named polyline with its colour and stroke width.
type Line = (String, Vec<(f64, f64)>, RGBColor, u32);

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

fn svg_or_note(draw: impl FnOnce(&mut String) -> DrawResult<()>, what: &str) -> String {
    let mut svg = String::new();
    match draw(&mut svg) {
        Ok(()) => svg,
        Err(e) => format!("<p>(the {what} plot could not be drawn: {e})</p>"),
    }
}

/// The arms' colours: Okabe and Ito's palette, told apart with every common colour-vision
/// deficiency and visible on white (vermillion, blue, bluish green).
pub(crate) const ARM_COLOURS: [(&str, RGBColor); 3] = [
    (MODEL_S, RGBColor(213, 94, 0)),
    (MODEL_T, RGBColor(0, 114, 178)),
    (MODEL_ST, RGBColor(0, 158, 115)),
];

pub(crate) fn arm_colour(arm: &str) -> RGBColor {
    ARM_COLOURS.iter().find(|(a, _)| *a == arm).map_or(RGBColor(0, 0, 0), |(_, c)| *c)
}

/// Tukey's box: quartiles (linear interpolation, as numpy's default) and whiskers at the most
/// extreme values within 1.5 IQR of the box, so a whisker never reaches past the data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BoxStats {
    pub(crate) q1: f64,
    pub(crate) median: f64,
    pub(crate) q3: f64,
    pub(crate) low: f64,
    pub(crate) high: f64,
}

impl BoxStats {
    pub(crate) fn new(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let h = p * (v.len() - 1) as f64;
            let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
            v[lo] + (h - lo as f64) * (v[hi] - v[lo])
        };
        let (q1, median, q3) = (q(0.25), q(0.5), q(0.75));
        let fence = 1.5 * (q3 - q1);
        let low = v.iter().copied().find(|&x| x >= q1 - fence).unwrap_or(q1);
        let high = v.iter().rev().copied().find(|&x| x <= q3 + fence).unwrap_or(q3);
        Some(Self { q1, median, q3, low, high })
    }
}

/// One organ's box plot: per arm a box (quartiles, median line), whiskers to the most extreme
/// case within 1.5 IQR of the box, and every case as a dot (spread sideways by rank so equal
/// values stay visible); Dice from 0 to 1.
pub(crate) fn boxplot(organ: &str, series: &[(&str, Vec<f64>)]) -> String {
    svg_or_note(
        |svg| {
            let root = SVGBackend::with_string(svg, (300, 260)).into_drawing_area();
            root.fill(&WHITE)?;
            let n = series.len().max(1) as f64;
            let mut chart = ChartBuilder::on(&root)
                .caption(organ, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(40)
                .build_cartesian_2d(-0.5..n - 0.5, 0f64..1f64)?;
            let names: Vec<&str> = series.iter().map(|(a, _)| *a).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(TRANSPARENT)
                .x_labels(series.len())
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        names.get(i as usize).map_or(String::new(), |s| (*s).to_owned())
                    } else {
                        String::new()
                    }
                })
                .y_desc("Dice")
                .draw()?;
            for (i, (arm, values)) in series.iter().enumerate() {
                let Some(b) = BoxStats::new(values) else { continue };
                let (x, w) = (i as f64, 0.18);
                let c = arm_colour(arm);
                let line = ShapeStyle::from(&c).stroke_width(2);
                chart.draw_series([
                    Rectangle::new([(x - w, b.q1), (x + w, b.q3)], line),
                    Rectangle::new([(x - w, b.median), (x + w, b.median)], line),
                ])?;
                for (from, to) in [(b.q1, b.low), (b.q3, b.high)] {
                    chart.draw_series([
                        PathElement::new(vec![(x, from), (x, to)], line),
                        PathElement::new(vec![(x - w / 2.0, to), (x + w / 2.0, to)], line),
                    ])?;
                }
                let mut sorted = values.clone();
                sorted.sort_by(f64::total_cmp);
                let k = sorted.len().max(2) as f64 - 1.0;
                chart.draw_series(sorted.iter().enumerate().map(|(j, &v)| {
                    let dx = (j as f64 / k - 0.5) * 1.4 * w;
                    Circle::new((x + dx, v), 2, c.mix(0.6).filled())
                }))?;
            }
            root.present()?;
            Ok(())
        },
        organ,
    )
}

/// Mean Dice against the swept setting (layers retrained, or training cases): one thin line
/// per organ and a thick one for the mean over organs; for the cases sweep, one pair of lines
/// (Model_T, Model_ST) of the mean over organs, with Model_S as a dashed level.
pub(crate) fn sweep(title: &str, points: &[SweepPoint], by_cases: bool) -> String {
    svg_or_note(
        |svg| {
            let x_of = |p: &SweepPoint| {
                f64::from(if by_cases { p.train_cases } else { p.trainable_layers })
            };
            let x_max = points.iter().map(x_of).fold(1.0, f64::max);
            let root = SVGBackend::with_string(svg, (640, 360)).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(44)
                .build_cartesian_2d(0f64..x_max * 1.05, 0f64..1f64)?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .x_desc(if by_cases { "training cases per site" } else { "layers retrained" })
                .y_desc("Dice (pooled mean)")
                .draw()?;
            let mut lines: Vec<Line> = Vec::new();
            if by_cases {
                for (arm, colour) in
                    [(MODEL_T, arm_colour(MODEL_T)), (MODEL_ST, arm_colour(MODEL_ST))]
                {
                    let mut pts: Vec<(f64, f64)> = points
                        .iter()
                        .filter(|p| p.arm == arm && p.organ == "mean")
                        .map(|p| (x_of(p), p.dice.mean))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    lines.push((arm.to_owned(), pts, colour, 3));
                }
                if let Some(s) = points.iter().find(|p| p.arm == MODEL_S && p.organ == "mean") {
                    lines.push((
                        MODEL_S.into(),
                        vec![(0.0, s.dice.mean), (x_max, s.dice.mean)],
                        arm_colour(MODEL_S),
                        1,
                    ));
                }
            } else {
                let mut organs: Vec<&str> = points.iter().map(|p| p.organ.as_str()).collect();
                organs.dedup();
                organs.sort();
                organs.dedup();
                for (i, organ) in organs.iter().enumerate() {
                    let mut pts: Vec<(f64, f64)> = points
                        .iter()
                        .filter(|p| p.organ == *organ)
                        .map(|p| (x_of(p), p.dice.mean))
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let (colour, width) = if *organ == "mean" {
                        (BLACK, 3)
                    } else {
                        {
                            let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
                            (RGBColor(r, g, b), 1)
                        }
                    };
                    lines.push(((*organ).to_owned(), pts, colour, width));
                }
            }
            for (name, pts, colour, width) in lines {
                let style = ShapeStyle::from(&colour).stroke_width(width);
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
            root.present()?;
            Ok(())
        },
        "sweep",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Quartiles as numpy.percentile (linear); whiskers end at cases, never at the fences
    /// (here the upper fence is 0.96, past every case, and 0.05 is an outlier).
    #[test]
    fn whiskers_end_at_the_most_extreme_case_within_the_fences() {
        let b = BoxStats::new(&[0.46, 0.61, 0.64, 0.70, 0.72, 0.75, 0.82, 0.05]).expect("stats");
        assert!(close(b.q1, 0.5725) && close(b.median, 0.67) && close(b.q3, 0.7275), "{b:?}");
        assert_eq!((b.low, b.high), (0.46, 0.82));
        let one = BoxStats::new(&[0.3]).expect("one case");
        assert_eq!((one.q1, one.median, one.q3, one.low, one.high), (0.3, 0.3, 0.3, 0.3, 0.3));
        assert!(BoxStats::new(&[]).is_none() && BoxStats::new(&[f64::NAN]).is_none());
    }

    #[test]
    fn the_plot_shows_every_case_in_colours_that_differ() {
        let series = [(MODEL_S, vec![0.4, 0.5, 0.6]), (MODEL_T, vec![0.7; 4]), (MODEL_ST, vec![])];
        let svg = boxplot("brainstem", &series);
        assert_eq!(svg.matches("<circle").count(), 7, "one dot per case");
        let colours: Vec<RGBColor> = ARM_COLOURS.iter().map(|(_, c)| *c).collect();
        assert!(colours.iter().all(|c| *c != RED && *c != GREEN && *c != BLUE));
        assert!(colours[0] != colours[1] && colours[1] != colours[2] && colours[0] != colours[2]);
    }

    #[test]
    fn small_p_values_are_not_printed_as_zero() {
        use crate::report::render::fmt_p;
        assert_eq!(fmt_p(0.0123456), "0.0123");
        assert_eq!(fmt_p(0.0001), "0.0001");
        assert_eq!(fmt_p(3.24e-6), "3.2e-6");
        assert_eq!(fmt_p(f64::NAN), "-");
    }
}
