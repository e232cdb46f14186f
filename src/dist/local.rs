//! The in-process group: ranks are threads, collectives go through shared slots guarded by an
//! abortable barrier.

use super::{Comm, DeviceComm, Member, Ticket};
use crate::backend::cpu::{Cpu, CpuBuf};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A reusable barrier that can be aborted, so one failing rank releases all the others.
struct Barrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

struct BarrierState {
    arrived: usize,
    generation: u64,
    failure: Option<String>,
}

impl Barrier {
    fn wait(&self) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &s.failure {
            bail!("{f}");
        }
        let gen = s.generation;
        s.arrived += 1;
        if s.arrived == self.n {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while s.generation == gen && s.failure.is_none() {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match &s.failure {
            Some(f) if s.generation == gen => bail!("{f}"),
            _ => Ok(()),
        }
    }

    fn abort(&self, reason: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failure.get_or_insert(reason);
        self.cv.notify_all();
    }
}

struct Shared {
    barrier: Barrier,
    slots: Vec<Mutex<Vec<f32>>>,
}

pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Seconds spent in device collectives since `take_busy_secs`, as f64 bits (only this rank's
    /// thread writes it).
    busy_bits: AtomicU64,
}

/// `n` connected ranks; hand one to each worker thread.
pub fn local_group(n: usize) -> Vec<LocalComm> {
    assert!(n > 0, "a group needs at least one rank");
    let shared = Arc::new(Shared {
        barrier: Barrier {
            n,
            state: Mutex::new(BarrierState { arrived: 0, generation: 0, failure: None }),
            cv: Condvar::new(),
        },
        slots: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
    });
    (0..n).map(|rank| LocalComm { rank, shared: shared.clone(), busy_bits: AtomicU64::new(0) }).collect()
}

/// `n` CPU ranks, each with its backend, for the FSDP engine.
pub fn cpu_group(n: usize) -> Vec<Member<Cpu>> {
    local_group(n).into_iter().map(|comm| Member { backend: Cpu::new(), comm: Box::new(comm) }).collect()
}

/// On the CPU a buffer is a host slice: the device collectives are the host ones, finished before
/// `start_*` returns.
impl DeviceComm<Cpu> for LocalComm {
    fn start_all_gather(&self, _: &Cpu, shard: &CpuBuf, out: &mut CpuBuf) -> Result<Ticket> {
        self.busy(|| self.all_gather(shard, out))
    }
    fn start_reduce_scatter(&self, _: &Cpu, input: &CpuBuf, out: &mut CpuBuf) -> Result<Ticket> {
        self.busy(|| self.reduce_scatter(input, out))
    }
    fn wait(&self, _: &Cpu, _: Ticket) -> Result<()> {
        Ok(())
    }
    fn take_busy_secs(&self) -> Result<f64> {
        Ok(f64::from_bits(self.busy_bits.swap(0, Ordering::Relaxed)))
    }
}

impl LocalComm {
    /// Runs a collective, adding its time to this rank's busy seconds.
    fn busy(&self, f: impl FnOnce() -> Result<()>) -> Result<Ticket> {
        let t = Instant::now();
        let out = f();
        let secs = f64::from_bits(self.busy_bits.load(Ordering::Relaxed)) + t.elapsed().as_secs_f64();
        self.busy_bits.store(secs.to_bits(), Ordering::Relaxed);
        out.map(|_| Ticket(0))
    }

    fn put(&self, data: &[f32]) {
        let mut slot = self.shared.slots[self.rank].lock().unwrap_or_else(|p| p.into_inner());
        slot.clear();
        slot.extend_from_slice(data);
    }

