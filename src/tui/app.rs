//! Dashboard state: everything the view shows, updated from engine events and key actions.

use super::chat::ChatPane;
use super::keymap::Action;
use super::theme::Theme;
use crate::train::events::{Command, Event, RankMetrics};
use std::collections::VecDeque;

/// One optimizer step as the dashboard keeps it.
#[derive(Clone, Debug)]
pub struct Point {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub ema: f64,
}

/// Weight of the newest point in the smoothed loss curve.
const EMA_ALPHA: f64 = 0.1;
/// Step windows that `+` / `-` move between (0 = all).
const WINDOWS: [usize; 5] = [50, 200, 1000, 5000, 0];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help,
    QuitPrompt,
}

pub struct App {
    pub title: String,
    pub max_steps: u64,
    pub points: Vec<Point>,
    pub evals: Vec<(u64, u64, f64)>,
    pub last: Option<crate::train::events::StepMetrics>,
    pub ranks: Vec<RankMetrics>,
    pub samples: VecDeque<(u64, String, String)>,
    pub log: VecDeque<String>,
    pub paused: bool,
    pub log_y: bool,
    pub x_tokens: bool,
    pub window: usize,
    pub themes: Vec<Theme>,
    pub theme: usize,
    pub overlay: Overlay,
    /// Braille charts need a UTF-8 locale; otherwise plain dots.
    pub unicode: bool,
    pub quit: bool,
    /// The viewer left; training goes on.
    pub detached: bool,
    /// Where metrics.jsonl lives, for `x` (export the view as a PNG).
    pub run_dir: Option<std::path::PathBuf>,
    /// `x` was pressed; the terminal loop renders the plot.
    pub export_requested: bool,
    /// The export running on its own thread, whose result line arrives here (`poll_export`).
    export_job: Option<std::sync::mpsc::Receiver<String>>,
    /// The chat pane (`g` or Tab).
    pub chat: ChatPane,
    /// An attached viewer leaves when its terminal goes away (the engine's own dashboard stays,
    /// headless, so training goes on).
    pub leave_on_hangup: bool,
}

impl App {
    pub fn new(title: String, max_steps: u64, themes: Vec<Theme>, unicode: bool) -> App {
        App {
            title,
            max_steps,
            points: Vec::new(),
            evals: Vec::new(),
            last: None,
            ranks: Vec::new(),
            samples: VecDeque::new(),
            log: VecDeque::new(),
            paused: false,
            log_y: false,
            x_tokens: false,
            window: 2,
            themes,
            theme: 0,
            overlay: Overlay::None,
            unicode,
            quit: false,
            detached: false,
            run_dir: None,
            export_requested: false,
            export_job: None,
            chat: ChatPane::default(),
            leave_on_hangup: false,
        }
    }

    pub fn theme(&self) -> &Theme {
        &self.themes[self.theme]
    }

