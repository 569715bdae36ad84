//! [`Comm`] over the system MPI (rsmpi's `mpi::ffi`; the `distributed` feature).
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer runs on one of the scheduler's
//! threads, not the main one, and no two threads ever call MPI at once (every call below holds
//! [`MPI_LOCK`]). The non-blocking all-reduce is `MPI_Iallreduce` into a buffer the request owns
//! until it completes; MPI moves it forward whenever any MPI call runs, which is why the
//! trainer tests its requests between the layers of the backward.

use std::ffi::{c_int, c_void};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mpi::ffi;

use super::{launcher_env, Comm, InFlight, ReduceBuf, World};

/// Serialises every MPI call of the process (`MPI_THREAD_SERIALIZED`).
static MPI_LOCK: Mutex<()> = Mutex::new(());

/// The largest element count one MPI call is given (counts are C ints); larger buffers are
/// reduced and broadcast in pieces.
const MAX_COUNT: usize = 1 << 28;

fn check(code: c_int, what: &str) {
    // The default error handler (MPI_ERRORS_ARE_FATAL) aborts the job before a failing call
    // returns; a non-zero code here means someone installed another handler.
    if code != 0 {
        eprintln!(
            "{}error: {what} failed with MPI error {code}",
            super::rank_prefix()
        );
        // SAFETY: aborting the world communicator is always allowed after MPI_Init.
        unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, 1) };
        std::process::exit(1);
    }
}

/// The bf16 sum of two bf16 vectors (raw bits): each pair summed in f32 and rounded to nearest
/// even, as NCCL reduces a bf16 tensor.
unsafe extern "C" fn bf16_sum(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _datatype: *mut ffi::MPI_Datatype,
) {
    let n = *len as usize;
    let a = std::slice::from_raw_parts(invec as *const u16, n);
    let b = std::slice::from_raw_parts_mut(inoutvec as *mut u16, n);
    for (x, y) in a.iter().zip(b.iter_mut()) {
        *y = super::bf16_add(*x, *y);
    }
}

/// Keeps MPI initialised for the process's life; [`Session::finish`] ends it.
pub struct Session {
    universe: Option<mpi::environment::Universe>,
    world: World,
}

struct MpiComm {
    world: World,
    bf16_sum: SendOp,
}

#[derive(Clone, Copy)]
struct SendOp(ffi::MPI_Op);
// SAFETY: MPI handles are process-wide values, usable from any thread under SERIALIZED.
unsafe impl Send for SendOp {}
unsafe impl Sync for SendOp {}

struct SendRequest(ffi::MPI_Request);
// SAFETY: as above; a request is only ever touched under MPI_LOCK.
unsafe impl Send for SendRequest {}

/// Starts MPI when an MPI launcher started this process (see [`launcher_env`]) and installs the
/// communicator; `None` without a launcher (one process, as without the feature).
pub fn init() -> Result<Option<Session>> {
    if launcher_env().is_none() {
        return Ok(None);
    }
    let (universe, threading) =
        mpi::initialize_with_threading(mpi::Threading::Serialized).context(
            "an MPI launcher started this process but MPI_Init_thread failed (is the MPI library the one runner was built against?)",
        )?;
    if threading < mpi::Threading::Serialized {
        bail!(
            "the MPI library provides thread level {threading:?}; runner needs MPI_THREAD_SERIALIZED (its trainer calls MPI from a worker thread): use an MPI built with thread support (Open MPI and MPICH are by default)"
        );
    }
    let _guard = MPI_LOCK.lock().unwrap();
    let (mut rank, mut size, mut local_rank, mut local_size) = (0, 0, 0, 0);
    let mut op: ffi::MPI_Op = unsafe { ffi::RSMPI_SUM };
    // SAFETY: MPI is initialised; every out-pointer is a live local.
    unsafe {
        let world = ffi::RSMPI_COMM_WORLD;
        check(ffi::MPI_Comm_rank(world, &mut rank), "MPI_Comm_rank");
        check(ffi::MPI_Comm_size(world, &mut size), "MPI_Comm_size");
        // The processes sharing this machine's memory: the local rank picks the GPU.
        let mut local: ffi::MPI_Comm = ffi::RSMPI_COMM_NULL;
        check(
            ffi::MPI_Comm_split_type(
                world,
                ffi::RSMPI_COMM_TYPE_SHARED,
                rank,
                ffi::RSMPI_INFO_NULL,
                &mut local,
            ),
            "MPI_Comm_split_type",
        );
        check(ffi::MPI_Comm_rank(local, &mut local_rank), "MPI_Comm_rank");
        check(ffi::MPI_Comm_size(local, &mut local_size), "MPI_Comm_size");
        check(ffi::MPI_Comm_free(&mut local), "MPI_Comm_free");
        check(
            ffi::MPI_Op_create(Some(bf16_sum), 1, &mut op),
            "MPI_Op_create",
        );
    }
    let world = World {
        rank: rank as usize,
        size: size as usize,
        local_rank: local_rank as usize,
        local_size: local_size as usize,
    };
    drop(_guard);
    super::install(Box::new(MpiComm {
        world,
        bf16_sum: SendOp(op),
    }));
    Ok(Some(Session {
        universe: Some(universe),
        world,
    }))
}

