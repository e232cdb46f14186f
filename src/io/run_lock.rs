//! One training process per run directory: `RUN/kiln.lock`, held with an advisory lock for as long
//! as the run is open. A second `kiln train --resume` on a live run would otherwise write its own
//! checkpoints, move `latest`, rewrite `metrics.jsonl` under the first and take over its socket.
//! The lock belongs to the open file, so a process that dies (even by `kill -9`) releases it.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub const LOCK_FILE: &str = "kiln.lock";

/// Held while the run is open; dropping it releases the run directory.
pub struct RunLock {
    _file: File,
}

/// Takes `run/kiln.lock`, or fails naming the process that holds it.
pub fn lock_run_dir(run: &Path) -> Result<RunLock> {
    let path = run.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = holder.trim();
            let who = if pid.is_empty() { "another process".to_string() } else { format!("process {pid}") };
            bail!("{}: the run is in use by {who} (attach with `kiln attach {}`)", path.display(), run.display());
        }
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("{}: cannot lock", path.display())),
    }
    // Who holds it, for the message above; the lock itself is what counts.
    let mut note = || -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())
    };
    note().with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(RunLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_run_fails_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_run_dir(dir.path()).unwrap();
        let e = lock_run_dir(dir.path()).err().unwrap().to_string();
        assert!(e.contains("kiln.lock: the run is in use by process"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(first);
        lock_run_dir(dir.path()).unwrap();
    }
}