    fn slot(&self, r: usize) -> std::sync::MutexGuard<'_, Vec<f32>> {
        self.shared.slots[r].lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.slots.len()
    }

    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.world_size();
        if out.len() != shard.len() * n {
            bail!("all_gather: output of {} values for {n} shards of {}", out.len(), shard.len());
        }
        self.put(shard);
        self.shared.barrier.wait()?;
        for r in 0..n {
            out[r * shard.len()..(r + 1) * shard.len()].copy_from_slice(&self.slot(r));
        }
        self.shared.barrier.wait() // nobody overwrites a slot before everyone has read it
    }

    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        let (n, len) = (self.world_size(), out.len());
        if input.len() != len * n {
            bail!("reduce_scatter: input of {} values for {n} shards of {len}", input.len());
        }
        self.put(input);
        self.shared.barrier.wait()?;
        let lo = self.rank * len;
        out.copy_from_slice(&self.slot(0)[lo..lo + len]);
        for r in 1..n {
            let s = self.slot(r);
            for (o, x) in out.iter_mut().zip(&s[lo..lo + len]) {
                *o += x;
            }
        }
        self.shared.barrier.wait()
    }

    fn all_reduce(&self, buf: &mut [f32]) -> Result<()> {
        self.put(buf);
        self.shared.barrier.wait()?;
        buf.copy_from_slice(&self.slot(0));
        for r in 1..self.world_size() {
            let s = self.slot(r);
            if s.len() != buf.len() {
                bail!("all_reduce: rank {r} sent {} values, rank {} has {}", s.len(), self.rank, buf.len());
            }
            for (o, x) in buf.iter_mut().zip(s.iter()) {
                *o += x;
            }
        }
        self.shared.barrier.wait()
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if self.rank == root {
            self.put(buf);
        }
        self.shared.barrier.wait()?;
        if self.rank != root {
            let s = self.slot(root);
            if s.len() != buf.len() {
                bail!("broadcast: root {root} sent {} values, rank {} expects {}", s.len(), self.rank, buf.len());
            }
            buf.copy_from_slice(&s);
        }
        self.shared.barrier.wait()
    }

    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait()
    }

    fn abort(&self, reason: &str) {
        self.shared.barrier.abort(format!("rank {} failed: {reason}", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Runs `f(rank, comm)` on one thread per rank and returns each rank's result.
    fn on_ranks<T: Send>(n: usize, f: impl Fn(&LocalComm) -> T + Sync) -> Vec<T> {
        let group = local_group(n);
        std::thread::scope(|s| {
            let handles: Vec<_> = group.iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn data(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (rank * 1000 + i) as f32 * 0.5 - 3.0).collect()
    }

    #[test]
    fn collectives_match_serial_references() {
        for n in 1..=4 {
            let len = 5;
            // all_gather
            let got = on_ranks(n, |c| {
                let mut out = vec![0.0; len * n];
                c.all_gather(&data(c.rank(), len), &mut out).unwrap();
                out
            });
            let want: Vec<f32> = (0..n).flat_map(|r| data(r, len)).collect();
            assert!(got.iter().all(|g| *g == want));
            // reduce_scatter
            let got = on_ranks(n, |c| {
                let mut out = vec![0.0; len];
                c.reduce_scatter(&data(c.rank(), len * n), &mut out).unwrap();
                out
            });
            for (r, g) in got.iter().enumerate() {
                let want: Vec<f32> =
                    (0..len).map(|i| (0..n).map(|q| data(q, len * n)[r * len + i]).fold(0.0, |a, b| a + b)).collect();
                assert_eq!(*g, want, "rank {r} of {n}");
            }
            // all_reduce: every rank sees the same bits
            let got = on_ranks(n, |c| {
                let mut b = data(c.rank(), 7);
                c.all_reduce(&mut b).unwrap();
                b
            });
            let want: Vec<f32> = (0..7).map(|i| (0..n).map(|q| data(q, 7)[i]).fold(0.0, |a, b| a + b)).collect();
            assert!(got.iter().all(|g| *g == want));
            // broadcast
            let got = on_ranks(n, |c| {
                let mut b = data(c.rank(), 3);
                c.broadcast(&mut b, n - 1).unwrap();
                c.barrier().unwrap();
                b
            });
            assert!(got.iter().all(|g| *g == data(n - 1, 3)));
        }
    }

    #[test]
    fn a_failing_rank_releases_the_others_with_an_error() {
        // Released by the abort, not by a timeout: bounded generously (a loaded machine is slow,
        // a hang is forever), on a thread so that a hang fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(on_ranks(4, |c| {
                if c.rank() == 2 {
                    std::thread::sleep(Duration::from_millis(50));
                    c.abort("out of memory");
                    return Err("aborted".to_string());
                }
                let mut b = vec![1.0; 4];
                c.all_reduce(&mut b).map_err(|e| e.to_string())
            }));
        });
        let got = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(got) => got,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("the other ranks were not released (hung)"),
            Err(e) => panic!("the ranks' thread failed: {e}"),
        };
        for (r, g) in got.iter().enumerate() {
            if r != 2 {
                assert_eq!(g.as_ref().unwrap_err(), "rank 2 failed: out of memory");
            }
        }
    }
}
