//! `kiln eval`: the commonsense suite on a model directory, checkpoint or run directory.

use crate::backend::Backend;
use crate::eval::report::TaskResult;
use crate::eval::score::{ItemScore, Scorer};
use crate::eval::tasks;
use crate::io::load_model_dir;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct EvalArgs {
    pub model: PathBuf,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub data: Option<PathBuf>,
    pub predictions: Option<PathBuf>,
    pub progress: bool,
    /// "cpu" or "cuda".
    pub device: String,
}

pub struct EvalOutput {
    pub results: Vec<TaskResult>,
    pub items: usize,
    pub secs: f64,
}

pub fn run(args: &EvalArgs) -> Result<EvalOutput> {
    crate::on_device!(&args.device, |b| run_on(args, b))
}

pub fn run_on<B: Backend>(args: &EvalArgs, backend: B) -> Result<EvalOutput> {
    // Load every task first so a malformed file fails before any scoring.
    let mut loaded = Vec::new();
    for t in &args.tasks {
        let mut items = tasks::load(t, args.data.as_deref())?;
        if let Some(n) = args.limit {
            if n == 0 {
                bail!("--limit must be at least 1");
            }
            items.truncate(n);
        }
        loaded.push((t.clone(), items));
    }
    let md = load_model_dir(&crate::train::checkpoint::resolve_model_dir(&args.model)?, backend)?;
    let tok = md.tokenizer()?;
    let mut scorer = Scorer::new(&md.model, tok, md.bos)?;
    let total: usize = loaded.iter().map(|(_, i)| i.len()).sum();
    let bar = if args.progress { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {pos}/{len} items {per_sec} {msg}").expect("valid template"),
    );
    // Kept in memory and written whole at the end, so a failed run leaves an earlier file as it was.
    let mut preds = args.predictions.as_ref().map(|_| String::new());
    let t0 = Instant::now();
    let mut results = Vec::new();
    for (task, items) in &loaded {
        bar.set_message(task.clone());
        let mut scores: Vec<ItemScore> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let s = scorer.score(item).with_context(|| {
                let file = match &args.data {
                    Some(d) => d.join(format!("{task}.jsonl")).display().to_string(),
                    None => format!("{task} (bundled)"),
                };
                format!("{file}: item {i}")
            })?;
            if let Some(text) = preds.as_mut() {
                let line = json!({"task": task, "index": i, "loglikelihoods": s.loglik, "gold": s.gold, "acc_choice": s.pred, "acc_norm_choice": s.pred_norm});
                text.push_str(&format!("{line}\n"));
            }
            scores.push(s);
            bar.inc(1);
        }
        results.push(TaskResult::from_scores(task, &scores));
    }
    bar.finish_and_clear();
    if let (Some(path), Some(text)) = (&args.predictions, preds) {
        crate::io::atomic::write_file(path, text.as_bytes())?;
    }
    Ok(EvalOutput { results, items: total, secs: t0.elapsed().as_secs_f64() })
}

pub fn json_report(out: &EvalOutput, model: &Path) -> serde_json::Value {
    let tasks: serde_json::Map<String, serde_json::Value> =
        out.results.iter().map(|r| (r.task.clone(), serde_json::to_value(r).expect("plain data"))).collect();
    json!({
        "model": model.display().to_string(),
        "tasks": tasks,
        "average": crate::eval::report::average(&out.results),
        "items": out.items,
        "items_per_s": out.items as f64 / out.secs.max(1e-9),
    })
}
