//! SVG plots for the HTML report, drawn with plotters (SVG backend, no system fonts: the
//! browser renders the text).

use plotters::prelude::*;

use crate::report::{MODEL_S, MODEL_ST, MODEL_T, SweepPoint};

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

/// One organ's box plot: a box per arm (quartiles, whiskers at 1.5 IQR), Dice from 0 to 1.
pub(crate) fn boxplot(organ: &str, series: &[(&str, Vec<f64>)]) -> String {
    svg_or_note(
        |svg| {
            let root = SVGBackend::with_string(svg, (300, 260)).into_drawing_area();
            root.fill(&WHITE)?;
            let labels: Vec<&str> = series.iter().map(|(a, _)| *a).collect();
            let mut chart = ChartBuilder::on(&root)
                .caption(organ, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(40)
                .build_cartesian_2d(labels[..].into_segmented(), 0f32..1f32)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(TRANSPARENT)
                .x_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(s) | SegmentValue::Exact(s) => (**s).to_owned(),
                    SegmentValue::Last => String::new(),
                })
                .y_desc("Dice")
                .draw()?;
            let colour = |arm: &str| match arm {
                MODEL_S => RED,
                MODEL_T => BLUE,
                _ => GREEN,
            };
            chart.draw_series(series.iter().filter(|(_, v)| !v.is_empty()).map(|(arm, v)| {
                Boxplot::new_vertical(SegmentValue::CenterOf(arm), &Quartiles::new(v))
                    .width(30)
                    .style(colour(arm))
            }))?;
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
                for (arm, colour) in [(MODEL_T, BLUE), (MODEL_ST, GREEN)] {
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
                        RED,
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
