//! What the engine reports. Headless output prints these; metrics.jsonl records them; the
//! dashboard will render them. The engine never knows who listens.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    /// Before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub data_wait_ms: f64,
    /// Model FLOPs per second over the device's peak (on CPU: the measured GEMM peak).
    pub mfu: f64,
    /// Wall-clock time at the end of the step (Unix seconds).
    pub time: f64,
    /// One entry per rank (one for single-device training).
    pub ranks: Vec<RankMetrics>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankMetrics {
    pub rank: usize,
    pub tokens_per_s: f64,
    /// Parameters, gradients and optimizer state this rank keeps between steps (MB).
    pub state_mb: f64,
    /// Peak of the above plus transiently gathered units and their gradients during the step (MB).
    pub peak_mb: f64,
    pub comm_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Step(StepMetrics),
    Eval {
        step: u64,
        tokens: u64,
        loss: f64,
        per_source: Vec<(String, f64)>,
    },
    Sample {
        step: u64,
        prompt: String,
        text: String,
    },
    /// Commonsense accuracies (the TinyLlama paper's metric per task) on the current weights.
    EvalTasks {
        step: u64,
        tokens: u64,
        results: Vec<crate::eval::report::TaskResult>,
        average: f64,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    /// Training paused (or resumed) at a step boundary.
    Paused {
        step: u64,
        paused: bool,
    },
    Log {
        step: u64,
        message: String,
    },
}

/// What a viewer (the dashboard, later an attached client) may ask of the engine. Handled at step
/// boundaries; the engine never waits on the viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Pause or resume at the next step boundary.
    TogglePause,
    CheckpointNow,
    SampleNow,
    EvalNow,
    /// Checkpoint and stop.
    Stop,
}

impl Command {
    /// The one-word form viewers send over the run's socket.
    pub fn wire(self) -> &'static str {
        match self {
            Command::TogglePause => "pause",
            Command::CheckpointNow => "checkpoint",
            Command::SampleNow => "sample",
            Command::EvalNow => "eval",
            Command::Stop => "stop",
        }
    }

    pub fn from_wire(s: &str) -> Option<Command> {
        [Command::TogglePause, Command::CheckpointNow, Command::SampleNow, Command::EvalNow, Command::Stop]
            .into_iter()
            .find(|c| c.wire() == s.trim())
    }
}
