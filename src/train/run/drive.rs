//! Driving a built trainer: headless lines or the dashboard, the run's socket for viewers, signals
//! and the chat worker.

use super::TrainArgs;
use crate::backend::cuda::device::datasheet_bf16_flops;
use crate::backend::cuda::Cuda;
use crate::backend::Backend;
use crate::chat::service::{ChatService, ChatStopper, Sink};
use crate::config::RunConfig;
use crate::train::events::{Command, Event};
use crate::train::socket::{CloseOnDrop, Server};
use crate::train::trainer::{RunEnd, Trainer};
use anyhow::Result;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

/// One headless line per event worth printing.
pub fn headless_line(e: &Event, cfg: &RunConfig) -> Option<String> {
    match e {
        Event::Step(m) if m.step % cfg.train.log_every == 0 || m.step == 1 => {
            let wait = 100.0 * m.data_wait_ms / m.step_ms.max(1e-9);
            let left = cfg.train.max_steps.saturating_sub(m.step) as f64 * m.step_ms / 1e3;
            Some(format!(
                "step {:>6}/{} | loss {:.4} | lr {:.2e} | gnorm {:.3} | {:.0} tok/s | {:.0} ms/step | data wait {:.1}% | mfu {:.1}% | eta {}",
                m.step,
                cfg.train.max_steps,
                m.loss,
                m.lr,
                m.grad_norm,
                m.tokens_per_s,
                m.step_ms,
                wait,
                100.0 * m.mfu,
                crate::cli::eta(left)
            ))
        }
        Event::Eval { step, loss, .. } => Some(format!("eval   {step:>6} | val loss {loss:.4}")),
        Event::EvalTasks { step, results, average, .. } => {
            let per: Vec<String> = results.iter().map(|r| format!("{} {:.1}", r.task, 100.0 * r.headline())).collect();
            Some(format!("tasks  {step:>6} | avg {:.1} | {}", 100.0 * average, per.join(" | ")))
        }
        Event::Sample { step, prompt, text } => Some(format!("sample {step:>6} | {prompt}{}", text.replace('\n', " "))),
        Event::Checkpoint { step, path } => Some(format!("ckpt   {step:>6} | {path}")),
        Event::Paused { step, paused } => Some(format!("{}  {step:>6}", if *paused { "paused " } else { "resumed" })),
        Event::Log { step, message } => Some(format!("log    {step:>6} | {message}")),
        Event::Guard { step, reason, loss, grad_norm, action, .. } => {
            let shown = |v: &Option<f64>| v.map_or("non-finite".to_string(), |v| format!("{v:.4}"));
            Some(format!(
                "guard  {step:>6} | {reason}: loss {} | grad norm {} | {action}",
                shown(loss),
                shown(grad_norm)
            ))
        }
        _ => None,
    }
}

/// MFU's denominator on a GPU kiln has no datasheet figure for: an H100 SXM's dense bf16 peak.
const DEFAULT_GPU_PEAK_FLOPS: f64 = 989.4e12;

/// GPU 0 for a CUDA run (on one node or as one of several) and the bf16 peak MFU is counted
/// against. A model whose head_dim no attention kernel takes is refused here, before the run
/// directory is made, rather than at its first step.
pub(crate) fn open_gpu(cfg: &RunConfig) -> Result<(Cuda, f64)> {
    let gpu = Cuda::open(0)?;
    if let Some(model) = cfg.model_config()? {
        crate::backend::cuda::flash_attn::check_head_dim(&model)?;
    }
    let peak = datasheet_bf16_flops(&gpu.gpu().name).unwrap_or(DEFAULT_GPU_PEAK_FLOPS);
    Ok((gpu, peak))
}

