//! The CUDA side of kiln, loaded at run time so that the same binary runs on machines without
//! CUDA: finding the libraries (`libs`), compiling `kernels/*.cu` with NVRTC (`kernels`), and one
//! launcher file per kernel file, named alike.

pub mod adamw;
pub mod attn_tune;
pub mod buf;
pub mod cast;
pub mod cross_entropy;
pub mod device;
pub mod elementwise;
pub mod engine;
pub mod flash_attn;
pub mod gemm;
pub mod kernels;
pub mod libs;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub use engine::{Cuda, CudaMemory};
