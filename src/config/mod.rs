//! The TOML run configuration: schema, defaults, `--set section.key=value` overrides and
//! validation. Every error names the file and the offending key.

mod guard;
mod model;
mod overrides;

pub use guard::{GuardAction, GuardSection};
pub use model::{ModelInit, ModelSection};
pub use overrides::apply_set;
use overrides::set_behind;

use crate::model::LlamaConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_TOKENIZER: &str = "assets/tokenizer/llama2/tokenizer.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    pub data: DataSection,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: OptimSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default)]
    pub guard: GuardSection,
}

/// What a run trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSection {
    pub path: PathBuf,
}

impl Default for TokenizerSection {
    fn default() -> Self {
        TokenizerSection { path: DEFAULT_TOKENIZER.into() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub seq_len: usize,
    pub sources: Vec<SourceSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    /// A directory made by `kiln prepare`.
    pub path: PathBuf,
    pub weight: f64,
    /// Raw inputs to prepare into `path` on first use (what the demo does).
    pub prepare: Option<PrepareSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareSpec {
    pub inputs: Vec<PathBuf>,
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    pub text_field: Option<String>,
}

fn default_val_fraction() -> f64 {
    0.01
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub micro_batch: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub max_steps: u64,
    #[serde(default)]
    pub seed: u64,
    /// Steps between headless log lines.
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Keep only each block's input and recompute its activations in the backward: about a
    /// third more compute for most of the activation memory back.
    #[serde(default)]
    pub recompute: bool,
}

fn one() -> usize {
    1
}
fn ten() -> u64 {
    10
}

/// AdamW and the schedule; defaults are TinyLlama's.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm clipping threshold; 0 disables clipping.
    pub grad_clip: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            lr: 4e-4,
            min_lr: 4e-5,
            warmup_steps: 2000,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    pub every_steps: u64,
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { every_steps: 1000, keep_last: 3 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSection {
    pub device: Device,
    pub world_size: usize,
    /// Seconds the ranks of a sharded run may spend inside one training step before the run ends
    /// with an error (a rank on another node died or hung, which no local rank sees); 0 = wait
    /// forever. PyTorch's NCCL default is the same ten minutes. The step-boundary agreement is not
    /// limited: there the other nodes wait for node 0's checkpoint or evaluation.
    pub collective_timeout_s: u64,
}

/// `parallel.collective_timeout_s` when the config does not say.
pub const DEFAULT_COLLECTIVE_TIMEOUT_S: u64 = 600;

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection { device: Device::Cpu, world_size: 1, collective_timeout_s: DEFAULT_COLLECTIVE_TIMEOUT_S }
    }
}

/// Every `every_steps` (0 = never): held-out loss over up to `batches` micro-batches per source, and
/// the accuracy of `tasks` on their first `task_limit` items.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    pub every_steps: u64,
    pub batches: usize,
    /// Commonsense tasks scored on the current weights at each eval (see `kiln eval`).
    pub tasks: Vec<String>,
    /// Items per task at each in-training eval (0 = the whole task).
    pub task_limit: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every_steps: 0, batches: 4, tasks: vec![], task_limit: 100 }
    }
}

/// Sample generations from `prompts` every `every_steps` (0 = never).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSection {
    pub every_steps: u64,
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
}

impl Default for SampleSection {
    fn default() -> Self {
        SampleSection { every_steps: 0, prompts: vec![], max_new_tokens: 48, temperature: 0.8, top_k: 40, top_p: 0.95 }
    }
}

