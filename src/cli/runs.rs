//! `kiln runs [DIR]`: the runs under a directory, one line each: live or stopped, how far each
//! got, its latest losses, throughput and checkpoint. Reading only: a live run's lock is looked
//! up in the kernel's table, never taken, and nothing is written.

use super::plot::labels;
use crate::io::run_lock::{liveness, Liveness};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// Steps whose median throughput the table shows: one step's figure jumps with whatever else the
/// machine did during it.
const THROUGHPUT_STEPS: usize = 20;

/// One run, as its table line shows it.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub name: String,
    pub state: String,
    pub step: Option<u64>,
    pub max_steps: Option<u64>,
    pub tokens: Option<u64>,
    pub loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub checkpoint: Option<String>,
    /// metrics.jsonl could not be read at all (its lines that do not parse are skipped instead).
    pub unreadable: bool,
}

/// The runs under `dir` (its subdirectories holding a metrics.jsonl, or `dir` itself if it is
/// one), sorted by name.
pub fn list(dir: &Path) -> Result<Vec<Summary>> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!("{}: not a directory", dir.display());
        }
        bail!("{}: no such directory", dir.display());
    }
    if dir.join("metrics.jsonl").is_file() {
        return Ok(vec![summarize(dir)]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("{}: cannot list ({e})", dir.display()))?;
    let mut runs: Vec<Summary> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.join("metrics.jsonl").is_file())
        .map(|p| summarize(&p))
        .collect();
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(runs)
}

/// What `run`'s metrics.jsonl, checkpoints/latest, config.toml and lock say.
pub fn summarize(run: &Path) -> Summary {
    let name = run.file_name().map_or_else(|| run.display().to_string(), |n| n.to_string_lossy().into_owned());
    let state = match liveness(run) {
        Liveness::Live(_) => "live",
        Liveness::Stopped => "stopped",
        Liveness::Unknown => "?",
    };
    let mut s = Summary { name, state: state.into(), max_steps: max_steps(run), ..Summary::default() };
    let Ok(bytes) = std::fs::read(run.join("metrics.jsonl")) else {
        s.unreadable = true;
        return s;
    };
    let mut throughput = Vec::new();
    // From the end: the latest of each kind is what the line shows. A line that does not parse
    // (cut short by a crash, or being appended right now) is skipped, as a resume skips it.
    for v in String::from_utf8_lossy(&bytes).lines().rev().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        match v.get("kind").and_then(Value::as_str) {
            Some("step") => {
                if s.step.is_none() {
                    s.step = v.get("step").and_then(Value::as_u64);
                    s.tokens = v.get("tokens").and_then(Value::as_u64);
                    s.loss = num("loss");
                }
                if throughput.len() < THROUGHPUT_STEPS {
                    throughput.extend(num("tokens_per_s").filter(|t| t.is_finite()));
                }
            }
            Some("eval") if s.eval_loss.is_none() => s.eval_loss = num("loss"),
            Some("checkpoint") if s.checkpoint.is_none() => {
                s.checkpoint = v.get("path").and_then(Value::as_str).and_then(|p| file_name(Path::new(p)));
            }
            _ => {}
        }
        if s.step.is_some() && s.eval_loss.is_some() && s.checkpoint.is_some() && throughput.len() >= THROUGHPUT_STEPS {
            break;
        }
    }
    s.tokens_per_s = median(&mut throughput);
    // The pointer a resume follows wins over the record: a checkpoint written after the last
    // record, or `latest` moved back by hand.
    if let Ok(text) = std::fs::read_to_string(run.join("checkpoints/latest")) {
        if !text.trim().is_empty() {
            s.checkpoint = Some(text.trim().to_string());
        }
    }
    s
}

/// Tokens/s whole below 10k (`1340`, where `1.3k` would hide a 10% change), else `45.3k`.
fn throughput_label(t: f64) -> String {
    if t < 10_000.0 {
        format!("{}", t.round() as i64)
    } else {
        labels::count(t)
    }
}

fn file_name(p: &Path) -> Option<String> {
    Some(p.file_name()?.to_string_lossy().into_owned())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// `train.max_steps` from the run's config.toml, if it parses.
fn max_steps(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("config.toml")).ok()?;
    let cfg: toml::Table = text.parse().ok()?;
    cfg.get("train")?.get("max_steps")?.as_integer()?.try_into().ok()
}

