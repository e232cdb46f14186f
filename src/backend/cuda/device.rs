//! One GPU: its context and stream, and every kernel compiled for its architecture and loaded.

use super::kernels::{compile_cached, evict, ALL};
use super::libs::{require, CudaLib};
use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};
use std::collections::HashMap;
use std::sync::Arc;

/// The element types kernels come in; a launcher picks `name_SUFFIX`.
pub trait Elem: DeviceRepr + Copy + Default + Send + Sync + 'static {
    const SUFFIX: &'static str;
    /// Values one thread of a vectorised elementwise kernel takes per step: the bf16 kernels move
    /// eight per 16-byte access, the f32 ones one at a time. Launchers size their grids by it.
    const PER_THREAD: usize;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const PER_THREAD: usize = 1;
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const PER_THREAD: usize = 8;
}

pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub arch: &'static str,
    /// Shared memory one multiprocessor holds, and what the system keeps of it per resident block:
    /// with a kernel's own bytes, how many of its blocks fit on an SM (read, not assumed per card).
    pub shared_per_sm: usize,
    pub shared_reserved_per_block: usize,
    /// Multiprocessors: how many blocks a grid-stride reduction needs to fill the device.
    pub sm_count: usize,
    functions: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

/// NVRTC's name for a compute capability. A device this list does not know gets PTX for the
/// newest architecture below it that the kernels tell apart (their Hopper paths are compiled
/// for `__CUDA_ARCH__ >= 900`), which the driver compiles forward.
fn arch_of(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 9 => "compute_90",
        _ => "compute_80",
    }
}

/// The CUDA version the driver supports and the one NVRTC comes from, as 1000·major + 10·minor.
/// kiln's bindings are CUDA 13.0's (an older driver lacks symbols they call, and cudarc panics on a
/// missing one), and a driver refuses PTX from a newer toolkit than its own, so both are checked
/// before any kernel is compiled: one line that says what to change, not a refusal per kernel.
fn check_versions() -> Result<()> {
    let (mut driver, mut major, mut minor) = (0, 0, 0);
    // SAFETY: the driver and NVRTC are present (`require` ran first); the calls only write integers.
    unsafe {
        cudarc::driver::sys::cuDriverGetVersion(&mut driver).result()?;
        if cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
            anyhow::bail!("NVRTC does not report its version");
        }
    }
    let nvrtc = 1000 * major + 10 * minor;
    let show = |v: i32| format!("{}.{}", v / 1000, v % 1000 / 10);
    if driver < 13000 {
        anyhow::bail!(
            "the NVIDIA driver supports CUDA {}; kiln's CUDA backend needs CUDA 13.0 or newer (driver 580 or later)",
            show(driver)
        );
    }
    if nvrtc > driver {
        anyhow::bail!(
            "NVRTC is CUDA {}, newer than the driver's CUDA {}, which cannot load the PTX it makes: put CUDA {}'s NVRTC first on LD_LIBRARY_PATH (pip: nvidia-cuda-nvrtc=={}.*), or update the driver",
            show(nvrtc),
            show(driver),
            show(driver),
            show(driver)
        );
    }
    Ok(())
}

impl Gpu {
    /// Opens GPU `ordinal` and compiles (or loads from the cache) every kernel for it.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        require("the CUDA backend", &[CudaLib::Driver, CudaLib::Nvrtc])?;
        check_versions()?;
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver: {e:?}"))? as usize;
        if ordinal >= count {
            anyhow::bail!("GPU {ordinal} requested, this machine has {count}");
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("cannot open GPU {ordinal}"))?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            anyhow::bail!(
                "GPU {ordinal} has compute capability {major}.{minor}; kiln's kernels need 8.0 (Ampere) or newer"
            );
        }
        let arch = arch_of(major, minor);
        use cudarc::driver::sys::CUdevice_attribute as Attr;
        let shared_per_sm = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as usize;
        let shared_reserved_per_block =
            ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK).unwrap_or(1024) as usize;
        let sm_count = ctx.attribute(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for k in ALL {
            let load = |ptx: String| ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx));
            // A cached PTX the driver refuses is compiled afresh once before giving up.
            let module = match load(compile_cached(k, arch)?) {
                Ok(m) => m,
                Err(_) => {
                    evict(k, arch);
                    load(compile_cached(k, arch)?)
                        .map_err(|e| anyhow!("kernels/{}.cu: the driver refused its PTX ({e:?})", k.name))?
                }
            };
            for &e in k.entries {
                functions.insert(e, module.load_function(e).map_err(|err| anyhow!("{}: {err:?}", e))?);
            }
            modules.push(module);
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: every kiln buffer of this context lives on its one stream, so cudarc's per-buffer
        // events (which order work across streams) would only cost two event creations per allocation.
        unsafe { ctx.disable_event_tracking() };
        // Best effort: a device without memory pools allocates synchronously and has nothing to keep.
        let _ = keep_freed_memory(&ctx);
        // A stream of its own rather than the legacy NULL stream: a NULL handle means "the current
        // context's" wherever it is used (cudarc frees buffers on their stream), and the legacy
        // stream would also serialise against any blocking stream a library creates.
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            name,
            arch,
            shared_per_sm,
            shared_reserved_per_block,
            sm_count,
            functions,
            _modules: modules,
        })
    }

    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).with_context(|| format!("no kernel entry point {name}"))
    }

    /// The entry point `name`, allowed `bytes` of dynamic shared memory (past the 48 KiB default
    /// a kernel must opt in). Binds the context first: cuFuncSetAttribute, unlike cudarc's
    /// launches and copies, does not, and FSDP's rank threads are fresh every step.
    pub fn function_with_shared(&self, name: &str, bytes: usize) -> Result<&CudaFunction> {
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let f = self.function(name)?;
        self.ctx.bind_to_thread()?;
        f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)?;
        Ok(f)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }
}

/// Dense bf16 tensor-core peak from the datasheet, for the cards kiln is measured on.
pub fn datasheet_bf16_flops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    let tf = if n.contains("H200") || (n.contains("H100") && !n.contains("PCIE")) {
        989.4
    } else if n.contains("H100") {
        756.0
    } else if n.contains("A100") {
        312.0
    } else if n.contains("L40S") {
        362.0
    } else {
        return None;
    };
    Some(tf * 1e12)
}

/// Stream-ordered allocations come from the device's default memory pool, which by default hands
/// freed memory back to the driver at every synchronisation; the per-step scratch (attention's dQ
/// accumulator, losses, ids) would then be mapped afresh every step. Keeping it cached, as PyTorch's
/// caching allocator does, makes those allocations free after the first step.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on this context's device; `threshold` outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}

/// A grid-stride launch over `n` elements.
pub fn elementwise_config(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 4) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// A grid-stride reduction over `n` elements that ends in one atomic per block: at most eight
/// 256-thread blocks per multiprocessor (a full H100 SM), each looping over its share, so a
/// tensor of 65M values costs ~1,000 atomics on one address instead of 256,000 (and as many
/// one-element blocks).
pub fn reduction_config(gpu: &Gpu, n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 8 * gpu.sm_count.max(1)) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
