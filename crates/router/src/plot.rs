//! SVG plots: the routing profile (one panel per layer) and quality-against-cost curves.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Result, RouterError};
use crate::policy::RoutingPolicy;
use crate::profile::RoutingProfile;

/// Panels per row of [`profile_svg`].
const COLUMNS: usize = 6;

fn failed(path: &Path) -> impl Fn(String) -> RouterError + '_ {
    move |reason| RouterError::Plot {
        path: path.into(),
        reason,
    }
}

/// Draws with `draw` on an SVG canvas of `size` and writes it to `path` atomically (temporary
/// file + rename): a drawing that fails leaves any earlier file as it was, never a partial one.
fn write_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw(&root)?;
        root.present().map_err(|e| failed(path)(e.to_string()))?;
    }
    moekit_llama::io::atomic::write(path, svg.as_bytes()).map_err(Into::into)
}

/// Draws one panel per MoE layer: bars of the mean probability of the 1st … E-th most
/// probable expert, and a line of their cumulative mass. The caption gives the layer, its
/// normalised entropy `H / ln E` and mean experts per token, and its rule under `policy` if
/// given. Sharp layers show one tall bar; layers that need several experts show flat bars.
pub fn profile_svg(
    profile: &RoutingProfile,
    policy: Option<&RoutingPolicy>,
    path: &Path,
) -> Result<()> {
    let fail = failed(path);
    let n = profile.layers.len();
    if n == 0 {
        return Err(fail("the profile has no layers".into()));
    }
    let rows = n.div_ceil(COLUMNS);
    let size = ((COLUMNS * 230) as u32, (rows * 170 + 40) as u32);
    write_svg(path, size, |root| {
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let (title, body) = root.split_vertically(40);
        title
            .titled(
                &format!(
                    "Routing profile: mean sorted expert probability per layer ({} tokens)",
                    profile.tokens
                ),
                ("sans-serif", 18),
            )
            .map_err(|e| fail(e.to_string()))?;
        for (panel, layer) in body
            .split_evenly((rows, COLUMNS))
            .iter()
            .zip(&profile.layers)
        {
            let e = layer.num_experts;
            let rule = policy
                .and_then(|p| p.layers.iter().find(|lp| lp.layer == layer.layer))
                .map(|lp| format!(" {}", lp.rule))
                .unwrap_or_default();
            let caption = format!(
                "L{} H={:.2} k={:.2}{rule}",
                layer.layer,
                layer.entropy / (e.max(2) as f64).ln(),
                layer.experts_per_token
            );
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 12))
                .margin(6)
                .x_label_area_size(18)
                .y_label_area_size(28)
                .build_cartesian_2d(0.5f64..(e as f64 + 0.5), 0f64..1f64)
                .map_err(|e| fail(e.to_string()))?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_labels(e.min(8))
                .y_labels(3)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 9))
                .draw()
                .map_err(|e| fail(e.to_string()))?;
            chart
                .draw_series(layer.sorted_mass.iter().enumerate().map(|(r, m)| {
                    let x = r as f64 + 1.0;
                    Rectangle::new([(x - 0.35, 0.0), (x + 0.35, *m)], BLUE.mix(0.6).filled())
                }))
                .map_err(|e| fail(e.to_string()))?;
            let cumulative = layer.sorted_mass.iter().scan(0.0, |acc, m| {
                *acc += m;
                Some(*acc)
            });
            chart
                .draw_series(LineSeries::new(
                    cumulative.enumerate().map(|(r, c)| (r as f64 + 1.0, c)),
                    RED.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    })
}

/// A named curve of `(x, y)` points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// Points, drawn in the order given.
    pub points: Vec<(f64, f64)>,
    /// Draw a staircase: each point's `y` holds until the next point's `x` (e.g. the best
    /// uniform top-k within a budget, which must round `k` down between its points).
    pub steps: bool,
}

impl Series {
    /// The polyline drawn for the series.
    fn path(&self) -> Vec<(f64, f64)> {
        if !self.steps {
            return self.points.clone();
        }
        let mut path = Vec::with_capacity(2 * self.points.len());
        for (i, &(x, y)) in self.points.iter().enumerate() {
            if i > 0 {
                path.push((x, self.points[i - 1].1));
            }
            path.push((x, y));
        }
        path
    }
}

/// Draws curves of a quality measure (log scale, e.g. perplexity) against a cost (e.g. the
/// activated-parameter fraction), each with its points marked and a legend.
pub fn tradeoff_svg(
    series: &[Series],
    title: &str,
    x_label: &str,
    y_label: &str,
    path: &Path,
) -> Result<()> {
    let fail = failed(path);
    let all = || series.iter().flat_map(|s| s.points.iter());
    if all().next().is_none() {
        return Err(fail("nothing to plot".into()));
    }
    if all().any(|(x, y)| !(x.is_finite() && *y > 0.0 && y.is_finite())) {
        return Err(fail(
            "points must be finite, with positive y (log scale)".into(),
        ));
    }
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (y0, y1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    let pad = ((x1 - x0) * 0.05).max(1e-3);
    write_svg(path, (760, 480), |root| {
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0 - pad..x1 + pad, (y0 / 1.1..y1 * 1.1).log_scale())
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(s.path(), color.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| fail(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staircase_holds_each_value_until_the_next_point() {
        let mut s = Series {
            name: "s".into(),
            points: vec![(1.0, 5.0), (2.0, 3.0), (4.0, 1.0)],
            steps: true,
        };
        assert_eq!(
            s.path(),
            [(1.0, 5.0), (2.0, 5.0), (2.0, 3.0), (4.0, 3.0), (4.0, 1.0)]
        );
        s.steps = false;
        assert_eq!(s.path(), s.points);
    }
}
