//! Hugging Face-style initialisation: every matrix drawn from N(0, 0.02²) (`initializer_range`),
//! norm weights at 1, from a seeded ChaCha stream so a seed always gives the same model.

use super::config::LlamaConfig;
use super::weights::Weights;
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

pub const INIT_STD: f32 = 0.02;

pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Result<Weights<Vec<f32>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, INIT_STD).expect("0.02 is a valid std");
    Weights::try_build(cfg, |spec| {
        Ok(if spec.shape.len() == 1 {
            vec![1.0; spec.numel()]
        } else {
            (0..spec.numel()).map(|_| normal.sample(&mut rng)).collect()
        })
    })
}
