//! The packed token shard: a 64-byte header followed by little-endian tokens.
//!
//! | offset | field                                                       |
//! |--------|-------------------------------------------------------------|
//! | 0      | magic `b"KILNTOKS"`                                         |
//! | 8      | format version, u32 (1)                                     |
//! | 12     | bytes per token, u32 (2 = u16 when the vocabulary fits, else 4) |
//! | 16     | tokens, u64                                                 |
//! | 24     | documents, u64                                              |
//! | 32     | FNV-1a 64 checksum of the token bytes, u64                  |
//! | 40..64 | zero                                                        |
//!
//! Shards are written to a temporary name, fsynced and renamed, so a shard under its final name is
//! always whole; the checksum catches later corruption.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"KILNTOKS";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;

/// Bytes per token for a vocabulary: u16 when every id fits.
pub fn token_bytes_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Writes one shard atomically: tokens go to `<path>.tmp`, the header is completed, the file is
/// fsynced and renamed into place.
pub fn write_shard(path: &Path, tokens: &[u32], documents: u64, token_bytes: u32) -> Result<()> {
    let tmp = path.with_extension("bin.tmp");
    let mut payload = Vec::with_capacity(tokens.len() * token_bytes as usize);
    for &t in tokens {
        if token_bytes == 2 {
            payload.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            payload.extend_from_slice(&t.to_le_bytes());
        }
    }
    let mut sum = Fnv64::default();
    sum.update(&payload);
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&token_bytes.to_le_bytes());
    header[16..24].copy_from_slice(&(tokens.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&documents.to_le_bytes());
    header[32..40].copy_from_slice(&sum.finish().to_le_bytes());
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&header)?;
        f.write_all(&payload)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("{}: cannot write shard", path.display()))
}

/// A memory-mapped, validated shard.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
    token_bytes: usize,
    pub tokens: u64,
    pub documents: u64,
}

impl Shard {
    /// Opens and validates a shard: header, length and (when `verify`) the payload checksum.
    pub fn open(path: &Path, verify: bool) -> Result<Shard> {
        let file = File::open(path).with_context(|| format!("{}: cannot open shard", path.display()))?;
        // SAFETY: read-only mapping of a file kiln wrote atomically and never rewrites in place.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map shard", path.display()))?;
        let bad = |what: &str| anyhow::anyhow!("{}: corrupt shard ({what})", path.display());
        if map.len() < HEADER_LEN || &map[..8] != MAGIC {
            return Err(bad("not a kiln token shard"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().unwrap());
        if u32_at(8) != VERSION {
            bail!("{}: shard format version {} is not supported (expected {VERSION})", path.display(), u32_at(8));
        }
        let token_bytes = u32_at(12) as usize;
        if token_bytes != 2 && token_bytes != 4 {
            return Err(bad("bad token width"));
        }
        let (tokens, documents, checksum) = (u64_at(16), u64_at(24), u64_at(32));
        if (map.len() - HEADER_LEN) as u64 != tokens * token_bytes as u64 {
            return Err(bad(&format!(
                "header says {tokens} tokens, file holds {} bytes of tokens",
                map.len() - HEADER_LEN
            )));
        }
        if verify {
            let mut sum = Fnv64::default();
            sum.update(&map[HEADER_LEN..]);
            if sum.finish() != checksum {
                return Err(bad("checksum mismatch"));
            }
        }
        Ok(Shard { path: path.to_path_buf(), map, token_bytes, tokens, documents })
    }

    /// Token `i` of the shard.
    #[inline]
    pub fn get(&self, i: u64) -> u32 {
        let o = HEADER_LEN + i as usize * self.token_bytes;
        if self.token_bytes == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[o..o + 4].try_into().unwrap())
        }
    }

    /// The largest token id in the shard (None when it is empty).
    pub fn max_token(&self) -> Option<u32> {
        let body = &self.map[HEADER_LEN..];
        if self.token_bytes == 2 {
            body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).max()
        } else {
            body.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).max()
        }
    }

    /// Appends tokens `[start, start + len)` to `out`.
    pub fn read_into(&self, start: u64, len: usize, out: &mut Vec<u32>) {
        out.extend((start..start + len as u64).map(|i| self.get(i)));
    }
}
