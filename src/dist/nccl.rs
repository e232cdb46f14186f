//! NCCL collectives for CUDA ranks, through cudarc's nccl module (loaded at run time). A rank owns
//! one GPU and one communicator; every rank of the world, on this node or another, joins with the
//! same unique id (made by rank 0, handed to other nodes by `rendezvous`).
//!
//! The device-buffer collectives are what a CUDA engine calls. `Comm` (host slices) is provided on
//! top of them by staging through the GPU, for control values and for tests against the CPU group.

use super::{Comm, DeviceComm, Member, Ticket};
use crate::backend::cuda::buf::{CudaBuf, Data};
use crate::backend::cuda::libs::{require, CudaLib};
use crate::backend::cuda::Cuda;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr};
use cudarc::nccl::{Comm as RawComm, Id, NcclType, ReduceOp};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const NEEDS: &[CudaLib] = &[CudaLib::Driver, CudaLib::Nccl];

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {:?}", e.0)
}

/// A fresh NCCL unique id (128 bytes), made on the world's rank 0.
pub fn unique_id() -> Result<Vec<u8>> {
    require("NCCL", NEEDS)?;
    let id = Id::new().map_err(|e| nccl_err("get unique id", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The communicator and its stream. NCCL communicators are not thread-safe, but may be used from
/// any thread one call at a time: the mutex in `NcclComm` guarantees that.
struct Inner {
    comm: RawComm,
    stream: Arc<CudaStream>,
}

// SAFETY: see `Inner`: all use goes through `NcclComm::inner`, a mutex.
unsafe impl Send for Inner {}

impl Inner {
    fn all_gather<T: NcclType + DeviceRepr>(&self, shard: &CudaSlice<T>, out: &mut CudaSlice<T>) -> Result<()> {
        let world = self.comm.world_size();
        if out.len() != shard.len() * world {
            bail!("all_gather: {} values out for {world} ranks of {}", out.len(), shard.len());
        }
        self.comm.all_gather(shard, out).map(|_| ()).map_err(|e| nccl_err("all_gather", e))
    }

    fn reduce_scatter<T: NcclType + DeviceRepr>(&self, input: &CudaSlice<T>, out: &mut CudaSlice<T>) -> Result<()> {
        let world = self.comm.world_size();
        if input.len() != out.len() * world {
            bail!("reduce_scatter: {} values in for {world} ranks of {}", input.len(), out.len());
        }
        self.comm.reduce_scatter(input, out, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_err("reduce_scatter", e))
    }
}

/// Started collectives: the event that marks each one's end, and start/end pairs for timing.
#[derive(Default)]
struct Started {
    next: u64,
    pending: HashMap<u64, Arc<CudaEvent>>,
    timings: Vec<(CudaEvent, Arc<CudaEvent>)>,
}

pub struct NcclComm {
    inner: Mutex<Inner>,
    rank: usize,
    world: usize,
    /// Shared by every communicator this process opened for the group, so one rank's abort reaches
    /// the ranks beside it (their next collective fails instead of waiting for the failed rank).
    failed: Arc<Mutex<Option<String>>>,
    started: Mutex<Started>,
}

impl NcclComm {
    /// Joins the world as `rank` of `world` on GPU `device`; blocks until every rank has joined.
    pub fn new(device: usize, rank: usize, world: usize, id: &[u8]) -> Result<NcclComm> {
        require("NCCL", NEEDS)?;
        let raw = raw_id(id)?;
        let ctx = CudaContext::new(device).with_context(|| format!("cannot open GPU {device}"))?;
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        let comm = RawComm::from_rank(stream.clone(), rank, world, Id::uninit(raw))
            .map_err(|e| nccl_err(&format!("init of rank {rank} of {world}"), e))?;
        Ok(NcclComm {
            inner: Mutex::new(Inner { comm, stream }),
            rank,
            world,
            failed: Arc::default(),
            started: Mutex::new(Started::default()),
        })
    }

    fn wrap(comm: RawComm, failed: Arc<Mutex<Option<String>>>) -> NcclComm {
        let (rank, world, stream) = (comm.rank(), comm.world_size(), comm.stream());
        NcclComm {
            inner: Mutex::new(Inner { comm, stream }),
            rank,
            world,
            failed,
            started: Mutex::new(Started::default()),
        }
    }

    fn check(&self) -> Result<()> {
        if let Some(why) = self.failed.lock().map_err(|_| anyhow!("NCCL group poisoned"))?.as_ref() {
            bail!("rank {}: the group failed: {why}", self.rank);
        }
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&Inner) -> Result<T>) -> Result<T> {
        self.check()?;
        let inner = self.inner.lock().map_err(|_| anyhow!("NCCL communicator poisoned"))?;
        f(&inner)
    }

    /// The stream the collectives run on (allocate their buffers here).
    pub fn stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.inner.lock().map_err(|_| anyhow!("NCCL communicator poisoned"))?.stream.clone())
    }

    /// Waits for every collective queued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.stream()?.synchronize()?;
        Ok(())
    }

    // The `*_device` collectives run on the communication stream with no ordering against any
    // other stream: their buffers must live on it (allocated on `stream()`, as the staged `Comm`
    // path and comm-check do). An engine's own buffers go through `start`, which orders first.

    /// `out = concat over ranks of shard`, on the GPU.
    fn all_gather_device<T: NcclType + DeviceRepr>(&self, shard: &CudaSlice<T>, out: &mut CudaSlice<T>) -> Result<()> {
        self.with(|i| i.all_gather(shard, out))
    }

    /// `out = Σ over ranks of input[rank·len..(rank+1)·len]`, on the GPU.
    fn reduce_scatter_device<T: NcclType + DeviceRepr>(
        &self,
        input: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.with(|i| i.reduce_scatter(input, out))
    }

    /// Queues `f` on the communication stream behind everything queued so far on `compute`
    /// (inputs written, buffers allocated), between two timing events; the second marks its end.
    fn start(&self, compute: &CudaStream, f: impl FnOnce(&Inner) -> Result<()>) -> Result<Ticket> {
        let (t0, t1) = self.with(|i| {
            i.stream.join(compute)?;
            let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let t0 = i.stream.record_event(timed)?;
            f(i)?;
            Ok((t0, Arc::new(i.stream.record_event(timed)?)))
        })?;
        let mut st = self.started.lock().map_err(|_| anyhow!("NCCL bookkeeping poisoned"))?;
        let id = st.next;
        st.next += 1;
        st.pending.insert(id, t1.clone());
        st.timings.push((t0, t1));
        Ok(Ticket(id))
    }

    /// `buf = Σ over ranks of buf`, in place; `buf` must live on `stream()` (see above).
    pub fn all_reduce_device(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.with(|i| {
            i.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_err("all_reduce", e))
        })
    }

    fn broadcast_device(&self, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
        self.with(|i| i.comm.broadcast_in_place(buf, root as i32).map(|_| ()).map_err(|e| nccl_err("broadcast", e)))
    }

    /// Runs `f` from a device copy of `input` into a device buffer the size of `out`, then copies
    /// that back into `out`.
    fn staged(
        &self,
        input: &[f32],
        out: &mut [f32],
        f: impl FnOnce(&Self, &CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<()> {
        let stream = self.stream()?;
        let src = stream.clone_htod(input)?;
        let mut dst = stream.alloc_zeros::<f32>(out.len())?;
        f(self, &src, &mut dst)?;
        stream.memcpy_dtoh(&dst, out)?;
        stream.synchronize()?;
        Ok(())
    }
}

impl NcclComm {
    /// Runs `f` on a device copy of `buf`, then copies the result back.
    fn staged_in_place(&self, buf: &mut [f32], f: impl FnOnce(&Self, &mut CudaSlice<f32>) -> Result<()>) -> Result<()> {
        let stream = self.stream()?;
        let mut dev = stream.clone_htod(&*buf)?;
        f(self, &mut dev)?;
        stream.memcpy_dtoh(&dev, buf)?;
        stream.synchronize()?;
        Ok(())
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, shard: &[f32], out: &mut [f32]) -> Result<()> {
        self.staged(shard, out, |c, s, o| c.all_gather_device(s, o))
    }
    fn reduce_scatter(&self, input: &[f32], out: &mut [f32]) -> Result<()> {
        self.staged(input, out, |c, s, o| c.reduce_scatter_device(s, o))
    }
    fn all_reduce(&self, buf: &mut [f32]) -> Result<()> {
        self.staged_in_place(buf, |c, d| c.all_reduce_device(d))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.staged_in_place(buf, |c, d| c.broadcast_device(d, root))
    }
    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one value waits for every rank.
        self.all_reduce(&mut [0.0])
    }
    fn abort(&self, reason: &str) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert_with(|| reason.to_string());
        }
    }
}

