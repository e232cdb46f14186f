//! A run's curves from its metrics.jsonl, for `kiln plot`: steps, held-out evals and the steps the
//! guard refused. Reading never writes.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepPoint {
    pub step: f64,
    pub tokens: f64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    pub step: f64,
    pub tokens: f64,
    pub loss: f64,
}

/// A step whose update the guard refused. It has no step record (its own record carries the
/// tokens read by then), and its loss is absent when it was not finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardPoint {
    pub step: f64,
    pub tokens: f64,
    pub loss: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Series {
    pub steps: Vec<StepPoint>,
    pub evals: Vec<EvalPoint>,
    pub guards: Vec<GuardPoint>,
}

impl Series {
    /// Tokens per step, when every step record holds `tokens = k · step` (one batch size for the
    /// whole run): then a step axis and a token axis are the same axis, labelled twice.
    pub fn tokens_per_step(&self) -> Option<f64> {
        let last = self.steps.last()?;
        let k = last.tokens / last.step;
        let fits = |p: &StepPoint| (p.tokens - k * p.step).abs() <= 0.01 * k * p.step + 0.5 * k;
        (k.is_finite() && k > 0.0 && self.steps.iter().all(fits)).then_some(k)
    }
}

/// The run's records from `from_step` on. A line cut short at the end of the file is a record
/// being appended by a live run and is left for next time; a damaged line before it is an error
/// naming it.
pub fn read(run: &Path, from_step: u64) -> Result<Series> {
    if !run.is_dir() {
        if run.exists() {
            bail!("{}: not a run directory", run.display());
        }
        bail!("{}: no such directory", run.display());
    }
    let p = run.join("metrics.jsonl");
    if !p.is_file() {
        bail!("{}: not a run directory (no metrics.jsonl)", run.display());
    }
    let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    // Lossy: a damaged line is then reported by its number below, not as an unreadable file.
    let text = String::from_utf8_lossy(&bytes);
    let complete = text.ends_with('\n');
    let n_lines = text.lines().count();
    let mut s = Series::default();
    for (i, line) in text.lines().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == n_lines && !complete => break,
            Err(e) => bail!("{}:{}: not valid JSON ({e})", p.display(), i + 1),
        };
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        if f("step") < from_step as f64 {
            continue;
        }
        let (step, tokens, loss) = (f("step"), f("tokens"), f("loss"));
        match v.get("kind").and_then(Value::as_str) {
            Some("step") => {
                s.steps.push(StepPoint { step, tokens, loss, lr: f("lr"), tokens_per_s: f("tokens_per_s") })
            }
            Some("eval") => s.evals.push(EvalPoint { step, tokens, loss }),
            Some("guard") => s.guards.push(GuardPoint { step, tokens, loss: loss.is_finite().then_some(loss) }),
            _ => {}
        }
    }
    if s.steps.is_empty() {
        bail!("{}: no training steps recorded yet", p.display());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("metrics.jsonl"), lines).unwrap();
        t
    }

    fn step(s: u64) -> String {
        format!(
            "{{\"kind\":\"step\",\"step\":{s},\"tokens\":{},\"loss\":3.0,\"lr\":0.001,\"tokens_per_s\":1.0}}\n",
            s * 100
        )
    }

    #[test]
    fn guards_are_read_with_the_tokens_of_their_step() {
        let guard = "{\"kind\":\"guard\",\"step\":3,\"tokens\":300,\"reason\":\"x\",\"loss\":null,\"grad_norm\":null,\"z\":null,\"action\":\"skip\",\"in_a_row\":1}\n";
        let t = write(&(step(1) + &step(2) + guard + &step(4)));
        let s = read(t.path(), 0).unwrap();
        assert_eq!(s.guards, [GuardPoint { step: 3.0, tokens: 300.0, loss: None }]);
        assert_eq!(s.tokens_per_step(), Some(100.0));
    }

    #[test]
    fn a_line_being_appended_is_left_for_later_and_a_damaged_one_is_named() {
        let t = write(&(step(1) + &step(2) + "{\"kind\":\"step\",\"st"));
        assert_eq!(read(t.path(), 0).unwrap().steps.len(), 2);
        let t = write(&(step(1) + "{\"kind\":\"step\",\"st\n" + &step(2)));
        let e = read(t.path(), 0).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2: not valid JSON (EOF while parsing"), "{e}");
    }

    #[test]
    fn what_is_not_a_run_is_named() {
        let t = tempfile::tempdir().unwrap();
        let e = read(t.path(), 0).unwrap_err().to_string();
        assert!(e.ends_with(": not a run directory (no metrics.jsonl)"), "{e}");
        let e = read(&t.path().join("missing"), 0).unwrap_err().to_string();
        assert!(e.ends_with("missing: no such directory"), "{e}");
    }
}
