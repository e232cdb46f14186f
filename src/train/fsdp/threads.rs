//! The rank threads: every local rank runs each collective-bearing call on a thread of its own,
//! and one rank's failure is turned into an error on all of them (or, where that cannot release
//! them, into the process's exit).

use super::rank::Rank;
use crate::backend::Backend;
use anyhow::{bail, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// The default `on_stuck`: the ranks left are blocked where nothing can release them, so report
/// the failure the way the command line reports errors and end the process.
pub(super) fn exit_stuck(why: &str) {
    use ratatui::crossterm::{execute, terminal};
    // The dashboard may own the terminal, and exiting skips its restore: give the terminal back.
    if terminal::is_raw_mode_enabled().unwrap_or(false) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(std::io::stdout(), terminal::LeaveAlternateScreen);
    }
    crate::note!("error: {why} (the other ranks are blocked in a collective that cannot be released: exiting)");
    std::process::exit(2);
}

/// Runs `f` on every local rank at once, a thread each (collectives need every rank inside
/// them together). A rank that errors or panics aborts the group, so the others get an error
/// instead of hanging; the error reported is the failing rank's, not those it released.
///
/// CPU ranks are released by the abort at once. GPU ranks blocked inside an NCCL collective
/// cannot be (kiln does not call `ncclCommAbort`), so if the others have not come back
/// `release_grace` after the first failure, `on_stuck` gets the failure: by default it prints
/// it and exits the process, which ends a run that would otherwise hang forever.
///
/// With no local failure at all, a rank on another node that died or stalled leaves every local
/// rank waiting in a collective for good; so if they are not all back `stall` after the call
/// began (`parallel.collective_timeout_s`), `on_stuck` gets that instead.
pub(super) fn on_every_rank<B: Backend, T: Send>(
    ranks: &mut [Rank<B>],
    grace: Duration,
    stall: Option<Duration>,
    on_stuck: &(dyn Fn(&str) + Send + Sync),
    f: impl Fn(&mut Rank<B>, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let started = Instant::now();
    let f = &f;
    let n = ranks.len();
    let global: Vec<usize> = ranks.iter().map(|r| r.shards.comm.rank()).collect();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<T>)>();
    let mut results: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        for (i, rank) in ranks.iter_mut().enumerate() {
            let tx = tx.clone();
            s.spawn(move || {
                let out = match catch_unwind(AssertUnwindSafe(|| f(rank, i))) {
                    Ok(x) => x,
                    Err(p) => {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into());
                        Err(anyhow::anyhow!("panicked: {msg}"))
                    }
                };
                if let Err(e) = &out {
                    rank.shards.comm.abort(&format!("{e:#}"));
                }
                let _ = tx.send((i, out));
            });
        }
        drop(tx);
        let mut first_failure: Option<(Instant, String)> = None;
        let mut stuck_reported = false;
        let stalled = |left: usize| {
            let secs = stall.unwrap_or_default().as_secs_f64();
            format!("{left} of {n} rank(s) on this node still inside the training step after {secs} s: a rank here or on another node stopped responding (the limit is parallel.collective_timeout_s)")
        };
        for back in 0..n {
            // Until when the ranks still out may take; what to report is worded only if they overrun it.
            let deadline = match &first_failure {
                Some((t, _)) => Some(*t + grace),
                None => stall.map(|d| started + d),
            };
            let next = match deadline {
                Some(at) if !stuck_reported => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(x) => Ok(x),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        stuck_reported = true;
                        let why = first_failure.as_ref().map_or_else(|| stalled(n - back), |(_, why)| why.clone());
                        on_stuck(&why);
                        rx.recv()
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                },
                _ => match rx.recv() {
                    Ok(x) => Ok(x),
                    Err(_) => break,
                },
            };
            let Ok((i, out)) = next else { break };
            if let (Err(e), None) = (&out, &first_failure) {
                first_failure = Some((Instant::now(), format!("rank {} failed: {e:#}", global[i])));
            }
            results[i] = Some(out);
        }
    });
    let results: Vec<Result<T>> =
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("rank thread died")))).collect();
    let mut first_err = None;
    for (res, r) in results.iter().zip(&global) {
        if let Err(e) = res {
            let msg = format!("{e:#}");
            if !msg.starts_with("rank ") {
                bail!("rank {r} failed: {msg}");
            }
            first_err.get_or_insert(msg);
        }
    }
    if let Some(e) = first_err {
        bail!("{e}");
    }
    Ok(results.into_iter().map(|r| r.expect("checked above")).collect())
}
