//! `kiln plot RUN_DIR... [--out FILE.png|FILE.svg]`: loss (raw, smoothed, held out, the guard's
//! refusals), learning rate and throughput from metrics.jsonl, rendered with plotters; several runs
//! overlaid, one colour each. The dashboard's `x` key exports its current window the same way.

mod draw;
pub mod labels;
pub mod read;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Renders the run's curves (steps ≥ `from_step`) to `out` (.png or .svg), written atomically.
pub fn plot(run: &Path, out: &Path, from_step: u64) -> Result<()> {
    let series = read::read(run, from_step)?;
    render(vec![draw::Run { name: run.display().to_string(), series }], &run.display().to_string(), out)
}

/// Renders several runs overlaid (against tokens, one colour each, named in a legend) to `out`.
/// Every run is read before anything is written: one that is not a run is an error naming it.
pub fn plot_runs(runs: &[PathBuf], out: &Path) -> Result<()> {
    if let [run] = runs {
        return plot(run, out, 0);
    }
    let names = legend_names(runs);
    let mut drawn = Vec::with_capacity(runs.len());
    for (run, name) in runs.iter().zip(names) {
        drawn.push(draw::Run { name, series: read::read(run, 0)? });
    }
    let mut title = drawn.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(" · ");
    if title.chars().count() > 100 {
        // The legend names them all; a title that long would run off the picture.
        title = format!("{} runs", drawn.len());
    }
    render(drawn, &title, out)
}

/// Each run's directory name, or its path as given where two runs share a name.
fn legend_names(runs: &[PathBuf]) -> Vec<String> {
    let short = |p: &PathBuf| {
        // `.` has no file name of its own: the name is the last part of the absolute path.
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
        abs.components()
            .rfind(|c| !matches!(c, std::path::Component::CurDir))
            .map_or_else(|| p.display().to_string(), |c| c.as_os_str().to_string_lossy().into_owned())
    };
    let shorts: Vec<String> = runs.iter().map(short).collect();
    shorts
        .iter()
        .zip(runs)
        .map(|(s, p)| if shorts.iter().filter(|o| *o == s).count() > 1 { p.display().to_string() } else { s.clone() })
        .collect()
}

fn render(runs: Vec<draw::Run>, title: &str, out: &Path) -> Result<()> {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
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
    let res = match ext.as_str() {
        "png" => draw::draw(BitMapBackend::new(&tmp, (1200, 900)).into_drawing_area(), &runs, title),
        "svg" => draw::draw(SVGBackend::new(&tmp, (1200, 900)).into_drawing_area(), &runs, title),
        _ => bail!("{}: the output must end in .png or .svg", out.display()),
    };
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("{}: cannot render", out.display())));
    }
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot write", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legend_names_are_directory_names_unless_two_share_one() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(legend_names(&[p("runs/a"), p("/tmp/b/")]), ["a", "b"]);
        assert_eq!(legend_names(&[p("x/run"), p("y/run"), p("z")]), ["x/run", "y/run", "z"]);
    }
}
