//! The CUDA libraries kiln loads at run time (cudarc's dynamic loading). cudarc panics when a
//! library it needs is missing, so every CUDA path asks here first and turns absence into a
//! one-line error that says what to install.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaLib {
    Driver,
    Nvrtc,
    Cublas,
    CublasLt,
    Nccl,
}

impl CudaLib {
    fn present(self) -> bool {
        // SAFETY: these only try to dlopen the library; no CUDA call is made.
        unsafe {
            match self {
                CudaLib::Driver => cudarc::driver::sys::is_culib_present(),
                CudaLib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                CudaLib::Cublas => cudarc::cublas::sys::is_culib_present(),
                CudaLib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                CudaLib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }

    fn what(self) -> &'static str {
        match self {
            CudaLib::Driver => "the NVIDIA driver (libcuda.so): this machine has no NVIDIA GPU or driver",
            CudaLib::Nvrtc => "NVRTC (libnvrtc.so), CUDA's run-time compiler: put CUDA 13's lib directory on LD_LIBRARY_PATH",
            CudaLib::Cublas => "cuBLAS (libcublas.so): put CUDA 13's lib directory on LD_LIBRARY_PATH",
            CudaLib::CublasLt => "cuBLASLt (libcublasLt.so): put CUDA 13's lib directory on LD_LIBRARY_PATH",
            CudaLib::Nccl => {
                "NCCL (libnccl.so): put its directory on LD_LIBRARY_PATH (pip's nvidia-nccl ships only libnccl.so.2: add a libnccl.so symlink to it)"
            }
        }
    }
}

/// Ok when every library in `libs` can be loaded; otherwise an error naming the first missing one.
pub fn require(purpose: &str, libs: &[CudaLib]) -> Result<()> {
    if let Some(missing) = libs.iter().find(|l| !l.present()) {
        bail!("{purpose} needs CUDA, which is not available: cannot load {}", missing.what());
    }
    Ok(())
}
