//! Data parallelism across processes (issue #17): which rank this process is, the collectives
//! the trainer needs, and how a dataset's micro-batches are dealt to the ranks.
//!
//! A run under an MPI launcher (`mpirun`/`mpiexec`, `srun --mpi=pmix`, a Kubeflow MPIJob) is
//! `world_size` processes running the same recipe, as a transformers/accelerate DDP run is:
//! each rank trains on every `world_size`-th micro-batch of the global order, the trainable
//! gradients (and the loss numerator and label-token count) are summed across ranks after each
//! rank's backward, and every rank then takes the identical clip and AdamW step. Without a
//! launcher (or in a build without the `distributed` feature) there is one rank and nothing here
//! runs: the trainer takes the single-process path it always had.
//!
//! The collectives go through [`Comm`]; the MPI implementation (rsmpi over the system MPI)
//! lives in [`mpi`] behind the `distributed` cargo feature, so the default build links no MPI.

#[cfg(feature = "distributed")]
pub mod mpi;

use std::sync::OnceLock;

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this machine (it picks the GPU adapter).
    pub local_rank: usize,
    pub local_size: usize,
}

impl World {
    pub const SOLO: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
        local_size: 1,
    };
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }
    /// Rank 0 alone writes what the run leaves behind (adapter, logs, checkpoints, pushes).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Values summed across ranks by a non-blocking all-reduce, in the dtype the gradient has on
/// the device: f32, or bf16 as raw bits (summed pairwise in f32 and rounded to bf16, as NCCL
/// sums a bf16 tensor).
#[derive(Debug, Clone, PartialEq)]
pub enum ReduceBuf {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl ReduceBuf {
    pub fn bytes(&self) -> u64 {
        match self {
            ReduceBuf::F32(v) => 4 * v.len() as u64,
            ReduceBuf::Bf16(v) => 2 * v.len() as u64,
        }
    }
}

/// `bf16(f32(a) + f32(b))`, rounded to nearest even: how a bf16 all-reduce adds two ranks'
/// values.
pub fn bf16_add(a: u16, b: u16) -> u16 {
    let f = |h: u16| f32::from_bits((h as u32) << 16);
    f32_to_bf16(f(a) + f(b))
}

/// f32 → bf16 bits, rounded to nearest even (NaN stays NaN): the engine's `f32_to_bf16`, which
/// `half` implements identically.
fn f32_to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// The distinct rows of `ids` (the rows an embedding gradient can touch), sorted.
pub fn distinct_rows(ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
    let mut v: Vec<u32> = ids.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// An all-reduce in flight.
pub trait InFlight: Send {
    /// Lets the collective progress (MPI moves non-blocking collectives forward only inside MPI
    /// calls); true once it has completed.
    fn test(&mut self) -> bool;
    /// Blocks until it completes; the sums.
    fn wait(self: Box<Self>) -> ReduceBuf;
}

/// The collectives of a data-parallel run. Every method is collective: every rank calls it,
/// in the same order, with the same lengths where a length is not its own.
pub trait Comm: Send + Sync {
    fn world(&self) -> World;
    /// Every rank's `mine` (all of one length), rank after rank.
    fn all_gather_u64(&self, mine: &[u64]) -> Vec<u64>;
    /// Every rank's `mine` (lengths may differ), one list per rank.
    fn all_gather_var_u32(&self, mine: &[u32]) -> Vec<Vec<u32>>;
    /// Rank `root`'s bytes on every rank (`data` is replaced on the others).
    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>);
    /// Starts summing `buf` across ranks without blocking.
    fn start_sum(&self, buf: ReduceBuf) -> Box<dyn InFlight>;
    /// A barrier that sleeps while it waits (a rank done early must not spin a core that a
    /// slower rank's CPU ops need).
    fn idle_barrier(&self);
    /// Ends every rank of the job with `code` (MPI_Abort): what a failed rank does, so that no
    /// other rank waits forever in a collective.
    fn abort(&self, code: i32) -> !;
}

static COMM: OnceLock<Box<dyn Comm>> = OnceLock::new();

/// Makes `comm` the process's communicator (once, before any op runs).
pub fn install(comm: Box<dyn Comm>) {
    if COMM.set(comm).is_err() {
        panic!("the communicator is installed once");
    }
}

/// The communicator of a run with several ranks; `None` for one process.
pub fn comm() -> Option<&'static dyn Comm> {
    COMM.get()
        .map(|c| c.as_ref())
        .filter(|c| c.world().is_distributed())
}

/// This process's place (rank 0 of 1 without a launcher).
pub fn world() -> World {
    COMM.get().map_or(World::SOLO, |c| c.world())
}

/// `"rank R: "` in a run of several ranks (what other ranks' messages start with), else "".
pub fn rank_prefix() -> String {
    let w = world();
    if w.is_distributed() {
        format!("rank {}: ", w.rank)
    } else {
        String::new()
    }
}

/// The rank and size an MPI launcher announced in the environment, if one started this
/// process: Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`), PMIx (`srun --mpi=pmix`, Open MPI 5,
/// `PMIX_RANK` + Slurm's task count), MPICH/Intel MPI's Hydra (`PMI_RANK`/`PMI_SIZE`) and
/// MVAPICH (`MV2_COMM_WORLD_*`).
pub fn launcher_env() -> Option<(usize, usize)> {
    let get = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "SLURM_NTASKS"),
    ];
    for (r, s) in pairs {
        if let (Some(rank), Some(size)) = (get(r), get(s)) {
            return Some((rank, size));
        }
    }
    // PMIx without Slurm's count: the rank alone says a launcher is there; MPI says the size.
    get("PMIX_RANK").map(|rank| (rank, 0))
}

