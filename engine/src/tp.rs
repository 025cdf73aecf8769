//! Tensor parallelism on one machine: each rank is an OS thread that owns one shard of the
//! weights and one shard of every session's KV cache (its key/value heads). A forward is
//! broadcast to all ranks; row-parallel layers meet in an all-reduce; rank 0 produces the
//! outputs. All ranks sum partials in the same order, so they stay bit-identical.
//!
//! The partial sums meet in host memory (CPU ranks; [`Reduction::Host`]) or, with one rank
//! per GPU in a `cuda` build, in NCCL's all-reduce on the devices ([`Reduction::Nccl`]).
//!
//! A rank that fails (an error or a panic in its shard) breaks the all-reduce's meeting
//! point, so the ranks waiting there fail the forward too instead of waiting forever; the
//! next forward starts afresh. NCCL's collectives cannot be broken off once entered, so
//! its ranks also meet at the host barrier first: a rank that failed never leaves the
//! others inside a collective it will not join.

use crate::api::{ForwardOutput, KvState, LanguageModel, ModelInfo, OutputSpec, SeqInput};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::mask::Visibility;
use crate::transformer::{AllReduce, LoadOptions, Shard, Transformer};
use candle_core::{Device, DeviceLocation, Tensor};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A rank that panicked has already failed its forward; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A barrier that a failing rank can break: then every rank waiting at it, or arriving
/// later in the same forward, gets an error instead of waiting for a rank that will never
/// come.
struct Meeting {
    world: usize,
    state: Mutex<MeetingState>,
    changed: Condvar,
}

#[derive(Default)]
struct MeetingState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl Meeting {
    fn new(world: usize) -> Self {
        Self {
            world,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn wait(&self) -> Result<()> {
        let broken = || EngineError::Rank("another rank failed this forward".into());
        let mut s = lock(&self.state);
        if s.broken {
            return Err(broken());
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.changed.notify_all();
            return Ok(());
        }
        while s.generation == generation && !s.broken {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match s.generation == generation {
            true => Err(broken()),
            false => Ok(()),
        }
    }

    /// A rank failed: nobody waits here for the rest of this forward.
    fn break_off(&self) {
        lock(&self.state).broken = true;
        self.changed.notify_all();
    }

    /// Every rank has left the forward: the next one meets afresh.
    fn reset(&self) {
        *lock(&self.state) = MeetingState::default();
    }
}

/// How the ranks of a tensor-parallel group add up their partial sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Each rank copies its partial to host memory and every rank adds all partials in
    /// rank order: any devices, one GPU shared by several ranks included.
    Host,
    /// NCCL's all-reduce between GPUs, one rank per GPU: the partials never leave the
    /// devices. Needs a `cuda` build.
    Nccl,
}

impl Reduction {
    /// The reduction for ranks on `places` (rank r on `places[r]`): NCCL when every rank
    /// has a GPU of its own and the build has CUDA, host memory otherwise (CPU ranks, mixed
    /// devices, or ranks sharing a GPU, which one NCCL group cannot hold).
    pub fn for_places(places: &[DeviceLocation], cuda_built: bool) -> Reduction {
        let mut gpus: Vec<usize> = Vec::with_capacity(places.len());
        for p in places {
            match p {
                DeviceLocation::Cuda { gpu_id } => gpus.push(*gpu_id),
                _ => return Reduction::Host,
            }
        }
        let all = gpus.len();
        gpus.sort_unstable();
        gpus.dedup();
        match cuda_built && all > 1 && gpus.len() == all {
            true => Reduction::Nccl,
            false => Reduction::Host,
        }
    }

    /// The reduction named by `OURO_TP_REDUCTION` (`host` or `nccl`), if set: for
    /// comparing the two on the same GPUs.
    pub fn from_env() -> Result<Option<Reduction>> {
        match std::env::var("OURO_TP_REDUCTION")
            .ok()
            .as_deref()
            .map(str::trim)
        {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("host") => Ok(Some(Reduction::Host)),
            Some(v) if v.eq_ignore_ascii_case("nccl") => Ok(Some(Reduction::Nccl)),
            Some(v) => Err(EngineError::invalid(format!(
                "OURO_TP_REDUCTION={v:?}: expected host or nccl"
            ))),
        }
    }
}

/// All-reduce between threads: every rank posts its partial, then sums all partials in
/// rank order.
struct ThreadAllReduce {
    slots: Vec<Mutex<Vec<f32>>>,
    meeting: Arc<Meeting>,
}

impl AllReduce for ThreadAllReduce {
    fn sum(&self, rank: usize, t: &Tensor) -> Result<Tensor> {
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        *lock(&self.slots[rank]) = data;
        self.meeting.wait()?;
        let mut acc = lock(&self.slots[0]).clone();
        for slot in &self.slots[1..] {
            for (a, b) in acc.iter_mut().zip(lock(slot).iter()) {
                *a += b;
            }
        }
        // Nobody may post the next partial before everyone has read this one.
        self.meeting.wait()?;
        Ok(Tensor::from_vec(acc, t.shape(), t.device())?)
    }
}

/// A session's cache: one shard per rank.
pub struct TpCache {
    shards: Vec<Arc<Mutex<KvCache>>>,
}

impl KvState for TpCache {
    fn len(&self) -> usize {
        lock(&self.shards[0]).len()
    }

    fn truncate(&mut self, n: usize) -> Result<()> {
        self.shards.iter().try_for_each(|s| lock(s).truncate(n))
    }

    fn keep(&mut self, base: usize, rows: &[usize]) -> Result<()> {
        self.shards
            .iter()
            .try_for_each(|s| lock(s).keep(base, rows))
    }

    fn memory_bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).memory_bytes()).sum()
    }

    fn memory_bytes_after(&self, extra: usize) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).memory_bytes_after(extra))
            .sum()
    }
}