impl Session {
    pub fn world(&self) -> World {
        self.world
    }

    /// Ends MPI with this rank's exit code. A rank that failed aborts the job, so that no other
    /// rank waits forever in a collective (mpirun then reports which rank called MPI_Abort);
    /// a rank that succeeded waits, sleeping, for the others and finalises.
    pub fn finish(mut self, code: i32) -> i32 {
        if code != 0 && self.world.is_distributed() {
            eprintln!(
                "rank {}: exiting with code {code}; stopping every rank of the job (MPI_Abort)",
                self.world.rank
            );
            abort_world(code);
        }
        if let Some(c) = super::comm() {
            c.idle_barrier();
        }
        let _guard = MPI_LOCK.lock().unwrap();
        drop(self.universe.take()); // MPI_Finalize
        code
    }
}

fn abort_world(code: i32) -> ! {
    // No lock: another thread may be blocked inside MPI holding it, and MPI_Abort is the one
    // call meant to be made from anywhere to end everything.
    // SAFETY: MPI is initialised.
    unsafe { ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code) };
    std::process::exit(code)
}

fn c_count(n: usize) -> c_int {
    c_int::try_from(n).expect("MPI counts are split below i32::MAX")
}

impl Comm for MpiComm {
    fn world(&self) -> World {
        self.world
    }