    fn note(&mut self, line: String) {
        self.log.push_back(line);
        while self.log.len() > 200 {
            self.log.pop_front();
        }
    }

    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Step(m) => {
                if self.points.last().is_some_and(|p| p.step >= m.step) {
                    return; // already seen (an attached viewer replays history, then goes live)
                }
                let ema = self.points.last().map_or(m.loss, |p| p.ema + EMA_ALPHA * (m.loss - p.ema));
                self.points.push(Point { step: m.step, tokens: m.tokens, loss: m.loss, ema });
                self.ranks = m.ranks.clone();
                self.last = Some(m.clone());
            }
            Event::Eval { step, tokens, loss, .. } => {
                self.evals.push((*step, *tokens, *loss));
                self.note(format!("step {step}: eval loss {loss:.4}"));
            }
            Event::EvalTasks { step, average, .. } => {
                self.note(format!("step {step}: commonsense average {:.1}", 100.0 * average))
            }
            Event::Sample { step, prompt, text } => {
                self.samples.push_front((*step, prompt.clone(), text.clone()));
                self.samples.truncate(8);
            }
            Event::Checkpoint { step, path } => self.note(format!("step {step}: checkpoint {path}")),
            Event::Paused { step, paused } => {
                self.paused = *paused;
                self.note(format!("step {step}: {}", if *paused { "paused" } else { "resumed" }));
            }
            Event::Log { step, message } => self.note(format!("step {step}: {message}")),
            Event::ChatToken { .. } | Event::ChatDone { .. } => self.on_chat_event(e),
            Event::Lagged { missed } => {
                self.note(format!("this viewer fell behind: {missed} events went past it (the run goes on)"))
            }
        }
    }

    /// Applies a key action; returns the commands to send to the engine.
    pub fn on_action(&mut self, a: Action) -> Vec<Command> {
        if self.overlay == Overlay::QuitPrompt {
            return Vec::new(); // the prompt takes its own keys (see `on_quit_key`)
        }
        match a {
            Action::TogglePause => return vec![Command::TogglePause],
            Action::Checkpoint => return vec![Command::CheckpointNow],
            Action::Sample => return vec![Command::SampleNow],
            Action::Eval => return vec![Command::EvalNow],
            Action::Chat => {
                self.overlay = Overlay::None;
                return self.open_chat();
            }
            Action::LogY => self.log_y = !self.log_y,
            Action::WindowIn => self.window = self.window.saturating_sub(1),
            Action::WindowOut => self.window = (self.window + 1).min(WINDOWS.len() - 1),
            Action::XAxis => self.x_tokens = !self.x_tokens,
            Action::Export => self.export_requested = true,
            Action::NextTheme => self.theme = (self.theme + 1) % self.themes.len(),
            Action::Help => self.overlay = if self.overlay == Overlay::Help { Overlay::None } else { Overlay::Help },
            Action::Quit => self.overlay = Overlay::QuitPrompt,
        }
        Vec::new()
    }

    /// Keys of the quit prompt: `s` checkpoint and stop, `d` detach (training goes on), Esc (or
    /// anything else) cancel. Leaving also gives back a pause the chat pane took.
    pub fn on_quit_key(&mut self, key: Option<char>) -> Vec<Command> {
        self.overlay = Overlay::None;
        match key {
            Some('s') => {
                self.quit = true;
                vec![Command::Stop]
            }
            Some('d') => {
                self.detached = true;
                self.close_chat()
            }
            _ => Vec::new(),
        }
    }

    /// The points in the current window.
    pub fn visible(&self) -> &[Point] {
        let w = WINDOWS[self.window];
        if w == 0 || self.points.len() <= w {
            &self.points
        } else {
            &self.points[self.points.len() - w..]
        }
    }

    pub fn window_label(&self) -> String {
        match WINDOWS[self.window] {
            0 => "all steps".into(),
            w => format!("last {w} steps"),
        }
    }
}

impl App {
    /// Replays the run's history from `RUN_DIR/metrics.jsonl` (what an attaching viewer missed);
    /// lines that do not parse are skipped, as the trainer's own resume does. Returns the number
    /// of records replayed. Events that then arrive live again are ignored by step.
    pub fn replay_history(&mut self, run_dir: &std::path::Path) -> usize {
        let Ok(text) = std::fs::read_to_string(run_dir.join("metrics.jsonl")) else { return 0 };
        let mut n = 0;
        for e in text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()) {
            self.on_event(&e);
            n += 1;
        }
        n
    }

    /// Renders the current window of the run to `RUN_DIR/plot-step-N.png` on its own thread (a
    /// long run's plot takes a moment the dashboard must not freeze for); `poll_export` notes where.
    pub fn export(&mut self) {
        self.export_requested = false;
        if self.export_job.is_some() {
            self.note("export: the previous one is still running".into());
            return;
        }
        let Some(dir) = self.run_dir.clone() else {
            self.note("export: no run directory known".into());
            return;
        };
        let from = self.visible().first().map_or(0, |p| p.step);
        let step = self.points.last().map_or(0, |p| p.step);
        let out = dir.join(format!("plot-step-{step:08}.png"));
        let (tx, rx) = std::sync::mpsc::channel();
        let job = std::thread::Builder::new().name("kiln-export".into()).spawn(move || {
            let line = match crate::cli::plot::plot(&dir, &out, from) {
                Ok(()) => format!("exported {}", out.display()),
                Err(e) => format!("export failed: {e:#}"),
            };
            let _ = tx.send(line);
        });
        match job {
            Ok(_) => self.export_job = Some(rx),
            Err(e) => self.note(format!("export failed: cannot start its thread ({e})")),
        }
    }

    /// Notes the running export's result once it has one; true when the event log changed.
    pub fn poll_export(&mut self) -> bool {
        let Some(job) = &self.export_job else { return false };
        let line = match job.try_recv() {
            Ok(line) => line,
            Err(std::sync::mpsc::TryRecvError::Empty) => return false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => "export failed: its thread ended early".into(),
        };
        self.export_job = None;
        self.note(line);
        true
    }
}