struct OwnedSeq {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    visibility: Visibility,
    outputs: OutputSpec,
}

impl OwnedSeq {
    fn view(&self) -> SeqInput<'_> {
        SeqInput {
            tokens: &self.tokens,
            positions: &self.positions,
            visibility: &self.visibility,
            outputs: self.outputs.clone(),
        }
    }
}

struct Job {
    seqs: Arc<Vec<OwnedSeq>>,
    caches: Vec<Arc<Mutex<KvCache>>>,
    done: Sender<Result<()>>,
}

/// One rank's part of a forward. If it fails, error or panic, the meeting point is broken
/// so that no other rank waits for it.
fn run_shard(
    model: &Transformer,
    rank: usize,
    seqs: &[OwnedSeq],
    caches: &[Arc<Mutex<KvCache>>],
    shared: &Shared,
) -> Result<Tensor> {
    let run = || {
        if shared.faults[rank].swap(false, Ordering::SeqCst) {
            panic!("fault injected into rank {rank}");
        }
        let mut guards: Vec<MutexGuard<'_, KvCache>> = caches.iter().map(|c| lock(c)).collect();
        let mut batch: Vec<(&mut KvCache, SeqInput<'_>)> = guards
            .iter_mut()
            .zip(seqs)
            .map(|(g, s)| (&mut **g, s.view()))
            .collect();
        model.forward_hidden(&mut batch)
    };
    let result = catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|p| {
        let msg = crate::error::panic_message(&*p);
        Err(EngineError::Rank(format!("rank {rank} panicked: {msg}")))
    });
    if result.is_err() {
        shared.meeting.break_off();
    }
    result
}

/// What the ranks share: the all-reduce's meeting point, and faults armed for tests.
struct Shared {
    meeting: Arc<Meeting>,
    faults: Vec<AtomicBool>,
}

pub struct TpModel {
    leader: Transformer,
    workers: Vec<(Sender<Job>, JoinHandle<()>)>,
    shared: Arc<Shared>,
    /// One forward at a time: the all-reduce pairs up ranks by call order.
    running: Mutex<()>,
    world: usize,
}