    fn all_gather_u64(&self, mine: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; mine.len() * self.world.size];
        let _guard = MPI_LOCK.lock().unwrap();
        // SAFETY: the buffers hold `len` and `len × size` u64s and outlive the blocking call.
        unsafe {
            check(
                ffi::MPI_Allgather(
                    mine.as_ptr() as *const c_void,
                    c_count(mine.len()),
                    ffi::RSMPI_UINT64_T,
                    out.as_mut_ptr() as *mut c_void,
                    c_count(mine.len()),
                    ffi::RSMPI_UINT64_T,
                    ffi::RSMPI_COMM_WORLD,
                ),
                "MPI_Allgather",
            );
        }
        out
    }

    fn all_gather_var_u32(&self, mine: &[u32]) -> Vec<Vec<u32>> {
        let counts = self.all_gather_u64(&[mine.len() as u64]);
        let total: u64 = counts.iter().sum();
        let mut flat = vec![0u32; total as usize];
        let recv_counts: Vec<c_int> = counts.iter().map(|&c| c_count(c as usize)).collect();
        let mut displs = Vec::with_capacity(counts.len());
        let mut at = 0usize;
        for &c in &counts {
            displs.push(c_count(at));
            at += c as usize;
        }
        {
            let _guard = MPI_LOCK.lock().unwrap();
            // SAFETY: `flat` holds the sum of the gathered counts; displacements index it.
            unsafe {
                check(
                    ffi::MPI_Allgatherv(
                        mine.as_ptr() as *const c_void,
                        c_count(mine.len()),
                        ffi::RSMPI_UINT32_T,
                        flat.as_mut_ptr() as *mut c_void,
                        recv_counts.as_ptr(),
                        displs.as_ptr(),
                        ffi::RSMPI_UINT32_T,
                        ffi::RSMPI_COMM_WORLD,
                    ),
                    "MPI_Allgatherv",
                );
            }
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut at = 0usize;
        for &c in &counts {
            out.push(flat[at..at + c as usize].to_vec());
            at += c as usize;
        }
        out
    }

    fn broadcast_bytes(&self, root: usize, data: &mut Vec<u8>) {
        let mut len = [data.len() as u64];
        let _guard = MPI_LOCK.lock().unwrap();
        // SAFETY: `len` is one u64; `data` is resized to the broadcast length before its bytes
        // are received, piece by piece.
        unsafe {
            check(
                ffi::MPI_Bcast(
                    len.as_mut_ptr() as *mut c_void,
                    1,
                    ffi::RSMPI_UINT64_T,
                    root as c_int,
                    ffi::RSMPI_COMM_WORLD,
                ),
                "MPI_Bcast",
            );
            data.resize(len[0] as usize, 0);
            for piece in data.chunks_mut(MAX_COUNT) {
                check(
                    ffi::MPI_Bcast(
                        piece.as_mut_ptr() as *mut c_void,
                        c_count(piece.len()),
                        ffi::RSMPI_UINT8_T,
                        root as c_int,
                        ffi::RSMPI_COMM_WORLD,
                    ),
                    "MPI_Bcast",
                );
            }
        }
    }

    fn start_sum(&self, buf: ReduceBuf) -> Box<dyn InFlight> {
        // The sums land in a fresh buffer (zeroed pages cost nothing until written).
        let mut recv = match &buf {
            ReduceBuf::F32(v) => ReduceBuf::F32(vec![0.0; v.len()]),
            ReduceBuf::Bf16(v) => ReduceBuf::Bf16(vec![0; v.len()]),
        };
        let send = buf;
        let (elem, datatype, op) = match &send {
            ReduceBuf::F32(_) => (4, unsafe { ffi::RSMPI_FLOAT }, unsafe { ffi::RSMPI_SUM }),
            ReduceBuf::Bf16(_) => (2, unsafe { ffi::RSMPI_UINT16_T }, self.bf16_sum.0),
        };
        let (src, dst, n) = match (&send, &mut recv) {
            (ReduceBuf::F32(s), ReduceBuf::F32(d)) => {
                (s.as_ptr() as *const u8, d.as_mut_ptr() as *mut u8, s.len())
            }
            (ReduceBuf::Bf16(s), ReduceBuf::Bf16(d)) => {
                (s.as_ptr() as *const u8, d.as_mut_ptr() as *mut u8, s.len())
            }
            _ => unreachable!("the receive buffer is made in the send buffer's dtype"),
        };
        let mut requests = Vec::new();
        let _guard = MPI_LOCK.lock().unwrap();
        let mut at = 0;
        while at < n {
            let count = MAX_COUNT.min(n - at);
            let mut req: ffi::MPI_Request = unsafe { ffi::RSMPI_REQUEST_NULL };
            // SAFETY: `send` and `recv` are heap buffers owned by the returned request object,
            // which keeps them (unmoved: a Vec's heap block never moves) until MPI completes.
            unsafe {
                check(
                    ffi::MPI_Iallreduce(
                        src.add(at * elem) as *const c_void,
                        dst.add(at * elem) as *mut c_void,
                        c_count(count),
                        datatype,
                        op,
                        ffi::RSMPI_COMM_WORLD,
                        &mut req,
                    ),
                    "MPI_Iallreduce",
                );
            }
            requests.push(SendRequest(req));
            at += count;
        }
        Box::new(MpiSum {
            _send: send,
            recv: Some(recv),
            requests,
        })
    }

    fn idle_barrier(&self) {
        let mut req = SendRequest(unsafe { ffi::RSMPI_REQUEST_NULL });
        {
            let _guard = MPI_LOCK.lock().unwrap();
            // SAFETY: `req` outlives the barrier (waited below).
            unsafe {
                check(
                    ffi::MPI_Ibarrier(ffi::RSMPI_COMM_WORLD, &mut req.0),
                    "MPI_Ibarrier",
                )
            };
        }
        while !test_all(std::slice::from_mut(&mut req)) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn abort(&self, code: i32) -> ! {
        abort_world(code)
    }
}

/// Tests every request; true when all have completed (completed ones become REQUEST_NULL).
fn test_all(requests: &mut [SendRequest]) -> bool {
    let _guard = MPI_LOCK.lock().unwrap();
    let mut flag: c_int = 0;
    // SAFETY: the requests are live MPI requests or REQUEST_NULL (for which Test sets flag).
    unsafe {
        check(
            ffi::MPI_Testall(
                c_count(requests.len()),
                requests.as_mut_ptr() as *mut ffi::MPI_Request,
                &mut flag,
                ffi::RSMPI_STATUSES_IGNORE,
            ),
            "MPI_Testall",
        );
    }
    flag != 0
}

struct MpiSum {
    /// The send buffer, alive until MPI is done with it.
    _send: ReduceBuf,
    recv: Option<ReduceBuf>,
    requests: Vec<SendRequest>,
}

impl InFlight for MpiSum {
    fn test(&mut self) -> bool {
        test_all(&mut self.requests)
    }

    fn wait(mut self: Box<Self>) -> ReduceBuf {
        // Tested rather than MPI_Wait'ed so the lock is released between tests; the wait is
        // short (the all-reduce has been progressing since it started).
        while !test_all(&mut self.requests) {
            std::thread::yield_now();
        }
        self.recv.take().expect("waited once")
    }
}

impl Drop for MpiSum {
    fn drop(&mut self) {
        // MPI may still write into `recv`: never free it under a running request.
        while !self.requests.is_empty() && !test_all(&mut self.requests) {
            std::thread::yield_now();
        }
    }
}
