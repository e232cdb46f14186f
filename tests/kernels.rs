//! Every kernel in kernels/ compiles with NVRTC for compute_80 (A100) and compute_90 (H100/H200),
//! and assembles for sm_80 and sm_90, with no GPU needed, and every entry point its launcher calls
//! is in the PTX. NVRTC comes from the
//! pip wheels nvidia-cuda-nvrtc==13.0.88 and nvidia-cuda-runtime==13.0.96 (.ci/run installs them);
//! without them the compile part is skipped with a note, unless KILN_REQUIRE_NVRTC=1.

mod common;

use kiln::backend::cuda::kernels::{
    assemble, cache_path_in, compile, compile_cached_in, entry_points, include_dir, ALL,
};
use kiln::backend::cuda::libs::{require, CudaLib};

#[test]
fn launchers_list_exactly_the_entry_points_of_their_sources() {
    for k in ALL {
        let mut defined = entry_points(k.source);
        let mut listed: Vec<String> = k.entries.iter().map(|s| s.to_string()).collect();
        defined.sort();
        listed.sort();
        assert_eq!(defined, listed, "kernels/{}.cu", k.name);
        assert!(!defined.is_empty(), "kernels/{}.cu defines no entry point", k.name);
    }
    // The build tree's kernels/, or, where this binary was carried to another machine's checkout
    // (scripts/gpu-check.sh runs from its root), the one in the working directory.
    let dir = [concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"), "kernels"]
        .into_iter()
        .find(|d| std::path::Path::new(d).is_dir())
        .expect("no kernels/ directory beside the build tree or in the working directory");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    files.sort();
    let mut known: Vec<String> = ALL.iter().map(|k| format!("{}.cu", k.name)).collect();
    known.sort();
    assert_eq!(files, known, "every kernels/*.cu has a launcher");
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let required = std::env::var("KILN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let ready = require("the kernel compile check", &[CudaLib::Nvrtc]).and_then(|_| include_dir());
    let include = match ready {
        Ok(d) => d,
        Err(e) if !required => {
            common::skipped(
                "every_kernel_compiles_for_sm80_and_sm90",
                &format!("{e:#} (KILN_REQUIRE_NVRTC=1 fails instead)"),
            );
            return;
        }
        Err(e) => panic!("KILN_REQUIRE_NVRTC=1 but {e:#}"),
    };
    let mut failures = Vec::new();
    for k in ALL {
        // Assembled too, as the driver will at load: inline PTX is only text to NVRTC's compiler.
        for sm in ["sm_80", "sm_90"] {
            match assemble(k, sm, &include) {
                Ok(bytes) => assert!(bytes > 0, "kernels/{}.cu: empty machine code for {sm}", k.name),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        for arch in ["compute_80", "compute_90"] {
            match compile(k, arch, &include) {
                Ok(ptx) => {
                    for e in k.entries {
                        if !ptx.contains(&format!(".entry {e}(")) {
                            failures.push(format!("kernels/{}.cu ({arch}): no entry {e} in the PTX", k.name));
                        }
                    }
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Engines open GPUs from several threads at once: with a cold cache they all compile, every one
/// gets the same PTX, exactly one complete file is left (no temporary ones), and an empty (damaged)
/// cache file is compiled afresh rather than served.
#[test]
fn threads_share_the_ptx_cache_safely() {
    let required = std::env::var("KILN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if let Err(e) = require("the kernel cache check", &[CudaLib::Nvrtc]).and_then(|_| include_dir()) {
        assert!(!required, "KILN_REQUIRE_NVRTC=1 but {e:#}");
        common::skipped("threads_share_the_ptx_cache_safely", &format!("{e:#} (KILN_REQUIRE_NVRTC=1 fails instead)"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = ALL.iter().find(|k| k.name == "rmsnorm").unwrap();
    let ptx: Vec<String> = std::thread::scope(|s| {
        let threads: Vec<_> =
            (0..4).map(|_| s.spawn(|| compile_cached_in(dir.path(), k, "compute_90").unwrap())).collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(ptx.iter().all(|p| p == &ptx[0] && p.contains(".entry rmsnorm_fwd_bf16(")));
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
    let path = cache_path_in(dir.path(), k, "compute_90");
    assert_eq!(files, vec![path.clone()], "one cache file and nothing else");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), ptx[0]);
    std::fs::write(&path, "").unwrap();
    assert_eq!(
        compile_cached_in(dir.path(), k, "compute_90").unwrap(),
        ptx[0],
        "an empty cache file is compiled afresh"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), ptx[0], "and replaced");
}
