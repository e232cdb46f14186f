//! `kiln plot RUN_DIR [--out FILE.png|FILE.svg]`: loss (raw, EMA, eval), learning rate and
//! throughput curves from metrics.jsonl, rendered with plotters. The dashboard's `x` key exports
//! its current window the same way.

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

struct Series {
    steps: Vec<(f64, f64, f64, f64)>, // step, loss, lr, tokens/s
    evals: Vec<(f64, f64)>,
}

fn read(run: &Path, from_step: u64) -> Result<Series> {
    let p = run.join("metrics.jsonl");
    let bytes =
        std::fs::read(&p).with_context(|| format!("{}: cannot read (is this a run directory?)", p.display()))?;
    // Lossy: a damaged line is then reported by its number below, not as an unreadable file.
    let text = String::from_utf8_lossy(&bytes);
    let mut s = Series { steps: Vec::new(), evals: Vec::new() };
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: not valid JSON ({e})", p.display(), i + 1))?;
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        if f("step") < from_step as f64 {
            continue;
        }
        match v.get("kind").and_then(Value::as_str) {
            Some("step") => s.steps.push((f("step"), f("loss"), f("lr"), f("tokens_per_s"))),
            Some("eval") => s.evals.push((f("step"), f("loss"))),
            _ => {}
        }
    }
    if s.steps.is_empty() {
        bail!("{}: no training steps recorded yet", p.display());
    }
    Ok(s)
}

/// The axis range of the finite values, padded 5%. Values near f64's limits are clamped first:
/// `1e308 - -1e308` is infinite, and plotters loops forever laying ticks on an infinite axis.
fn range(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    const LIMIT: f64 = f64::MAX / 4.0;
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .map(|x| x.clamp(-LIMIT, LIMIT))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    // At least a few ULPs of the larger end, so a flat series far from zero still has a width.
    let pad = ((hi - lo) * 0.05).max(lo.abs().max(hi.abs()) * 1e-9).max(1e-9);
    (lo - pad)..(hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, s: &Series, title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let panels = root.split_evenly((3, 1));
    let xs = range(s.steps.iter().map(|p| p.0));
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("{e:?}");
    // Loss: raw points, EMA line, eval points.
    let mut ema = Vec::with_capacity(s.steps.len());
    for p in &s.steps {
        let prev = ema.last().map_or(p.1, |&(_, e): &(f64, f64)| e + 0.1 * (p.1 - e));
        ema.push((p.0, prev));
    }
    let ys = range(s.steps.iter().map(|p| p.1).chain(s.evals.iter().map(|e| e.1)));
    let mut c = ChartBuilder::on(&panels[0])
        .caption("loss", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(50)
        .build_cartesian_2d(xs.clone(), ys)
        .map_err(err)?;
    c.configure_mesh().x_desc("step").draw().map_err(err)?;
    c.draw_series(s.steps.iter().map(|p| Circle::new((p.0, p.1), 1, RGBColor(170, 170, 170).filled())))
        .map_err(err)?
        .label("raw");
    c.draw_series(LineSeries::new(ema, RGBColor(230, 120, 0).stroke_width(2))).map_err(err)?.label("ema");
    c.draw_series(s.evals.iter().map(|e| Circle::new(*e, 4, RGBColor(0, 150, 60).filled())))
        .map_err(err)?
        .label("eval");
    // Learning rate and throughput.
    for (i, (name, pick)) in [("learning rate", 2usize), ("tokens/s", 3)].into_iter().enumerate() {
        let get = |p: &(f64, f64, f64, f64)| if pick == 2 { p.2 } else { p.3 };
        let mut c = ChartBuilder::on(&panels[i + 1])
            .caption(name, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(50)
            .build_cartesian_2d(xs.clone(), range(s.steps.iter().map(get)))
            .map_err(err)?;
        c.configure_mesh().x_desc("step").draw().map_err(err)?;
        c.draw_series(LineSeries::new(s.steps.iter().map(|p| (p.0, get(p))), RGBColor(40, 90, 200).stroke_width(2)))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Renders the run's curves (steps ≥ `from_step`) to `out` (.png or .svg), written atomically.
pub fn plot(run: &Path, out: &Path, from_step: u64) -> Result<()> {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let s = read(run, from_step)?;
    // Checked first: plotters reports an unwritable path as a nested debug dump.
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("{}: no such directory", dir.display());
    }
    let out = &crate::io::atomic::replace_target(out)?;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext != "png" && ext != "svg" {
        bail!("{}: the output must end in .png or .svg", out.display());
    }
    let tmp = out.with_file_name(format!(".kiln-plot-{}.{ext}", std::process::id()));
    // Checked first too: plotters reports a file it cannot create as a nested debug dump.
    std::fs::File::create(&tmp).with_context(|| format!("{}: cannot write", out.display()))?;
    let title = format!("{}", run.display());
    let res = match ext.as_str() {
        "png" => draw(BitMapBackend::new(&tmp, (1200, 900)).into_drawing_area(), &s, &title),
        "svg" => draw(SVGBackend::new(&tmp, (1200, 900)).into_drawing_area(), &s, &title),
        _ => bail!("{}: the output must end in .png or .svg", out.display()),
    };
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("{}: cannot render", out.display())));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot write", out.display()))
}
