//! What the engine reports. Headless output prints these; metrics.jsonl records them; the
//! dashboard renders them. The engine never knows who listens.

use crate::chat::service::ChatRequest;
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
    /// On logged steps (`train.log_every`): the gradient norm of each unit before clipping, the
    /// embedding first, then each block, then the final norm with the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_grad_norms: Option<Vec<f64>>,
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
    /// The step guard refused a step's update (see `train::guard`).
    Guard {
        step: u64,
        /// Training tokens consumed after this step (its batch counts as consumed).
        #[serde(default)]
        tokens: u64,
        reason: String,
        /// The step's mean loss and gradient norm (absent when not finite).
        loss: Option<f64>,
        grad_norm: Option<f64>,
        /// Standard deviations above the running mean, for a spike.
        z: Option<f64>,
        /// "skip", "pause" or "stop".
        action: String,
        /// Steps skipped in a row, this one included.
        in_a_row: u32,
    },
    /// The next piece of a chat reply (to viewers only, never to metrics.jsonl).
    ChatToken {
        id: u64,
        text: String,
    },
    /// A chat reply ended.
    ChatDone {
        /// The request's id.
        id: u64,
        /// The training step whose weights answered.
        step: u64,
        tokens: usize,
        tokens_per_s: f64,
        /// "end of turn", "token limit", "context full", "stopped" or "error: ...".
        ended: String,
        /// Oldest messages left out to fit the model's context.
        dropped: usize,
    },
    /// To one viewer of the run's socket only: it fell behind, and this many events went past it.
    Lagged {
        missed: u64,
    },
}

/// What a viewer (the dashboard, an attached client) may ask of the engine. Handled at step
/// boundaries, except `ChatStop`, which reaches the chat worker directly; the engine never waits on
/// a viewer.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Pause or resume at the next step boundary.
    TogglePause,
    /// Pause (true) or resume (false); idempotent, so several viewers cannot undo each other.
    SetPaused(bool),
    CheckpointNow,
    SampleNow,
    EvalNow,
    /// Checkpoint and stop.
    Stop,
    /// Reply to a conversation with the current weights.
    Chat(ChatRequest),
    /// Stop the reply with this id.
    ChatStop(u64),
}

impl Command {
    /// The line a viewer sends over the run's socket: one word for the simple commands
    /// (`pause`, `pause on`, `pause off`, `checkpoint`, `sample`, `eval`, `stop`), `chat {json}`
    /// and `chat-stop ID`.
    pub fn wire(&self) -> String {
        match self {
            Command::TogglePause => "pause".into(),
            Command::SetPaused(true) => "pause on".into(),
            Command::SetPaused(false) => "pause off".into(),
            Command::CheckpointNow => "checkpoint".into(),
            Command::SampleNow => "sample".into(),
            Command::EvalNow => "eval".into(),
            Command::Stop => "stop".into(),
            Command::Chat(r) => format!("chat {}", serde_json::to_string(r).unwrap_or_default()),
            Command::ChatStop(id) => format!("chat-stop {id}"),
        }
    }

    pub fn from_wire(line: &str) -> Option<Command> {
        let line = line.trim();
        let (word, rest) = line.split_once(' ').map_or((line, ""), |(w, r)| (w, r.trim()));
        Some(match (word, rest) {
            ("pause", "") => Command::TogglePause,
            ("pause", "on") => Command::SetPaused(true),
            ("pause", "off") => Command::SetPaused(false),
            ("checkpoint", "") => Command::CheckpointNow,
            ("sample", "") => Command::SampleNow,
            ("eval", "") => Command::EvalNow,
            ("stop", "") => Command::Stop,
            ("chat", json) => Command::Chat(serde_json::from_str(json).ok()?),
            ("chat-stop", id) => Command::ChatStop(id.parse().ok()?),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;

    #[test]
    fn commands_survive_the_wire() {
        let chat = ChatRequest {
            id: 7,
            messages: vec![Message::new("user", "hi\nthere")],
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 64,
        };
        for c in [
            Command::TogglePause,
            Command::SetPaused(true),
            Command::SetPaused(false),
            Command::CheckpointNow,
            Command::SampleNow,
            Command::EvalNow,
            Command::Stop,
            Command::Chat(chat),
            Command::ChatStop(7),
        ] {
            let w = c.wire();
            assert!(!w.contains('\n'), "one line: {w}");
            assert_eq!(Command::from_wire(&w), Some(c));
        }
        assert_eq!(Command::from_wire("pause sideways"), None);
        assert_eq!(Command::from_wire("chat {"), None);
    }
}