/// The GPUs the driver sees; a clear error where the driver or NCCL is missing.
pub fn gpu_count() -> Result<usize> {
    require("FSDP on GPUs", NEEDS)?;
    Ok(CudaContext::device_count().context("cannot count the GPUs")? as usize)
}

/// `world` FSDP ranks on this machine's GPUs 0..world, one `Cuda` engine each, joined by one NCCL
/// communicator per GPU on a communication stream of its own. Events order each collective after
/// the kernels that produced its input and before those that read its output, with no host wait.
pub fn cuda_group(world: usize) -> Result<Vec<Member<Cuda>>> {
    let count = gpu_count()?;
    if world > count {
        bail!("parallel.world_size = {world} needs {world} GPUs; this machine has {count}");
    }
    let (engines, streams) = open_engines(world)?;
    let comms = RawComm::from_devices(streams).map_err(|e| nccl_err(&format!("init of {world} GPUs"), e))?;
    let failed = Arc::default();
    members(engines, comms.into_iter().map(|c| Ok(NcclComm::wrap(c, Arc::clone(&failed)))).collect())
}

/// A 128-byte NCCL unique id as NCCL takes it.
fn raw_id(id: &[u8]) -> Result<[std::ffi::c_char; 128]> {
    id.iter()
        .map(|&b| b as std::ffi::c_char)
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| anyhow!("an NCCL unique id has 128 bytes, got {}", id.len()))
}

