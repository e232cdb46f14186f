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
    /// `[chunk, vocab]` logits for `decode_branches`, allocated on first use.
    all: Option<AllRows<B>>,
    /// Keys and values of the continuations `decode_branches` scores, allocated on first use.
    branches: Option<BranchCache<B>>,
}

/// Per layer, `slots` sequences of `stride` positions: each a copy of the context, then one
/// continuation. Sized to what scoring needs (a context and its longest continuation), not to the
/// model's context length, and grown only when an item needs more.
struct BranchCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    slots: usize,
    stride: usize,
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
            // f32 on every backend: the sampler and the scorer read these, and bf16 logits tie
            // (greedy decoding on a GPU picked the lower id of two equal bf16 logits where f32
            // told them apart).
            logits: b.zeros_as(cfg.vocab_size, Role::Stats)?,
            all: None,
            branches: None,
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
}

impl<B: Backend> Llama<B> {
    /// Appends `ids` to the cache and returns the next-token logits after the last of them.
    pub fn decode(&self, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
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

    /// Scores several continuations of the context now in the cache at once: returns, for each
    /// branch, the next-token logits after every one of its tokens (`[branch.len(), vocab]`
    /// row-major), as `decode` of the branch after that context would give them. The branches run
    /// as one batch (each on its own copy of the context's keys and values, padded to the longest),
    /// so the weights are read once per pass instead of once per branch. The cache itself is left
    /// holding the context alone.
    pub fn decode_branches(&self, cache: &mut KvCache<B>, branches: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let ctx = cache.len;
        let longest = branches.iter().map(|b| b.len()).max().unwrap_or(0);
        if branches.iter().any(|b| b.is_empty()) {
            bail!("decode needs at least one token per branch");
        }
        if ctx + longest > cache.capacity {
            bail!("context full: {ctx} + {longest} tokens exceed the cache of {}", cache.capacity);
        }
        for b in branches {
            self.check_ids(b)?;
        }
        // A pass holds at most the workspace's rows: more branches than that go in groups.
        let mut out = Vec::with_capacity(branches.len());
        for group in branches.chunks(cache.ws.seq) {
            out.extend(self.decode_group(cache, group, ctx, longest)?);
        }
        Ok(out)
    }

    fn decode_group(
        &self,
        cache: &mut KvCache<B>,
        group: &[&[u32]],
        ctx: usize,
        longest: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let (b, cfg) = (&self.backend, &self.cfg);
        let (d, v, kvd, n) = (cfg.d_model, cfg.vocab_size, cfg.kv_dim(), group.len());
        let need = ctx + longest;
        if !cache.branches.as_ref().is_some_and(|br| br.slots >= n && br.stride >= need) {
            let (slots, stride) = match &cache.branches {
                Some(br) => (br.slots.max(n), br.stride.max(need)),
                None => (n, need),
            };
            // Free the old buffers before allocating larger ones.
            cache.branches = None;
            let layers = || (0..cfg.n_layer).map(|_| b.zeros(slots * stride * kvd)).collect::<Result<Vec<_>>>();
            cache.branches = Some(BranchCache { k: layers()?, v: layers()?, slots, stride });
        }
        let br = cache.branches.as_mut().expect("allocated above");
        let stride = br.stride;
        for l in 0..cfg.n_layer {
            for s in 0..n {
                b.copy(&mut br.k[l], s * stride * kvd, &cache.k[l], 0, ctx * kvd)?;
                b.copy(&mut br.v[l], s * stride * kvd, &cache.v[l], 0, ctx * kvd)?;
            }
        }
        let rows_max = cache.ws.seq;
        if cache.all.is_none() {
            cache.all = Some(AllRows {
                norm: b.zeros(rows_max * d)?,
                rstd: b.zeros_as(rows_max, Role::Stats)?,
                logits: b.zeros_as(rows_max * v, Role::Stats)?,
            });
        }
        // Positions per pass: the group's rows fill at most the workspace.
        let step = (rows_max / n).max(1);
        let mut out: Vec<Vec<f32>> = group.iter().map(|br| Vec::with_capacity(br.len() * v)).collect();
        let mut ids = Vec::with_capacity(n * step);
        for offset in (0..longest).step_by(step) {
            let seq = step.min(longest - offset);
            // Each branch's next `seq` tokens; one that has ended is padded with its last token.
            // The padding comes after every real token of its row, so under the causal mask it
            // changes nothing they see; its logits are dropped below.
            ids.clear();
            for br in group {
                let last = *br.last().expect("branches are not empty");
                ids.extend((offset..offset + seq).map(|i| br.get(i).copied().unwrap_or(last)));
            }
            let ws = &mut cache.ws;
            b.embedding_forward(&mut ws.resid[0], &self.weights.embed, &ids, d)?;
            for (l, w) in self.weights.layers.iter().enumerate() {
                let (r0, r1) = ws.resid.split_at_mut(1);
                let (x_in, x_out) = if l.is_multiple_of(2) { (&r0[0], &mut r1[0]) } else { (&r1[0], &mut r0[0]) };
                let place = KvPlace::Cache { k: &mut br.k[l], v: &mut br.v[l], pos0: ctx + offset, capacity: stride };
                self.block_forward(w, &mut ws.blocks[0], x_in, x_out, n, seq, place)?;
            }
            let a = cache.all.as_mut().expect("allocated above");
            let hidden = &cache.ws.resid[cfg.n_layer % 2];
            let rows = n * seq;
            b.rmsnorm_forward(
                &mut a.norm,
                &mut a.rstd,
                hidden,
                &self.weights.final_norm,
                rows,
                d,
                cfg.norm_eps as f32,
            )?;
            b.matmul(&mut a.logits, &a.norm, self.weights.head(), Gemm::linear(rows, d, v))?;
            // Only this pass's rows: the buffer holds a whole workspace's (and on the CPU a
            // download is a copy).
            let host = b.download_prefix(&a.logits, rows * v)?;
            for (s, br) in group.iter().enumerate() {
                let real = br.len().saturating_sub(offset).min(seq);
                out[s].extend_from_slice(&host[s * seq * v..(s * seq + real) * v]);
            }
        }
        Ok(out)
    }
}
