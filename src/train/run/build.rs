//! Building the trainer: a new run's directory (removed again if the build fails), the model from a
//! checkpoint, `model.init` or random weights, the tokenizer and the data (prepared on first use).

use super::locate::{absolutize, Located};
use super::TrainArgs;
use crate::backend::cpu::{Cpu, CpuBuf};
use crate::backend::{Backend, Role};
use crate::config::{Device, ModelInit, RunConfig, DEFAULT_TOKENIZER};
use crate::data::dataset::Dataset;
use crate::data::loader::Source;
use crate::data::prepare::{prepare, sha256_hex, PrepareArgs, DEFAULT_SHARD_TOKENS};
use crate::dist::Member;
use crate::io::atomic::write_file;
use crate::io::load_model_dir;
use crate::io::run_lock::lock_run_dir;
use crate::model::init::random_weights;
use crate::model::{Llama, LlamaConfig, Weights};
use crate::tokenizer::{Tokenizer, LLAMA2_TOKENIZER_JSON};
use crate::train::checkpoint::{self, TrainerState};
use crate::train::trainer::{NodeRole, Trainer, TrainerParts};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tokenizer bytes: the configured file, or the bundled Llama-2 one for the default path when
/// kiln runs outside its source tree.
fn tokenizer_bytes(cfg: &RunConfig) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
    let p = &cfg.tokenizer.path;
    if !p.exists() && p == Path::new(DEFAULT_TOKENIZER) {
        return Ok((LLAMA2_TOKENIZER_JSON.to_vec(), None));
    }
    let bytes = std::fs::read(p).with_context(|| format!("{}: cannot read tokenizer", p.display()))?;
    let config =
        p.parent().map(|d| d.join("tokenizer_config.json")).filter(|c| c.exists()).and_then(|c| std::fs::read(c).ok());
    Ok((bytes, config))
}

fn open_sources(cfg: &RunConfig, tok_path: &Path, tok_sha: &str, vocab: usize, verbose: bool) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for s in &cfg.data.sources {
        if let Some(p) = &s.prepare {
            let args = PrepareArgs {
                tokenizer: tok_path.to_path_buf(),
                out: s.path.clone(),
                inputs: p.inputs.clone(),
                text_field: p.text_field.clone(),
                val_fraction: p.val_fraction,
                shard_tokens: DEFAULT_SHARD_TOKENS,
                progress: verbose,
            };
            let summary = prepare(&args).with_context(|| format!("data source {:?}", s.name))?;
            if verbose && !summary.skipped {
                crate::note!("prepared {}", crate::cli::prepare_summary(&summary, &s.path));
            }
        }
        let data = Dataset::open(&s.path, Some(tok_sha), vocab).with_context(|| format!("data source {:?}", s.name))?;
        out.push(Source { name: s.name.clone(), weight: s.weight, data: Arc::new(data) });
    }
    Ok(out)
}

/// Builds the trainer on `backend` as `node` of the run: creates a new run's directory, loads or
/// initialises the model, opens the data; `peak_flops` is what MFU is reported against. When `parallel.world_size > 1`,
/// `open_group` gives this process's FSDP ranks; it is called once the model and data are ready
/// (on node 0 of a multi-node run, that is when the other nodes are let in). A node other than 0
/// writes nothing: it follows a run node 0 has made.
pub fn build_on<B: Backend + Clone>(
    args: &TrainArgs,
    located: Located,
    backend: B,
    peak_flops: f64,
    node: NodeRole,
    open_group: impl FnOnce(&RunConfig) -> Result<Vec<Member<B>>>,
) -> Result<Trainer<B>> {
    let Located { mut cfg, run_dir, resuming } = located;
    if resuming {
        return build_run(args, cfg, run_dir, true, backend, peak_flops, node, open_group);
    }
    if !node.leads() {
        bail!("node {}: a node other than 0 only joins a run node 0 has made", node.rank);
    }
    absolutize(&mut cfg);
    if checkpoint::latest(&run_dir).ok().flatten().is_some() || run_dir.join("config.toml").exists() {
        bail!(
            "{}: run directory already holds a run (use `kiln train --resume {0}` or another --run-dir)",
            run_dir.display()
        );
    }
    let existed = run_dir.exists();
    let ours = ["config.toml", "metrics.jsonl", crate::io::run_lock::LOCK_FILE, crate::train::socket::SOCKET];
    let ours: Vec<&str> = ours.into_iter().filter(|f| !run_dir.join(f).exists()).collect();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("{}: cannot create run directory", run_dir.display()))?;
    let built = build_run(args, cfg, run_dir.clone(), false, backend, peak_flops, node, open_group);
    if built.is_err() {
        // A run that never started leaves nothing behind, so the corrected command is not refused
        // as "already holds a run". Only what this process wrote goes; anything else stays.
        for f in ours {
            let _ = std::fs::remove_file(run_dir.join(f));
        }
        if !existed {
            let _ = std::fs::remove_dir(&run_dir); // only if empty
        }
    }
    built
}

