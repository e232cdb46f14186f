//! The GPU tests on machines without a GPU: `rerun_on_the_emulator` builds the CPU stand-in for the
//! CUDA driver, NVRTC, cuBLASLt and NCCL (tests/emulated/fake_cuda.cpp: the kernels' own source on the
//! fiber emulator, strict checks on every pointer, copy, launch and GEMM layout) and runs the calling
//! test binary's other tests again with it on LD_LIBRARY_PATH. The CUDA backend's host code (launchers,
//! argument lists, grids, cuBLASLt layouts, the engine's buffers, FSDP over NCCL between two emulated
//! devices) then runs end to end against the
//! CPU backend, as it does on a GPU in scripts/gpu-check.sh.
//!
//! Skipped where a real driver is present (the real tests run there) and without g++, unless
//! KILN_REQUIRE_GXX=1 (CI), which turns a missing g++ into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set in the re-run child, whose tests then open the emulated device.
const CHILD: &str = "KILN_EMULATED_GPU";

/// g++ flags of every program built from the kernels' source. `-fsanitize=alignment` checks each
/// typed access against its type's alignment (the stand-in `uint4` is 16-byte aligned, as CUDA's is),
/// so a kernel's vector load through a misaligned pointer, which a GPU answers with a fault that
/// ends the context, aborts here with its source line instead of reading the bytes anyway.
pub const GXX_FLAGS: &[&str] = &[
    "-std=c++20",
    "-O2",
    "-pthread",
    "-w",
    "-DKILN_CPU_EMULATION",
    "-fsanitize=alignment",
    "-fno-sanitize-recover=alignment",
];

/// True in the re-run: tests may shrink their largest shapes (the emulator runs every CUDA thread
/// on one core).
pub fn emulated() -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == "1")
}

/// Whether g++ is on PATH to build the emulator's programs; its absence fails the test where
/// KILN_REQUIRE_GXX=1 (CI), so that nothing is skipped there.
pub fn gxx_present() -> bool {
    let ok = Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        ok || !std::env::var("KILN_REQUIRE_GXX").is_ok_and(|v| v == "1"),
        "KILN_REQUIRE_GXX=1 but g++ is not on PATH"
    );
    ok
}

/// Runs every other test of this binary on the emulated GPU and fails if any fails there.
/// `this_test` is the calling test's name, which the re-run skips.
pub fn rerun_on_the_emulator(this_test: &str) {
    if emulated() {
        return;
    }
    if super::real_gpu_present() {
        // Not a skip: with KILN_REQUIRE_GPU=1 (scripts/gpu-check.sh) the tests ran on the card.
        eprintln!("not emulated: a GPU is present, so the tests ran on it");
        return;
    }
    if !gxx_present() {
        super::skipped(this_test, "no g++ to build tests/emulated/fake_cuda.cpp (KILN_REQUIRE_GXX=1 fails instead)");
        return;
    }
    let libs = build_fake_cuda();
    let ptx_cache = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = std::time::Instant::now();
    // A deadlock in the emulator (every CUDA thread a fiber) would otherwise hang CI.
    let limit = std::env::var("KILN_EMULATOR_TIMEOUT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(1800);
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        // Its output is shown only if this test fails (or runs with --nocapture): then every
        // figure the tests print (errors against the CPU, step losses) is there to read.
        .args(["--skip", this_test, "--nocapture"])
        .env("LD_LIBRARY_PATH", &libs)
        .env(CHILD, "1")
        // The child must find the emulated device: a skip there would pass by testing nothing.
        .env("KILN_REQUIRE_GPU", "1")
        // `kiln bench train`'s GEMM ceiling at 256³: 8192³ would take minutes on the stand-in.
        .env("KILN_GEMM_CEILING_N", "256")
        .env("KILN_CUDA_INCLUDE", root.join("tests/emulated/include"))
        // Fake PTX must never reach the cache a real GPU run reads.
        .env("KILN_KERNEL_CACHE", ptx_cache.path());
    let what = format!("{this_test} (the GPU tests on the emulated GPU; KILN_EMULATOR_TIMEOUT_S={limit})");
    let out = super::output_within(&mut child, std::time::Duration::from_secs(limit), &what);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}\n(on the emulated GPU in {:.1} s)", started.elapsed().as_secs_f64());
    assert!(out.status.success(), "the GPU tests failed on the emulated GPU (see above): {}", out.status);
}

/// Builds the stand-in once per source version into the target directory, with the names cudarc
/// loads, and returns its directory.
pub fn build_fake_cuda() -> PathBuf {
    use sha2::{Digest, Sha256};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Every kernel entry point the launchers load, for the stand-in's cuModuleGetFunction.
    let entries: String = kiln::backend::cuda::kernels::ALL
        .iter()
        .flat_map(|k| k.entries.iter())
        .map(|e| format!("KILN_ENTRY({e})\n"))
        .collect();
    let mut sources = vec![root.join("tests/emulated/fake_cuda.cpp"), root.join("tests/emulated/include/cuda_bf16.h")];
    let mut kernels: Vec<PathBuf> =
        std::fs::read_dir(root.join("kernels")).unwrap().map(|e| e.unwrap().path()).collect();
    kernels.sort();
    sources.extend(kernels);
    let mut hash = Sha256::new();
    hash.update(&entries);
    hash.update(GXX_FLAGS.join(" "));
    for s in &sources {
        hash.update(std::fs::read(s).unwrap());
    }
    let key = format!("{:x}", hash.finalize());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-cuda-{}", &key[..16]));
    if dir.join("libcuda.so").exists() {
        return dir;
    }
    // Built beside, then renamed into place whole: test binaries may race to build it.
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("fake_cuda_entries.inc"), entries).unwrap();
    let lib = tmp.join("libkiln_fake_cuda.so");
    let build = Command::new("g++")
        .args(GXX_FLAGS)
        .args(["-march=native", "-fopenmp-simd", "-shared", "-fPIC"])
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emulated/include"))
        .arg("-I")
        .arg(&tmp)
        .arg(root.join("tests/emulated/fake_cuda.cpp"))
        .arg("-o")
        .arg(&lib)
        .output()
        .unwrap();
    assert!(build.status.success(), "g++ fake_cuda.cpp:\n{}", String::from_utf8_lossy(&build.stderr));
    for name in ["libcuda.so", "libnvrtc.so", "libcublasLt.so", "libcublas.so", "libnccl.so"] {
        std::os::unix::fs::symlink("libkiln_fake_cuda.so", tmp.join(name)).unwrap();
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test binary got there first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}
