//! Per-task accuracies with lm-evaluation-harness's standard errors, and the paper-style table.

use super::score::ItemScore;
use super::tasks::paper_metric;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub n: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    /// The metric the TinyLlama paper reports for this task.
    pub metric: String,
}

/// Mean and standard error of the mean (sample standard deviation / √n), as lm-eval computes them.
fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

impl TaskResult {
    pub fn from_scores(task: &str, scores: &[ItemScore]) -> TaskResult {
        let acc: Vec<f64> = scores.iter().map(|s| (s.pred == s.gold) as u8 as f64).collect();
        let (acc, acc_stderr) = mean_stderr(&acc);
        let norm: Option<Vec<f64>> = scores.iter().map(|s| s.pred_norm.map(|p| (p == s.gold) as u8 as f64)).collect();
        let (acc_norm, acc_norm_stderr) = match norm {
            Some(v) if !v.is_empty() => {
                let (m, e) = mean_stderr(&v);
                (Some(m), Some(e))
            }
            _ => (None, None),
        };
        TaskResult {
            task: task.to_string(),
            n: scores.len(),
            acc,
            acc_stderr,
            acc_norm,
            acc_norm_stderr,
            metric: paper_metric(task).to_string(),
        }
    }

    /// The value of the paper's metric for this task.
    pub fn headline(&self) -> f64 {
        if self.metric == "acc_norm" {
            self.acc_norm.unwrap_or(self.acc)
        } else {
            self.acc
        }
    }
}

/// Average of the paper metrics, as the TinyLlama tables report it.
pub fn average(results: &[TaskResult]) -> f64 {
    results.iter().map(TaskResult::headline).sum::<f64>() / results.len().max(1) as f64
}

pub fn table(results: &[TaskResult]) -> String {
    let mut s = format!("{:<14} {:>5} {:>8} {:>8} {:>10} {:>8}\n", "task", "n", "acc", "±", "acc_norm", "±");
    for r in results {
        let pct = |x: f64| format!("{:.2}", 100.0 * x);
        let norm = r.acc_norm.map(pct).unwrap_or_else(|| "-".into());
        let norm_e = r.acc_norm_stderr.map(pct).unwrap_or_else(|| "-".into());
        s += &format!(
            "{:<14} {:>5} {:>8} {:>8} {:>10} {:>8}\n",
            r.task,
            r.n,
            pct(r.acc),
            pct(r.acc_stderr),
            norm,
            norm_e
        );
    }
    s += &format!("{:<14} {:>5} {:>8}   (paper metric per task: acc_norm for hellaswag/openbookqa/arc_challenge, acc otherwise)\n", "average", "", format!("{:.2}", 100.0 * average(results)));
    s
}
