//! Crash-safe file and directory writes: write to a temporary name, fsync, rename, fsync the
//! parent, so a reader sees either the old content or the whole new content, never a torn write.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("{}: cannot sync directory", dir.display()))
}

/// Where an atomic replacement of `path` must happen: `path` itself, or the file a symlink there
/// points to (renaming over the link would replace the link, not update its target). Anything
/// else that exists there (a device such as /dev/null, a FIFO, a directory) is refused: a rename
/// would replace it with a plain file.
pub fn replace_target(path: &Path) -> Result<PathBuf> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(path.to_path_buf()) };
    let target = if meta.file_type().is_symlink() {
        std::fs::canonicalize(path).with_context(|| format!("{}: a symlink to nothing", path.display()))?
    } else {
        path.to_path_buf()
    };
    match std::fs::metadata(&target) {
        Ok(m) if !m.is_file() => bail!("{}: not a regular file (kiln replaces files whole)", path.display()),
        _ => Ok(target),
    }
}

/// Replaces `path` (or the file it links to) with `bytes` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let path = &replace_target(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_go_through_symlinks_and_never_replace_special_files() {
        let d = tempfile::tempdir().unwrap();
        let (target, link) = (d.path().join("target.txt"), d.path().join("link.txt"));
        std::fs::write(&target, "old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_file(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        // A directory stands in for the special files (a device, a FIFO) a rename would replace.
        let e = write_file(d.path(), b"x").unwrap_err().to_string();
        assert!(e.ends_with("not a regular file (kiln replaces files whole)"), "{e}");
    }
}
