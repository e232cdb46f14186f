//! The step loop. One loop serves one process and a run over several nodes: every collective (the
//! step; consolidating the weights for eval, samples, chat and checkpoints) must be entered by all
//! nodes together, so at each step boundary they agree, in one all-reduce of a few flags, on what
//! happens next. On one node the agreement is the node's own wishes. Commands come from node 0's
//! viewers only; SIGINT / SIGTERM on any node stops every node after a checkpoint.

use super::events::{Command, Event, StepMetrics};
use super::guard::Trip;
use super::signals;
use super::trainer::{RunEnd, Trainer};
use crate::backend::Backend;
use crate::chat::service::ChatRequest;
use crate::config::GuardAction;
use anyhow::{bail, Result};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// How long a paused run waits for a command before it agrees again (and looks at the signals).
const PAUSED_POLL: Duration = Duration::from_millis(200);

/// What a node wants at a step boundary. Agreed flag by flag: one node wanting it is enough.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Wants {
    paused: bool,
    stop: bool,
    checkpoint: bool,
    sample: bool,
    eval: bool,
    /// Chat requests wait for a snapshot of the weights.
    snapshot: bool,
}

impl Wants {
    fn to_flags(self) -> [f32; 6] {
        [self.paused, self.stop, self.checkpoint, self.sample, self.eval, self.snapshot].map(|b| f32::from(u8::from(b)))
    }

    fn from_flags(f: &[f32]) -> Wants {
        let on = |i: usize| f.get(i).is_some_and(|&v| v > 0.0);
        Wants { paused: on(0), stop: on(1), checkpoint: on(2), sample: on(3), eval: on(4), snapshot: on(5) }
    }
}

impl<B: Backend> Trainer<B> {
    /// Trains until step `until` (capped at `train.max_steps`), then checkpoints.
    pub fn run(&mut self, until: u64, on_event: &mut dyn FnMut(&Event)) -> Result<RunEnd> {
        self.run_with_commands(until, None, on_event)
    }

    /// `run`, also obeying viewer commands at step boundaries. While paused it waits for them; a
    /// viewer that goes away resumes training.
    pub fn run_with_commands(
        &mut self,
        until: u64,
        commands: Option<&Receiver<Command>>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<RunEnd> {
        let until = until.min(self.cfg.train.max_steps);
        if self.state.step >= until {
            let message =
                format!("nothing to do: the run is at step {} of {}", self.state.step, self.cfg.train.max_steps);
            on_event(&Event::Log { step: self.state.step, message });
            return Ok(RunEnd::Done);
        }
        let mut paused = false;
        let mut chats = Vec::new();
        loop {
            let mut want = Wants::default();
            if let Some(rx) = commands {
                self.take_commands(rx, &mut paused, &mut want, &mut chats, on_event)?;
            }
            want.paused = paused;
            want.snapshot = !chats.is_empty();
            want.stop |= signals::stop_requested();
            let agreed = self.agree(want)?;
            if agreed.snapshot {
                self.sync_model()?;
                for req in chats.drain(..) {
                    self.submit_chat(req, on_event)?;
                }
            }
            if agreed.eval {
                self.eval_and_report(on_event)?;
            }
            if agreed.sample {
                self.sample_and_report(on_event)?;
            }
            if agreed.checkpoint {
                self.checkpoint_and_report(on_event)?;
            }
            if agreed.stop {
                self.checkpoint_unless_current(on_event)?;
                return Ok(RunEnd::Interrupted);
            }
            if self.state.step >= until {
                break;
            }
            if !agreed.paused && self.step_and_schedule(until, on_event)? && self.node.leads() {
                // Every node saw the same refused step; node 0's pause reaches the others through
                // the agreement, and only its viewers can resume the run.
                if commands.is_none() {
                    bail!("step guard: the run would pause at step {}, but it has no viewer to resume it; stopping, the last checkpoint is kept", self.state.step);
                }
                paused = true;
                self.emit(Event::Paused { step: self.state.step, paused }, on_event)?;
            }
        }
        self.checkpoint_unless_current(on_event)?;
        Ok(RunEnd::Done)
    }

    /// Takes the commands waiting; while paused, waits a little for one first.
    fn take_commands(
        &mut self,
        rx: &Receiver<Command>,
        paused: &mut bool,
        want: &mut Wants,
        chats: &mut Vec<ChatRequest>,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<()> {
        loop {
            let cmd = if *paused {
                match rx.recv_timeout(PAUSED_POLL) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Disconnected) => Command::SetPaused(false),
                    Err(RecvTimeoutError::Timeout) => return Ok(()),
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(()),
                }
            };
            match cmd {
                Command::TogglePause | Command::SetPaused(_) => {
                    let p = if let Command::SetPaused(p) = cmd { p } else { !*paused };
                    if p != *paused {
                        *paused = p;
                        self.emit(Event::Paused { step: self.state.step, paused: p }, on_event)?;
                    }
                }
                Command::Chat(req) => chats.push(req),
                Command::ChatStop(id) => {
                    if let Some(c) = &self.chat {
                        c.stop(id);
                    }
                }
                Command::CheckpointNow => want.checkpoint = true,
                Command::SampleNow => want.sample = true,
                Command::EvalNow => want.eval = true,
                Command::Stop => want.stop = true,
            }
        }
    }

