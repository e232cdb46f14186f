//! A prepared dataset directory opened for reading: each split is one token stream, the
//! concatenation of its shards.

use super::prepare::{read_index, PreparedIndex};
use super::shard::Shard;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub struct TokenStream {
    shards: Vec<Shard>,
    /// `starts[i]` is the stream offset of shard `i`.
    starts: Vec<u64>,
    pub len: u64,
}

impl TokenStream {
    /// Opens every shard, verified, and checks each id fits a vocabulary of `vocab_size` (the
    /// model's): an out-of-range id would otherwise surface mid-run with no shard named.
    fn open(dir: &Path, files: &[super::prepare::ShardEntry], vocab_size: usize) -> Result<Self> {
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for e in files {
            let s = Shard::open(&dir.join(&e.file), true)?;
            if s.tokens != e.tokens {
                bail!("{}: corrupt shard (index says {} tokens, shard holds {})", s.path.display(), e.tokens, s.tokens);
            }
            if let Some(max) = s.max_token().filter(|&m| m as usize >= vocab_size) {
                bail!("{}: token id {max} is outside the model's vocabulary of {vocab_size}", s.path.display());
            }
            starts.push(len);
            len += s.tokens;
            shards.push(s);
        }
        Ok(TokenStream { shards, starts, len })
    }

    /// Appends stream tokens `[start, start + len)` to `out`, crossing shard boundaries.
    pub fn read_into(&self, mut start: u64, mut len: usize, out: &mut Vec<u32>) {
        assert!(start + len as u64 <= self.len, "read past the end of the stream");
        while len > 0 {
            let i = self.starts.partition_point(|&s| s <= start) - 1;
            let within = start - self.starts[i];
            let n = len.min((self.shards[i].tokens - within) as usize);
            self.shards[i].read_into(within, n, out);
            start += n as u64;
            len -= n;
        }
    }
}

pub struct Dataset {
    pub dir: PathBuf,
    pub index: PreparedIndex,
    pub train: TokenStream,
    pub val: TokenStream,
}

impl Dataset {
    /// Opens `dir` and checks it was tokenized with the tokenizer whose sha256 is `tokenizer_sha`
    /// and fits a model vocabulary of `vocab_size`.
    pub fn open(dir: &Path, tokenizer_sha: Option<&str>, vocab_size: usize) -> Result<Dataset> {
        if !dir.is_dir() {
            bail!("{}: data directory does not exist", dir.display());
        }
        let index = read_index(dir)?;
        if let Some(sha) = tokenizer_sha {
            if index.tokenizer.sha256 != sha {
                bail!("{}: prepared with a different tokenizer than the run's (re-run `kiln prepare`)", dir.display());
            }
        }
        if index.tokenizer.vocab_size > vocab_size {
            bail!(
                "{}: tokenizer vocabulary {} exceeds the model's vocab_size {vocab_size} (vocab mismatch)",
                dir.display(),
                index.tokenizer.vocab_size
            );
        }
        let train = TokenStream::open(dir, &index.train.shards, vocab_size)?;
        let val = TokenStream::open(dir, &index.val.shards, vocab_size)?;
        if train.len == 0 {
            bail!("{}: empty dataset (no training tokens)", dir.display());
        }
        Ok(Dataset { dir: dir.to_path_buf(), index, train, val })
    }
}
