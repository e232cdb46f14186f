//! The `kiln` command line: parse, call into the library, map errors to exit codes.
//! Every error is one line naming the file and the problem; the exit code is 2.

use clap::{Parser, Subcommand};
use kiln::cli::{bench, eval, generate, parse_ids, score};
use kiln::model::sampling::SamplingParams;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Pretrain Llama-family language models the TinyLlama way")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print per-token log-probabilities of a sequence as JSON
    Score {
        /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json)
        #[arg(long)]
        model: PathBuf,
        /// Text to score (encoded with BOS)
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        text: Option<String>,
        /// Token ids to score, e.g. "1 15043 3186"
        #[arg(long)]
        ids: Option<String>,
        /// cpu, or cuda (GPU 0, bf16)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate text with a KV cache (temperature 0 = greedy)
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
        temperature: f32,
        /// Keep the K most likely tokens (0 = off)
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        /// Keep the smallest set of tokens with this much probability (1 = off)
        #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print {"ids": [...], "text": "..."} instead of streaming text
        #[arg(long)]
        json: bool,
        /// cpu, or cuda (GPU 0, bf16)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Chat with a model: one message per line on stdin, replies streamed (its chat template, or plain continuation)
    Chat {
        /// Model directory, checkpoint or run directory
        #[arg(long)]
        model: PathBuf,
        /// A system message to open the conversation with
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
        top_p: f32,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, or cuda (GPU 0, bf16)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Train a model (with no CONFIG: the bundled demo, configs/demo.toml)
    Train {
        /// Run config (TOML)
        config: Option<PathBuf>,
        /// Run directory (default runs/<config name>)
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Override a config field: --set section.key=value (value parsed as TOML)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Print a line per log interval instead of the dashboard
        #[arg(long)]
        headless: bool,
        /// Run this many more optimizer steps, checkpoint and exit (the schedule still follows train.max_steps)
        #[arg(long)]
        steps: Option<u64>,
        /// Continue the run in RUN_DIR from its latest checkpoint
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "run_dir"])]
        resume: Option<PathBuf>,
        /// Start the run in the background (log in RUN_DIR/train.log) and print how to attach
        #[arg(long)]
        detach: bool,
    },
    /// Plot loss, learning rate and throughput of a run (PNG or SVG)
    Plot {
        run_dir: PathBuf,
        /// Output file (.png or .svg); default RUN_DIR/plot.png
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show the dashboard of a running job (over RUN_DIR/kiln.sock)
    Attach { run_dir: PathBuf },
    /// Zero-shot accuracy on the TinyLlama paper's commonsense suite (lm-evaluation-harness scoring)
    Eval {
        /// Model directory, checkpoint or run directory
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated tasks, or "all": hellaswag,openbookqa,winogrande,arc_easy,arc_challenge,boolq,piqa
        #[arg(long, default_value = "all")]
        tasks: String,
        /// Score only the first N items of each task
        #[arg(long)]
        limit: Option<usize>,
        /// Directory of full-size task files in the same format (default: the bundled 500-item subsets)
        #[arg(long)]
        data: Option<PathBuf>,
        /// Write one JSON line per item (per-choice log-likelihoods and predictions)
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Print one JSON object instead of the table
        #[arg(long)]
        json: bool,
        /// cpu, or cuda (GPU 0, bf16)
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Tokenize corpora into packed shards (one prepared directory per source)
    Prepare {
        /// tokenizer.json to encode with
        #[arg(long, default_value = "assets/tokenizer/llama2/tokenizer.json")]
        tokenizer: PathBuf,
        /// Output directory (a data source for `kiln train`)
        #[arg(long)]
        out: PathBuf,
        /// Field holding the text (default: "text" for jsonl, "content" for parquet)
        #[arg(long)]
        text_field: Option<String>,
        /// Fraction of documents held out for validation (0 disables it)
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        /// Files or directories of .jsonl, .jsonl.zst, .parquet or .txt
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Check a node (or a cluster) for training: the multi-node rendezvous, then NCCL collectives
    /// and bandwidth on every local GPU. Launch it like training (MASTER_ADDR, NNODES, ... or SLURM)
    CommCheck {
        /// GPUs of this node to use (default: all)
        #[arg(long)]
        gpus: Option<usize>,
        /// All-reduce size for the bandwidth figure, in MiB
        #[arg(long, default_value_t = 256)]
        megabytes: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Seconds to wait for the other nodes
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Measure throughput: CPU GEMM, training, decoding; subcommands: GPU attention, a training step, the dashboard
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        #[arg(long, default_value = "small")]
        preset: String,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// FlashAttention-2 forward + backward TFLOP/s on GPU 0 (compare: bench/torch_baseline.py)
    Attention {
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Query heads (KV heads: an eighth)
        #[arg(long)]
        heads: Option<usize>,
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// A full training step's tokens/s, MFU and peak memory (default: TinyLlama-1.1B on GPU 0)
    Train {
        /// cpu or cuda
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long, default_value = "tinyllama-1.1b")]
        preset: String,
        /// Micro-batch (sequences per step)
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Timed steps
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Recompute each block's activations in the backward
        #[arg(long)]
        recompute: bool,
        /// Then time every op kind over two more steps (ops synchronised: where the time goes)
        #[arg(long)]
        profile: bool,
        /// Also time the sharded engine (FSDP) over N ranks (GPUs 0..N, or CPU ranks) on the same
        /// micro-batch, split between them; 1 measures what sharding costs on one device
        #[arg(long, value_name = "N")]
        fsdp: Option<usize>,
    },
    /// Training throughput with the dashboard open against headless, and an idle dashboard's CPU
    Dashboard {
        #[arg(long, default_value = "configs/demo.toml")]
        config: PathBuf,
        /// Steps per run
        #[arg(long, default_value_t = 60)]
        steps: u64,
        /// Headless/dashboard pairs, interleaved
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// Steps left out of each run's median
        #[arg(long, default_value_t = 10)]
        warmup: u64,
        /// Seconds a paused dashboard is watched (0 skips it)
        #[arg(long, default_value_t = 20)]
        idle_secs: u64,
        /// Terminal size as COLSxROWS
        #[arg(long, default_value = "160x48")]
        size: String,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Score { model, text, ids, device } => {
            let input = match (text.as_deref(), ids) {
                (Some(t), _) => score::ScoreInput::Text(t),
                (None, Some(ids)) => score::ScoreInput::Ids(parse_ids(&ids)?),
                (None, None) => anyhow::bail!("give --text or --ids"),
            };
            let scores = score::run(&model, input, &device)?;
            kiln::out!("{}", serde_json::to_string(&scores)?)?;
        }
        Command::Chat { model, system, temperature, top_p, max_tokens, seed, device } => {
            check_sampling(temperature, top_p)?;
            positive("--max-tokens", max_tokens)?;
            let args = kiln::cli::chat::ChatArgs { system, temperature, top_p, max_tokens, seed };
            kiln::cli::chat::run(&model, args, &device)?;
        }
        Command::Generate { model, prompt, max_new_tokens, temperature, top_k, top_p, seed, json, device } => {
            positive("--max-new-tokens", max_new_tokens)?;
            check_sampling(temperature, top_p)?;
            let args = generate::GenerateArgs {
                prompt: &prompt,
                max_new_tokens,
                sampling: SamplingParams { temperature, top_k, top_p },
                seed,
                stream: !json,
            };
            let g = generate::run(&model, args, &device)?;
            if json {
                kiln::out!("{}", serde_json::to_string(&g)?)?;
            }
            let n = g.ids.len();
            kiln::note!(
                "{n} tokens in {:.2} s ({:.1} tokens/s); prompt {} tokens in {:.2} s",
                g.decode_secs,
                n as f64 / g.decode_secs.max(1e-9),
                g.prompt_tokens,
                g.prefill_secs
            );
        }
        Command::Train { steps: Some(0), .. } => anyhow::bail!("--steps must be at least 1"),
        Command::Train { config, run_dir, sets, headless: _, steps, resume, detach: true } => {
            let args =
                kiln::train::run::TrainArgs { config, run_dir, sets, steps, resume, verbose: true, dashboard: false };
            kiln::train::run::detach(&args)?;
        }
        Command::Attach { run_dir } => kiln::tui::attach::attach(&run_dir)?,
        Command::Plot { run_dir, out } => {
            let out = out.unwrap_or_else(|| run_dir.join("plot.png"));
            kiln::cli::plot::plot(&run_dir, &out, 0)?;
            kiln::out!("{}", out.display())?;
        }
        Command::Train { config, run_dir, sets, headless, steps, resume, detach: false } => {
            use std::io::IsTerminal;
            // The dashboard needs a terminal on both ends; otherwise (or with --headless) a line per
            // log interval.
            let dashboard = !headless && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
            let args = kiln::train::run::TrainArgs { config, run_dir, sets, steps, resume, verbose: true, dashboard };
            kiln::train::run::train(args)?;
        }
        Command::Eval { model, tasks, limit, data, predictions, json, device } => {
            let args = eval::EvalArgs {
                model: model.clone(),
                tasks: kiln::eval::tasks::task_list(&tasks)?,
                limit,
                data,
                predictions,
                progress: !json,
                device,
            };
            let out = eval::run(&args)?;
            if json {
                kiln::out!("{}", eval::json_report(&out, &model))?;
            } else {
                kiln::out!("{}", kiln::eval::report::table(&out.results).trim_end_matches('\n'))?;
                kiln::out!(
                    "{} items in {:.1} s ({:.1} items/s)",
                    out.items,
                    out.secs,
                    out.items as f64 / out.secs.max(1e-9)
                )?;
            }
        }
        Command::Prepare { tokenizer, out, text_field, val_fraction, inputs } => {
            let args = kiln::data::prepare::PrepareArgs {
                tokenizer,
                out,
                inputs,
                text_field,
                val_fraction,
                shard_tokens: kiln::data::prepare::DEFAULT_SHARD_TOKENS,
                progress: true,
            };
            let s = kiln::data::prepare::prepare(&args)?;
            kiln::out!("{}", kiln::cli::prepare_summary(&s, &args.out))?;
        }
        Command::CommCheck { gpus, megabytes, iters, timeout } => {
            let args = kiln::cli::comm_check::CommCheckArgs {
                gpus,
                megabytes,
                iters,
                timeout: std::time::Duration::from_secs(timeout),
            };
            for line in kiln::cli::comm_check::run(&args)? {
                kiln::out!("{line}")?;
            }
        }
        Command::Bench { what: Some(BenchWhat::Attention { batch, seq, head_dim, heads, iters }), .. } => {
            // d_model 2048 as in TinyLlama unless told otherwise.
            let heads = heads.unwrap_or((2048 / head_dim.max(1)).max(1));
            let args = kiln::cli::bench_attention::AttentionBenchArgs { batch, seq, head_dim, heads, iters };
            for (k, v) in kiln::cli::bench_attention::run(&args)? {
                kiln::out!("{k:<24} {v}")?;
            }
        }
        Command::Bench {
            what: Some(BenchWhat::Train { device, preset, batch, seq, steps, warmup, recompute, profile, fsdp }),
            ..
        } => {
            let args = kiln::cli::bench_train::TrainBenchArgs {
                device,
                preset,
                batch: positive("--batch", batch)?,
                seq: positive("--seq", seq)?,
                steps: positive("--steps", steps)?,
                warmup,
                recompute,
                profile,
                fsdp,
            };
            for (k, v) in kiln::cli::bench_train::run(&args)? {
                kiln::out!("{k:<28} {v}")?;
            }
        }
        Command::Bench {
            what: Some(BenchWhat::Dashboard { config, steps, pairs, warmup, idle_secs, size }), ..
        } => {
            let (cols, rows) = size
                .split_once('x')
                .and_then(|(c, r)| Some((c.parse().ok()?, r.parse().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--size {size}: expected COLSxROWS, e.g. 160x48"))?;
            let args = kiln::cli::bench_dashboard::DashboardBenchArgs {
                config,
                steps: steps.max(warmup + 1),
                pairs: positive("--pairs", pairs)?,
                warmup,
                idle_secs,
                cols,
                rows,
            };
            for (k, v) in kiln::cli::bench_dashboard::run(&args)? {
                kiln::out!("{k:<24} {v}")?;
            }
        }
        Command::Bench { what: None, preset, batch, seq, steps, decode_tokens } => {
            let (batch, seq, steps) =
                (positive("--batch", batch)?, positive("--seq", seq)?, positive("--steps", steps)?);
            let decode_tokens = positive("--decode-tokens", decode_tokens)?;
            let report = bench::run(&bench::BenchArgs { preset, batch, seq, steps, decode_tokens })?;
            for (k, v) in report.lines {
                kiln::out!("{k:<24} {v}")?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and a bare `kiln` (the help, on stderr)
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.exit()
        }
        Err(e) => {
            // clap's report is several lines (the error, what is missing, a tip, the usage); one
            // line carries all but the usage.
            let text = e.render().to_string();
            let said: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            kiln::note!("{} (see --help)", said.join(" ").replace(": tip:", ";").replace(" tip:", ";"));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            kiln::note!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(2)
        }
    }
}

/// A count that must be at least 1 (a benchmark of nothing is a mistake, not a request).
fn positive(flag: &str, n: usize) -> anyhow::Result<usize> {
    if n == 0 {
        anyhow::bail!("{flag} must be at least 1");
    }
    Ok(n)
}

fn check_sampling(temperature: f32, top_p: f32) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        anyhow::bail!("--top-p must be in (0, 1]");
    }
    if temperature < 0.0 || !temperature.is_finite() {
        anyhow::bail!("--temperature must be a non-negative number");
    }
    Ok(())
}
