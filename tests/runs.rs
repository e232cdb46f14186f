//! Comparing runs through the `kiln` binary: `kiln runs` lists two small runs (live and stopped,
//! read without touching the lock), `kiln plot A B` overlays them with a legend and the guard's
//! marker, and bad input is one line, exit 2, with nothing on disk changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

fn kiln(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).env("RAYON_NUM_THREADS", "2");
    common::output_within(&mut c, Duration::from_secs(120), &format!("kiln {args:?}"))
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "kiln failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The error contract: exit code 2, no panic, one line `error: ...` containing `needle`.
fn fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "expected exit code 2 mentioning {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&o.stdout));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every path under `dir` with its length, modification time and bytes: what "nothing on disk
/// changed" compares.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, SystemTime, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let bytes = if m.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
            out.push((p, m.len(), m.modified().unwrap(), bytes));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether the SVG has a text element reading exactly `text` (plotters writes `>\nTEXT\n</text>`).
fn has_text(svg: &str, text: &str) -> bool {
    svg.contains(&format!(">\n{text}\n</text>"))
}

/// `kiln runs` as rows of columns (header first).
fn rows(printed: &str) -> Vec<Vec<String>> {
    printed.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect()
}

/// Two runs of a small model in `dir`: `lr-3e-3` (6 of 8 steps) and `lr-1e-2` (4 of 8 steps,
/// its third update refused by the guard: a NaN gradient from the test hook).
fn two_runs(dir: &Path) -> (PathBuf, PathBuf) {
    let data = common::prepared_corpus_holding_out(dir, 0.05);
    let cfg = dir.join("run.toml");
    let head = "[model]\nn_layer = 1\nd_model = 32\nn_head = 2\nd_ff = 64\nvocab_size = 32000\nmax_seq_len = 64\n\
                [train]\nmicro_batch = 1\nmax_steps = 8\nlog_every = 1\n[optim]\nwarmup_steps = 1\n\
                [checkpoint]\nevery_steps = 2\nkeep_last = 2\n[eval]\nevery_steps = 2\nbatches = 1\n";
    std::fs::write(&cfg, format!("{head}{}", common::corpus_sections(&data, 32))).unwrap();
    let (a, b) = (dir.join("lr-3e-3"), dir.join("lr-1e-2"));
    ok(&kiln(&["train", s(&cfg), "--run-dir", s(&a), "--headless", "--steps", "6", "--set", "optim.lr=3e-3"]));
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(["train", s(&cfg), "--run-dir", s(&b), "--headless", "--steps", "4", "--set", "optim.lr=1e-2"])
        .env("RAYON_NUM_THREADS", "2")
        .env("KILN_TEST_NAN_GRAD", "3");
    ok(&common::output_within(&mut c, Duration::from_secs(120), "kiln train lr-1e-2"));
    (a, b)
}

