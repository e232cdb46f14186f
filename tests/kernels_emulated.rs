//! The CUDA kernels' own source, compiled by g++ with `-DKILN_CPU_EMULATION` and run on the CPU
//! (tests/emulated/: every CUDA thread a fiber, barriers for `__syncthreads`, the warp shuffles,
//! and `mma.sync` computed from the PTX fragment layout), against double-precision
//! references. This checks the kernels' logic on machines without a GPU; tests/gpu.rs checks the
//! real thing where one is present. Skipped without g++ unless KILN_REQUIRE_GXX=1 (set by CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds tests/emulated/`program` into a temporary directory (returned with the executable, which
/// lives as long as it does); None when there is no g++ (and it is not required).
fn build(program: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    if !common::emulated_gpu::gxx_present() {
        common::skipped(program, "no g++ to build it (KILN_REQUIRE_GXX=1 fails instead)");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join(program.trim_end_matches(".cpp"));
    let build = Command::new("g++")
        .args(common::emulated_gpu::GXX_FLAGS)
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emulated/include"))
        .arg(root.join("tests/emulated").join(program))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(build.status.success(), "g++ {program}:\n{}", String::from_utf8_lossy(&build.stderr));
    Some((dir, exe))
}

/// Builds and runs tests/emulated/`program`; None when there is no g++ (and it is not required).
fn build_and_run(program: &str) -> Option<std::process::Output> {
    let (_dir, exe) = build(program)?;
    // The emulator aborts a deadlock it can see (deadlock.cpp); one it cannot would hang CI.
    let limit = std::time::Duration::from_secs(1800);
    Some(common::output_within(&mut Command::new(&exe), limit, &format!("tests/emulated/{program}")))
}

fn run(program: &str) {
    let Some(out) = build_and_run(program) else { return };
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(out.status.success(), "tests/emulated/{program} failed:\n{report}{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn flash_attention_forward_and_backward_on_the_cpu_emulator() {
    run("flash_attn.cpp");
}

#[test]
fn norm_rope_swiglu_cross_entropy_adamw_and_helpers_on_the_cpu_emulator() {
    run("kernels.cpp");
}

#[test]
fn threads_that_wait_on_each_other_forever_abort_instead_of_hanging() {
    let Some(out) = build_and_run("deadlock.cpp") else { return };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("block (0,0,0): deadlock"), "{err}");
}

#[test]
fn misaligned_vector_loads_ldmatrix_and_cp_async_abort_as_they_fault_on_a_gpu() {
    let Some((_dir, exe)) = build("misaligned.cpp") else { return };
    let run = |case: &str| {
        let out = Command::new(&exe).arg(case).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The same accesses, aligned, run: the checks object to the address, not to the access.
    let (ok, err) = run("aligned");
    assert!(ok, "aligned accesses aborted: {err}");
    for case in ["uint4", "ldmatrix", "cp.async"] {
        let (ok, err) = run(case);
        assert!(
            !ok && err.contains("misaligned address") && err.contains(case),
            "a misaligned {case} was not caught: {err}"
        );
    }
}
