//! `kiln bench dashboard`: what the dashboard costs training. The real binary is run as a child,
//! headless and with the dashboard on a pseudo-terminal (so it is the same code a user runs over
//! SSH; only the terminal emulator's own drawing is left out, and over SSH that happens on the
//! client), in interleaved pairs on the same config. Throughput is the median tokens/s of the steps
//! after a warm-up, read back from each run's metrics.jsonl. A final run is paused from the
//! keyboard to measure what an idle dashboard costs.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct DashboardBenchArgs {
    pub config: PathBuf,
    /// Steps per run.
    pub steps: u64,
    /// Headless/dashboard pairs.
    pub pairs: usize,
    /// Steps left out of each run's median (start-up, first allocations).
    pub warmup: u64,
    /// Seconds the paused dashboard is watched for its idle cost.
    pub idle_secs: u64,
    pub cols: u16,
    pub rows: u16,
}

/// A pseudo-terminal whose master end is drained by a thread, as a terminal emulator would.
struct Pty {
    master: File,
    slave: OwnedFd,
    bytes: Arc<AtomicU64>,
}

impl Pty {
    fn open(cols: u16, rows: u16) -> Result<Pty> {
        let (mut m, mut s) = (-1, -1);
        let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: out-pointers to two ints; no name buffer; default termios; a valid winsize.
        let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &size) };
        if rc != 0 {
            bail!("cannot open a pseudo-terminal: {}", std::io::Error::last_os_error());
        }
        // SAFETY: openpty succeeded, so both are fresh descriptors we now own.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        let bytes = Arc::new(AtomicU64::new(0));
        let mut reader = master.try_clone()?;
        let counted = bytes.clone();
        std::thread::Builder::new().name("pty-drain".into()).spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            // Ends with EIO once the child has closed the terminal.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                counted.fetch_add(n as u64, Ordering::Relaxed);
            }
        })?;
        Ok(Pty { master, slave, bytes })
    }

    fn press(&mut self, keys: &str) -> Result<()> {
        self.master.write_all(keys.as_bytes())?;
        Ok(())
    }
}

/// Kills the child if the bench stops early, so no training run outlives it.
struct Run {
    child: Child,
    dir: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn train_command(args: &DashboardBenchArgs, dir: &Path, steps: u64) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe().context("cannot find the kiln binary")?);
    cmd.arg("train").arg(&args.config).arg("--run-dir").arg(dir);
    cmd.args(["--steps", &steps.to_string(), "--set", &format!("train.max_steps={}", steps.max(1_000_000))]);
    Ok(cmd)
}

fn spawn_headless(args: &DashboardBenchArgs, dir: &Path, steps: u64) -> Result<Run> {
    let mut cmd = train_command(args, dir, steps)?;
    let log = dir.with_extension("stderr");
    let err = File::create(&log).with_context(|| format!("{}: cannot create", log.display()))?;
    cmd.arg("--headless").stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
    Ok(Run { child: cmd.spawn().context("cannot start kiln train")?, dir: dir.to_path_buf() })
}

fn spawn_dashboard(args: &DashboardBenchArgs, dir: &Path, steps: u64, pty: &Pty) -> Result<Run> {
    let mut cmd = train_command(args, dir, steps)?;
    cmd.stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave.try_clone()?));
    if std::env::var_os("TERM").is_none() {
        cmd.env("TERM", "xterm-256color");
    }
    // SAFETY: only async-signal-safe calls between fork and exec. A session of its own with the
    // pseudo-terminal as its controlling terminal, as a login shell would have.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    Ok(Run { child: cmd.spawn().context("cannot start kiln train")?, dir: dir.to_path_buf() })
}

/// CPU seconds (user + system) of a process, or of one of its threads.
fn cpu_secs(stat: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// CPU seconds of the dashboard's threads: the process's main thread (the loop and its drawing)
/// and the thread that reads the terminal (absent in a headless run).
fn dashboard_cpu_secs(pid: u32) -> Option<f64> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    let main = cpu_secs(&task.join(pid.to_string()).join("stat"))?;
    let input: f64 = std::fs::read_dir(&task)
        .ok()?
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "kiln-input"))
        .filter_map(|t| cpu_secs(&t.path().join("stat")))
        .sum();
    Some(main + input)
}

/// What one finished run measured.
struct Measured {
    tokens_per_s: f64,
    steps: usize,
    /// CPU of the dashboard's threads (the process's main thread in a headless run) per second,
    /// after the warm-up; NaN when the run was too short to tell.
    main_thread_cores: f64,
    wall_secs: f64,
}

