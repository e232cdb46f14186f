//! Drawing `kiln plot`: loss, learning rate and tokens/s panels over one x axis, for one run or
//! several overlaid. One run is drawn against steps, as the dashboard draws it; several against
//! tokens, the measure on which runs with different batches compare.

use super::labels;
use super::read::Series;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;

/// A run as the plot names it (its legend entry) and its curves.
pub struct Run {
    pub name: String,
    pub series: Series,
}

/// One colour per run, in order; red is kept for the guard's markers.
const PALETTE: [RGBColor; 8] = [
    RGBColor(230, 120, 0),
    RGBColor(40, 90, 200),
    RGBColor(0, 150, 60),
    RGBColor(150, 60, 190),
    RGBColor(140, 90, 40),
    RGBColor(210, 60, 150),
    RGBColor(0, 150, 160),
    RGBColor(110, 110, 110),
];
const GUARD: RGBColor = RGBColor(220, 20, 20);
const RAW: RGBColor = RGBColor(150, 150, 150);
const EVAL: RGBColor = RGBColor(0, 150, 60);
const LINE: RGBColor = RGBColor(40, 90, 200);
/// Faint grid lines between labelled ones: one, halfway. plotters' default of ten made a dense
/// grid that told little and tripled the PNG's size.
const LIGHT_LINES: usize = 1;

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Steps,
    Tokens,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Axis::Steps => "step",
            Axis::Tokens => "tokens",
        }
    }

    fn label(self, v: f64) -> String {
        match self {
            Axis::Steps => labels::step(v),
            Axis::Tokens => labels::tick(v),
        }
    }

    /// How many ticks: on a step axis few enough that each lands on an integer (plotters spaces
    /// ticks by 1, 2 or 5 times a power of ten, at least the span over the count).
    fn ticks(self, r: &Range<f64>) -> usize {
        match self {
            Axis::Steps => ((r.end - r.start).floor() as usize + 1).clamp(1, 10),
            Axis::Tokens => 10,
        }
    }
}

/// The x axis, and the other axis labelled along the top of the loss panel when every run maps
/// one onto the other by the same factor (`other = x · factor`).
struct Layout {
    x: Axis,
    top: Option<f64>,
}

fn layout(runs: &[Run]) -> Layout {
    let ks: Vec<Option<f64>> = runs.iter().map(|r| r.series.tokens_per_step()).collect();
    if runs.len() == 1 {
        return Layout { x: Axis::Steps, top: ks[0] };
    }
    if !runs.iter().all(|r| r.series.steps.iter().all(|p| p.tokens.is_finite())) {
        // Records without token counts (written by hand or by an old kiln): steps are all there is.
        return Layout { x: Axis::Steps, top: None };
    }
    let shared = ks[0].filter(|k| ks.iter().all(|o| o.is_some_and(|o| (o - k).abs() <= 1e-6 * k)));
    Layout { x: Axis::Tokens, top: shared.map(|k| 1.0 / k) }
}

/// The axis range of the finite values, padded 5%. Values near f64's limits are clamped first:
/// `1e308 - -1e308` is infinite, and plotters loops forever laying ticks on an infinite axis.
pub fn range(v: impl Iterator<Item = f64>) -> Range<f64> {
    const LIMIT: f64 = f64::MAX / 4.0;
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .map(|x| x.clamp(-LIMIT, LIMIT))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    // A flat series (a constant learning rate) gets 5% of its size either side: padded by a
    // hair, every tick of its axis would print the same number.
    let size = lo.abs().max(hi.abs());
    let pad = if hi - lo > size * 1e-3 { (hi - lo) * 0.05 } else { (size * 0.05).max(1e-9) };
    (lo - pad)..(hi + pad)
}

/// The x range: like `range`, but a single step still spans one step either side.
fn x_range(v: impl Iterator<Item = f64>, axis: Axis) -> Range<f64> {
    let r = range(v);
    let min = match axis {
        Axis::Steps => 1.0,
        Axis::Tokens => r.start.abs().max(r.end.abs()) * 0.05,
    };
    let pad = ((min - (r.end - r.start)) / 2.0).max(0.0);
    (r.start - pad)..(r.end + pad)
}

