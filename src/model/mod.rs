//! The Llama model: configuration, parameters in Hugging Face layout, and the explicit forward and
//! backward passes written once against the `Backend` trait.

pub mod config;
pub mod decode;
pub mod init;
pub mod llama;
pub mod rope;
pub mod sampling;
pub mod units;
pub mod weights;

pub use config::LlamaConfig;
pub use decode::KvCache;
pub use llama::{Keep, Llama, Workspace};
pub use weights::{tensor_specs, LayerWeights, TensorSpec, Weights};