impl RunConfig {
    /// Parses TOML text (from `source`, named in errors), applying `--set` overrides first.
    pub fn parse(text: &str, source: &str, sets: &[String]) -> Result<RunConfig> {
        let mut doc: toml::Table = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{source}: not valid TOML ({})", one_line(e.message())))?;
        for s in sets {
            apply_set(&mut doc, s)?;
        }
        let text = toml::to_string(&doc)?;
        let de =
            toml::Deserializer::parse(&text).map_err(|e| anyhow::anyhow!("{source}: {}", one_line(e.message())))?;
        let cfg: RunConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let msg = one_line(e.inner().message());
            if let Some(set) = set_behind(sets, &path) {
                anyhow::anyhow!("--set {set:?}: {path}: {msg}")
            } else if path == "." {
                anyhow::anyhow!("{source}: {msg}")
            } else {
                anyhow::anyhow!("{source}: {path}: {msg}")
            }
        })?;
        cfg.validate().map_err(|e| {
            // "train.max_steps must be positive" is about a --set when one set that key.
            let msg = format!("{e:#}");
            let key = msg.split([' ', ':']).next().unwrap_or("");
            match set_behind(sets, key) {
                Some(set) => anyhow::anyhow!("--set {set:?}: {msg}"),
                None => anyhow::anyhow!("{source}: {msg}"),
            }
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path, sets: &[String]) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
        Self::parse(&text, &path.display().to_string(), sets)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Settings that are allowed but probably not meant, one line each, for the run to print.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let (warmup, steps) = (self.optim.warmup_steps, self.train.max_steps);
        if warmup > steps {
            w.push(format!(
                "optim.warmup_steps {warmup} exceeds train.max_steps {steps}: the learning rate never reaches optim.lr"
            ));
        }
        w
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("data.seq_len", self.data.seq_len as u64),
            ("train.micro_batch", self.train.micro_batch as u64),
            ("train.grad_accum", self.train.grad_accum as u64),
            ("train.max_steps", self.train.max_steps),
            ("train.log_every", self.train.log_every),
            ("parallel.world_size", self.parallel.world_size as u64),
            ("eval.batches", self.eval.batches as u64),
        ];
        for (k, v) in positive {
            if v == 0 {
                bail!("{k} must be positive");
            }
        }
        // A step of more micro-steps than this would never end (nor reach a signal's checkpoint).
        if self.train.grad_accum > 1 << 20 {
            bail!("train.grad_accum {} is beyond what kiln supports ({})", self.train.grad_accum, 1 << 20);
        }
        self.guard.validate()?;
        if self.data.sources.is_empty() {
            bail!("data.sources: at least one source is needed");
        }
        for (i, s) in self.data.sources.iter().enumerate() {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                bail!("data.sources: source {:?} needs a positive weight", s.name);
            }
            // Names key the per-source held-out losses in metrics.jsonl and the dashboard.
            if self.data.sources[..i].iter().any(|o| o.name == s.name) {
                bail!("data.sources: two sources are named {:?}", s.name);
            }
        }
        let o = &self.optim;
        for (k, v) in [("optim.lr", o.lr), ("optim.eps", o.eps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{k} must be positive");
            }
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            bail!("optim.min_lr must be in [0, optim.lr]");
        }
        for (k, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{k} must be in [0, 1)");
            }
        }
        // Written so that NaN fails too (every comparison with NaN is false).
        for (k, v) in [("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{k} must be a non-negative number");
            }
        }
        let sm = &self.sample;
        if !(sm.temperature.is_finite() && sm.temperature >= 0.0) {
            bail!("sample.temperature must be a non-negative number");
        }
        if !(sm.top_p > 0.0 && sm.top_p <= 1.0) {
            bail!("sample.top_p must be in (0, 1]");
        }
        if !self.train.micro_batch.is_multiple_of(self.parallel.world_size) {
            bail!(
                "train.micro_batch ({}) must be a multiple of parallel.world_size ({}): each rank takes an equal slice",
                self.train.micro_batch,
                self.parallel.world_size
            );
        }
        for (i, t) in self.eval.tasks.iter().enumerate() {
            if self.eval.tasks[..i].contains(t) {
                bail!("eval.tasks: {t:?} is listed twice");
            }
            if !crate::eval::tasks::TASKS.contains(&t.as_str()) {
                bail!("eval.tasks: unknown task {t:?} (known: {})", crate::eval::tasks::TASKS.join(", "));
            }
        }
        if self.checkpoint.keep_last == 0 {
            bail!("checkpoint.keep_last must be at least 1");
        }
        self.model_config()?; // an unknown preset or a shape field with nothing to apply it to
        Ok(())
    }

    /// The model shape from `preset` plus explicit fields; `None` when neither is given (the shape
    /// then comes from `model.init`).
    pub fn model_config(&self) -> Result<Option<LlamaConfig>> {
        self.model.shape()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
preset = "tiny"
[data]
seq_len = 64
[[data.sources]]
name = "a"
path = "d"
weight = 1.0
[train]
micro_batch = 2
max_steps = 10
"#;

    #[test]
    fn defaults_are_tinyllamas() {
        let c = RunConfig::parse(BASE, "t.toml", &[]).unwrap();
        assert_eq!((c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.weight_decay), (4e-4, 4e-5, 2000, 0.1));
        assert_eq!((c.optim.beta1, c.optim.beta2, c.optim.grad_clip), (0.9, 0.95, 1.0));
        assert_eq!(c.model_config().unwrap().unwrap(), LlamaConfig::preset("tiny").unwrap());
    }

    #[test]
    fn set_overrides_any_field_with_toml_values() {
        let sets = vec![
            "optim.lr=1e-3".to_string(),
            "model.n_layer=3".to_string(),
            "data.sources=[{name=\"x\", path=\"p\", weight=2.0}]".to_string(),
            "model.init=runs/a".to_string(),
        ];
        let c = RunConfig::parse(BASE, "t.toml", &sets).unwrap();
        assert_eq!(c.optim.lr, 1e-3);
        assert_eq!(c.model_config().unwrap().unwrap().n_layer, 3);
        assert_eq!(c.data.sources[0].name, "x");
        assert_eq!(c.model.init, ModelInit::Path("runs/a".into()));
    }

    #[test]
    fn a_model_field_with_nothing_to_apply_it_to_is_refused_not_dropped() {
        // The model comes from model.init: its shape is the checkpoint's.
        let init = &BASE.replace("preset = \"tiny\"", "init = \"runs/a\"");
        assert!(RunConfig::parse(init, "t.toml", &[]).unwrap().model_config().unwrap().is_none());
        for set in [
            "model.max_seq_len=4096",
            "model.head_dim=64",
            "model.rope_theta=5e5",
            "model.norm_eps=1e-6",
            "model.tie_embeddings=true",
        ] {
            let e = RunConfig::parse(init, "t.toml", &[set.to_string()]).unwrap_err().to_string();
            let key = set.split('=').next().unwrap();
            assert!(e.starts_with(&format!("--set {set:?}: {key}: set without model.preset")), "{e}");
        }
        // With a preset or the whole shape, a field is applied (and a loaded model is checked against it).
        let c = RunConfig::parse(BASE, "t.toml", &["model.max_seq_len=4096".into()]).unwrap();
        assert_eq!(c.model_config().unwrap().unwrap().max_seq_len, 4096);
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let e = RunConfig::parse(BASE, "t.toml", &["train.micro_bach=3".into()]).unwrap_err().to_string();
        // The key came from the command line: the error names the --set, not the file.
        assert!(e.starts_with("--set \"train.micro_bach=3\"") && e.contains("micro_bach"), "{e}");
        assert!(!e.contains("t.toml"), "{e}");
        let e = RunConfig::parse("[train]\nmicro_bach = 3\n", "t.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("t.toml") && e.contains("micro_bach"), "{e}");
        let e = RunConfig::parse(BASE, "t.toml", &["train.micro_batch=\"two\"".into()]).unwrap_err().to_string();
        assert!(e.contains("train.micro_batch"), "{e}");
        let e = RunConfig::parse(BASE, "t.toml", &["optim.lr=-1".into()]).unwrap_err();
        assert!(format!("{e:#}").contains("optim.lr"), "{e:#}");
        let e = RunConfig::parse("[model\n", "t.toml", &[]).unwrap_err().to_string();
        assert!(e.starts_with("t.toml: not valid TOML"), "{e}");
        assert!(!e.contains('\n'));
    }
}
