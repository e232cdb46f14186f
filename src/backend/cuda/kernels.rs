//! The CUDA sources in `kernels/`, compiled by NVRTC for the device at hand (its compute
//! capability is read, not assumed) and cached on disk keyed by source hash and architecture, so a
//! restart does not recompile. The sources are built into the binary: a machine that runs kiln
//! needs only the driver and the CUDA libraries, not a checkout.

use super::libs::{require, CudaLib};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One `kernels/NAME.cu` and the `extern "C"` entry points its launcher calls.
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub entries: &'static [&'static str],
}

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file, in the order the model uses them.
pub const ALL: &[Kernel] = &[
    super::elementwise::KERNEL,
    super::cast::KERNEL,
    super::rmsnorm::KERNEL,
    super::rope::KERNEL,
    super::flash_attn::KERNEL,
    super::swiglu::KERNEL,
    super::cross_entropy::KERNEL,
    super::adamw::KERNEL,
];

impl Kernel {
    /// The source with the shared header inlined (NVRTC is given no file system).
    pub fn full_source(&self) -> String {
        self.source.replace("#include \"common.cuh\"", COMMON)
    }
}

/// Where `cuda_bf16.h` lives: `KILN_CUDA_INCLUDE`, `CUDA_HOME`/`CUDA_PATH`, the include directory
/// beside any CUDA library directory on `LD_LIBRARY_PATH` (pip wheels: `nvidia/cu13/{lib,include}`),
/// or /usr/local/cuda.
pub fn include_dir() -> Result<PathBuf> {
    let has = |d: &Path| d.join("cuda_bf16.h").is_file();
    if let Some(d) = std::env::var_os("KILN_CUDA_INCLUDE").map(PathBuf::from) {
        if has(&d) {
            return Ok(d);
        }
        bail!("KILN_CUDA_INCLUDE={}: no cuda_bf16.h there", d.display());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            candidates.push(PathBuf::from(d).join("include"));
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            candidates.push(lib.join("../include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.into_iter().find(|d| has(d)).context(
        "cannot find cuda_bf16.h for NVRTC: set KILN_CUDA_INCLUDE to a CUDA 13 include directory (pip: nvidia-cuda-runtime's nvidia/cu13/include)",
    )
}

/// What NVRTC is told besides the architecture and include path (part of the cache key).
const OPTIONS: &[&str] = &["--std=c++17"];

/// PTX for `kernel` on `arch` (e.g. "compute_90"), straight from NVRTC.
pub fn compile(kernel: &Kernel, arch: &'static str, include: &Path) -> Result<String> {
    require("compiling CUDA kernels", &[CudaLib::Nvrtc])?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options: OPTIONS.iter().map(|o| o.to_string()).collect(),
        name: Some(format!("{}.cu", kernel.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel.full_source(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            let log = log.to_string_lossy().replace('\n', " | ");
            anyhow::anyhow!("kernels/{}.cu does not compile for {arch}: {log}", kernel.name)
        }
        other => anyhow::anyhow!("kernels/{}.cu: NVRTC failed: {other:?}", kernel.name),
    })?;
    Ok(ptx.to_src())
}

/// Size in bytes of the machine code for `kernel` on `sm` (e.g. "sm_90"): NVRTC compiles, then
/// assembles the PTX as the driver does when it loads it, so inline PTX the assembler rejects (an
/// `mma.sync`, `ldmatrix` or `cp.async` typo) fails here, with no GPU. The loader itself keeps
/// handing the driver PTX (`compile`), which any later device can compile forward.
pub fn assemble(kernel: &Kernel, sm: &str, include: &Path) -> Result<usize> {
    use cudarc::nvrtc::{result, sys};
    require("assembling CUDA kernels", &[CudaLib::Nvrtc])?;
    let src = std::ffi::CString::new(kernel.full_source())?;
    let name = std::ffi::CString::new(format!("{}.cu", kernel.name))?;
    let mut opts = vec![format!("--gpu-architecture={sm}"), format!("--include-path={}", include.display())];
    opts.extend(OPTIONS.iter().map(|o| o.to_string()));
    let prog = result::create_program(&src, Some(&name))?;
    // SAFETY: `prog` is live from create_program until destroy_program below; the size query only
    // writes an integer.
    unsafe {
        let out = match result::compile_program(prog, &opts) {
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size).result().map(|_| size).map_err(anyhow::Error::from)
            }
            Err(_) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
                let log = String::from_utf8_lossy(&log).replace('\n', " | ");
                Err(anyhow::anyhow!("kernels/{}.cu does not assemble for {sm}: {log}", kernel.name))
            }
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// Where `compile_cached` keeps `kernel`'s PTX for `arch`: keyed by the source, the architecture,
/// NVRTC's options and its version (a driver refuses PTX from a newer toolkit than its own, so PTX
/// from one NVRTC must not be served to a run using another).
pub fn cache_path(kernel: &Kernel, arch: &'static str) -> PathBuf {
    cache_path_in(&cache_dir(), kernel, arch)
}

/// `cache_path` under the cache directory `dir`.
pub fn cache_path_in(dir: &Path, kernel: &Kernel, arch: &'static str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let key = format!(
        "{:x}",
        Sha256::digest(format!("{arch}\n{}\n{}\n{}", nvrtc_version(), OPTIONS.join(" "), kernel.full_source()))
    );
    dir.join(format!("{}-{arch}-{}.ptx", kernel.name, &key[..16]))
}

/// "major.minor" of the NVRTC that would compile, or "unknown".
fn nvrtc_version() -> String {
    if require("compiling CUDA kernels", &[CudaLib::Nvrtc]).is_err() {
        return "unknown".into();
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the call only writes the two integers.
    let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS;
    if ok {
        format!("{major}.{minor}")
    } else {
        "unknown".into()
    }
}

/// `compile`, through the on-disk cache (`cache_dir`).
pub fn compile_cached(kernel: &Kernel, arch: &'static str) -> Result<String> {
    compile_cached_in(&cache_dir(), kernel, arch)
}

/// `compile_cached` with the cache in `dir` (tests give their own, rather than setting the
/// environment variable under threads that may be reading it).
pub fn compile_cached_in(dir: &Path, kernel: &Kernel, arch: &'static str) -> Result<String> {
    let path = cache_path_in(dir, kernel, arch);
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if !ptx.is_empty() {
            return Ok(ptx);
        }
    }
    let ptx = compile(kernel, arch, &include_dir()?)?;
    // A cache that cannot be written only costs a recompile next time. The temporary name is unique
    // per process and thread (engines open GPUs from several threads at once), and the rename
    // publishes a complete file or nothing.
    if path.parent().is_some_and(|dir| std::fs::create_dir_all(dir).is_ok()) {
        static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_err() || std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

/// Forgets a cached PTX the driver refused (written by another toolkit, or damaged), so the next
/// `compile_cached` compiles afresh.
pub fn evict(kernel: &Kernel, arch: &'static str) {
    let _ = std::fs::remove_file(cache_path(kernel, arch));
}

/// `KILN_KERNEL_CACHE`, else `$XDG_CACHE_HOME/kiln/kernels` or `~/.cache/kiln/kernels`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("kiln").join("kernels")
}

/// The `extern "C" __global__` functions a source defines (for checking launchers against it).
pub fn entry_points(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__";
    source
        .split(MARK)
        .skip(1)
        .filter_map(|decl| {
            // `void [__launch_bounds__(N)] name(`: the name is the last identifier before the
            // parameter list.
            let decl = match decl.find("__launch_bounds__") {
                Some(i) => &decl[i + decl[i..].find(')')? + 1..],
                None => decl,
            };
            let head = &decl[..decl.find('(')?];
            head.split(|c: char| !(c.is_alphanumeric() || c == '_')).rfind(|s| !s.is_empty()).map(str::to_string)
        })
        .collect()
}
