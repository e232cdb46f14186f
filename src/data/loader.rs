//! The training data loader: a prefetch thread draws micro-batches from the mixture ahead of the
//! step, so the step only waits when data is truly late (that wait is measured and reported).

use super::dataset::Dataset;
use super::mixture::{MixState, Mixture};
use anyhow::{bail, Result};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Micro-batches prepared ahead of the step.
const PREFETCH_DEPTH: usize = 4;

/// `[micro_batch, seq_len]` inputs and next-token targets.
pub struct Batch {
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
    /// The mixture position after this batch: what a checkpoint taken after it must store.
    pub state: MixState,
}

pub struct Source {
    pub name: String,
    pub weight: f64,
    pub data: Arc<Dataset>,
}

pub struct Loader {
    rx: Option<Receiver<Batch>>,
    thread: Option<JoinHandle<()>>,
}

fn windows(src: &Source, seq_len: usize) -> Result<u64> {
    let n = src.data.train.len / (seq_len as u64 + 1);
    if n == 0 {
        bail!(
            "{}: dataset {:?} has {} training tokens, shorter than seq_len + 1 = {}",
            src.data.dir.display(),
            src.name,
            src.data.train.len,
            seq_len + 1
        );
    }
    Ok(n)
}

impl Loader {
    pub fn start(
        sources: &[Source],
        seed: u64,
        seq_len: usize,
        micro_batch: usize,
        state: Option<MixState>,
    ) -> Result<Loader> {
        let wins = sources.iter().map(|s| windows(s, seq_len)).collect::<Result<Vec<_>>>()?;
        let weights: Vec<f64> = sources.iter().map(|s| s.weight).collect();
        let data: Vec<Arc<Dataset>> = sources.iter().map(|s| s.data.clone()).collect();
        let mut mix = Mixture::new(seed, &weights, wins, state)?;
        let (tx, rx) = sync_channel(PREFETCH_DEPTH);
        let thread = std::thread::Builder::new().name("kiln-data".into()).spawn(move || loop {
            let mut ids = Vec::with_capacity(micro_batch * seq_len);
            let mut targets = Vec::with_capacity(micro_batch * seq_len);
            let mut window = Vec::with_capacity(seq_len + 1);
            for _ in 0..micro_batch {
                let d = mix.draw();
                window.clear();
                data[d.source].train.read_into(d.window * (seq_len as u64 + 1), seq_len + 1, &mut window);
                ids.extend_from_slice(&window[..seq_len]);
                targets.extend(window[1..].iter().map(|&t| t as i32));
            }
            if tx.send(Batch { ids, targets, state: mix.state.clone() }).is_err() {
                return; // the trainer is gone
            }
        })?;
        Ok(Loader { rx: Some(rx), thread: Some(thread) })
    }

    /// The next micro-batch and how long the step waited for it.
    pub fn next_batch(&mut self) -> Result<(Batch, Duration)> {
        let t = Instant::now();
        let rx = self.rx.as_ref().expect("receiver lives until drop");
        match rx.recv() {
            Ok(b) => Ok((b, t.elapsed())),
            Err(_) => bail!("the data loader thread stopped unexpectedly"),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx.take(); // unblocks the producer's send
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fixed held-out sequences for eval loss: the first `max_per_source` windows of each source's
/// validation split (sources without one are skipped). Returns `(source name, ids, targets)`.
pub fn val_sequences(sources: &[Source], seq_len: usize, max_per_source: usize) -> Vec<(String, Vec<u32>, Vec<i32>)> {
    let mut out = Vec::new();
    for s in sources {
        let n = (s.data.val.len / (seq_len as u64 + 1)).min(max_per_source as u64);
        for w in 0..n {
            let mut win = Vec::with_capacity(seq_len + 1);
            s.data.val.read_into(w * (seq_len as u64 + 1), seq_len + 1, &mut win);
            out.push((s.name.clone(), win[..seq_len].to_vec(), win[1..].iter().map(|&t| t as i32).collect()));
        }
    }
    out
}
