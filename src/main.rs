//! The `kiln` command line: parse, call into the library, map errors to exit codes.
//! Every error is one line naming the file and the problem; the exit code is 2.

use clap::{Parser, Subcommand};
use kiln::cli::bench_command::BenchCommand;
use kiln::cli::{check_sampling, eval, generate, parse_ids, positive, score};
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
    /// Plot loss, learning rate and throughput of a run, or of several overlaid (PNG or SVG)
    Plot {
        /// One run directory, or several to compare (drawn against tokens, one colour each)
        #[arg(num_args = 1.., required = true, value_name = "RUN_DIR")]
        run_dirs: Vec<PathBuf>,
        /// Output file (.png or .svg); default RUN_DIR/plot.png for one run, compare.png for several
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the runs under DIR (default runs/): live or stopped, step, tokens, losses, tokens/s, checkpoint
    Runs { dir: Option<PathBuf> },
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
    Bench(BenchCommand),
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
        Command::Plot { run_dirs, out } => {
            let out = match (out, &run_dirs[..]) {
                (Some(out), _) => out,
                (None, [one]) => one.join("plot.png"),
                // Not inside any one of the runs: a comparison belongs to none of them.
                (None, _) => PathBuf::from("compare.png"),
            };
            kiln::cli::plot::plot_runs(&run_dirs, &out)?;
            kiln::out!("{}", out.display())?;
        }
        Command::Runs { dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("runs"));
            let runs = kiln::cli::runs::list(&dir)?;
            if runs.is_empty() {
                kiln::out!("{}: no runs (a run is a directory with a metrics.jsonl)", dir.display())?;
            } else {
                kiln::out!("{}", kiln::cli::runs::table(&runs).trim_end())?;
            }
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
        Command::Bench(b) => b.run()?,
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