/// Waits for a run to end, sampling its dashboard's CPU twice a second while it lives. That is
/// counted from the end of the warm-up: before it the main thread also loaded the tokenizer and
/// built the model.
fn finish(mut run: Run, warmup: u64) -> Result<Measured> {
    let pid = run.child.id();
    let metrics = run.dir.join("metrics.jsonl");
    let start = Instant::now();
    let mut first: Option<(f64, Instant)> = None;
    let mut last = (0.0, Instant::now());
    let status = loop {
        if let Some(s) = run.child.try_wait()? {
            break s;
        }
        if let Some(cpu) = dashboard_cpu_secs(pid) {
            last = (cpu, Instant::now());
            if first.is_none() && count_steps(&metrics) as u64 > warmup {
                first = Some(last);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let wall_secs = start.elapsed().as_secs_f64();
    let main_thread_cores = match first {
        Some((cpu, t)) if last.1 > t => (last.0 - cpu) / (last.1 - t).as_secs_f64(),
        _ => f64::NAN,
    };
    if !status.success() {
        let err = std::fs::read_to_string(run.dir.with_extension("stderr")).unwrap_or_default();
        bail!("{}: kiln train failed ({status}): {}", run.dir.display(), err.trim());
    }
    let (tokens_per_s, steps) = median_tokens_per_s(&run.dir.join("metrics.jsonl"), warmup)?;
    Ok(Measured { tokens_per_s, steps, main_thread_cores, wall_secs })
}

/// The median tokens/s of the step records after `warmup`, and how many there were.
fn median_tokens_per_s(metrics: &Path, warmup: u64) -> Result<(f64, usize)> {
    let text = std::fs::read_to_string(metrics).with_context(|| format!("{}: cannot read", metrics.display()))?;
    let mut tps: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step" && v["step"].as_u64().is_some_and(|s| s > warmup))
        .filter_map(|v| v["tokens_per_s"].as_f64())
        .collect();
    if tps.is_empty() {
        bail!("{}: no steps after the {warmup}-step warm-up", metrics.display());
    }
    tps.sort_by(f64::total_cmp);
    Ok((median(&tps), tps.len()))
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn count_steps(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics).map(|t| t.lines().filter(|l| l.contains("\"kind\":\"step\"")).count()).unwrap_or(0)
}

/// What an idle dashboard costs: a run is paused with `p`, its whole process is watched, and it
/// is ended with `q` `s` as a user would.
struct Idle {
    cores: f64,
    steps_while_paused: usize,
}

fn measure_idle(args: &DashboardBenchArgs, dir: &Path) -> Result<Idle> {
    let mut pty = Pty::open(args.cols, args.rows)?;
    let mut run = spawn_dashboard(args, dir, 1_000_000, &pty)?;
    let metrics = dir.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while count_steps(&metrics) == 0 {
        if Instant::now() > deadline || run.child.try_wait()?.is_some() {
            bail!("{}: the run did not reach its first step", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    pty.press("p")?;
    // The pause lands at the next step boundary; wait for the step count to settle.
    let mut seen = count_steps(&metrics);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = count_steps(&metrics);
        if now == seen {
            break;
        }
        seen = now;
    }
    let stat = PathBuf::from(format!("/proc/{}/stat", run.child.id()));
    let before = cpu_secs(&stat).context("cannot read the run's CPU time")?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let after = cpu_secs(&stat).context("cannot read the run's CPU time")?;
    let cores = (after - before) / t.elapsed().as_secs_f64();
    let steps_while_paused = count_steps(&metrics) - seen;
    pty.press("q")?;
    std::thread::sleep(Duration::from_millis(300));
    pty.press("s")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("{}: the paused run did not stop after q s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Idle { cores, steps_while_paused })
}

/// Milliseconds to draw one frame of a dashboard holding `steps` steps of history, into an
/// in-memory terminal (layout, widgets and the diff against the previous frame).
fn frame_ms(cols: u16, rows: u16, steps: u64) -> Result<f64> {
    use crate::train::events::{Event, RankMetrics, StepMetrics};
    use crate::tui::{app::App, theme, view::render};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    let mut app = App::new("bench".into(), steps * 2, theme::themes(theme::ColorMode::TrueColor), true);
    for step in 1..=steps {
        app.on_event(&Event::Step(StepMetrics {
            step,
            tokens: step * 2048,
            loss: 3.0 + 7.0 / (step as f64).sqrt() + 0.1 * ((step * 7919 % 101) as f64 / 101.0),
            lr: 3e-3,
            grad_norm: 0.8,
            tokens_per_s: 1800.0,
            step_ms: 1100.0,
            data_wait_ms: 0.1,
            mfu: 0.05,
            time: 0.0,
            ranks: vec![RankMetrics { rank: 0, tokens_per_s: 1800.0, state_mb: 36.0, peak_mb: 70.0, comm_ms: 0.0 }],
            unit_grad_norms: None,
        }));
    }
    let mut term = Terminal::new(TestBackend::new(cols, rows))?;
    let frames = 40;
    let t = Instant::now();
    for _ in 0..frames {
        term.clear()?; // every cell changed, as when the curve moves: the worst case
        term.draw(|f| render(f, &app))?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / frames as f64)
}

pub fn run(args: &DashboardBenchArgs) -> Result<Vec<(String, String)>> {
    if !args.config.is_file() {
        bail!("{}: no such config file", args.config.display());
    }
    let root = std::env::temp_dir().join(format!("kiln-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let result = measure(args, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn measure(args: &DashboardBenchArgs, root: &Path) -> Result<Vec<(String, String)>> {
    let mut lines = vec![(
        "config".to_string(),
        format!(
            "{} · {} steps per run, median of steps after {} · dashboard at {}x{}",
            args.config.display(),
            args.steps,
            args.warmup,
            args.cols,
            args.rows
        ),
    )];
    for steps in [100, 10_000, 100_000] {
        lines.push((
            format!("frame, {steps} steps"),
            format!("{:.2} ms to draw (full redraw)", frame_ms(args.cols, args.rows, steps)?),
        ));
    }
    // Prepare the corpus (if the config asks for it) outside the timed runs.
    finish(spawn_headless(args, &root.join("prepare"), 1)?, 0).ok();
    let (mut headless, mut dashboard) = (Vec::new(), Vec::new());
    let mut ui_cores = Vec::new();
    for pair in 0..args.pairs {
        // Alternate which mode goes first so that drift in the machine's speed cancels out.
        for dash in [pair % 2 == 1, pair % 2 == 0] {
            let dir = root.join(format!("{}-{pair}", if dash { "dashboard" } else { "headless" }));
            let m = if dash {
                let pty = Pty::open(args.cols, args.rows)?;
                let m = finish(spawn_dashboard(args, &dir, args.steps, &pty)?, args.warmup)?;
                let kib = pty.bytes.load(Ordering::Relaxed) as f64 / 1024.0;
                ui_cores.push(m.main_thread_cores);
                lines.push((
                    format!("dashboard run {}", pair + 1),
                    format!(
                        "{:.0} tokens/s ({} steps, {:.0} s; dashboard threads {:.2}% of a core, {:.1} KiB/s to the terminal)",
                        m.tokens_per_s,
                        m.steps,
                        m.wall_secs,
                        m.main_thread_cores * 100.0,
                        kib / m.wall_secs
                    ),
                ));
                m
            } else {
                let m = finish(spawn_headless(args, &dir, args.steps)?, args.warmup)?;
                lines.push((
                    format!("headless run {}", pair + 1),
                    format!("{:.0} tokens/s ({} steps, {:.0} s)", m.tokens_per_s, m.steps, m.wall_secs),
                ));
                m
            };
            if dash { &mut dashboard } else { &mut headless }.push(m.tokens_per_s);
        }
    }
    // Each pair ran back to back, so its ratio is the least affected by the machine's drift.
    let mut ratios: Vec<f64> = dashboard.iter().zip(&headless).map(|(d, h)| d / h).collect();
    let listed: Vec<String> = ratios.iter().map(|r| format!("{:.1}%", 100.0 * r)).collect();
    ratios.sort_by(f64::total_cmp);
    headless.sort_by(f64::total_cmp);
    dashboard.sort_by(f64::total_cmp);
    let (h, d) = (median(&headless), median(&dashboard));
    lines.push(("headless (median)".into(), format!("{h:.0} tokens/s")));
    lines.push(("dashboard (median)".into(), format!("{d:.0} tokens/s")));
    lines.push((
        "dashboard / headless".into(),
        format!("{:.1}% (median of the pairs' ratios: {})", 100.0 * median(&ratios), listed.join(", ")),
    ));
    ui_cores.sort_by(f64::total_cmp);
    lines.push(("dashboard threads".into(), format!("{:.2}% of a core while training", 100.0 * median(&ui_cores))));
    if args.idle_secs > 0 {
        let idle = measure_idle(args, &root.join("idle"))?;
        lines.push((
            "idle (paused) dashboard".into(),
            format!(
                "{:.2}% of a core for the whole process over {} s ({} steps taken while paused)",
                idle.cores * 100.0,
                args.idle_secs,
                idle.steps_while_paused
            ),
        ));
    }
    Ok(lines)
}
