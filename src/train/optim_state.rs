//! AdamW moments in checkpoints, one file per rank: `optimizer/rank-RRRRR-of-WWWWW.safetensors`
//! holds that rank's shard of every FSDP unit (`exp_avg.unit-UUUUU`, `exp_avg_sq.unit-UUUUU`, each
//! the padded shard), and `optimizer/layout.json` records the world size and each unit's length.
//! Each rank writes only what it owns, so saving never gathers the optimizer on one rank.
//!
//! Resuming at another world size reshards: each new rank reads, from the old files, only the
//! pieces that overlap the part of each unit it now owns. Checkpoints from before per-rank files
//! (one consolidated `optimizer.safetensors`) are still read.

use super::checkpoint::{HostMoments, OPTIMIZER_FILE};
use crate::dist::shard::ShardLayout;
use crate::io::safetensors::TensorFiles;
use crate::io::save::{write_json, write_safetensors};
pub use crate::model::units::unit_ranges;
use crate::model::{LlamaConfig, TensorSpec, Weights};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const OPTIMIZER_DIR: &str = "optimizer";
const LAYOUT_FILE: &str = "layout.json";

/// Each unit of `w` flattened: tensors of the unit back to back, in canonical order (the form
/// FSDP shards and the optimizer files store).
pub fn flat_units(cfg: &LlamaConfig, w: &Weights<Vec<f32>>) -> Vec<Vec<f32>> {
    let t = w.iter();
    unit_ranges(cfg).into_iter().map(|r| t[r].iter().flat_map(|x| x.iter().copied()).collect()).collect()
}

