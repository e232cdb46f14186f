//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/` is a Hugging Face model directory plus kiln's
//! training state (`optimizer/` with each rank's shard of the AdamW moments, see `optim_state`, and
//! `trainer.json`). A checkpoint is
//! written into a temporary directory, fsynced and renamed; only then does `RUN/checkpoints/latest`
//! move to it, and retention never deletes what `latest` names. A `kill -9` at any moment therefore
//! leaves `latest` on a whole checkpoint.

use super::optim_state::{self, RankMoments};
use crate::data::mixture::MixState;
use crate::io::atomic::{fsync_dir, write_file};
use crate::io::save::{write_json, write_model_dir};
use crate::model::{LlamaConfig, Weights};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The consolidated AdamW moments of checkpoints written before per-rank files (still read).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
use crate::io::checksums::{checksum_files, CHECKSUMS_KEY};
pub use crate::io::checksums::{verify_files, TRAINER_FILE};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Data position after the last consumed micro-batch.
    pub mix: MixState,
    pub kiln_version: String,
    /// The step guard's running window and skip counts (absent in checkpoints from before it).
    #[serde(default)]
    pub guard: super::guard::GuardState,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// What a checkpoint holds, on the host.
pub struct Snapshot<'a> {
    pub cfg: &'a LlamaConfig,
    pub weights: &'a Weights<Vec<f32>>,
    /// Each rank's shard of the AdamW moments.
    pub optimizer: &'a [RankMoments<'a>],
    pub state: &'a TrainerState,
    pub bos: u32,
    pub eos: u32,
    pub tokenizer_files: &'a [(&'a str, &'a [u8])],
}

/// Writes a checkpoint atomically, points `latest` at it, applies `keep_last` retention.
pub fn save(run: &Path, snap: &Snapshot<'_>, keep_last: usize) -> Result<PathBuf> {
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = checkpoint_name(snap.state.step);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        hold_for_test(run, "staging");
        write_model_dir(&tmp, snap.cfg, snap.weights, snap.bos, snap.eos, snap.tokenizer_files)?;
        hold_for_test(run, "weights");
        optim_state::write(&tmp, &optim_state::unit_lens(snap.cfg), snap.optimizer)?;
        hold_for_test(run, "optimizer");
        let mut state = serde_json::to_value(snap.state)?;
        state[CHECKSUMS_KEY] = serde_json::to_value(checksum_files(&tmp)?)?;
        write_json(&tmp.join(TRAINER_FILE), &state)?;
        hold_for_test(run, "state");
        fsync_dir(&tmp)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(
            e.context(format!("{}: checkpoint not written (the previous one is intact)", dir.join(&name).display()))
        );
    }
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        // A leftover from a run that was resumed from an earlier checkpoint; `latest` is older.
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("{}: cannot replace", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot move into place", final_dir.display()))?;
    hold_for_test(run, "renamed");
    fsync_dir(&dir)?;
    write_file(&dir.join("latest"), format!("{name}\n").as_bytes())?;
    hold_for_test(run, "latest");
    retain(&dir, keep_last, &name)?;
    Ok(final_dir)
}

/// The crash test's hook (tests/train.rs): with `KILN_TEST_HOLD_CHECKPOINT=STAGE`, writing a
/// checkpoint stops at that stage, says so in `RUN/.kiln-test-held`, and waits to be killed, so
/// the test kills it mid-write at a point the checkpoint's own progress defines, not a timer.
fn hold_for_test(run: &Path, stage: &str) {
    if std::env::var("KILN_TEST_HOLD_CHECKPOINT").is_ok_and(|s| s == stage) {
        let _ = std::fs::write(run.join(".kiln-test-held"), stage);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

/// Deletes all but the newest `keep` checkpoints, never `protect`, and stale temporary dirs.
fn retain(dir: &Path, keep: usize, protect: &str) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if name.starts_with(".tmp-") && !name.ends_with(&format!("-{}", std::process::id())) {
            let _ = std::fs::remove_dir_all(dir.join(&name));
        }
    }
    // Only whole checkpoints count and are deleted: a stray file or a directory without a trainer
    // state (the user's, or anything else) is not kiln's to delete.
    let steps = whole_checkpoints_in(dir)?;
    let n = steps.len();
    for old in steps.into_iter().take(n.saturating_sub(keep)) {
        if old != protect {
            std::fs::remove_dir_all(dir.join(&old))
                .with_context(|| format!("{}: cannot remove", dir.join(&old).display()))?;
        }
    }
    Ok(())
}

/// The checkpoint `RUN/checkpoints/latest` names, if any.
pub fn latest(run: &Path) -> Result<Option<PathBuf>> {
    let p = checkpoints_dir(run).join("latest");
    if !p.exists() {
        // A checkpoint directory is renamed into place only once whole, so any that exist are
        // whole: `latest` was lost (deleted, or a crash between the rename and its write). Starting
        // afresh would throw their training, and the run's metrics, away.
        return Ok(match whole_checkpoints(run)?.pop() {
            Some(newest) => {
                crate::note!("{}: missing; using the newest whole checkpoint, {newest}", p.display());
                Some(checkpoints_dir(run).join(newest))
            }
            None => None,
        });
    }
    let name = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    let name = name.trim();
    if !name.starts_with("step-") || name.contains('/') {
        bail!("{}: does not name a checkpoint ({name:?})", p.display());
    }
    let dir = checkpoints_dir(run).join(name);
    if !dir.join(TRAINER_FILE).exists() {
        bail!("{}: latest checkpoint is missing or incomplete", dir.display());
    }
    Ok(Some(dir))
}

