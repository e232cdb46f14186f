//! Reading (and later writing) Hugging Face model directories.

pub mod atomic;
pub mod checksums;
pub mod console;
pub mod hf_config;
pub mod model_dir;
pub mod run_lock;
pub mod safetensors;
pub mod save;

pub use model_dir::{load_model_dir, ModelDir};
