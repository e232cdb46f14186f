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

/// Whether a process trains the run now, as far as can be told without touching its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// A process holds `kiln.lock` (its id, as this process sees it).
    Live(u32),
    Stopped,
    /// The system does not say who holds locks (no /proc/locks).
    Unknown,
}

/// Who holds `run/kiln.lock`, read from the kernel's table of locks (/proc/locks) and never by
/// trying the lock: a probe that took it even for a moment would refuse a `kiln train` starting
/// in that moment. Nothing is opened for writing and nothing is created.
pub fn liveness(run: &Path) -> Liveness {
    use std::os::unix::fs::MetadataExt;
    let path = run.join(LOCK_FILE);
    let Ok(meta) = std::fs::metadata(&path) else { return Liveness::Stopped };
    let Ok(table) = std::fs::read_to_string("/proc/locks") else { return Liveness::Unknown };
    // The holder the trainer wrote down: a second witness where the table's device numbers differ
    // from stat's (btrfs subvolumes and overlay mounts report another device to stat).
    let written: Option<u32> = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok());
    let dev = (libc::major(meta.dev() as libc::dev_t) as u64, libc::minor(meta.dev() as libc::dev_t) as u64);
    holder(&table, dev, meta.ino(), written).map_or(Liveness::Stopped, Liveness::Live)
}

/// The process holding a lock on inode `ino` of device `dev` in a /proc/locks table, e.g.
/// `1: FLOCK  ADVISORY  WRITE 8251 fe:00:10020836 0 EOF` (waiters, marked `->`, hold nothing).
fn holder(table: &str, dev: (u64, u64), ino: u64, written: Option<u32>) -> Option<u32> {
    table.lines().filter(|l| !l.contains("->")).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| f.matches(':').count() == 2)?;
        let pid: u32 = fields.get(at.checked_sub(1)?)?.parse().ok()?;
        let mut id = fields[at].split(':');
        let major = u64::from_str_radix(id.next()?, 16).ok()?;
        let minor = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (inode == ino && ((major, minor) == dev || written == Some(pid))).then_some(pid)
    })
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

    #[test]
    fn liveness_follows_the_lock_without_taking_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(liveness(dir.path()), Liveness::Stopped, "never trained here");
        let lock = lock_run_dir(dir.path()).unwrap();
        if !Path::new("/proc/locks").exists() {
            assert_eq!(liveness(dir.path()), Liveness::Unknown);
            return;
        }
        assert_eq!(liveness(dir.path()), Liveness::Live(std::process::id()));
        // Asking left the lock with its holder: a second lock is still refused.
        assert!(lock_run_dir(dir.path()).is_err());
        drop(lock);
        assert_eq!(liveness(dir.path()), Liveness::Stopped, "the file stays behind, the lock does not");
    }

    #[test]
    fn the_lock_table_is_read_by_device_and_inode() {
        let table = "1: FLOCK  ADVISORY  WRITE 8251 fe:00:10020836 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 9000 fe:00:77 0 EOF\n\
                     3: POSIX  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n";
        assert_eq!(holder(table, (0xfe, 0), 10020836, None), Some(8251));
        assert_eq!(holder(table, (0xfe, 1), 10020836, None), None, "another device");
        assert_eq!(holder(table, (0xfe, 0), 77, None), None, "a waiter holds nothing");
        assert_eq!(holder(table, (0, 0x2a), 77, None), Some(4242));
        assert_eq!(holder(table, (9, 9), 10020836, Some(8251)), Some(8251), "the pid the trainer wrote");
    }
}
