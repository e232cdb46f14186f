//! Lines for the terminal. Two kinds, because they fail differently:
//! - `note!` (stderr) and `progress!` (stdout): for people watching a job (progress, warnings). A
//!   closed pipe (`kiln train | head`), a full disk or a vanished terminal must not stop training,
//!   whose record is metrics.jsonl, so a failed write is dropped. (`println!` would panic.)
//! - `out!`: a command's result on stdout (`kiln score`, `eval`, `bench` ...). Not being able to
//!   write it is the command failing, so it returns an error naming stdout.

use anyhow::{Context, Result};
use std::fmt::Arguments;
use std::io::Write;

pub fn note_fmt(args: Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

pub fn progress_fmt(args: Arguments) {
    let _ = writeln!(std::io::stdout().lock(), "{args}");
}

pub fn out_fmt(args: Arguments) -> Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{args}").and_then(|()| o.flush()).context("cannot write to stdout")
}

/// A best-effort line on stderr (see the module notes).
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => { $crate::io::console::note_fmt(format_args!($($t)*)) };
}

/// A best-effort line on stdout (see the module notes).
#[macro_export]
macro_rules! progress {
    ($($t:tt)*) => { $crate::io::console::progress_fmt(format_args!($($t)*)) };
}

/// A result line on stdout; `Err` when it cannot be written.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::io::console::out_fmt(format_args!($($t)*)) };
}
