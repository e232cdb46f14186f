//! Reading `.safetensors` files (single or sharded) into f32 host arrays, with every failure
//! reported as the file plus the problem.

use crate::model::TensorSpec;
use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Memory-mapped safetensors files and which file holds each tensor.
pub struct TensorFiles {
    maps: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `maps`
    location: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // mmap's own errors for these ("No such device") do not say what is wrong.
    let meta = file.metadata().with_context(|| format!("{}: cannot stat", path.display()))?;
    if meta.is_dir() {
        anyhow::bail!("{}: is a directory, not a safetensors file", path.display());
    }
    if !meta.is_file() {
        anyhow::bail!("{}: not a regular file (a safetensors file is read by mapping it)", path.display());
    }
    // SAFETY: the mapping is read-only; a checkpoint being rewritten under us is the same hazard
    // every mmap-based loader (transformers included) accepts.
    unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))
}

impl TensorFiles {
    /// Opens the given files and indexes their tensors; header problems are reported here.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::new();
        let mut location = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let m = map_file(p)?;
            for name in parse(p, &m)?.names() {
                location.insert(name.to_string(), i);
            }
            maps.push((p.clone(), m));
        }
        Ok(TensorFiles { maps, location })
    }

    /// Opens `model.safetensors.index.json`'s shards.
    pub fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing \"weight_map\" object", index.display()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f =
                f.as_str().with_context(|| format!("{}: weight_map[{name:?}] is not a file name", index.display()))?;
            if f.contains('/') || f.contains("..") {
                bail!("{}: weight_map[{name:?}] = {f:?} is not a file in the model directory", index.display());
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                bail!("{}: shard listed in {} is missing", p.display(), index.display());
            }
        }
        Self::open(&paths)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The tensor `spec.name` as f32, checked against `spec.shape`; F32, BF16 and F16 accepted.
    pub fn load_f32(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let &i = self.location.get(&spec.name).with_context(|| {
            let files: Vec<_> = self.maps.iter().map(|(p, _)| p.display().to_string()).collect();
            format!("{}: tensor {:?} is missing", files.join(", "), spec.name)
        })?;
        let (path, map) = &self.maps[i];
        let st = parse(path, map)?;
        let view = st.tensor(&spec.name).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if view.shape() != spec.shape.as_slice() {
            bail!(
                "{}: tensor {:?} has shape {:?}, the config implies {:?}",
                path.display(),
                spec.name,
                view.shape(),
                spec.shape
            );
        }
        let data = view.data();
        let out: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                bail!("{}: tensor {:?} has dtype {other:?}; kiln reads F32, BF16 and F16", path.display(), spec.name)
            }
        };
        if out.len() != spec.numel() {
            bail!("{}: tensor {:?} holds {} values, expected {}", path.display(), spec.name, out.len(), spec.numel());
        }
        if let Some(pos) = out.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor {:?} has a non-finite value at index {pos}", path.display(), spec.name);
        }
        Ok(out)
    }
}