#[allow(clippy::too_many_arguments)]
fn build_run<B: Backend + Clone>(
    args: &TrainArgs,
    cfg: RunConfig,
    run_dir: PathBuf,
    resuming: bool,
    backend: B,
    peak_flops: f64,
    node: NodeRole,
    open_group: impl FnOnce(&RunConfig) -> Result<Vec<Member<B>>>,
) -> Result<Trainer<B>> {
    // Before anything in the run directory is written: one process per run (see `run_lock`).
    let run_lock = if node.leads() { Some(lock_run_dir(&run_dir)?) } else { None };
    if !resuming {
        write_file(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    }

    let (tok_bytes, tok_config) = tokenizer_bytes(&cfg)?;
    let tokenizer = Tokenizer::from_bytes(&tok_bytes, &cfg.tokenizer.path.display().to_string())?;
    let tok_sha = sha256_hex(&tok_bytes);
    let piece =
        |p: &str| tokenizer.token_id(p).with_context(|| format!("{}: no {p:?} token", cfg.tokenizer.path.display()));
    let (bos, eos) = (piece("<s>")?, piece("</s>")?);

    // The model: a checkpoint when resuming, else random or `model.init`.
    // A run killed before its first checkpoint resumes from its start: same config, same seed.
    let ckpt = if resuming { checkpoint::latest(&run_dir)? } else { None };
    if resuming && ckpt.is_none() && node.leads() {
        check_no_history_lost(&run_dir, args.resume.is_some())?;
        truncate_metrics(&run_dir, 0)?;
        if args.verbose {
            crate::note!("{}: no checkpoint yet, starting the run from step 0", run_dir.display());
        }
    }
    let sharded = cfg.parallel.world_size > 1;
    // One device loads straight onto it; FSDP loads on the host first (see `place`).
    let load = |dir: &Path| -> Result<Placed<B>> {
        if sharded {
            place(load_model_dir(dir, Cpu::new())?.model, backend.clone(), node)
        } else {
            Ok((load_model_dir(dir, backend.clone())?.model, None))
        }
    };
    let (placed, moments, state) = if let Some(ckpt) = ckpt {
        // Loading verifies the model's files; the optimizer state's are verified here.
        crate::io::checksums::verify_for_resume(&ckpt)?;
        let placed = load(&ckpt)?;
        // The run's model (config.toml, with any --set) is the checkpoint's: a checkpoint of
        // another shape, or a --set that would change the model, is a mistake to report, not a
        // model to train silently.
        if let Some(mc) = cfg.model_config()? {
            if !mc.same_model(&placed.0.cfg) {
                bail!(
                    "{}: the model in this checkpoint differs from the run's configured model (config.toml and any --set)",
                    ckpt.join("config.json").display()
                );
            }
        }
        let moments = crate::train::optim_state::open(&ckpt, &placed.0.cfg)?;
        let state = checkpoint::read_state(&ckpt)?;
        if ckpt.file_name() != Some(std::ffi::OsStr::new(&checkpoint::checkpoint_name(state.step))) {
            bail!(
                "{}: step {} does not match its checkpoint directory's name",
                ckpt.join(checkpoint::TRAINER_FILE).display(),
                state.step
            );
        }
        if node.leads() {
            truncate_metrics(&run_dir, state.step)?;
        }
        (placed, Some(moments), state)
    } else {
        let placed = if let ModelInit::Path(init) = &cfg.model.init {
            let dir = checkpoint::resolve_model_dir(init)?;
            let placed = load(&dir).context("model.init")?;
            if let Some(mc) = cfg.model_config()? {
                if !mc.same_model(&placed.0.cfg) {
                    bail!("model.init {}: its shape differs from the configured model", dir.display());
                }
            }
            placed
        } else {
            let mc = cfg.model_config()?.context("model: give a preset or the model fields (or model.init = PATH)")?;
            check_host_memory(&cfg, &mc)?;
            let w = random_weights(&mc, cfg.train.seed)?;
            if sharded {
                place(Llama::new(mc, Cpu::new(), w.map(CpuBuf::from))?, backend.clone(), node)?
            } else {
                (Llama::from_host(mc, backend.clone(), &w)?, None)
            }
        };
        let state = TrainerState {
            step: 0,
            tokens: 0,
            mix: Default::default(),
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            guard: Default::default(),
        };
        (placed, None, state)
    };
    let (model, host_weights) = placed;
    check_host_memory(&cfg, &model.cfg)?;
    tokenizer.check_vocab_for_training(model.cfg.vocab_size, "the model")?;
    if cfg.data.seq_len > model.cfg.max_seq_len {
        bail!("data.seq_len {} exceeds the model's max_seq_len {}", cfg.data.seq_len, model.cfg.max_seq_len);
    }
    let sources = open_sources(&cfg, &cfg.tokenizer.path.clone(), &tok_sha, model.cfg.vocab_size, args.verbose)?;
    let mut tokenizer_files = vec![("tokenizer.json".to_string(), tok_bytes)];
    if let Some(c) = tok_config {
        tokenizer_files.push(("tokenizer_config.json".to_string(), c));
    }
    let group = if cfg.parallel.world_size > 1 { open_group(&cfg)? } else { Vec::new() };
    Trainer::new(TrainerParts {
        cfg,
        model,
        host_weights,
        moments,
        group,
        node,
        state,
        sources,
        run_dir,
        tokenizer,
        tokenizer_files,
        bos,
        eos,
        peak_flops,
        run_lock,
    })
}

/// On the CPU, a run that cannot fit in this machine's memory is refused before it allocates (it
/// would abort, or be killed by the OOM killer minutes later). The estimate is a floor: f32
/// weights, gradients and both AdamW moments, plus the activations of a micro-batch and its logits.
fn check_host_memory(cfg: &RunConfig, mc: &LlamaConfig) -> Result<()> {
    if cfg.parallel.device != Device::Cpu {
        return Ok(());
    }
    let Some(total) = crate::backend::cpu::host_memory_bytes() else { return Ok(()) };
    let params = mc.n_params() as f64;
    let rows = (cfg.train.micro_batch * cfg.data.seq_len) as f64;
    let per_row = (mc.n_layer * (8 * mc.d_model + 3 * mc.d_ff) + mc.vocab_size) as f64;
    let need = 4.0 * (4.0 * params + rows * per_row);
    if need > total as f64 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        bail!(
            "this run needs at least {:.1} GiB of memory ({:.1}M parameters with gradients and AdamW moments, \
             activations of train.micro_batch × data.seq_len = {} tokens); this machine has {:.1} GiB",
            gib(need),
            params / 1e6,
            rows,
            gib(total as f64)
        );
    }
    Ok(())
}