/// A centred moving average over about a thirtieth of the points (at least 3). It follows a
/// falling loss where an EMA lags it: a plot is drawn after the fact and may look ahead.
/// Non-finite values are left out of each window; a window with none left is NaN.
pub fn smoothed(y: &[f64]) -> Vec<f64> {
    let half = (y.len() / 60).max(1);
    let (mut sum, mut count) = (vec![0.0], vec![0usize]);
    for &v in y {
        let ok = v.is_finite();
        sum.push(sum.last().unwrap() + if ok { v } else { 0.0 });
        count.push(count.last().unwrap() + ok as usize);
    }
    (0..y.len())
        .map(|i| {
            // Narrowed at the ends so each window stays centred on its point.
            let h = half.min(i).min(y.len() - 1 - i);
            let (a, b) = (i - h, i + h + 1);
            (sum[b] - sum[a]) / (count[b] - count[a]) as f64
        })
        .collect()
}

/// A run's colour halfway to white: its raw points, under its smoothed line.
fn lighter(c: RGBColor) -> RGBColor {
    let mix = |v: u8| (v as u16 + 255).div_ceil(2) as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// Draws `runs` onto `root`. `title` heads the picture.
pub fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Run], title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let panels = root.split_evenly((3, 1));
    let single = runs.len() == 1;
    let lay = layout(runs);
    let x_of = |step: f64, tokens: f64| match lay.x {
        Axis::Steps => step,
        Axis::Tokens => tokens,
    };
    // The guard's refusals count too: a run the guard stopped has no step record for its last step.
    let xs = x_range(
        runs.iter().flat_map(|r| {
            let s = &r.series;
            s.steps.iter().map(|p| x_of(p.step, p.tokens)).chain(s.guards.iter().map(|g| x_of(g.step, g.tokens)))
        }),
        lay.x,
    );
    let x_label = |v: &f64| lay.x.label(*v);
    let colour = |i: usize| PALETTE[i % PALETTE.len()];

    // Loss: raw points (faint), the smoothed curve, held-out evals, and the guard's refusals.
    let ys = range(runs.iter().flat_map(|r| {
        let s = &r.series;
        s.steps.iter().map(|p| p.loss).chain(s.evals.iter().map(|e| e.loss))
    }));
    let mut c = ChartBuilder::on(&panels[0])
        .caption("loss", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .top_x_label_area_size(if lay.top.is_some() { 40 } else { 0 })
        .y_label_area_size(50)
        .build_cartesian_2d(xs.clone(), ys.clone())
        .map_err(err)?
        .set_secondary_coord(xs.start * lay.top.unwrap_or(1.0)..xs.end * lay.top.unwrap_or(1.0), ys.clone());
    c.configure_mesh()
        .x_desc(lay.x.name())
        .x_labels(lay.x.ticks(&xs))
        .x_label_formatter(&x_label)
        .max_light_lines(LIGHT_LINES)
        .draw()
        .map_err(err)?;
    if let Some(f) = lay.top {
        let other = if lay.x == Axis::Steps { Axis::Tokens } else { Axis::Steps };
        let top = (xs.start * f)..(xs.end * f);
        let top_label = |v: &f64| other.label(*v);
        c.configure_secondary_axes()
            .x_desc(other.name())
            .x_labels(other.ticks(&top))
            .x_label_formatter(&top_label)
            .y_labels(0)
            .draw()
            .map_err(err)?;
    }
    let mut guards = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let s = &r.series;
        let (raw, line) = if single { (RAW, colour(0)) } else { (lighter(colour(i)), colour(i)) };
        let pts: Vec<(f64, f64)> = s.steps.iter().map(|p| (x_of(p.step, p.tokens), p.loss)).collect();
        // Dots big enough to see on a short run, small enough not to blot out a long one.
        let dot = if pts.len() <= 300 { 2 } else { 1 };
        let raw_series = c.draw_series(pts.iter().map(|&p| Circle::new(p, dot, raw.filled()))).map_err(err)?;
        if single {
            raw_series.label("raw").legend(move |(x, y)| Circle::new((x + 10, y), 2, raw.filled()));
        }
        let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
        let smooth = pts.iter().zip(smoothed(&ys)).map(|(p, y)| (p.0, y)).filter(|p| p.1.is_finite());
        let name = if single { "smoothed".to_string() } else { r.name.clone() };
        c.draw_series(LineSeries::new(smooth, line.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], line.stroke_width(3)));
        let eval = if single { EVAL } else { line };
        let evals: Vec<(f64, f64)> = s.evals.iter().map(|e| (x_of(e.step, e.tokens), e.loss)).collect();
        c.draw_series(evals.iter().map(|&p| Circle::new(p, 4, eval.filled()))).map_err(err)?;
        if !single {
            c.draw_series(evals.iter().map(|&p| Circle::new(p, 4, BLACK.stroke_width(1)))).map_err(err)?;
        }
        guards.extend(s.guards.iter().map(|g| (x_of(g.step, g.tokens), g.loss)));
    }
    if runs.iter().any(|r| !r.series.evals.is_empty()) {
        // A legend entry only: the points are drawn per run above.
        let (fill, ring) = if single { (EVAL, EVAL) } else { (WHITE, BLACK) };
        c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>()).map_err(err)?.label("eval (held out)").legend(
            move |(x, y)| {
                EmptyElement::at((x + 10, y)) + Circle::new((0, 0), 4, fill.filled()) + Circle::new((0, 0), 4, ring)
            },
        );
    }
    if !guards.is_empty() {
        // The legend entry; the markers themselves come after the legend, below.
        c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(err)?
            .label("guard: update refused")
            .legend(|(x, y)| {
                EmptyElement::at((x + 10, y)) + Polygon::new(vec![(0, 5), (-5, -4), (5, -4)], GUARD.filled())
            });
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    if !guards.is_empty() {
        // A refused step: a faint line across the panel and a triangle pointing at its loss, or
        // hanging from the top edge when the loss was not finite or is off the chart. Drawn after
        // the legend, so that a marker in its corner stays in sight.
        c.draw_series(
            guards
                .iter()
                .filter(|g| g.0.is_finite())
                .map(|&(x, _)| PathElement::new(vec![(x, ys.start), (x, ys.end)], GUARD.mix(0.35).stroke_width(1))),
        )
        .map_err(err)?;
        c.draw_series(guards.iter().filter(|g| g.0.is_finite()).map(|&(x, loss)| {
            let (y, tip) = match loss {
                Some(l) if l < ys.end => (l.max(ys.start), vec![(0, 0), (-6, -11), (6, -11)]),
                _ => (ys.end, vec![(0, 11), (-6, 0), (6, 0)]),
            };
            EmptyElement::at((x, y)) + Polygon::new(tip, GUARD.filled())
        }))
        .map_err(err)?;
    }

    // Learning rate and throughput, per run.
    let tps_label = |v: &f64| labels::tick(*v);
    let lr_label = |v: &f64| labels::rate(*v);
    for (panel, name) in [(&panels[1], "learning rate"), (&panels[2], "tokens/s")] {
        let get = |p: &super::read::StepPoint| if name == "tokens/s" { p.tokens_per_s } else { p.lr };
        let yr = range(runs.iter().flat_map(|r| r.series.steps.iter().map(get)));
        let mut c = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(xs.clone(), yr)
            .map_err(err)?;
        let mut mesh = c.configure_mesh();
        mesh.x_desc(lay.x.name()).x_labels(lay.x.ticks(&xs)).x_label_formatter(&x_label).max_light_lines(LIGHT_LINES);
        if name == "tokens/s" {
            mesh.y_label_formatter(&tps_label);
        } else {
            mesh.y_label_formatter(&lr_label);
        }
        mesh.draw().map_err(err)?;
        for (i, r) in runs.iter().enumerate() {
            let s = &r.series;
            let line = if single { LINE } else { colour(i) };
            let pts = s.steps.iter().map(|p| (x_of(p.step, p.tokens), get(p))).filter(|p| p.1.is_finite());
            c.draw_series(LineSeries::new(pts, line.stroke_width(2))).map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_series_still_spans_distinct_ticks() {
        let r = range([1e-3, 1e-3].into_iter());
        assert!((r.start - 0.95e-3).abs() < 1e-12 && (r.end - 1.05e-3).abs() < 1e-12, "{r:?}");
        assert_eq!(range([0.0].into_iter()), -1e-9..1e-9);
        let r = range([2.0, 4.0].into_iter());
        assert!((r.start - 1.9).abs() < 1e-12 && (r.end - 4.1).abs() < 1e-12, "{r:?}");
        // Near f64's limits: finite, so plotters can lay ticks on it.
        let r = range([1e308, -1e308].into_iter());
        assert!(r.start.is_finite() && r.end.is_finite());
    }

    #[test]
    fn the_smoothed_loss_is_centred_and_skips_what_is_not_finite() {
        // A straight line is its own centred average: no lag behind a falling loss.
        let y: Vec<f64> = (0..200).map(|i| 10.0 - 0.01 * i as f64).collect();
        for (a, b) in smoothed(&y).iter().zip(&y) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        let s = smoothed(&[1.0, f64::NAN, 3.0, 5.0]);
        assert_eq!(s[0], 1.0);
        assert_eq!(s[1], 2.0);
        assert_eq!(s[2], 4.0);
        assert_eq!(s[3], 5.0);
        assert!(smoothed(&[f64::NAN])[0].is_nan());
    }
}
