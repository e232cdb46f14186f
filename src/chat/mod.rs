//! Chatting with a model: the tokenizer's chat template (`template`), the prompt built from a
//! conversation within the model's context (`prompt`), a streamed reply (`reply`), and the engine's
//! chat worker that answers viewers on a snapshot of the weights being trained (`service`).

pub mod prompt;
pub mod reply;
pub mod service;
pub mod template;

pub use template::{ChatTemplate, Message};