/// Runs a built trainer to `--steps` or `train.max_steps`, headless or with the dashboard.
pub(crate) fn drive<B: Backend>(mut trainer: Trainer<B>, args: &TrainArgs) -> Result<RunEnd> {
    let until = match args.steps {
        Some(n) => trainer.state.step.saturating_add(n),
        None => trainer.cfg.train.max_steps,
    };
    if trainer.state.step >= until.min(trainer.cfg.train.max_steps) {
        crate::note!(
            "{}: nothing to do, the run is at step {} of {} (delete it to start over, or raise train.max_steps)",
            trainer.run_dir().display(),
            trainer.state.step,
            trainer.cfg.train.max_steps
        );
        return Ok(RunEnd::Done);
    }
    // Commands reach the engine from the dashboard and from viewers attached over the socket.
    let (cmd_tx, raw_rx) = channel();
    let server = Arc::new(Server::start(trainer.run_dir(), cmd_tx.clone())?);
    let _close_socket = CloseOnDrop(server.clone());
    // Chat replies stream to every viewer from their own thread, whatever the engine is doing.
    let (feed, inbox) = crate::tui::inbox::channel();
    let feed = args.dashboard.then_some(feed);
    let viewers = server.clone();
    let sink: Sink = Arc::new(move |e: &Event| {
        viewers.broadcast(e);
        if let Some(feed) = &feed {
            feed.send(e.clone());
        }
    });
    let chat = ChatService::start(trainer.chat_format()?, sink.clone())?;
    let cmd_rx = route(raw_rx, chat.stopper())?;
    trainer.attach_chat(chat);
    if args.dashboard {
        return train_with_dashboard(trainer, until, sink, inbox, cmd_tx, cmd_rx);
    }
    if args.verbose {
        let c = &trainer.model.cfg;
        crate::note!(
            "kiln train: {} | {:.1}M params | {} | run dir {} | step {} → {} | attach: kiln attach {}",
            trainer.model.backend.name(),
            c.n_params() as f64 / 1e6,
            format_args!(
                "seq {} × micro-batch {} × accum {} × world {}",
                trainer.cfg.data.seq_len,
                trainer.cfg.train.micro_batch,
                trainer.cfg.train.grad_accum,
                trainer.cfg.parallel.world_size
            ),
            trainer.run_dir().display(),
            trainer.state.step,
            until.min(trainer.cfg.train.max_steps),
            trainer.run_dir().display()
        );
    }
    let cfg = trainer.cfg.clone();
    let verbose = args.verbose;
    let mut print = |e: &Event| {
        sink(e);
        if verbose {
            if let Some(line) = headless_line(e, &cfg) {
                crate::progress!("{line}");
            }
        }
    };
    trainer.run_with_commands(until, Some(&cmd_rx), &mut print)
}

/// The engine on its own thread, the dashboard on this one; they share only the dashboard's inbox
/// (the sink feeds it) and the command channel.
fn train_with_dashboard<B: Backend>(
    mut trainer: Trainer<B>,
    until: u64,
    sink: Sink,
    inbox: crate::tui::inbox::Inbox,
    cmd_tx: Sender<Command>,
    cmd_rx: Receiver<Command>,
) -> Result<RunEnd> {
    use crate::tui::{app::App, term, theme};
    let title = format!(
        "{} · {:.1}M params · {}",
        trainer.run_dir().display(),
        trainer.model.cfg.n_params() as f64 / 1e6,
        trainer.model.backend.name()
    );
    let run_dir = trainer.run_dir().to_path_buf();
    let mut app =
        App::new(title, trainer.cfg.train.max_steps, theme::themes(theme::ColorMode::detect()), term::utf8_locale());
    app.run_dir = Some(run_dir.clone());
    let engine = std::thread::Builder::new().name("kiln-engine".into()).spawn(move || {
        let mut send = |e: &Event| sink(e);
        trainer.run_with_commands(until, Some(&cmd_rx), &mut send)
    })?;
    let ui = term::run(app, inbox, cmd_tx);
    if let Ok(true) = ui {
        crate::note!(
            "detached: training goes on in process {}; attach again with `kiln attach {}`",
            std::process::id(),
            run_dir.display()
        );
    }
    let end = engine.join().map_err(|_| anyhow::anyhow!("the training engine panicked"))??;
    ui?;
    Ok(end)
}

/// Passes viewer commands on to the engine, except stop requests for chat replies, which go
/// straight to the chat worker (the engine only reads commands between steps).
fn route(raw: Receiver<Command>, chat: ChatStopper) -> Result<Receiver<Command>> {
    let (tx, rx) = channel();
    std::thread::Builder::new().name("kiln-commands".into()).spawn(move || {
        for c in raw {
            match c {
                Command::ChatStop(id) => chat.stop(id),
                other => {
                    if tx.send(other).is_err() {
                        return;
                    }
                }
            }
        }
    })?;
    Ok(rx)
}
