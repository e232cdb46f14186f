//! `kiln eval`: zero-shot multiple-choice accuracy on the TinyLlama paper's commonsense suite,
//! scored the way lm-evaluation-harness scores it (summed continuation log-likelihoods; `acc` and
//! the character-length-normalised `acc_norm`).

pub mod report;
pub mod score;
pub mod tasks;
