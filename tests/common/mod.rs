//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod emulated_gpu;
pub mod gpu;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [-scale, scale).
pub fn randv(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// A test that cannot run on this machine says why: on stderr, and as a line in the file
/// `$KILN_SKIP_LOG` names, where .ci/run collects them and fails on any. Each skip has a
/// `KILN_REQUIRE_*` that turns it into a failure instead; CI sets them all, so this log stays
/// empty there unless a requirement is missing from .ci/run.
pub fn skipped(test: &str, why: &str) {
    eprintln!("skipped: {why}");
    if let Ok(log) = std::env::var("KILN_SKIP_LOG") {
        use std::io::Write;
        let line = format!("{test}: {why}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
}

/// Runs `cmd` to completion and returns its output, or fails the test (killing the command and
/// everything it started) once it has run `limit`: a deadlock fails CI with what was printed so
/// far instead of hanging it. The limit is a bound for hangs, far above any normal run.
pub fn output_within(cmd: &mut std::process::Command, limit: std::time::Duration, what: &str) -> std::process::Output {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > limit {
            // The whole process group (a script's children too; `--` so that the negative id is
            // not read as an option), and the child itself whatever happens to that.
            let group = format!("-{}", child.id());
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "{what}: still running after {} s, killed (a hang?)\n{}{}",
                limit.as_secs(),
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    std::process::Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// `f()`, or a failure naming `what` if it has not returned within `limit`: for tests of code that
/// must not hang (a failing rank releasing the others), where the old check was a tight
/// wall-clock bound that a loaded machine can miss. The limit sits far below the timeouts a hang
/// would otherwise end at (collective_timeout_s, 600 s) and far above a normal run.
pub fn within<T: Send + 'static>(limit: std::time::Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("{what}: did not finish within {} s (hung?)", limit.as_secs()),
    }
}

/// A real GPU: the driver loads and reports a device. A `libcuda.so` alone is not one (a
/// container's driver stub, or a machine whose card is gone), and must not stop the emulated runs.
pub fn real_gpu_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    driver && cudarc::driver::result::init().is_ok() && cudarc::driver::result::device::get_count().is_ok_and(|n| n > 0)
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// ‖a − b‖ / max(‖a‖, ‖b‖, tiny).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    diff / na.max(nb).max(1e-12)
}

/// Central finite differences of `loss` with respect to a sample of coordinates of `x`, compared
/// with `analytic`. Panics with a readable message when the relative error exceeds `tol`.
pub fn check_grad(
    what: &str,
    x: &mut [f32],
    analytic: &[f32],
    samples: usize,
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let n = x.len();
    let stride = (n / samples.max(1)).max(1);
    let (mut num, mut ana) = (Vec::new(), Vec::new());
    for i in (0..n).step_by(stride).take(samples) {
        let orig = x[i];
        x[i] = orig + h;
        let lp = loss(x);
        x[i] = orig - h;
        let lm = loss(x);
        x[i] = orig;
        num.push((lp - lm) / (2.0 * h as f64));
        ana.push(analytic[i] as f64);
    }
    let err = rel_err(&num, &ana);
    assert!(err < tol, "{what}: finite-difference relative error {err:.2e} >= {tol:.0e}\n num {num:?}\n ana {ana:?}");
    assert!(ana.iter().any(|&g| g != 0.0), "{what}: analytic gradient is identically zero on the sample");
}

/// Σ out ⊙ r in f64: a scalar whose gradient with respect to `out` is `r`.
pub fn project(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Directional finite differences: for a few random directions `u`, compares the central
/// difference `(L(x + h·u) − L(x − h·u)) / 2h` (Richardson-extrapolated) with `∇L · u`. Perturbing every coordinate at once makes the
/// signal as large as the whole gradient's norm, so f32 rounding of the loss stays far below it.
pub fn check_grad_directional(
    what: &str,
    x: &mut [f32],
    analytic: &[f32],
    directions: usize,
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut r = rng(0xD1 + x.len() as u64);
    let orig = x.to_vec();
    let (mut num, mut ana) = (Vec::new(), Vec::new());
    for _ in 0..directions {
        let u = randv(&mut r, x.len(), 1.0);
        let mut central = |h: f32| {
            for i in 0..x.len() {
                x[i] = orig[i] + h * u[i];
            }
            let lp = loss(x);
            for i in 0..x.len() {
                x[i] = orig[i] - h * u[i];
            }
            let lm = loss(x);
            (lp - lm) / (2.0 * h as f64)
        };
        // Richardson extrapolation cancels the O(h²) term, so h can stay large enough that f32
        // rounding of the loss is negligible.
        let (d1, d2) = (central(h), central(h / 2.0));
        num.push((4.0 * d2 - d1) / 3.0);
        ana.push(analytic.iter().zip(&u).map(|(&g, &u)| g as f64 * u as f64).sum());
    }
    x.copy_from_slice(&orig);
    let err = rel_err(&num, &ana);
    assert!(
        err < tol,
        "{what}: directional finite-difference error {err:.2e} >= {tol:.0e}\n num {num:?}\n ana {ana:?}"
    );
    assert!(ana.iter().any(|&g| g != 0.0), "{what}: analytic gradient is identically zero");
}

/// The SmolLM2-135M-Instruct directory from `scripts/fetch-smollm2.sh` (or `KILN_REAL_MODEL_DIR`).
/// Without it the caller skips, unless `KILN_REQUIRE_REAL_MODEL=1` (set by `.ci/run`).
pub fn real_model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_REAL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/real-models/smollm2-135m-instruct"));
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var("KILN_REQUIRE_REAL_MODEL").as_deref() != Ok("1"),
        "{} is missing: run scripts/fetch-smollm2.sh",
        dir.display()
    );
    skipped(
        "real model",
        &format!(
            "{} not present (run scripts/fetch-smollm2.sh; KILN_REQUIRE_REAL_MODEL=1 fails instead)",
            dir.display()
        ),
    );
    None
}

/// The bundled SlimPajama-like sample prepared into `dir/data` by the real binary (no held-out
/// split); returns the data directory.
pub fn prepared_corpus(dir: &std::path::Path) -> PathBuf {
    prepared_corpus_holding_out(dir, 0.0)
}

/// The same, with `val_fraction` of the documents held out for evaluation.
pub fn prepared_corpus_holding_out(dir: &std::path::Path, val_fraction: f64) -> PathBuf {
    let data = dir.join("data");
    let input = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/slimpajama_like/validation");
    let fraction = val_fraction.to_string();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["prepare", "--out", data.to_str().unwrap(), "--val-fraction", &fraction, input.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    data
}

/// The `[tokenizer]` and `[data]` sections of a run config that trains on `data` (a prepared
/// corpus) with the bundled Llama-2 tokenizer, `seq_len` tokens per sequence.
pub fn corpus_sections(data: &std::path::Path, seq_len: usize) -> String {
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer/llama2/tokenizer.json");
    format!(
        "[tokenizer]\npath = \"{}\"\n[data]\nseq_len = {seq_len}\n[[data.sources]]\nname = \"text\"\npath = \"{}\"\nweight = 1.0\n",
        tok.display(),
        data.display()
    )
}

/// `kiln train CONFIG --run-dir RUN`, headless and quiet, as the library takes it.
pub fn train_args(config: &std::path::Path, run: &std::path::Path) -> kiln::train::run::TrainArgs {
    kiln::train::run::TrainArgs {
        config: Some(config.to_path_buf()),
        run_dir: Some(run.to_path_buf()),
        sets: Vec::new(),
        steps: None,
        resume: None,
        verbose: false,
        dashboard: false,
    }
}

/// The records of one `kind` ("step", "eval", ...) in a run's metrics.jsonl, in order.
pub fn metrics(run: &std::path::Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}
