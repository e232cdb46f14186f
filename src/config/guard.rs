//! `[guard]`: the step guard's rule and what it does when a step trips it (see `train::guard`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// What the guard does with a step that tripped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardAction {
    /// No update: weights and moments stay as they were; the batch counts as consumed.
    Skip,
    /// Skip the update, then pause the run (the dashboard shows why).
    Pause,
    /// Skip the update and end the run with an error; the last checkpoint stays as it was.
    Stop,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardSection {
    pub enabled: bool,
    /// A loss or gradient norm more than `z` standard deviations above its running mean is a spike.
    pub z: f64,
    /// Applied steps the running mean and deviation are taken over.
    pub window: usize,
    /// Applied steps seen before spikes are judged (non-finite values always are).
    pub min_steps: usize,
    pub action: GuardAction,
    /// Skips in a row after which the run pauses instead (0: never).
    pub max_consecutive: u32,
}

impl Default for GuardSection {
    fn default() -> Self {
        GuardSection {
            enabled: true,
            z: 6.0,
            window: 128,
            min_steps: 64,
            action: GuardAction::Skip,
            max_consecutive: 5,
        }
    }
}

impl GuardSection {
    pub fn validate(&self) -> Result<()> {
        if !(self.z.is_finite() && self.z > 0.0) {
            bail!("guard.z must be a positive number, not {}", self.z);
        }
        if self.window < 2 {
            bail!("guard.window must be at least 2 steps (a deviation needs two), not {}", self.window);
        }
        if self.min_steps < 2 || self.min_steps > self.window {
            bail!("guard.min_steps must be from 2 to guard.window ({}), not {}", self.window, self.min_steps);
        }
        Ok(())
    }
}
