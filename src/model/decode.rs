//! Incremental decoding with a KV cache: a prompt is processed in one pass (prefill) and every
//! later token costs one matrix-vector pass per layer plus attention over the cache.

use super::llama::{KvPlace, Llama, Workspace};
use crate::backend::{Backend, Gemm, Role};
use anyhow::{bail, Result};

/// Keys and values of every layer for one sequence, `[capacity, n_kv_head · head_dim]` each.
pub struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    capacity: usize,
    len: usize,
    /// Scratch activations for up to `chunk` new tokens at a time.
    ws: Workspace<B>,
    last_hidden: B::Buf,
    last_norm: B::Buf,
    rstd: B::Buf,
    logits: B::Buf,
    /// `[chunk, vocab]` logits for `decode_all`, allocated on first use.
    all: Option<AllRows<B>>,
}

struct AllRows<B: Backend> {
    norm: B::Buf,
    rstd: B::Buf,
    logits: B::Buf,
}

/// Most prompt tokens processed in one prefill pass; longer prompts go in several passes, which
/// bounds the scratch memory without changing the result.
const PREFILL_CHUNK: usize = 256;

impl<B: Backend> KvCache<B> {
    pub fn new(model: &Llama<B>, capacity: usize) -> Result<Self> {
        let (b, cfg) = (&model.backend, &model.cfg);
        let capacity = capacity.min(cfg.max_seq_len);
        let kvd = cfg.kv_dim();
        let k = (0..cfg.n_layer).map(|_| b.zeros(capacity * kvd)).collect::<Result<_>>()?;
        let v = (0..cfg.n_layer).map(|_| b.zeros(capacity * kvd)).collect::<Result<_>>()?;
        let ws = Workspace::for_inference(model, 1, PREFILL_CHUNK.min(capacity))?;
        Ok(KvCache {
            k,
            v,
            capacity,
            len: 0,
            ws,
            last_hidden: b.zeros(cfg.d_model)?,
            last_norm: b.zeros(cfg.d_model)?,
            rstd: b.zeros_as(1, Role::Stats)?,
            logits: b.zeros(cfg.vocab_size)?,
            all: None,
        })
    }

    /// Tokens currently held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Forgets every token after the first `len` (to score several continuations of one context).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl<B: Backend> Llama<B> {
    /// Appends `ids` to the cache and returns the next-token logits after the last of them.
    pub fn decode(&self, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
        self.decode_impl(cache, ids, false)
    }

    /// Appends `ids` to the cache and returns the next-token logits after every one of them,
    /// `[ids.len(), vocab]` row-major (scoring continuations).
    pub fn decode_all(&self, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
        self.decode_impl(cache, ids, true)
    }

    fn decode_impl(&self, cache: &mut KvCache<B>, ids: &[u32], all_rows: bool) -> Result<Vec<f32>> {
        if ids.is_empty() {
            bail!("decode needs at least one token");
        }
        if cache.len + ids.len() > cache.capacity {
            bail!("context full: {} + {} tokens exceed the cache of {}", cache.len, ids.len(), cache.capacity);
        }
        self.check_ids(ids)?;
        let (b, cfg) = (&self.backend, &self.cfg);
        let d = cfg.d_model;
        let mut last_rows = 0;
        let mut all_logits = Vec::new();
        for chunk in ids.chunks(cache.ws.seq) {
            let seq = chunk.len();
            let ws = &mut cache.ws;
            b.embedding_forward(&mut ws.resid[0], &self.weights.embed, chunk, d)?;
            for (l, w) in self.weights.layers.iter().enumerate() {
                // Ping-pong between the two residual buffers: block activations are scratch here.
                let (r0, r1) = ws.resid.split_at_mut(1);
                let (x_in, x_out) = if l.is_multiple_of(2) { (&r0[0], &mut r1[0]) } else { (&r1[0], &mut r0[0]) };
                let place = KvPlace::Cache {
                    k: &mut cache.k[l],
                    v: &mut cache.v[l],
                    pos0: cache.len,
                    capacity: cache.capacity,
                };
                self.block_forward(w, &mut ws.blocks[0], x_in, x_out, 1, seq, place)?;
            }
            cache.len += seq;
            last_rows = seq;
            if all_rows {
                let (chunk, v) = (cache.ws.seq, cfg.vocab_size);
                if cache.all.is_none() {
                    cache.all = Some(AllRows {
                        norm: b.zeros(chunk * d)?,
                        rstd: b.zeros_as(chunk, Role::Stats)?,
                        logits: b.zeros(chunk * v)?,
                    });
                }
                let a = cache.all.as_mut().expect("allocated above");
                let out = &cache.ws.resid[cfg.n_layer % 2];
                let eps = cfg.norm_eps as f32;
                b.rmsnorm_forward(&mut a.norm, &mut a.rstd, out, &self.weights.final_norm, seq, d, eps)?;
                b.matmul(&mut a.logits, &a.norm, self.weights.head(), Gemm::linear(seq, d, v))?;
                // Only this chunk's rows: the buffer holds a whole chunk's (and on the CPU a
                // download is a copy).
                let host = b.download_prefix(&a.logits, seq * v)?;
                if all_logits.is_empty() {
                    all_logits = host;
                } else {
                    all_logits.extend_from_slice(&host);
                }
            }
        }
        if all_rows {
            return Ok(all_logits);
        }
        // Only the last position's logits are needed: normalise and project one row.
        let out = &cache.ws.resid[cfg.n_layer % 2];
        b.copy(&mut cache.last_hidden, 0, out, (last_rows - 1) * d, d)?;
        b.rmsnorm_forward(
            &mut cache.last_norm,
            &mut cache.rstd,
            &cache.last_hidden,
            &self.weights.final_norm,
            1,
            d,
            cfg.norm_eps as f32,
        )?;
        b.matmul(&mut cache.logits, &cache.last_norm, self.weights.head(), Gemm::linear(1, d, cfg.vocab_size))?;
        b.download(&cache.logits)
    }
}