/// An engine on each of GPUs 0..n, and for each a communication stream of its own beside the
/// engine's, so collectives overlap compute.
fn open_engines(n: usize) -> Result<(Vec<Cuda>, Vec<Arc<CudaStream>>)> {
    let engines = (0..n).map(Cuda::open).collect::<Result<Vec<_>>>()?;
    share_memory_pools(&engines)?;
    let streams = engines
        .iter()
        .map(|e| e.gpu().ctx.new_stream())
        .collect::<Result<Vec<_>, _>>()
        .context("cannot create a CUDA stream")?;
    Ok((engines, streams))
}

/// Lets every GPU of this process read and write the others' stream-ordered memory pools. Buffers
/// come from `cuMemAllocAsync`, whose pools (unlike `cuMemAlloc`'s memory) are not reachable by
/// peers until granted; NCCL's peer-to-peer transport between GPUs of one process reads and writes
/// the user buffers directly, which would otherwise fault. Pairs without peer access are left to
/// NCCL's other transports.
fn share_memory_pools(engines: &[Cuda]) -> Result<()> {
    use cudarc::driver::sys;
    for owner in engines {
        let ctx = &owner.gpu().ctx;
        ctx.bind_to_thread()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver calls on devices this process opened; every pointer outlives its call.
        if unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result() }.is_err() {
            continue; // no pools: cudarc allocates with cuMemAlloc, which peers reach as they are
        }
        for peer in engines.iter().filter(|p| p.gpu().ordinal != owner.gpu().ordinal) {
            let mut can = 0;
            // SAFETY: as above.
            unsafe { sys::cuDeviceCanAccessPeer(&mut can, peer.gpu().ctx.cu_device(), ctx.cu_device()).result() }?;
            if can == 0 {
                continue;
            }
            let access = sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: peer.gpu().ctx.cu_device(),
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            };
            // SAFETY: as above; one descriptor.
            unsafe { sys::cuMemPoolSetAccess(pool, &access, 1).result() }.with_context(|| {
                format!("cannot give GPU {} access to GPU {}'s memory", peer.gpu().ordinal, owner.gpu().ordinal)
            })?;
        }
    }
    Ok(())
}

