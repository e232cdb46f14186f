//! `kiln prepare`: documents → BOS + tokens + EOS, packed back to back into shards, with a held-out
//! split per source and an index (`index.json`) that is written last, so a directory is trusted only
//! once it is whole. Re-running over unchanged inputs is a no-op.

use super::readers::{collect_inputs, for_each_document};
use super::shard::{token_bytes_for, write_shard, Shard, MAGIC};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const INDEX_FILE: &str = "index.json";
const FORMAT: &str = "kiln-prepared-1";
/// Tokens per shard (128 MiB at u16).
pub const DEFAULT_SHARD_TOKENS: usize = 1 << 26;
/// Documents tokenized per parallel batch.
const BATCH_DOCS: usize = 512;

#[derive(Clone, Debug)]
pub struct PrepareArgs {
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub inputs: Vec<PathBuf>,
    pub text_field: Option<String>,
    pub val_fraction: f64,
    pub shard_tokens: usize,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub file: String,
    pub tokens: u64,
    pub documents: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitIndex {
    pub shards: Vec<ShardEntry>,
    pub tokens: u64,
    pub documents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputEntry {
    pub path: String,
    pub bytes: u64,
    pub documents: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenizerInfo {
    pub sha256: String,
    pub vocab_size: usize,
    pub bos: u32,
    pub eos: u32,
}

/// `index.json` of a prepared directory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PreparedIndex {
    pub format: String,
    /// Hash of the inputs (paths, sizes, mtimes), tokenizer and settings; equal ⇒ nothing to redo.
    pub fingerprint: String,
    pub tokenizer: TokenizerInfo,
    pub token_bytes: u32,
    pub text_field: Option<String>,
    pub val_fraction: f64,
    pub inputs: Vec<InputEntry>,
    pub train: SplitIndex,
    pub val: SplitIndex,
}

#[derive(Debug)]
pub struct PrepareSummary {
    pub index: PreparedIndex,
    pub input_bytes: u64,
    pub secs: f64,
    /// The directory was already up to date.
    pub skipped: bool,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn read_index(dir: &Path) -> Result<PreparedIndex> {
    let p = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: not a prepared dataset (run `kiln prepare` first)", p.display()))?;
    let idx: PreparedIndex =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: malformed index ({e})", p.display()))?;
    if idx.format != FORMAT {
        bail!("{}: format {:?} is not {FORMAT:?}", p.display(), idx.format);
    }
    Ok(idx)
}

/// Deterministic held-out choice per document: a hash of (input path, document number) → [0, 1).
fn is_val(path: &str, doc: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let mut h = super::shard::Fnv64::default();
    h.update(path.as_bytes());
    let mut z = h.finish() ^ doc.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// Shard buffer of one split.
struct SplitWriter {
    name: &'static str,
    tokens: Vec<u32>,
    docs: u64,
    index: SplitIndex,
}

impl SplitWriter {
    fn new(name: &'static str) -> Self {
        SplitWriter { name, tokens: Vec::new(), docs: 0, index: SplitIndex::default() }
    }
    fn push(&mut self, doc: &[u32], out: &Path, shard_tokens: usize, token_bytes: u32) -> Result<()> {
        self.tokens.extend_from_slice(doc);
        self.docs += 1;
        if self.tokens.len() >= shard_tokens {
            self.flush(out, token_bytes)?;
        }
        Ok(())
    }
    fn flush(&mut self, out: &Path, token_bytes: u32) -> Result<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let file = format!("{}-{:05}.bin", self.name, self.index.shards.len());
        write_shard(&out.join(&file), &self.tokens, self.docs, token_bytes)?;
        self.index.tokens += self.tokens.len() as u64;
        self.index.documents += self.docs;
        self.index.shards.push(ShardEntry { file, tokens: self.tokens.len() as u64, documents: self.docs });
        self.tokens.clear();
        self.docs = 0;
        Ok(())
    }
}

fn fingerprint(files: &[PathBuf], tok_sha: &str, args: &PrepareArgs) -> Result<(String, Vec<InputEntry>, u64)> {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(tok_sha.as_bytes());
    h.update(format!("{:?}|{}|{}", args.text_field, args.val_fraction, args.shard_tokens).as_bytes());
    let mut entries = Vec::new();
    let mut total = 0;
    for f in files {
        let meta = std::fs::metadata(f).with_context(|| format!("{}: cannot stat", f.display()))?;
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
        h.update(format!("{}|{}|{}.{}\n", f.display(), meta.len(), mtime.as_secs(), mtime.subsec_nanos()).as_bytes());
        entries.push(InputEntry { path: f.display().to_string(), bytes: meta.len(), documents: 0 });
        total += meta.len();
    }
    Ok((h.finalize().iter().map(|b| format!("{b:02x}")).collect(), entries, total))
}

/// True when `dir` holds a whole prepared dataset with this fingerprint.
fn up_to_date(dir: &Path, fp: &str) -> Option<PreparedIndex> {
    let idx = read_index(dir).ok()?;
    if idx.fingerprint != fp {
        return None;
    }
    let all_ok = idx
        .train
        .shards
        .iter()
        .chain(&idx.val.shards)
        .all(|s| Shard::open(&dir.join(&s.file), true).map(|sh| sh.tokens == s.tokens).unwrap_or(false));
    all_ok.then_some(idx)
}

pub fn prepare(args: &PrepareArgs) -> Result<PrepareSummary> {
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!(
            "the validation fraction (--val-fraction, or val_fraction in a config) must be in [0, 1), got {}",
            args.val_fraction
        );
    }
    let t0 = Instant::now();
    let tok_bytes = std::fs::read(&args.tokenizer)
        .with_context(|| format!("{}: cannot read tokenizer", args.tokenizer.display()))?;
    let tok = Tokenizer::from_file(&args.tokenizer)?;
    let tok_sha = sha256_hex(&tok_bytes);
    let piece = |p: &str| {
        tok.token_id(p)
            .with_context(|| format!("{}: no {p:?} token (needed to delimit documents)", args.tokenizer.display()))
    };
    let (bos, eos) = (piece("<s>")?, piece("</s>")?);
    let files = collect_inputs(&args.inputs)?;
    let (fp, inputs, input_bytes) = fingerprint(&files, &tok_sha, args)?;
    remove_stale_staging(&args.out);
    if let Some(index) = up_to_date(&args.out, &fp) {
        return Ok(PrepareSummary { index, input_bytes, secs: t0.elapsed().as_secs_f64(), skipped: true });
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create output directory", args.out.display()))?;
    check_previous_is_ours(&args.out, &tok_sha)?;
    // Shards are written into a staging directory inside the output and moved into place only once
    // every input has been read: a bad input or a full disk leaves an earlier dataset as it was.
    let staging = args.out.join(format!(".staging-{}", std::process::id()));
    std::fs::create_dir(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
    let result = write_shards(args, &tok, bos, eos, &files, inputs, &fp, &tok_sha, &staging)
        .and_then(|index| publish(&staging, &args.out, index));
    let _ = std::fs::remove_dir_all(&staging);
    let index = result?;
    Ok(PrepareSummary { index, input_bytes, secs: t0.elapsed().as_secs_f64(), skipped: false })
}

/// Removes the staging directories of prepares that were killed: they hold only partial shards
/// nobody can use. One whose process still runs (another prepare of the same output) is left alone.
fn remove_stale_staging(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for p in entries.flatten().map(|e| e.path()) {
        let Some(pid) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(".staging-")) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// Tokenizes every input into shards in `dir` and returns their index (not yet written).
#[allow(clippy::too_many_arguments)]
fn write_shards(
    args: &PrepareArgs,
    tok: &Tokenizer,
    bos: u32,
    eos: u32,
    files: &[PathBuf],
    mut inputs: Vec<InputEntry>,
    fp: &str,
    tok_sha: &str,
    dir: &Path,
) -> Result<PreparedIndex> {
    let input_bytes: u64 = inputs.iter().map(|i| i.bytes).sum();
    let token_bytes = token_bytes_for(tok.vocab_size());
    let (mut train, mut val) = (SplitWriter::new("train"), SplitWriter::new("val"));
    let bar = if args.progress { ProgressBar::new(input_bytes) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
            .expect("valid template"),
    );
    let mut batch: Vec<(u64, String)> = Vec::with_capacity(BATCH_DOCS);
    for (fi, f) in files.iter().enumerate() {
        let name = f.display().to_string();
        let mut doc_no = 0u64;
        let flush_batch =
            |batch: &mut Vec<(u64, String)>, train: &mut SplitWriter, val: &mut SplitWriter| -> Result<()> {
                let encoded: Vec<Result<Vec<u32>>> =
                    batch.par_iter().map(|(_, text)| tok.encode(text, Some(bos))).collect();
                for ((doc, _), ids) in batch.iter().zip(encoded) {
                    let mut ids = ids.with_context(|| format!("{name}: document {doc}"))?;
                    ids.push(eos);
                    let split = if is_val(&name, *doc, args.val_fraction) { &mut *val } else { &mut *train };
                    split.push(&ids, dir, args.shard_tokens, token_bytes)?;
                }
                batch.clear();
                Ok(())
            };
        for_each_document(f, args.text_field.as_deref(), |text| {
            batch.push((doc_no, text));
            doc_no += 1;
            if batch.len() == BATCH_DOCS {
                flush_batch(&mut batch, &mut train, &mut val)?;
                bar.set_message(format!(
                    "{} docs",
                    train.index.documents + train.docs + val.index.documents + val.docs
                ));
            }
            Ok(())
        })?;
        flush_batch(&mut batch, &mut train, &mut val)?;
        inputs[fi].documents = doc_no;
        bar.inc(inputs[fi].bytes);
    }
    train.flush(dir, token_bytes)?;
    val.flush(dir, token_bytes)?;
    bar.finish_and_clear();
    if train.index.documents == 0 {
        let inputs = args.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        if val.index.documents > 0 {
            bail!(
                "{inputs}: all {} documents went to the validation split; lower --val-fraction ({})",
                val.index.documents,
                args.val_fraction
            );
        }
        bail!("{inputs}: the inputs hold no documents");
    }
    Ok(PreparedIndex {
        format: FORMAT.into(),
        fingerprint: fp.to_string(),
        tokenizer: TokenizerInfo { sha256: tok_sha.to_string(), vocab_size: tok.vocab_size(), bos, eos },
        token_bytes,
        text_field: args.text_field.clone(),
        val_fraction: args.val_fraction,
        inputs,
        train: train.index,
        val: val.index,
    })
}

/// Replaces what an earlier run left in `out` with the staged shards, index last: until it is
/// written the directory is trusted by nobody, so an interruption here costs a re-prepare, not data.
fn publish(staging: &Path, out: &Path, index: PreparedIndex) -> Result<PreparedIndex> {
    remove_previous(out)?;
    for s in index.train.shards.iter().chain(&index.val.shards) {
        let (from, to) = (staging.join(&s.file), out.join(&s.file));
        std::fs::rename(&from, &to).with_context(|| format!("{}: cannot move into place", to.display()))?;
    }
    crate::io::atomic::write_file(&out.join(INDEX_FILE), serde_json::to_string_pretty(&index)?.as_bytes())?;
    Ok(index)
}

/// An `index.json` already in the output directory must be kiln's, or it is the user's file and
/// preparing there would delete it.
fn check_previous_is_ours(dir: &Path, tok_sha: &str) -> Result<()> {
    // Shard-named files are replaced or removed when the new dataset is published: each must be a
    // kiln shard (its magic), or it is someone else's file.
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if (name.starts_with("train-") || name.starts_with("val-")) && name.ends_with(".bin") {
            let mut magic = [0u8; 8];
            let ours = File::open(&p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == MAGIC;
            if !ours {
                bail!("{}: exists and is not a kiln token shard; prepare into another --out", p.display());
            }
        }
    }
    let index = dir.join(INDEX_FILE);
    if !index.exists() {
        return Ok(());
    }
    let ours = std::fs::read(&index)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get("format").and_then(|f| f.as_str()).is_some_and(|f| f.starts_with("kiln")));
    if !ours {
        bail!("{}: exists and is not a kiln dataset index; prepare into another --out", index.display());
    }
    // Another tokenizer's dataset may be another run's data: re-preparing would change that run's
    // tokens under it. Inputs that changed are re-prepared; a tokenizer that changed is refused.
    if let Ok(previous) = read_index(dir) {
        if previous.tokenizer.sha256 != tok_sha {
            bail!(
                "{}: prepared with another tokenizer ({} tokens, sha256 {}…); kiln does not replace it: \
                 prepare into another directory, or delete this one",
                dir.display(),
                previous.tokenizer.vocab_size,
                &previous.tokenizer.sha256[..previous.tokenizer.sha256.len().min(12)]
            );
        }
    }
    Ok(())
}

/// Removes what an earlier run wrote (index first), leaving unrelated files alone.
fn remove_previous(dir: &Path) -> Result<()> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        std::fs::remove_file(&index).with_context(|| format!("{}: cannot remove", index.display()))?;
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ours = (name.starts_with("train-") || name.starts_with("val-"))
            && (name.ends_with(".bin") || name.ends_with(".bin.tmp"));
        if ours {
            std::fs::remove_file(&p).with_context(|| format!("{}: cannot remove", p.display()))?;
        }
    }
    Ok(())
}

/// Writes an already-tokenized stream as a prepared directory (one train shard, optionally one
/// validation shard): for pre-tokenized corpora and for tests that need exact token streams.
pub fn write_token_dataset(dir: &Path, train: &[u32], val: &[u32], tokenizer_json: &[u8]) -> Result<PreparedIndex> {
    let tok = Tokenizer::from_bytes(tokenizer_json, "tokenizer")?;
    let token_bytes = token_bytes_for(tok.vocab_size());
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    remove_previous(dir)?;
    let split = |name: &'static str, tokens: &[u32]| -> Result<SplitIndex> {
        let mut w = SplitWriter::new(name);
        w.tokens.extend_from_slice(tokens);
        w.docs = u64::from(!tokens.is_empty());
        w.flush(dir, token_bytes)?;
        Ok(w.index)
    };
    let (train, val) = (split("train", train)?, split("val", val)?);
    let index = PreparedIndex {
        format: FORMAT.into(),
        fingerprint: String::new(),
        tokenizer: TokenizerInfo {
            sha256: sha256_hex(tokenizer_json),
            vocab_size: tok.vocab_size(),
            bos: tok.token_id("<s>").unwrap_or(1),
            eos: tok.token_id("</s>").unwrap_or(2),
        },
        token_bytes,
        text_field: None,
        val_fraction: 0.0,
        inputs: vec![],
        train,
        val,
    };
    crate::io::atomic::write_file(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index)?.as_bytes())?;
    Ok(index)
}
