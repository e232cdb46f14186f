//! A checkpoint's own integrity check: trainer.json lists the sha256 of every other file in the
//! directory, and whatever loads the checkpoint (resume, `score`, `generate`, `eval`, `chat`,
//! `model.init`) checks the files it reads against it. safetensors has no checksum of its own, so a
//! flipped bit in a tensor would otherwise load without complaint.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The trainer state kiln writes into each checkpoint; its presence makes a model directory a
/// kiln checkpoint.
pub const TRAINER_FILE: &str = "trainer.json";

/// The key in trainer.json under which a checkpoint lists the sha256 of every other file in it.
pub(crate) const CHECKSUMS_KEY: &str = "sha256";

/// sha256 of each file under `dir` (relative path → hex), streamed: a bit flipped in a tensor is
/// otherwise invisible, since safetensors has no checksum of its own.
/// Files are hashed in parallel (the `sha2` crate: 1.76 GB/s on one core of the development VM).
pub(crate) fn checksum_files(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    use rayon::prelude::*;
    files_in(dir)?.into_par_iter().map(|(rel, path)| Ok((rel, sha256_file(&path)?))).collect()
}

/// Every file under `dir` but trainer.json: (path relative to `dir`, path).
fn files_in(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).expect("under dir").to_string_lossy().to_string();
            if rel != TRAINER_FILE {
                files.push((rel, path));
            }
        }
    }
    Ok(files)
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    std::io::copy(&mut f, &mut hasher).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Checks every file a checkpoint's trainer.json lists against its sha256 (checkpoints written
/// before the list existed have nothing to check).
pub fn verify_files(ckpt: &Path) -> Result<()> {
    verify_files_where(ckpt, |_| true)
}

/// Checks the listed files whose relative path `pick` accepts (the model's files for a loader
/// that reads only those).
pub fn verify_files_where(ckpt: &Path, pick: impl Fn(&str) -> bool + Sync) -> Result<()> {
    match listed(ckpt)?.1 {
        Some(list) => hash_listed(ckpt, &list, pick),
        None => Ok(()),
    }
}

/// trainer.json's path and its checksum list, if it has one.
fn listed(ckpt: &Path) -> Result<(PathBuf, Option<serde_json::Map<String, serde_json::Value>>)> {
    let p = ckpt.join(TRAINER_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: malformed trainer state ({e})", p.display()))?;
    let list = match v.get_mut(CHECKSUMS_KEY).map(serde_json::Value::take) {
        None => None,
        Some(serde_json::Value::Object(list)) => Some(list),
        Some(_) => bail!("{}: malformed {CHECKSUMS_KEY} list", p.display()),
    };
    Ok((p, list))
}

/// Hashes the listed files `pick` accepts, in parallel, against the list. Files the list does not
/// name (one a user added, say) are not checked, and not refused.
fn hash_listed(
    ckpt: &Path,
    list: &serde_json::Map<String, serde_json::Value>,
    pick: impl Fn(&str) -> bool + Sync,
) -> Result<()> {
    use rayon::prelude::*;
    let list: Vec<_> = list.iter().filter(|(rel, _)| pick(rel)).collect();
    list.into_par_iter().try_for_each(|(rel, want)| {
        let file = ckpt.join(rel);
        if !file.is_file() {
            bail!("{}: missing (the checkpoint lists it)", file.display());
        }
        if want.as_str() != Some(sha256_file(&file)?.as_str()) {
            bail!("{}: corrupt (its sha256 differs from the one recorded in {TRAINER_FILE})", file.display());
        }
        Ok(())
    })
}

/// Verifies `dir` when it is a kiln checkpoint (it has trainer.json); other model directories
/// (from the Hub, or `kiln`'s exports) carry no list and load as they are.
/// Only the model's files are hashed: the optimizer state (twice the weights' size) is the
/// resume's to verify, and `score` never reads it.
pub fn verify_if_checkpoint(dir: &Path) -> Result<()> {
    if dir.join(TRAINER_FILE).is_file() {
        verify_files_where(dir, |rel| !is_optimizer_state(rel))?;
    }
    Ok(())
}

/// The AdamW moments of a checkpoint: `optimizer/…` (one file per rank) or `optimizer.safetensors`.
pub fn is_optimizer_state(rel: &str) -> bool {
    rel.starts_with("optimizer")
}

/// For resuming: the checkpoint must carry its checksum list (one without it, hand-made or
/// edited, cannot be told from a damaged one, so it is refused rather than trusted), and the
/// optimizer state is checked against it. The model's files are checked as they load.
pub fn verify_for_resume(ckpt: &Path) -> Result<()> {
    let (p, list) = listed(ckpt)?;
    let Some(list) = list else {
        bail!(
            "{}: has no {CHECKSUMS_KEY} list of the checkpoint's files, so it cannot be verified; not resuming from it",
            p.display()
        );
    };
    hash_listed(ckpt, &list, is_optimizer_state)
}