fn members(engines: Vec<Cuda>, comms: Vec<Result<NcclComm>>) -> Result<Vec<Member<Cuda>>> {
    engines
        .into_iter()
        .zip(comms)
        .map(|(backend, comm)| Ok(Member { backend, comm: Box::new(comm?) as Box<dyn DeviceComm<Cuda>> }))
        .collect()
}

/// This node's share of a world that spans `node.nnodes` nodes: GPUs 0..world/nnodes here, as
/// global ranks `node_rank · local ..`, joined with the NCCL `id` every node got from node 0.
/// `ncclCommInitRank` blocks until the whole world has joined, so each local GPU joins from a
/// thread of its own.
pub fn cuda_group_on_node(node: &super::launch::Node, world: usize, id: &[u8]) -> Result<Vec<Member<Cuda>>> {
    let ranks = node.local_ranks(world)?;
    let local = ranks.len();
    let count = gpu_count()?;
    if local > count {
        bail!(
            "parallel.world_size = {world} over {} nodes needs {local} GPUs per node; this node has {count}",
            node.nnodes
        );
    }
    let raw = raw_id(id)?;
    let (engines, streams) = open_engines(local)?;
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let comms: Vec<Result<NcclComm>> = std::thread::scope(|s| {
        let joins: Vec<_> = streams
            .into_iter()
            .zip(ranks.clone())
            .map(|(stream, rank)| {
                let failed = Arc::clone(&failed);
                s.spawn(move || {
                    // ncclCommInitRank joins on the thread's current device, and a new thread has
                    // none (or GPU 0's): make this rank's GPU current first.
                    stream.context().bind_to_thread().with_context(|| format!("cannot use the GPU of rank {rank}"))?;
                    RawComm::from_rank(stream, rank, world, Id::uninit(raw))
                        .map(|c| NcclComm::wrap(c, failed))
                        .map_err(|e| nccl_err(&format!("init of rank {rank} of {world}"), e))
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap_or_else(|_| bail!("an NCCL init thread panicked"))).collect()
    });
    members(engines, comms)
}

/// Parameters travel as their bf16 compute copies (what every op reads), gradients as f32, both on
/// the communication stream.
impl DeviceComm<Cuda> for NcclComm {
    fn start_all_gather(&self, b: &Cuda, shard: &CudaBuf, out: &mut CudaBuf) -> Result<Ticket> {
        self.start(&b.gpu().stream, |i| {
            if let Data::F32(o) = &mut out.data {
                let master = match &shard.data {
                    Data::F32(x) | Data::Param { master: x, .. } => x,
                    Data::Bf16(_) => bail!("all_gather: a bf16 shard cannot fill an f32 output"),
                };
                return i.all_gather(master, o);
            }
            i.all_gather(shard.bf16("all_gather shard")?, out.bf16_mut("all_gather output")?)
        })
    }

    fn start_reduce_scatter(&self, b: &Cuda, input: &CudaBuf, out: &mut CudaBuf) -> Result<Ticket> {
        self.start(&b.gpu().stream, |i| {
            i.reduce_scatter(input.f32("reduce_scatter input")?, out.f32_mut("reduce_scatter output")?)
        })
    }

    fn wait(&self, b: &Cuda, t: Ticket) -> Result<()> {
        let done = self.started.lock().map_err(|_| anyhow!("NCCL bookkeeping poisoned"))?.pending.remove(&t.0);
        match done {
            Some(ev) => Ok(b.gpu().stream.wait(&ev)?),
            None => bail!("NCCL: collective {} was never started or already waited on", t.0),
        }
    }

    fn take_busy_secs(&self) -> Result<f64> {
        let timings =
            std::mem::take(&mut self.started.lock().map_err(|_| anyhow!("NCCL bookkeeping poisoned"))?.timings);
        let mut ms = 0.0f64;
        for (t0, t1) in &timings {
            ms += t0.elapsed_ms(t1)? as f64;
        }
        Ok(ms / 1e3)
    }
}
