//! NCCL collectives for CUDA ranks, through cudarc's nccl module (loaded at run time). A rank owns
//! one GPU and one communicator; every rank of the world, on this node or another, joins with the
//! same unique id (made by rank 0, handed to other nodes by `rendezvous`).
//!
//! The device-buffer collectives are what a CUDA engine calls. `Comm` (host slices) is provided on
//! top of them by staging through the GPU, for control values and for tests against the CPU group.

use super::{Comm, DeviceComm, Member};
use crate::backend::cuda::buf::{CudaBuf, Data};
use crate::backend::cuda::libs::{require, CudaLib};
use crate::backend::cuda::Cuda;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use cudarc::nccl::{Comm as RawComm, Id, NcclType, ReduceOp};
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

pub struct NcclComm {
    inner: Mutex<Inner>,
    rank: usize,
    world: usize,
    failed: Mutex<Option<String>>,
}

impl NcclComm {
    /// Joins the world as `rank` of `world` on GPU `device`; blocks until every rank has joined.
    pub fn new(device: usize, rank: usize, world: usize, id: &[u8]) -> Result<NcclComm> {
        require("NCCL", NEEDS)?;
        let raw: [std::ffi::c_char; 128] = id
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| anyhow!("an NCCL unique id has 128 bytes, got {}", id.len()))?;
        let ctx = CudaContext::new(device).with_context(|| format!("cannot open GPU {device}"))?;
        let stream = ctx.new_stream().context("cannot create a CUDA stream")?;
        let comm = RawComm::from_rank(stream.clone(), rank, world, Id::uninit(raw))
            .map_err(|e| nccl_err(&format!("init of rank {rank} of {world}"), e))?;
        Ok(NcclComm { inner: Mutex::new(Inner { comm, stream }), rank, world, failed: Mutex::new(None) })
    }

    fn wrap(comm: RawComm) -> NcclComm {
        let (rank, world, stream) = (comm.rank(), comm.world_size(), comm.stream());
        NcclComm { inner: Mutex::new(Inner { comm, stream }), rank, world, failed: Mutex::new(None) }
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

    /// `out = concat over ranks of shard`, on the GPU.
    pub fn all_gather_device<T: NcclType + DeviceRepr>(
        &self,
        shard: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if out.len() != shard.len() * self.world {
            bail!("all_gather: {} values out for {} ranks of {}", out.len(), self.world, shard.len());
        }
        self.with(|i| i.comm.all_gather(shard, out).map(|_| ()).map_err(|e| nccl_err("all_gather", e)))
    }

    /// `out = Σ over ranks of input[rank·len..(rank+1)·len]`, on the GPU.
    pub fn reduce_scatter_device<T: NcclType + DeviceRepr>(
        &self,
        input: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if input.len() != out.len() * self.world {
            bail!("reduce_scatter: {} values in for {} ranks of {}", input.len(), self.world, out.len());
        }
        self.with(|i| {
            i.comm.reduce_scatter(input, out, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_err("reduce_scatter", e))
        })
    }

    pub fn all_reduce_device(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.with(|i| {
            i.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map(|_| ()).map_err(|e| nccl_err("all_reduce", e))
        })
    }

    pub fn broadcast_device(&self, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
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
/// communicator per GPU that runs on the engine's own stream: a collective is ordered after the
/// kernels that produced its input and before those that read its output, with no host wait.
pub fn cuda_group(world: usize) -> Result<Vec<Member<Cuda>>> {
    let count = gpu_count()?;
    if world > count {
        bail!("parallel.world_size = {world} needs {world} GPUs; this machine has {count}");
    }
    let engines = (0..world).map(Cuda::open).collect::<Result<Vec<_>>>()?;
    let streams = engines.iter().map(|e| e.gpu().stream.clone()).collect();
    let comms = RawComm::from_devices(streams).map_err(|e| nccl_err(&format!("init of {world} GPUs"), e))?;
    Ok(engines
        .into_iter()
        .zip(comms)
        .map(|(backend, comm)| Member { backend, comm: Box::new(NcclComm::wrap(comm)) as Box<dyn DeviceComm<Cuda>> })
        .collect())
}

/// Parameters travel as their bf16 compute copies (what every op reads), gradients as f32.
impl DeviceComm<Cuda> for NcclComm {
    fn all_gather_buf(&self, _: &Cuda, shard: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        if let Data::F32(o) = &mut out.data {
            let master = match &shard.data {
                Data::F32(x) | Data::Param { master: x, .. } => x,
                Data::Bf16(_) => bail!("all_gather: a bf16 shard cannot fill an f32 output"),
            };
            return self.all_gather_device(master, o);
        }
        self.all_gather_device(shard.bf16("all_gather shard")?, out.bf16_mut("all_gather output")?)
    }

    fn reduce_scatter_buf(&self, _: &Cuda, input: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        self.reduce_scatter_device(input.f32("reduce_scatter input")?, out.f32_mut("reduce_scatter output")?)
    }
}
