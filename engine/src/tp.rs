//! Tensor parallelism on one machine: each rank is an OS thread that owns one shard of the
//! weights and one shard of every session's KV cache (its key/value heads). A forward is
//! broadcast to all ranks; row-parallel layers meet in an all-reduce; rank 0 produces the
//! outputs. All ranks sum partials in the same order, so they stay bit-identical.
//!
//! A rank that fails (an error or a panic in its shard) breaks the all-reduce's meeting
//! point, so the ranks waiting there fail the forward too instead of waiting forever; the
//! next forward starts afresh.

use crate::api::{ForwardOutput, KvState, LanguageModel, ModelInfo, OutputSpec, SeqInput};
use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::mask::Visibility;
use crate::transformer::{AllReduce, LoadOptions, Shard, Transformer};
use candle_core::{Device, Tensor};
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

/// All-reduce between threads: every rank posts its partial, then sums all partials in
/// rank order.
struct ThreadAllReduce {
    slots: Vec<Mutex<Vec<f32>>>,
    meeting: Meeting,
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
        shared.all_reduce.meeting.break_off();
    }
    result
}

/// What the ranks share: the all-reduce, and faults armed for tests.
struct Shared {
    all_reduce: Arc<ThreadAllReduce>,
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

    /// Loads one shard per device (rank r on `devices[r]`). The all-reduce goes through
    /// host memory, so ranks may sit on different GPUs.
    pub fn load_on(path: impl AsRef<Path>, opts: &LoadOptions, devices: &[Device]) -> Result<Self> {
        let world = devices.len();
        if world == 0 {
            return Err(EngineError::invalid(
                "tensor-parallel size must be at least 1",
            ));
        }
        let path = path.as_ref();
        let ar = Arc::new(ThreadAllReduce {
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
            meeting: Meeting::new(world),
        });
        let shared = Arc::new(Shared {
            all_reduce: ar.clone(),
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
        self.shared.all_reduce.meeting.reset();
        let hidden = match (hidden, failed) {
            (Err(e), _) if !broken_meeting(&e) => return Err(e),
            (_, Some(e)) => return Err(e),
            (hidden, None) => hidden?,
        };
        let inputs: Vec<SeqInput<'_>> = seqs.iter().map(|s| s.view()).collect();
        self.leader.outputs(&hidden, &inputs)
    }
}