/// Names of the run's whole checkpoints, oldest first (see `whole_checkpoints_in`).
pub fn whole_checkpoints(run: &Path) -> Result<Vec<String>> {
    let dir = checkpoints_dir(run);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    whole_checkpoints_in(&dir)
}

/// Names of the checkpoint directories in `dir` (`step-N` holding a trainer state), oldest first.
fn whole_checkpoints_in(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-") && dir.join(n).join(TRAINER_FILE).is_file())
        .collect();
    names.sort();
    Ok(names)
}

/// A model directory from a path that may be a model dir, a checkpoint, a run dir, or a run's
/// `checkpoints/latest` pointer (a file naming the checkpoint, which users reach for as if it were one).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.is_file() && path.file_name().is_some_and(|n| n == "latest") {
        if let Some(run) =
            path.parent().filter(|c| c.file_name().is_some_and(|n| n == "checkpoints")).and_then(Path::parent)
        {
            return latest(run)?.with_context(|| format!("{}: names no whole checkpoint", path.display()));
        }
    }
    if path.join("config.json").exists() || !path.join("checkpoints").is_dir() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.with_context(|| format!("{}: run directory has no checkpoint yet", path.display()))
}

pub fn read_state(ckpt: &Path) -> Result<TrainerState> {
    let p = ckpt.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: malformed trainer state ({e})", p.display()))
}

/// AdamW first and second moments `(m, v)` on the host.
pub type HostMoments = (Weights<Vec<f32>>, Weights<Vec<f32>>);

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_checkpoint(run: &Path, step: u64) {
        let d = checkpoints_dir(run).join(checkpoint_name(step));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(TRAINER_FILE), "{}").unwrap();
    }

    #[test]
    fn the_latest_pointer_resolves_to_its_checkpoint() {
        let run = tempfile::tempdir().unwrap();
        fake_checkpoint(run.path(), 2);
        fake_checkpoint(run.path(), 4);
        let pointer = checkpoints_dir(run.path()).join("latest");
        std::fs::write(&pointer, "step-00000002\n").unwrap();
        assert_eq!(resolve_model_dir(&pointer).unwrap(), checkpoints_dir(run.path()).join(checkpoint_name(2)));
        assert_eq!(resolve_model_dir(run.path()).unwrap(), checkpoints_dir(run.path()).join(checkpoint_name(2)));
    }

    #[test]
    fn without_latest_the_newest_whole_checkpoint_is_used() {
        let run = tempfile::tempdir().unwrap();
        assert!(latest(run.path()).unwrap().is_none());
        fake_checkpoint(run.path(), 2);
        fake_checkpoint(run.path(), 10);
        // Not whole: no trainer state.
        std::fs::create_dir_all(checkpoints_dir(run.path()).join(checkpoint_name(12))).unwrap();
        assert_eq!(latest(run.path()).unwrap().unwrap(), checkpoints_dir(run.path()).join(checkpoint_name(10)));
        std::fs::write(checkpoints_dir(run.path()).join("latest"), "step-00000002\n").unwrap();
        assert_eq!(latest(run.path()).unwrap().unwrap(), checkpoints_dir(run.path()).join(checkpoint_name(2)));
    }

    #[test]
    fn listed_files_are_verified() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("optimizer")).unwrap();
        std::fs::write(d.path().join("model.safetensors"), b"weights").unwrap();
        std::fs::write(d.path().join("optimizer/rank-0.safetensors"), b"moments").unwrap();
        let mut state = serde_json::json!({"step": 1});
        state[CHECKSUMS_KEY] = serde_json::to_value(checksum_files(d.path()).unwrap()).unwrap();
        assert_eq!(state[CHECKSUMS_KEY].as_object().unwrap().len(), 2);
        std::fs::write(d.path().join(TRAINER_FILE), state.to_string()).unwrap();
        verify_files(d.path()).unwrap();
        std::fs::write(d.path().join("optimizer/rank-0.safetensors"), b"momentz").unwrap();
        let e = verify_files(d.path()).unwrap_err().to_string();
        assert!(e.ends_with("rank-0.safetensors: corrupt (its sha256 differs from the one recorded in trainer.json)"));
        std::fs::write(d.path().join("optimizer/rank-0.safetensors"), b"moments").unwrap();
        std::fs::write(d.path().join("generation_config.json"), b"{}").unwrap();
        verify_files(d.path()).unwrap();
        std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
        assert!(verify_files(d.path()).unwrap_err().to_string().contains("model.safetensors: missing"));
    }

    #[test]
    fn retention_deletes_only_whole_checkpoints() {
        let run = tempfile::tempdir().unwrap();
        for step in [60, 62, 64, 65] {
            fake_checkpoint(run.path(), step);
        }
        let dir = checkpoints_dir(run.path());
        // The user's: an empty directory, one with notes, a file; none may count or be deleted.
        std::fs::create_dir(dir.join(checkpoint_name(999))).unwrap();
        std::fs::create_dir(dir.join(checkpoint_name(10))).unwrap();
        std::fs::write(dir.join(checkpoint_name(10)).join("mynotes"), "x").unwrap();
        std::fs::write(dir.join(checkpoint_name(1)), "x").unwrap();
        retain(&dir, 3, &checkpoint_name(65)).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        left.sort();
        let want: Vec<String> = [1, 10, 62, 64, 65, 999].iter().map(|&s| checkpoint_name(s)).collect();
        assert_eq!(left, want);
    }

    #[test]
    fn a_checkpoints_file_is_an_error() {
        let run = tempfile::tempdir().unwrap();
        std::fs::write(checkpoints_dir(run.path()), "").unwrap();
        let e = latest(run.path()).unwrap_err().to_string();
        assert!(e.ends_with("checkpoints: not a directory"), "{e}");
    }
}