/// How one epoch's micro-batches are dealt to the ranks, as accelerate's `BatchSamplerShard`
/// (`even_batches = True`, the Trainer's default) deals a DataLoader's batches: rank `r` takes
/// the global batches `r, r + W, r + 2W, …` of the epoch's (seeded, shared) example order.
/// With one rank nothing changes. With several:
/// - `drop_last = false`: the example order is extended cyclically from its start (accelerate
///   completes the short last batch and adds whole batches from the epoch's first examples),
///   so every batch is full and every rank gets `ceil(batches / W)` of them;
/// - `drop_last = true`: the short last batch is dropped (as the DataLoader does) and so is a
///   last round that would not give every rank a batch: `floor(floor(n / bs) / W)` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// Batches of one epoch that this rank trains on, for `examples` examples of the epoch.
    pub fn batches_per_epoch(&self, examples: usize, batch_size: usize, drop_last: bool) -> usize {
        let w = self.world.max(1);
        if drop_last {
            examples / batch_size / w
        } else if w == 1 {
            examples.div_ceil(batch_size)
        } else {
            examples.div_ceil(batch_size).div_ceil(w)
        }
    }

    /// Positions in the epoch's example order of this rank's `index`-th batch (positions past
    /// the order wrap to its start: `% examples` is applied by the caller).
    pub fn positions(
        &self,
        index: usize,
        examples: usize,
        batch_size: usize,
    ) -> std::ops::Range<usize> {
        let global = index * self.world.max(1) + self.rank;
        let lo = global * batch_size;
        if self.world <= 1 {
            lo..(lo + batch_size).min(examples)
        } else {
            lo..lo + batch_size
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// accelerate 1.x `BatchSamplerShard._iter_with_no_split` (even_batches = True) over
    /// `BatchSampler(range(n), bs, drop_last)`, transcribed: the batches rank `rank` yields.
    fn accelerate_shard(
        n: usize,
        bs: usize,
        drop_last: bool,
        world: usize,
        rank: usize,
    ) -> Vec<Vec<usize>> {
        let all: Vec<usize> = (0..n).collect();
        let mut sampler: Vec<Vec<usize>> = all.chunks(bs).map(|c| c.to_vec()).collect();
        if drop_last && sampler.last().is_some_and(|b| b.len() < bs) {
            sampler.pop();
        }
        let mut out = Vec::new();
        let mut initial: Vec<usize> = Vec::new();
        let mut to_yield: Vec<usize> = Vec::new();
        let mut idx = 0usize;
        let mut batch: Vec<usize> = Vec::new();
        for (i, b) in sampler.iter().enumerate() {
            idx = i;
            batch = b.clone();
            if !drop_last && i < world {
                initial.extend(b);
            }
            if i % world == rank {
                to_yield = b.clone();
            }
            if i % world == world - 1 && b.len() == bs {
                out.push(std::mem::take(&mut to_yield));
            }
        }
        if !drop_last && !initial.is_empty() {
            if to_yield.len() == bs {
                out.push(to_yield.clone());
            }
            while initial.len() < world * bs {
                let copy = initial.clone();
                initial.extend(copy);
            }
            if batch.len() == bs {
                batch.clear();
                idx += 1;
            }
            let mut cycle = 0;
            while !idx.is_multiple_of(world) || !batch.is_empty() {
                let end = cycle + bs - batch.len();
                batch.extend(&initial[cycle..end]);
                if idx % world == rank {
                    out.push(batch.clone());
                }
                cycle = end;
                batch.clear();
                idx += 1;
            }
        }
        out
    }

    #[test]
    fn shards_are_accelerates_batch_sampler_shards() {
        for n in 1..=23 {
            for bs in 1..=4 {
                for world in 1..=4 {
                    for drop_last in [false, true] {
                        if world == 1 {
                            continue; // accelerate does not shard one process
                        }
                        for rank in 0..world {
                            let shard = Shard { rank, world };
                            let ours: Vec<Vec<usize>> = (0..shard
                                .batches_per_epoch(n, bs, drop_last))
                                .map(|i| shard.positions(i, n, bs).map(|p| p % n).collect())
                                .collect();
                            let want = accelerate_shard(n, bs, drop_last, world, rank);
                            assert_eq!(
                                ours, want,
                                "n {n} bs {bs} world {world} rank {rank} drop_last {drop_last}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn distinct_rows_are_sorted_and_deduplicated() {
        assert_eq!(distinct_rows([5, 1, 5, 3, 1]), vec![1, 3, 5]);
    }

    #[test]
    fn bf16_sum_rounds_the_f32_sum_to_nearest_even() {
        let bf = f32_to_bf16;
        assert_eq!(bf16_add(bf(1.0), bf(2.0)), bf(3.0));
        // 1 + 2^-8 lies halfway between two bf16 values (8 significand bits): to even, 1.
        assert_eq!(bf16_add(bf(1.0), bf(1.0 / 256.0)), bf(1.0));
        // 1 + 2^-7 + 2^-8: halfway again, now rounded up to the even 1 + 2^-6.
        assert_eq!(
            bf16_add(bf(1.0 + 1.0 / 128.0), bf(1.0 / 256.0)),
            bf(1.0 + 1.0 / 64.0)
        );
    }

    #[test]
    fn one_rank_keeps_the_short_last_batch() {
        let s = Shard::default();
        assert_eq!(s.batches_per_epoch(5, 2, false), 3);
        assert_eq!(s.positions(2, 5, 2), 4..5);
        assert_eq!(s.batches_per_epoch(5, 2, true), 2);
    }
}
