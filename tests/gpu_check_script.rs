//! scripts/gpu-check.sh is the one command to run on a GPU machine, which may have no Rust: a fault
//! in its own plumbing (a stage's arguments, a grep that finds no row, the time budget) would cost
//! that run. So it runs here end to end on the
//! emulated GPU in its smoke mode (`KILN_GPU_CHECK_SMOKE=1`: every stage, small shapes, no test
//! binaries), and every row of its table must be there and none may say FAILED.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_check_script_runs_every_stage_on_the_emulated_gpu() {
    let this = "the_gpu_check_script_runs_every_stage_on_the_emulated_gpu";
    if common::real_gpu_present() {
        common::skipped(this, "a GPU is present: run scripts/gpu-check.sh itself");
        return;
    }
    if !common::emulated_gpu::gxx_present() {
        common::skipped(this, "no g++ to build tests/emulated/fake_cuda.cpp (KILN_REQUIRE_GXX=1 fails instead)");
        return;
    }
    let libs = common::emulated_gpu::build_fake_cuda();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("summary.txt");
    let mut script = Command::new("bash");
    script
        .arg(root.join("scripts/gpu-check.sh"))
        .env("KILN_GPU_CHECK_SMOKE", "1")
        .env("KILN_GPU_SUMMARY", &summary)
        .env("KILN_BIN_DIR", kiln.parent().unwrap())
        .env("LD_LIBRARY_PATH", &libs)
        .env("KILN_CUDA_INCLUDE", root.join("tests/emulated/include"))
        .env("KILN_KERNEL_CACHE", tmp.path().join("ptx"))
        .env("KILN_GEMM_CEILING_N", "256")
        // No PyTorch here: the baseline's stage must say it was skipped, not fail.
        .env("TORCH_VENV", tmp.path().join("no-venv"))
        // The stage limits are sized for a GPU; on a loaded 2-core machine the emulator is slower
        // by far, so they get slack here (the script's budget logic still runs), and the whole
        // script is bounded below instead.
        .env("KILN_GPU_STAGE_SLACK", "30")
        .env("KILN_GPU_BUDGET_S", "100000");
    let out = common::output_within(&mut script, std::time::Duration::from_secs(2400), "scripts/gpu-check.sh (smoke)");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let table = std::fs::read_to_string(&summary).unwrap_or_default();
    assert!(out.status.success(), "gpu-check.sh failed ({}):\n{log}", out.status);
    assert!(!table.contains("FAILED"), "a stage failed:\n{table}\n{log}");
    let row = |label: &str| {
        table.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} row in\n{table}"))
    };
    for (label, expect) in [
        ("card", "unknown"),
        ("nccl all_reduce", "GB/s"),
        ("kiln flash-attn hd64", "TFLOP/s fwd+bwd"),
        ("kiln flash-attn hd128", "TFLOP/s fwd+bwd"),
        ("kiln TinyLlama-1.1B step", "tokens/s"),
        ("kiln TinyLlama-1.1B MFU", "% of"),
        ("kiln TinyLlama-1.1B memory", "peak"),
        ("kiln GEMM autotune", ""),
        ("kiln attention autotune", "not timed"),
        ("kiln step profile (top 3)", "ms/step"),
        ("torch baseline", "skipped"),
        ("kiln FSDP, 1 GPU (NCCL)", "tokens/s"),
        ("  same step, one device", "tokens/s"),
    ] {
        assert!(row(label).contains(expect), "{label}: {:?} lacks {expect:?}", row(label));
    }
    // The headline names the builds it ran, and every other build of each pass has its own row.
    assert!(row("kiln flash-attn hd64").contains("forward (") && row("kiln flash-attn hd64").contains("backward ("));
    let alternates = |hd: usize| table.lines().filter(|l| l.starts_with(&format!("  hd{hd} "))).count();
    let builds = |hd: usize| 2 * (kiln::backend::cuda::flash_attn::builds(hd).len() - 1);
    assert_eq!(alternates(64), builds(64), "{table}");
    assert_eq!(alternates(128), builds(128), "{table}");
}