/// The table: a header, then one line per run, columns aligned.
pub fn table(runs: &[Summary]) -> String {
    let dash = || "-".to_string();
    let loss = |l: Option<f64>| l.filter(|x| x.is_finite()).map_or_else(dash, |x| format!("{x:.4}"));
    let mut rows =
        vec![["run", "state", "step", "tokens", "loss", "eval loss", "tokens/s", "checkpoint"].map(String::from)];
    for r in runs {
        let step = match (r.step, r.max_steps) {
            _ if r.unreadable => "unreadable".to_string(),
            (Some(s), Some(m)) => format!("{s}/{m}"),
            (Some(s), None) => s.to_string(),
            (None, _) => dash(),
        };
        rows.push([
            r.name.clone(),
            r.state.clone(),
            step,
            r.tokens.map_or_else(dash, |t| labels::count(t as f64)),
            loss(r.loss),
            loss(r.eval_loss),
            r.tokens_per_s.map_or_else(dash, throughput_label),
            r.checkpoint.clone().unwrap_or_else(dash),
        ]);
    }
    let width = |c: usize| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..8).map(width).collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            // Names and words to the left, numbers to the right.
            let pad = " ".repeat(widths[c] - cell.chars().count());
            let numeric = (2..=6).contains(&c);
            let cell = if numeric { format!("{pad}{cell}") } else { format!("{cell}{pad}") };
            line += &cell;
            line += "  ";
        }
        out += line.trim_end();
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, name: &str, metrics: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.join("checkpoints")).unwrap();
        std::fs::write(p.join("metrics.jsonl"), metrics).unwrap();
        p
    }

    #[test]
    fn a_run_is_summed_up_from_its_latest_records() {
        let t = tempfile::tempdir().unwrap();
        let mut m = String::new();
        for s in 1..=30u64 {
            m += &format!(
                "{{\"kind\":\"step\",\"step\":{s},\"tokens\":{},\"loss\":{},\"tokens_per_s\":{}}}\n",
                s * 40960,
                10.0 - s as f64 * 0.1,
                1000 + s
            );
            if s == 20 {
                m += "{\"kind\":\"eval\",\"step\":20,\"tokens\":819200,\"loss\":8.25,\"per_source\":[]}\n";
                m += "{\"kind\":\"checkpoint\",\"step\":20,\"path\":\"/x/checkpoints/step-00000020\"}\n";
                m += "{\"kind\":\"step\",\"st\n"; // damaged: skipped
            }
        }
        let p = run(t.path(), "b", &m);
        std::fs::write(p.join("config.toml"), "[train]\nmax_steps = 400\n").unwrap();
        let s = summarize(&p);
        assert_eq!(
            (s.step, s.max_steps, s.tokens, s.eval_loss, s.checkpoint.as_deref()),
            (Some(30), Some(400), Some(1_228_800), Some(8.25), Some("step-00000020"))
        );
        assert!((s.loss.unwrap() - 7.0).abs() < 1e-9);
        assert_eq!(s.tokens_per_s, Some(1021.0), "the median of the last 20 steps");
        assert_eq!(s.state, "stopped");
        std::fs::write(p.join("checkpoints/latest"), "step-00000030\n").unwrap();
        assert_eq!(summarize(&p).checkpoint.as_deref(), Some("step-00000030"));

        run(t.path(), "a", "not json\n");
        std::fs::create_dir(t.path().join("data")).unwrap(); // not a run: no metrics.jsonl
        let runs = list(t.path()).unwrap();
        assert_eq!(runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let text = table(&runs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "run  state      step  tokens    loss  eval loss  tokens/s  checkpoint");
        assert_eq!(lines[1], "a    stopped       -       -       -          -         -  -");
        assert_eq!(lines[2], "b    stopped  30/400    1.2M  7.0000     8.2500      1021  step-00000030");
        // A run directory itself lists as its one run.
        assert_eq!(list(&p).unwrap().len(), 1);
    }

    #[test]
    fn a_missing_directory_is_named() {
        let t = tempfile::tempdir().unwrap();
        let e = list(&t.path().join("nope")).unwrap_err().to_string();
        assert!(e.ends_with("nope: no such directory"), "{e}");
        assert!(list(t.path()).unwrap().is_empty());
    }
}