/// Values in each unit of `cfg`.
pub fn unit_lens(cfg: &LlamaConfig) -> Vec<usize> {
    let specs = crate::model::tensor_specs(cfg);
    unit_ranges(cfg).into_iter().map(|r| specs[r].iter().map(|s| s.numel()).sum()).collect()
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Layout {
    world_size: usize,
    unit_lens: Vec<usize>,
}

pub fn rank_file(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

fn tensor_name(moment: &str, unit: usize) -> String {
    format!("{moment}.unit-{unit:05}")
}

/// One rank's moments: its padded shard of each unit.
pub struct RankMoments<'a> {
    pub m: Vec<&'a [f32]>,
    pub v: Vec<&'a [f32]>,
}

/// One rank's moments held by value (the single-rank engine flattens its moments into this).
pub struct OwnedRankMoments {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl OwnedRankMoments {
    pub fn view(&self) -> RankMoments<'_> {
        RankMoments {
            m: self.m.iter().map(|x| x.as_slice()).collect(),
            v: self.v.iter().map(|x| x.as_slice()).collect(),
        }
    }
}

/// Writes `optimizer/` into the checkpoint directory `ckpt`, every rank's file from its own thread.
pub fn write(ckpt: &Path, unit_lens: &[usize], ranks: &[RankMoments<'_>]) -> Result<()> {
    let dir = ckpt.join(OPTIMIZER_DIR);
    std::fs::create_dir(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let world = ranks.len();
    let layout = Layout { world_size: world, unit_lens: unit_lens.to_vec() };
    write_json(&dir.join(LAYOUT_FILE), &serde_json::to_value(&layout)?)?;
    std::thread::scope(|s| {
        let jobs: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(r, rm)| {
                let dir = &dir;
                s.spawn(move || -> Result<()> {
                    let mut tensors = Vec::with_capacity(2 * rm.m.len());
                    for (moment, shards) in [("exp_avg", &rm.m), ("exp_avg_sq", &rm.v)] {
                        for (u, t) in shards.iter().enumerate() {
                            tensors.push((tensor_name(moment, u), vec![t.len()], *t));
                        }
                    }
                    write_safetensors(&dir.join(rank_file(r, world)), &tensors)
                })
            })
            .collect();
        jobs.into_iter().try_for_each(|j| j.join().unwrap_or_else(|_| bail!("an optimizer writer panicked")))
    })
}

/// Where resumed AdamW moments come from.
pub trait MomentSource: Send + Sync {
    /// `(m, v)` for the values `range` of unit `unit`'s flattened (unpadded) parameters.
    fn read(&self, unit: usize, range: Range<usize>) -> Result<(Vec<f32>, Vec<f32>)>;
}

/// The moments of checkpoint `ckpt` for a model of shape `cfg`, in whichever format it holds.
pub fn open(ckpt: &Path, cfg: &LlamaConfig) -> Result<Box<dyn MomentSource>> {
    if ckpt.join(OPTIMIZER_DIR).is_dir() {
        return Ok(Box::new(ShardFiles::open(&ckpt.join(OPTIMIZER_DIR), cfg)?));
    }
    Ok(Box::new(Consolidated::open(ckpt, cfg)?))
}

/// Per-rank files written by some world size.
struct ShardFiles {
    dir: PathBuf,
    layout: Layout,
    files: Vec<TensorFiles>,
}

impl ShardFiles {
    fn open(dir: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let p = dir.join(LAYOUT_FILE);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let layout: Layout = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: malformed optimizer layout ({e})", p.display()))?;
        if layout.world_size == 0 {
            bail!("{}: world_size is 0", p.display());
        }
        if layout.unit_lens != unit_lens(cfg) {
            bail!("{}: the optimizer state was written for a model of another shape", p.display());
        }
        let files = (0..layout.world_size)
            .map(|r| {
                let f = dir.join(rank_file(r, layout.world_size));
                if !f.exists() {
                    bail!("{}: missing (the layout names {} ranks)", f.display(), layout.world_size);
                }
                TensorFiles::open(&[f])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardFiles { dir: dir.to_path_buf(), layout, files })
    }
}

impl MomentSource for ShardFiles {
    fn read(&self, unit: usize, range: Range<usize>) -> Result<(Vec<f32>, Vec<f32>)> {
        let len = self.layout.unit_lens[unit];
        if range.end > len {
            bail!("{}: unit {unit} has {len} values, asked for {range:?}", self.dir.display());
        }
        let old = ShardLayout::new(len, self.layout.world_size);
        let (mut m, mut v) = (Vec::with_capacity(range.len()), Vec::with_capacity(range.len()));
        for (q, file) in self.files.iter().enumerate() {
            let owned = old.owned(q);
            let (lo, hi) = (owned.start.max(range.start), owned.end.min(range.end));
            if lo >= hi {
                continue;
            }
            let local = lo - owned.start..hi - owned.start;
            for (moment, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let spec = TensorSpec { name: tensor_name(moment, unit), shape: vec![old.shard] };
                out.extend_from_slice(&file.load_f32(&spec)?[local.clone()]);
            }
        }
        Ok((m, v))
    }
}

/// One `optimizer.safetensors` with the moments of every tensor (checkpoints before per-rank files).
struct Consolidated {
    /// Each unit's moments, flattened.
    units: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Consolidated {
    fn open(ckpt: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let files = TensorFiles::open(&[ckpt.join(OPTIMIZER_FILE)]).with_context(|| {
            format!("{}: no optimizer state ({OPTIMIZER_DIR}/ or {OPTIMIZER_FILE})", ckpt.display())
        })?;
        let load = |prefix: &str| {
            Weights::try_build(cfg, |s| {
                files.load_f32(&TensorSpec { name: format!("{prefix}.{}", s.name), shape: s.shape.clone() })
            })
        };
        let (m, v) = (flat_units(cfg, &load("exp_avg")?), flat_units(cfg, &load("exp_avg_sq")?));
        Ok(Consolidated { units: m.into_iter().zip(v).collect() })
    }
}

impl MomentSource for Consolidated {
    fn read(&self, unit: usize, range: Range<usize>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (m, v) = self.units.get(unit).context("no such unit")?;
        Ok((m[range.clone()].to_vec(), v[range].to_vec()))
    }
}

/// All of the moments, one tensor per weight (the single-rank engine's form).
pub fn full(src: &dyn MomentSource, cfg: &LlamaConfig) -> Result<HostMoments> {
    let specs = crate::model::tensor_specs(cfg);
    let (mut ms, mut vs) = (Vec::new(), Vec::new());
    for (u, (r, len)) in unit_ranges(cfg).into_iter().zip(unit_lens(cfg)).enumerate() {
        let (m, v) = src.read(u, 0..len)?;
        let mut at = 0;
        for s in &specs[r] {
            ms.push(m[at..at + s.numel()].to_vec());
            vs.push(v[at..at + s.numel()].to_vec());
            at += s.numel();
        }
    }
    let (mut mi, mut vi) = (ms.into_iter(), vs.into_iter());
    Ok((
        Weights::try_build(cfg, |_| Ok(mi.next().expect("one per spec")))?,
        Weights::try_build(cfg, |_| Ok(vi.next().expect("one per spec")))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensor_specs;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            n_layer: 2,
            d_model: 8,
            n_head: 2,
            n_kv_head: 1,
            d_ff: 16,
            vocab_size: 11,
            ..LlamaConfig::preset("tiny").unwrap()
        }
    }

    /// Distinct values per position so a misplaced piece shows.
    fn unit_values(lens: &[usize], salt: f32) -> Vec<Vec<f32>> {
        lens.iter().enumerate().map(|(u, &n)| (0..n).map(|i| salt + u as f32 * 1000.0 + i as f32).collect()).collect()
    }

    #[test]
    fn per_rank_files_reshard_to_any_world_size() {
        let cfg = cfg();
        let lens = unit_lens(&cfg);
        let (m, v) = (unit_values(&lens, 0.5), unit_values(&lens, 0.25));
        let dir = tempfile::tempdir().unwrap();
        let world = 3;
        // Each rank's padded shards, as FSDP holds them.
        let shards: Vec<OwnedRankMoments> = (0..world)
            .map(|r| {
                let take = |x: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                    x.iter().map(|u| ShardLayout::new(u.len(), world).take(u, r)).collect()
                };
                OwnedRankMoments { m: take(&m), v: take(&v) }
            })
            .collect();
        let ranks: Vec<RankMoments> = shards.iter().map(|s| s.view()).collect();
        write(dir.path(), &lens, &ranks).unwrap();
        for r in 0..world {
            assert!(dir.path().join(OPTIMIZER_DIR).join(rank_file(r, world)).is_file());
        }
        let src = open(dir.path(), &cfg).unwrap();
        for new_world in [1, 2, 4, 5] {
            for (u, &len) in lens.iter().enumerate() {
                let l = ShardLayout::new(len, new_world);
                let got: Vec<f32> = (0..new_world).flat_map(|r| src.read(u, l.owned(r)).unwrap().0).collect();
                assert_eq!(got, m[u], "unit {u} at world {new_world}");
                let got: Vec<f32> = (0..new_world).flat_map(|r| src.read(u, l.owned(r)).unwrap().1).collect();
                assert_eq!(got, v[u], "unit {u} at world {new_world}");
            }
        }
        // A model of another shape is refused.
        let other = LlamaConfig { vocab_size: 12, ..cfg.clone() };
        let e = open(dir.path(), &other).err().unwrap().to_string();
        assert!(e.contains("another shape"), "{e}");
        // A missing rank file is named.
        std::fs::remove_file(dir.path().join(OPTIMIZER_DIR).join(rank_file(1, world))).unwrap();
        let e = open(dir.path(), &cfg).err().unwrap().to_string();
        assert!(e.contains("rank-00001-of-00003.safetensors") && e.contains("missing"), "{e}");
    }

    #[test]
    fn consolidated_files_from_earlier_checkpoints_are_still_read() {
        let cfg = cfg();
        let dir = tempfile::tempdir().unwrap();
        let specs = tensor_specs(&cfg);
        let vals: Vec<Vec<f32>> = specs.iter().enumerate().map(|(i, s)| vec![i as f32; s.numel()]).collect();
        let mut tensors = Vec::new();
        for prefix in ["exp_avg", "exp_avg_sq"] {
            for (s, t) in specs.iter().zip(&vals) {
                tensors.push((format!("{prefix}.{}", s.name), s.shape.clone(), t.as_slice()));
            }
        }
        write_safetensors(&dir.path().join(OPTIMIZER_FILE), &tensors).unwrap();
        let src = open(dir.path(), &cfg).unwrap();
        let (m, v) = full(src.as_ref(), &cfg).unwrap();
        assert_eq!(m.iter().into_iter().cloned().collect::<Vec<_>>(), vals);
        assert_eq!(v.iter().into_iter().cloned().collect::<Vec<_>>(), vals);
    }
}