impl TpModel {
    /// Loads `world` shards of the model at `path` on `device` and starts one thread per
    /// extra rank.
    pub fn load(
        path: impl AsRef<Path>,
        world: usize,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<Self> {
        Self::load_on(path, opts, &vec![device.clone(); world])
    }

    /// Loads one shard per device (rank r on `devices[r]`), with the reduction that
    /// `OURO_TP_REDUCTION` names or else [`Reduction::for_places`] picks: NCCL with one
    /// rank per GPU, host memory otherwise.
    pub fn load_on(path: impl AsRef<Path>, opts: &LoadOptions, devices: &[Device]) -> Result<Self> {
        let places: Vec<DeviceLocation> = devices.iter().map(Device::location).collect();
        let reduction = match Reduction::from_env()? {
            Some(r) => r,
            None => Reduction::for_places(&places, cfg!(feature = "cuda")),
        };
        Self::load_with(path, opts, devices, reduction)
    }

    /// [`Self::load_on`] with the reduction given. NCCL needs a GPU of its own per rank.
    pub fn load_with(
        path: impl AsRef<Path>,
        opts: &LoadOptions,
        devices: &[Device],
        reduction: Reduction,
    ) -> Result<Self> {
        let world = devices.len();
        if world == 0 {
            return Err(EngineError::invalid(
                "tensor-parallel size must be at least 1",
            ));
        }
        let path = path.as_ref();
        let meeting = Arc::new(Meeting::new(world));
        let ar: Arc<dyn AllReduce> = match reduction {
            Reduction::Host => Arc::new(ThreadAllReduce {
                slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
                meeting: meeting.clone(),
            }),
            Reduction::Nccl => nccl_all_reduce(devices, meeting.clone())?,
        };
        tracing::info!(world, ?reduction, "tensor-parallel group");
        let shared = Arc::new(Shared {
            meeting,
            faults: (0..world).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut shards = Vec::with_capacity(world);
        for (rank, device) in devices.iter().enumerate() {
            let mut m = crate::load_shard(path, Shard { rank, world }, opts, device)?;
            m.set_all_reduce(ar.clone());
            shards.push(m);
        }
        let mut shards = shards.into_iter();
        let leader = shards
            .next()
            .ok_or_else(|| EngineError::invalid("no shards"))?;
        let mut workers = Vec::new();
        for (i, model) in shards.enumerate() {
            let (tx, rx): (Sender<Job>, Receiver<Job>) = channel();
            let shared = shared.clone();
            let rank = i + 1;
            let handle = std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || {
                    for job in rx {
                        let res = run_shard(&model, rank, &job.seqs, &job.caches, &shared);
                        let _ = job.done.send(res.map(|_| ()));
                    }
                })
                .map_err(|e| EngineError::Rank(format!("cannot start rank thread: {e}")))?;
            workers.push((tx, handle));
        }
        Ok(Self {
            leader,
            workers,
            shared,
            running: Mutex::new(()),
            world,
        })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// For fault tests: `rank`'s part of the next forward panics.
    pub fn inject_panic(&self, rank: usize) {
        if let Some(f) = self.shared.faults.get(rank) {
            f.store(true, Ordering::SeqCst);
        }
    }
}

/// NCCL's all-reduce over `devices`, one rank per GPU.
#[cfg(feature = "cuda")]
fn nccl_all_reduce(devices: &[Device], meeting: Arc<Meeting>) -> Result<Arc<dyn AllReduce>> {
    Ok(Arc::new(nccl::NcclAllReduce::new(devices, meeting)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_all_reduce(_devices: &[Device], _meeting: Arc<Meeting>) -> Result<Arc<dyn AllReduce>> {
    Err(EngineError::invalid(
        "NCCL tensor parallelism needs a build with --features cuda",
    ))
}

#[cfg(feature = "cuda")]
mod nccl {
    //! NCCL's all-reduce between the GPUs of one process (`ncclCommInitAll`): rank r's
    //! communicator works on the CUDA stream of rank r's device, so the collective is
    //! ordered with the kernels around it and nothing comes back to the host.

    use super::{Meeting, lock};
    use crate::error::{EngineError, Result};
    use crate::transformer::AllReduce;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::CudaDType;
    use candle_core::cuda::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda::cudarc::nccl::safe::{Comm, NcclType, ReduceOp};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
    use std::sync::{Arc, Mutex};

    /// A communicator used by its own rank's thread only (through the mutex), as NCCL
    /// allows; the raw handle inside is what keeps `Comm` from being `Send`.
    struct RankComm(Comm);
    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it do
    // not overlap; the mutex around each one serializes them.
    unsafe impl Send for RankComm {}

    pub(super) struct NcclAllReduce {
        comms: Vec<Mutex<RankComm>>,
        meeting: Arc<Meeting>,
    }

    impl NcclAllReduce {
        pub(super) fn new(devices: &[Device], meeting: Arc<Meeting>) -> Result<Self> {
            let streams = devices
                .iter()
                .enumerate()
                .map(|(rank, d)| match d {
                    Device::Cuda(c) => Ok(c.cuda_stream()),
                    other => Err(EngineError::invalid(format!(
                        "NCCL tensor parallelism: rank {rank} is on {:?}, not a GPU",
                        other.location()
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let comms = Comm::from_devices(streams).map_err(|e| {
                EngineError::Rank(format!(
                    "NCCL init: {e:?} (OURO_TP_REDUCTION=host sums through host memory instead)"
                ))
            })?;
            Ok(Self {
                comms: comms.into_iter().map(|c| Mutex::new(RankComm(c))).collect(),
                meeting,
            })
        }
    }

    impl AllReduce for NcclAllReduce {
        fn sum(&self, rank: usize, t: &Tensor) -> Result<Tensor> {
            let comm = self.comms.get(rank).ok_or_else(|| {
                EngineError::Rank(format!("no NCCL communicator for rank {rank}"))
            })?;
            // Every rank is here (none failed) before any enters the collective.
            self.meeting.wait()?;
            let comm = lock(comm);
            Ok(t.contiguous()?.apply_op1_no_bwd(&Sum(&comm.0))?)
        }
    }

    /// The all-reduce as a tensor op: a new buffer with the sum over the ranks.
    struct Sum<'a>(&'a Comm);

    impl Sum<'_> {
        fn run<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
            let src = s.as_cuda_slice::<T>()?.slice(start..end);
            let dev = s.device().clone();
            let mut dst = dev.alloc_zeros::<T>(end - start)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl CustomOp1 for Sum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            Err(candle_core::Error::Msg(
                "NCCL all-reduce of a tensor in host memory".into(),
            ))
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            match s.dtype() {
                DType::F32 => self.run::<f32>(s, l),
                DType::F16 => self.run::<half::f16>(s, l),
                DType::BF16 => self.run::<half::bf16>(s, l),
                other => Err(candle_core::Error::Msg(format!(
                    "NCCL all-reduce of {other:?}"
                ))),
            }
        }
    }
}

/// Whether `e` only says that another rank failed.
fn broken_meeting(e: &EngineError) -> bool {
    matches!(e, EngineError::Rank(m) if m.starts_with("another rank failed"))
}

impl LanguageModel for TpModel {
    type Cache = TpCache;

    fn info(&self) -> &ModelInfo {
        self.leader.info()
    }

    fn new_cache(&self) -> TpCache {
        let shards = (0..self.world)
            .map(|rank| Arc::new(Mutex::new(self.leader.new_cache_for_rank(rank))))
            .collect();
        TpCache { shards }
    }

    fn forward_batch(
        &self,
        batch: &mut [(&mut TpCache, SeqInput<'_>)],
    ) -> Result<Vec<ForwardOutput>> {
        let cfg = self.leader.config();
        // Validate here so that no rank can fail on input and leave the others waiting
        // in the all-reduce.
        for (cache, input) in batch.iter() {
            input.validate(cfg.vocab_size, cfg.max_position)?;
            let needed = cache.len() + input.tokens.len();
            if needed > cfg.max_position {
                return Err(EngineError::ContextOverflow {
                    needed,
                    limit: cfg.max_position,
                });
            }
        }
        let _one_at_a_time = lock(&self.running);
        let seqs: Arc<Vec<OwnedSeq>> = Arc::new(
            batch
                .iter()
                .map(|(_, i)| OwnedSeq {
                    tokens: i.tokens.to_vec(),
                    positions: i.positions.to_vec(),
                    visibility: i.visibility.clone(),
                    outputs: i.outputs.clone(),
                })
                .collect(),
        );
        let mut replies = Vec::with_capacity(self.workers.len());
        for (rank, (tx, _)) in self.workers.iter().enumerate() {
            let (done, rx) = channel();
            let caches = batch
                .iter()
                .map(|(c, _)| c.shards[rank + 1].clone())
                .collect();
            tx.send(Job {
                seqs: seqs.clone(),
                caches,
                done,
            })
            .map_err(|_| EngineError::Rank(format!("rank {} has stopped", rank + 1)))?;
            replies.push(rx);
        }
        let leader_caches: Vec<_> = batch.iter().map(|(c, _)| c.shards[0].clone()).collect();
        let hidden = run_shard(&self.leader, 0, &seqs, &leader_caches, &self.shared);
        // Every rank has left the forward (failed or not) before the next may start.
        let mut failed = None;
        for (rank, rx) in replies.into_iter().enumerate() {
            let reply = rx
                .recv()
                .map_err(|_| EngineError::Rank(format!("rank {} died mid-forward", rank + 1)))
                .and_then(|r| r);
            match (reply, &failed) {
                (Err(e), None) => failed = Some(e),
                // The first failure is the cause; the others only found the meeting broken.
                (Err(e), Some(f)) if broken_meeting(f) && !broken_meeting(&e) => failed = Some(e),
                _ => {}
            }
        }
        self.shared.meeting.reset();
        let hidden = match (hidden, failed) {
            (Err(e), _) if !broken_meeting(&e) => return Err(e),
            (_, Some(e)) => return Err(e),
            (hidden, None) => hidden?,
        };
        let inputs: Vec<SeqInput<'_>> = seqs.iter().map(|s| s.view()).collect();
        self.leader.outputs(&hidden, &inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(id: usize) -> DeviceLocation {
        DeviceLocation::Cuda { gpu_id: id }
    }

    #[test]
    fn nccl_is_chosen_only_for_one_rank_per_gpu_in_a_cuda_build() {
        use Reduction::{Host, Nccl};
        let cpu = DeviceLocation::Cpu;
        for (places, cuda_built, want) in [
            (vec![gpu(0), gpu(1)], true, Nccl),
            (vec![gpu(2), gpu(3), gpu(0), gpu(1)], true, Nccl),
            // A build without CUDA, CPU ranks, mixed devices, a shared GPU, one rank.
            (vec![gpu(0), gpu(1)], false, Host),
            (vec![cpu, cpu], true, Host),
            (vec![gpu(0), cpu], true, Host),
            (vec![gpu(0), gpu(0)], true, Host),
            (vec![gpu(0), gpu(1), gpu(1)], true, Host),
            (vec![gpu(0)], true, Host),
            (vec![], true, Host),
        ] {
            assert_eq!(
                Reduction::for_places(&places, cuda_built),
                want,
                "{places:?} cuda={cuda_built}"
            );
        }
    }

    #[test]
    fn nccl_without_a_cuda_build_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = TpModel::load_with(
            "/nonexistent.gguf",
            &LoadOptions::default(),
            &[Device::Cpu, Device::Cpu],
            Reduction::Nccl,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn a_meeting_lets_ranks_through_together_and_a_broken_one_lets_nobody_wait() {
        let m = Arc::new(Meeting::new(3));
        let others: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || (m.wait(), m.wait()))
            })
            .collect();
        assert!(m.wait().is_ok() && m.wait().is_ok());
        for t in others {
            let (a, b) = t.join().unwrap();
            assert!(a.is_ok() && b.is_ok());
        }
        // Rank 2 fails: the two that wait are released with an error, and a late one
        // finds the meeting broken; after the reset it meets again.
        m.reset();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || m.wait())
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.break_off();
        for t in waiting {
            assert!(broken_meeting(&t.join().unwrap().unwrap_err()));
        }
        assert!(m.wait().is_err());
        m.reset();
        let again: Vec<_> = (0..2)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || m.wait())
            })
            .collect();
        assert!(m.wait().is_ok());
        assert!(again.into_iter().all(|t| t.join().unwrap().is_ok()));
    }
}
