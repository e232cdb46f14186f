//! kiln: pretraining Llama-family language models the way TinyLlama was trained.
//!
//! Layers, bottom up: `backend` (device buffers and ops, CPU now, CUDA as a sibling), `model`
//! (Llama forward/backward/decoding written once against the backend), `io` (Hugging Face model
//! directories), `tokenizer`, and `cli` (the commands the binary exposes).

pub mod backend;
pub mod chat;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod io;
pub mod model;
pub mod tokenizer;
pub mod train;
pub mod tui;
