//! Collective communication between ranks. `Comm` is what the FSDP engine speaks; `local` is the
//! in-process group for CPU ranks (one thread per rank, shared memory) and `nccl` the group for
//! CUDA ranks, on one node or many. `launch` reads where this process sits in a multi-node run and
//! `rendezvous` hands NCCL's unique id from node 0 to the others.
//!
//! Every local collective sums in rank order, so all ranks see bit-identical results and a run's
//! numbers do not depend on thread scheduling.

pub mod launch;
pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod shard;

use crate::backend::Backend;
use anyhow::Result;

pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// `out = concat(shard of rank 0, …, shard of rank n−1)`; every shard has `out.len() / n` values.
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()>;
    /// `out = Σ_ranks input[rank·len .. (rank+1)·len]` with `len = out.len()` (summed over ranks).
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()>;
    /// `buf = Σ_ranks buf`.
    fn all_reduce(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Marks the group failed (a rank errored or panicked): every rank blocked in or entering a
    /// collective gets an error naming the failed rank instead of hanging.
    fn abort(&self, reason: &str);
}

/// Collectives over a backend's own buffers: what the FSDP engine moves parameters and gradients
/// with. The host-slice `Comm` underneath carries control values (loss, gradient norm) and failures.
///
/// Collectives are *started*: each is ordered after the work already queued on the backend and
/// returns a [`Ticket`]; `wait` orders the backend's later work after it. A synchronous group (CPU
/// ranks) finishes before `start_*` returns; a GPU group runs them on a communication stream, so
/// the engine can gather the next unit while it computes this one. Until its ticket is waited on,
/// a collective's output must not be read and neither of its buffers dropped.
pub trait DeviceComm<B: Backend>: Comm {
    /// `out = concat over ranks of shard`, in `out`'s storage (a mixed-precision backend gathers a
    /// parameter's compute copy into a compute-precision `out`: half the bytes of the master).
    fn start_all_gather(&self, backend: &B, shard: &B::Buf, out: &mut B::Buf) -> Result<Ticket>;
    /// `out = Σ over ranks of input[rank·len .. (rank+1)·len]` with `len = out.len()`.
    fn start_reduce_scatter(&self, backend: &B, input: &B::Buf, out: &mut B::Buf) -> Result<Ticket>;
    /// Orders the backend's later work after collective `t` (on a GPU, without a host wait).
    fn wait(&self, backend: &B, t: Ticket) -> Result<()>;
    /// Seconds the collectives were busy since the last call (on a GPU, timed on the communication
    /// stream, overlapped or not).
    fn take_busy_secs(&self) -> Result<f64>;
}

/// A started collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(pub u64);

/// One FSDP rank: its device and its place in the group.
pub struct Member<B: Backend> {
    pub backend: B,
    pub comm: Box<dyn DeviceComm<B>>,
}