#[test]
fn runs_lists_two_runs_live_and_stopped_and_plot_overlays_them() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = two_runs(t.path());

    // Sorted by name; `data` (a prepared corpus, no metrics.jsonl) is not a run.
    let listed = rows(&ok(&kiln(&["runs", s(t.path())])));
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0][..3], ["run", "state", "step"]);
    assert_eq!(listed[1][..3], ["lr-1e-2", "stopped", "4/8"], "{listed:?}");
    assert_eq!(listed[2][..3], ["lr-3e-3", "stopped", "6/8"], "{listed:?}");
    // tokens, loss, eval loss, tokens/s, the latest checkpoint.
    assert_eq!(listed[2][3], "192", "6 steps of 32 tokens");
    for r in &listed[1..] {
        let num = |c: usize| r[c].parse::<f64>().unwrap_or_else(|_| panic!("column {c} of {r:?}"));
        assert!(num(4) > 5.0 && num(5) > 5.0 && num(6) > 0.0, "{r:?}");
    }
    assert_eq!((listed[1][7].as_str(), listed[2][7].as_str()), ("step-00000004", "step-00000006"));

    // Overlaid: a PNG, and an SVG whose legend names both runs and the guard's refusal.
    let png = t.path().join("x.png");
    assert_eq!(ok(&kiln(&["plot", s(&a), s(&b), "--out", s(&png)])).trim(), s(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 30_000, "{} bytes", bytes.len());
    let svg = t.path().join("x.svg");
    ok(&kiln(&["plot", s(&a), s(&b), "--out", s(&svg)]));
    let text = std::fs::read_to_string(&svg).unwrap();
    for name in ["lr-3e-3", "lr-1e-2", "guard: update refused", "tokens", "eval (held out)"] {
        assert!(has_text(&text, name), "{name} in the SVG");
    }
    // One run: against steps, labelled as integers, tokens along the top.
    let one = t.path().join("one.svg");
    ok(&kiln(&["plot", s(&a), "--out", s(&one)]));
    let text = std::fs::read_to_string(&one).unwrap();
    assert!(has_text(&text, "step") && has_text(&text, "6") && !has_text(&text, "6.0"), "integer step labels");
    assert!(has_text(&text, "smoothed") && has_text(&text, "raw") && has_text(&text, "tokens"));

    // A live run: `kiln runs` sees its lock without taking it, and changes nothing while it looks.
    let held = a.join(".kiln-test-held");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--resume", s(&a), "--headless", "--steps", "1"])
        .env("RAYON_NUM_THREADS", "2")
        .env("KILN_TEST_HOLD_CHECKPOINT", "staging")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !held.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the resumed run exited early");
        assert!(Instant::now() < deadline, "the resumed run never reached its checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = snapshot(t.path());
    let listed = rows(&ok(&kiln(&["runs", s(t.path())])));
    let after = snapshot(t.path());
    let live = (listed[2][1].clone(), listed[2][2].clone());
    // The trainer held in its checkpoint write, still holding the run.
    let refused = kiln(&["train", "--resume", s(&a), "--headless"]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(live, ("live".to_string(), "7/8".to_string()), "{listed:?}");
    assert_eq!(listed[1][1], "stopped");
    assert!(before == after, "kiln runs changed something on disk");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use by process"), "the lock was left to its holder");
    assert_eq!(rows(&ok(&kiln(&["runs", s(t.path())])))[2][1], "stopped", "its lock went with it");
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let step = |s: u32| {
        format!(
            "{{\"kind\":\"step\",\"step\":{s},\"tokens\":{},\"loss\":4.0,\"lr\":0.001,\"tokens_per_s\":9.0}}\n",
            s * 64
        )
    };
    std::fs::write(run.join("metrics.jsonl"), step(1) + &step(2)).unwrap();
    let not_run = t.path().join("notes");
    std::fs::create_dir(&not_run).unwrap();
    std::fs::write(not_run.join("readme.txt"), "not a run").unwrap();
    let before = snapshot(t.path());

    fails(&kiln(&["plot", s(&not_run)]), "notes: not a run directory (no metrics.jsonl)");
    fails(&kiln(&["plot", s(&run), s(&not_run), "--out", s(&t.path().join("c.png"))]), "notes: not a run directory");
    fails(&kiln(&["plot", s(&run), s(&t.path().join("gone"))]), "gone: no such directory");
    fails(&kiln(&["runs", s(&t.path().join("missing"))]), "missing: no such directory");
    fails(&kiln(&["runs", s(&run.join("metrics.jsonl"))]), "metrics.jsonl: not a directory");
    assert!(snapshot(t.path()) == before, "a refused command changed something on disk");

    // No runs under a directory is a note, not an error; a run directory lists as itself.
    let printed = ok(&kiln(&["runs", s(&not_run)]));
    assert_eq!(printed.trim_end().lines().count(), 1);
    assert!(printed.contains("no runs"), "{printed}");
    assert_eq!(rows(&ok(&kiln(&["runs", s(&run)])))[1][..3], ["run", "stopped", "2"]);
    assert!(snapshot(t.path()) == before, "listing changed something on disk");
}
