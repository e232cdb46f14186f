//! AdamW over a whole parameter set, plus global-norm clipping with torch's `clip_grad_norm_`
//! semantics (norm before clipping is what gets reported).

use crate::backend::{AdamW, Backend};
use crate::model::{Llama, Weights};
use anyhow::Result;

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

/// Global L2 norm of all gradients.
pub fn grad_norm<B: Backend>(b: &B, grads: &Weights<B::Buf>) -> Result<f64> {
    Ok(b.sum_squares_all(&grads.iter())?.sqrt())
}

/// Scales gradients by `max_norm / (norm + 1e-6)` when that is below 1, as torch does.
pub fn clip<B: Backend>(b: &B, grads: &mut Weights<B::Buf>, norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            b.scale(g, coef as f32)?;
        }
    }
    Ok(())
}