/// The trainer's model, and under FSDP the host f32 weights its shards start from.
type Placed<B> = (Llama<B>, Option<Weights<Vec<f32>>>);

/// Under FSDP the f32 masters go from the host to the rank shards, so the trainer's own model (which
/// only evaluates and samples) gets just the compute-precision copy on `backend`, none on a node
/// that does not lead, and the device never holds the whole model's masters. Returns the model
/// and the host weights for the shards.
fn place<B: Backend>(host: Llama<Cpu>, backend: B, node: NodeRole) -> Result<Placed<B>> {
    let Llama { cfg, weights, .. } = host;
    // Moved out of their buffers, not copied: the shards are cut from these host values.
    let weights = weights.map(CpuBuf::into_vec);
    let mut it = weights.iter().into_iter();
    let eval = Weights::try_build(&cfg, |_| {
        let w = it.next().expect("same config, same tensors");
        if node.leads() {
            backend.upload_as(w, Role::Activation)
        } else {
            backend.zeros_as(1, Role::Activation)
        }
    })?;
    Ok((Llama::new(cfg, backend, eval)?, Some(weights)))
}

/// A resume that finds no checkpoint would start over from step 0 and drop the run's history.
/// That is refused when the history says a checkpoint was written (the checkpoints were moved
/// or deleted), and on an explicit `--resume` when any step was recorded; only the demo's
/// one command quietly starts over a run that never reached its first checkpoint.
fn check_no_history_lost(run: &Path, explicit: bool) -> Result<()> {
    let p = run.join("metrics.jsonl");
    let Ok(bytes) = std::fs::read(&p) else { return Ok(()) };
    let (mut steps, mut saved) = (None, None);
    for v in String::from_utf8_lossy(&bytes).lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        let step = v.get("step").and_then(|s| s.as_u64());
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("step") => steps = steps.max(step),
            Some("checkpoint") => saved = saved.max(step),
            _ => {}
        }
    }
    if let Some(at) = saved {
        bail!(
            "{}: holds no checkpoint, but {} records one at step {at} (moved or deleted?); nothing was changed",
            checkpoint::checkpoints_dir(run).display(),
            p.display()
        );
    }
    if let (Some(last), true) = (steps, explicit) {
        bail!(
            "{}: no checkpoint yet, but {} records steps up to {last}; resuming would start over and drop them \
             (delete metrics.jsonl to start the run over)",
            run.display(),
            p.display()
        );
    }
    Ok(())
}

/// On resume, drops metric records past the checkpoint so replayed steps are not duplicated.
fn truncate_metrics(run: &Path, step: u64) -> Result<()> {
    let p = run.join("metrics.jsonl");
    let Ok(bytes) = std::fs::read(&p) else { return Ok(()) };
    // Lossy, and only lines that parse are kept: a damaged file is repaired, not appended to.
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_file(&p, out.as_bytes())
}
