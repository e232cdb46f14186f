//! Dashboard state: everything the view shows, updated from engine events and key actions.

use super::chat::ChatPane;
use super::theme::Theme;
use crate::train::events::{Event, RankMetrics};
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
pub(super) const WINDOWS: [usize; 5] = [50, 200, 1000, 5000, 0];

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
    /// Steps whose update the step guard refused: `(step, tokens)`, marked on the loss chart.
    pub guards: Vec<(u64, u64)>,
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
    /// Where metrics.jsonl lives, for `x` (export the view as a PNG).
    pub run_dir: Option<std::path::PathBuf>,
    /// A plot export is running on its own thread (`export`, `export_done`).
    pub(super) exporting: bool,
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
            guards: Vec::new(),
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
            run_dir: None,
            exporting: false,
            chat: ChatPane::default(),
            leave_on_hangup: false,
        }
    }

    pub fn theme(&self) -> &Theme {
        &self.themes[self.theme]
    }

    pub(super) fn note(&mut self, line: String) {
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
            Event::Guard { step, tokens, reason, action, .. } => {
                if !self.guards.iter().any(|g| g.0 == *step) {
                    self.guards.push((*step, *tokens));
                }
                self.note(format!("step {step}: guard: {reason}, {action}"));
            }
            Event::ChatToken { .. } | Event::ChatDone { .. } => self.on_chat_event(e),
            Event::Lagged { missed } => {
                self.note(format!("this viewer fell behind: {missed} events went past it (the run goes on)"))
            }
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
}