    /// On one node, what it wants; over several, what any of them wants.
    fn agree(&mut self, want: Wants) -> Result<Wants> {
        if self.node.count == 1 {
            return Ok(want);
        }
        Ok(Wants::from_flags(&self.engine.agree_across_nodes(&want.to_flags())?))
    }

    /// One step, then what the schedule asks for at it: eval, samples, a checkpoint. Every node
    /// runs the same schedule. Returns whether the step guard asks the run to pause.
    fn step_and_schedule(&mut self, until: u64, on_event: &mut dyn FnMut(&Event)) -> Result<bool> {
        let (ev, sa, ck) = (self.cfg.eval.every_steps, self.cfg.sample.every_steps, self.cfg.checkpoint.every_steps);
        let (m, trip) = self.step()?;
        let step = m.step;
        let mut pause = false;
        match trip {
            Some(trip) => pause = self.guard_acts(trip, &m, on_event)?,
            None if !m.loss.is_finite() => {
                // The guard is off: nothing stopped the update, and the weights are lost.
                let e = Event::Log { step, message: format!("loss is {} at step {step}: stopping", m.loss) };
                self.emit(e, on_event)?;
                bail!("training diverged: loss {} at step {step} (last good checkpoint kept)", m.loss);
            }
            None => self.emit(Event::Step(m), on_event)?,
        }
        if ev > 0 && step % ev == 0 {
            self.eval_and_report(on_event)?;
        }
        if sa > 0 && step % sa == 0 {
            self.sample_and_report(on_event)?;
        }
        // The last step's checkpoint is written when the loop ends.
        if ck > 0 && step % ck == 0 && step < until {
            self.checkpoint_and_report(on_event)?;
        }
        Ok(pause)
    }

    /// Records a step the guard refused and does what `[guard]` says: skip (pausing after
    /// `max_consecutive` skips in a row), pause, or stop. Returns whether to pause.
    fn guard_acts(&mut self, trip: Trip, m: &StepMetrics, on_event: &mut dyn FnMut(&Event)) -> Result<bool> {
        let g = &self.cfg.guard;
        let in_a_row = self.state.guard.consecutive;
        let action = match g.action {
            GuardAction::Skip if g.max_consecutive > 0 && in_a_row >= g.max_consecutive => GuardAction::Pause,
            a => a,
        };
        let window = &self.state.guard;
        let z = match trip {
            Trip::LossSpike => window.z_of(m.loss, |x| x.0),
            Trip::NormSpike => window.z_of(m.grad_norm, |x| x.1),
            Trip::NonFinite => None,
        };
        let finite = |v: f64| v.is_finite().then_some(v);
        let action_name = match action {
            GuardAction::Skip => "skip",
            GuardAction::Pause => "pause",
            GuardAction::Stop => "stop",
        };
        let e = Event::Guard {
            step: m.step,
            tokens: m.tokens,
            reason: trip.reason().into(),
            loss: finite(m.loss),
            grad_norm: finite(m.grad_norm),
            z,
            action: action_name.into(),
            in_a_row,
        };
        self.emit(e, on_event)?;
        match action {
            GuardAction::Skip => Ok(false),
            GuardAction::Pause => Ok(true),
            GuardAction::Stop => bail!(
                "step guard: {} at step {} (loss {}, gradient norm {}); stopping, the last checkpoint is kept",
                trip.reason(),
                m.step,
                m.loss,
                m.grad_norm
            ),
        }
    }

    fn eval_and_report(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        for e in self.evaluate()? {
            self.emit(e, on_event)?;
        }
        Ok(())
    }

    fn sample_and_report(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        for e in self.samples()? {
            self.emit(e, on_event)?;
        }
        Ok(())
    }

    /// Checkpoints unless the latest checkpoint already holds this step.
    fn checkpoint_unless_current(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        if self.last_checkpoint_step != Some(self.state.step) {
            self.checkpoint_and_report(on_event)?;
        }
        Ok(())
    }

    fn checkpoint_and_report(&mut self, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let p = self.checkpoint()?;
        let e = Event::Checkpoint { step: self.state.step, path: p.display().to_string() };
        self.emit(e, on_event)
    }
}

#[cfg(test)]
mod tests {
    use super::Wants;

    #[test]
    fn wants_survive_the_agreement_flags_and_any_node_is_enough() {
        let w = Wants { paused: true, eval: true, snapshot: true, ..Wants::default() };
        assert_eq!(Wants::from_flags(&w.to_flags()), w);
        // The all-reduce sums: one node's flag shows as 1, several as more.
        let summed = [0.0, 2.0, 0.0, 1.0, 0.0, 0.0];
        assert_eq!(Wants::from_flags(&summed), Wants { stop: true, sample: true, ..Wants::default() });
    }
}
