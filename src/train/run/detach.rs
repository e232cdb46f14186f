//! `kiln train --detach`: the same run started in the background, headless, in its own process
//! group (closing the terminal does not stop it), with its output appended to `RUN_DIR/train.log`.
//! A run that cannot start fails within moments, so this waits for its socket or its end and makes
//! that failure this command's.

use super::{default_run_dir, TrainArgs};
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;

/// Re-runs this `kiln train` in the background, headless, detached from the terminal.
pub fn detach(args: &TrainArgs) -> Result<()> {
    let TrainArgs { config, run_dir, sets, steps, resume, .. } = args;
    let run = match resume {
        Some(r) => r.clone(),
        None => run_dir.clone().unwrap_or_else(|| default_run_dir(config.as_deref())),
    };
    std::fs::create_dir_all(&run).with_context(|| format!("{}: cannot create run directory", run.display()))?;
    let log_path = run.join("train.log");
    // Appended to: a resumed run keeps its earlier log (and a live run's is not cut off).
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: cannot open", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let started = std::time::SystemTime::now();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("train").arg("--headless");
    match resume {
        Some(r) => {
            cmd.arg("--resume").arg(r);
        }
        None => {
            cmd.args(config.iter()).arg("--run-dir").arg(&run);
        }
    }
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    if let Some(n) = steps {
        cmd.arg("--steps").arg(n.to_string());
    }
    // Its own process group: closing this terminal does not signal it (and it ignores SIGHUP).
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the background run")?;
    // A run that cannot start (a bad config, a corrupt shard, a run already in use) fails within
    // moments: wait for it to open its socket or end, so that failure is this command's.
    let socket = run.join(crate::train::socket::SOCKET);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let log_text = std::fs::read(&log_path).unwrap_or_default();
            let tail = String::from_utf8_lossy(log_text.get(log_start as usize..).unwrap_or_default());
            let why = tail.lines().rev().find_map(|l| l.strip_prefix("error: ")).unwrap_or("see its log");
            if !status.success() {
                bail!("the background run failed at once: {why} (log {})", log_path.display());
            }
            break;
        }
        let listening = std::fs::metadata(&socket).and_then(|m| m.modified()).is_ok_and(|t| t >= started);
        if listening {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    crate::out!("training in the background (pid {}), log {}", child.id(), log_path.display())?;
    crate::out!("attach:  kiln attach {}", run.display())?;
    Ok(())
}
