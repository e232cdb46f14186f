//! AdamW over a whole parameter set, plus global-norm clipping with torch's `clip_grad_norm_`
//! semantics (norm before clipping is what gets reported).

use super::guard::{self, UpdateCheck};
use crate::backend::{AdamW, Backend, Role};
use crate::data::loader::Batch;
use crate::model::units::unit_ranges;
use crate::model::{Llama, LlamaConfig, Weights, Workspace};
use anyhow::Result;
use std::borrow::Borrow;

pub struct AdamWState<B: Backend> {
    pub m: Weights<B::Buf>,
    pub v: Weights<B::Buf>,
}

impl<B: Backend> AdamWState<B> {
    pub fn new(model: &Llama<B>) -> Result<Self> {
        Ok(AdamWState { m: model.zeros_like_weights()?, v: model.zeros_like_weights()? })
    }

    /// One update of every tensor; `hp.step` is the 1-based optimizer step.
    pub fn step(&mut self, model: &mut Llama<B>, grads: &Weights<B::Buf>, hp: AdamW) -> Result<()> {
        let b = &model.backend;
        b.adamw_step_all(
            &mut model.weights.iter_mut(),
            &grads.iter(),
            &mut self.m.iter_mut(),
            &mut self.v.iter_mut(),
            hp,
        )
    }
}

/// Σ grad² of each of the model's units (`units::unit_ranges`): the global norm is the square root
/// of their sum, and each unit's norm comes with it at no extra pass.
pub fn unit_sums_of_squares<B: Backend>(b: &B, cfg: &LlamaConfig, grads: &Weights<B::Buf>) -> Result<Vec<f64>> {
    let tensors = grads.iter();
    let groups: Vec<Vec<&B::Buf>> = unit_ranges(cfg).into_iter().map(|r| tensors[r].to_vec()).collect();
    b.sum_squares_grouped(&groups)
}

/// What one optimizer step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Stepped {
    /// The summed token loss over the global batch.
    pub loss_sum: f64,
    /// The global gradient norm before clipping.
    pub norm: f64,
    /// Σ grad² of each unit, in `units::unit_ranges` order (embedding, blocks, head).
    pub unit_sq: Vec<f64>,
}

/// What global-norm clipping multiplies every gradient by, as torch's `clip_grad_norm_` does:
/// `max_norm / (norm + 1e-6)` when that is below 1, else 1 (and 1 when `max_norm` is 0). AdamW
/// applies it as it reads each gradient (`AdamW::grad_scale`), so clipping costs no pass of its own.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

/// What one optimizer step needs besides the state it updates.
#[derive(Clone, Copy, Debug)]
pub struct StepParams {
    /// Multiplies each token's loss: `1 / tokens in the global batch` makes the loss a mean.
    pub scale: f32,
    /// Global-norm clipping threshold (0 disables it).
    pub max_norm: f64,
    pub hp: AdamW,
    /// What the update must stay within to be applied (the step guard).
    pub check: UpdateCheck,
}

/// One optimizer step with the whole model on one device: zero the gradients, forward and backward
/// every micro-batch (the gradients accumulate), clip, AdamW, unless `p.check` refuses the update
/// (weights and moments then stay as they were). The trainer, `kiln bench train` and the GPU tests all step
/// through here.
pub fn device_step<B: Backend>(
    model: &mut Llama<B>,
    ws: &mut Workspace<B>,
    grads: &mut Weights<B::Buf>,
    opt: &mut AdamWState<B>,
    micro_batches: impl Iterator<Item = Result<impl Borrow<Batch>>>,
    p: StepParams,
) -> Result<Stepped> {
    for g in grads.iter_mut() {
        model.backend.fill_zero(g)?;
    }
    let mut loss_sum = 0.0f64;
    for batch in micro_batches {
        let batch = batch?;
        let batch = batch.borrow();
        let losses = model.forward(ws, &batch.ids, &batch.targets, Some(p.scale))?;
        loss_sum += losses.iter().map(|&l| l as f64).sum::<f64>();
        model.backward(ws, grads)?;
    }
    if guard::poisoned(p.hp.step, 0) {
        poison(&model.backend, &mut grads.final_norm)?;
    }
    let unit_sq = unit_sums_of_squares(&model.backend, &model.cfg, grads)?;
    let norm = unit_sq.iter().sum::<f64>().sqrt();
    let out = Stepped { loss_sum, norm, unit_sq };
    if !p.check.accepts(loss_sum, p.scale, norm) {
        return Ok(out);
    }
    let hp = AdamW { grad_scale: clip_coefficient(norm, p.max_norm), ..p.hp };
    opt.step(model, grads, hp)?;
    Ok(out)
}

/// Adds NaN to every value of `g` (the guard's test hook, `guard::poisoned`).
pub fn poison<B: Backend>(b: &B, g: &mut B::Buf) -> Result<()> {
    let nan = b.upload_as(&vec![f32::NAN; b.len(g)], Role::Accum)?;
    b.add_assign(g, &nan)
}

#[cfg(test)]
mod tests {
    use super::clip_coefficient;

    #[test]
    fn clipping_scales_only_norms_above_the_threshold_as_torch_does() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(4.0, 0.0), 1.0, "max_norm 0 disables clipping");
        let c = clip_coefficient(4.0, 1.0);
        assert!((c as f64 - 1.0 / (4.0 + 1e-6)).abs() < 1e-7, "{c}");
    }
}
