//! The gradient all-reduce of a data-parallel step (issue #17), overlapped with the backward as
//! PyTorch DDP overlaps its buckets.
//!
//! A bucket is the gradients the model reports final together (`TrainModel::accumulate_notify`:
//! the lm_head copy right after the loss, each decoder layer as its backward is submitted, last
//! layer first, the vision tower, the embed_tokens copy last), concatenated into one buffer and
//! one all-reduce per dtype as DDP concatenates a bucket. For each, the step records copies of
//! its gradient buffers into a mappable readback buffer (kept from step to step) right behind
//! the work that finished them, maps it when the GPU gets there, and starts a non-blocking
//! all-reduce of the host copy; while the GPU runs the earlier layers' backward, the bucket
//! travels. Every pending request is tested at every later bucket (MPI moves a non-blocking
//! collective forward only inside MPI calls). Before clipping, the step waits for every bucket
//! and writes the sums back.
//!
//! The sum is exact for what single-process accumulation computes: with two ranks the f32 sum
//! `a + b` is the `g₀ + g₁` one process forms in its gradient buffers (addition commutes);
//! with more micro-batches per rank the grouping differs (`(g₀+g₂) + (g₁+g₃)` against
//! `((g₀+g₁)+g₂)+g₃`), a rounding-level difference. bf16 gradients (the copies under
//! `bf16 = true`) are reduced in bf16, each pair summed in f32 and rounded, as NCCL does.
//!
//! The `embed_tokens` copy's gradient is zero outside the rows of the tokens the batch embeds,
//! so only the union over ranks of those rows travels (at Gemma 3 4B a few thousand of 262,208
//! rows). The readback buffers are mappable host-visible memory that wgpu allocates outside the
//! engine's device pool, one bucket at a time alive: nothing the device memory plan counts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};

use dist::{Comm, InFlight, ReduceBuf};
use engine::gpu::{DType, Gpu, GpuTensor};
use model::train_model::Parameter;

/// Rows `first..first + rows` of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    first: usize,
    rows: usize,
}

/// Sorted, distinct rows as runs of consecutive rows.
fn runs_of(rows: &[u32]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for &r in rows {
        let r = r as usize;
        match out.last_mut() {
            Some(run) if run.first + run.rows == r => run.rows += 1,
            _ => out.push(Run { first: r, rows: 1 }),
        }
    }
    out
}

/// Bytes of `rows` rows of `t` (rows are whole 32-bit words where a row range is copied).
fn row_bytes(t: &GpuTensor) -> u64 {
    (t.row_len() * t.dtype().bits() / 8) as u64
}

/// The pieces of a row range inside `t`'s chunks: (chunk, byte offset in it, bytes).
fn pieces(t: &GpuTensor, run: Run) -> Vec<(usize, u64, u64)> {
    let rb = row_bytes(t);
    let mut out = Vec::new();
    for (k, c) in t.chunks().iter().enumerate() {
        let lo = run.first.max(c.first_row);
        let hi = (run.first + run.rows).min(c.first_row + c.rows);
        if lo < hi {
            out.push((k, (lo - c.first_row) as u64 * rb, (hi - lo) as u64 * rb));
        }
    }
    out
}

const MAP_PENDING: u8 = 0;
const MAP_OK: u8 = 1;
const MAP_FAILED: u8 = 2;

/// Readback buffers kept from step to step (a 4B step reads back 1.4 GB of gradients: mapping
/// fresh host memory for it every step would cost more than the copy).
#[derive(Default)]
pub struct ReadbackPool {
    free: Vec<wgpu::Buffer>,
}

impl ReadbackPool {
    /// The smallest free buffer of at least `bytes`, or a new one (rounded up to a MiB, so
    /// that a bucket whose embedding rows vary from step to step still finds one).
    fn take(&mut self, gpu: &Gpu, bytes: u64) -> wgpu::Buffer {
        let best = (0..self.free.len())
            .filter(|&k| self.free[k].size() >= bytes)
            .min_by_key(|&k| self.free[k].size());
        match best {
            Some(k) => self.free.swap_remove(k),
            None => gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("gradient bucket readback"),
                size: bytes.next_multiple_of(1 << 20),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        }
    }

    fn give(&mut self, buffer: wgpu::Buffer) {
        self.free.push(buffer);
    }
}

/// One gradient of a bucket: all its rows (`runs` empty) or the rows of `runs`.
struct Part {
    param: usize,
    runs: Vec<Run>,
    /// Elements it contributes to the bucket.
    elements: usize,
}

/// A bucket on its way to the host: its gradients' bytes, one after the other, in `buffer`.
struct Readback {
    parts: Vec<Part>,
    dtype: DType,
    bytes: u64,
    buffer: wgpu::Buffer,
    state: Arc<AtomicU8>,
}

/// One step's gradient all-reduce.
pub struct GradSync<'a> {
    comm: &'a dyn Comm,
    params: &'a [Parameter],
    pool: &'a mut ReadbackPool,
    /// The rows to reduce of each row-sparse parameter (sorted; the union over ranks).
    sparse: BTreeMap<usize, Vec<u32>>,
    reads: Vec<Readback>,
    flights: Vec<(Vec<Part>, Box<dyn InFlight>)>,
    done: Vec<bool>,
    /// Payload this rank gave to all-reduces so far this step.
    pub bytes: u64,
    pub buckets: usize,
    /// Buckets whose all-reduce had started when the whole backward was queued
    /// ([`GradSync::drain`]).
    pub started_early: usize,
}

impl<'a> GradSync<'a> {
    pub fn new(
        comm: &'a dyn Comm,
        params: &'a [Parameter],
        pool: &'a mut ReadbackPool,
        sparse: BTreeMap<usize, Vec<u32>>,
    ) -> Self {
        Self {
            comm,
            params,
            pool,
            sparse,
            reads: Vec::new(),
            flights: Vec::new(),
            done: vec![false; params.len()],
            bytes: 0,
            buckets: 0,
            started_early: 0,
        }
    }

    /// The rows of parameter `p` that travel: the sparse set (as runs), or every row (empty).
    fn runs(&self, p: usize) -> Vec<Run> {
        let t = &self.params[p].grad;
        match self.sparse.get(&p) {
            // Row copies need whole-word rows; a table whose rows are not (an odd bf16 width)
            // travels whole.
            Some(rows) if row_bytes(t).is_multiple_of(4) => runs_of(rows),
            _ => Vec::new(),
        }
    }

    /// Gradients `indices` are final (the work that finished them is submitted): queue their
    /// readback as one bucket per dtype and push every bucket in flight forward.
    pub fn ready(&mut self, gpu: &Gpu, indices: &[usize]) -> Result<()> {
        let mut enc = gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("gradient readback"),
            });
        let first_new = self.reads.len();
        for dtype in [DType::F32, DType::BF16] {
            // (chunk buffer, offset, bytes) copies, and the parts they make up.
            let mut copies: Vec<(usize, usize, u64, u64)> = Vec::new();
            let mut parts = Vec::new();
            for &p in indices {
                let t = &self.params[p].grad;
                if t.dtype() != dtype {
                    continue;
                }
                ensure!(
                    !std::mem::replace(&mut self.done[p], true),
                    "gradient `{}` was reported final twice",
                    self.params[p].key
                );
                let runs = self.runs(p);
                let elements = if runs.is_empty() {
                    // Whole chunks (a chunk's bytes are padded to a word; the copy strips it).
                    for (k, c) in t.chunks().iter().enumerate() {
                        copies.push((p, k, 0, c.bytes));
                    }
                    t.numel()
                } else {
                    for &r in &runs {
                        copies.extend(pieces(t, r).into_iter().map(|(k, o, n)| (p, k, o, n)));
                    }
                    runs.iter().map(|r| r.rows).sum::<usize>() * t.row_len()
                };
                parts.push(Part {
                    param: p,
                    runs,
                    elements,
                });
            }
            let bytes: u64 = copies.iter().map(|c| c.3).sum();
            if bytes == 0 {
                continue;
            }
            let buffer = self.pool.take(gpu, bytes);
            let mut at = 0;
            for (p, k, offset, n) in copies {
                let src = self.params[p].grad.chunks()[k].buffer.buffer();
                enc.copy_buffer_to_buffer(src, offset, &buffer, at, n);
                at += n;
            }
            self.reads.push(Readback {
                parts,
                dtype,
                bytes,
                buffer,
                state: Arc::new(AtomicU8::new(MAP_PENDING)),
            });
        }
        if let Some(&p) = indices.iter().find(|&&p| !self.done[p]) {
            bail!(
                "gradient `{}` is neither f32 nor bf16 and cannot be summed",
                self.params[p].key
            );
        }
        if self.reads.len() > first_new {
            gpu.queue().submit([enc.finish()]);
            for r in &self.reads[first_new..] {
                let state = r.state.clone();
                r.buffer
                    .slice(..r.bytes)
                    .map_async(wgpu::MapMode::Read, move |res| {
                        state.store(
                            if res.is_ok() { MAP_OK } else { MAP_FAILED },
                            Ordering::Release,
                        );
                    });
            }
            self.buckets += self.reads.len() - first_new;
        }
        self.progress(gpu, false)
    }

    /// Starts the all-reduce of every bucket the GPU has delivered and tests those in flight;
    /// `wait`: blocks until every readback is delivered.
    fn progress(&mut self, gpu: &Gpu, wait: bool) -> Result<()> {
        let poll = if wait {
            wgpu::PollType::wait_indefinitely()
        } else {
            wgpu::PollType::Poll
        };
        gpu.device()
            .poll(poll)
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        let mut still = Vec::new();
        for r in std::mem::take(&mut self.reads) {
            match r.state.load(Ordering::Acquire) {
                MAP_PENDING => still.push(r),
                MAP_FAILED => bail!(
                    "mapping the gradient readback of `{}` failed",
                    self.params[r.parts[0].param].key
                ),
                _ => {
                    let buf = self.host_copy(&r)?;
                    r.buffer.unmap();
                    self.pool.give(r.buffer);
                    self.bytes += buf.bytes();
                    let flight = self.comm.start_sum(buf);
                    self.flights.push((r.parts, flight));
                }
            }
        }
        self.reads = still;
        for (_, f) in &mut self.flights {
            f.test();
        }
        Ok(())
    }

    /// After the last bucket's work is submitted: keeps starting and testing all-reduces until
    /// the GPU has delivered every bucket, so the sums travel while the GPU finishes the
    /// backward (a blocking wait on the GPU would leave MPI without progress meanwhile).
    pub fn drain(&mut self, gpu: &Gpu) -> Result<()> {
        self.started_early = self.flights.len();
        while !self.reads.is_empty() {
            self.progress(gpu, false)?;
            if !self.reads.is_empty() {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// The delivered bucket as values (chunk padding stripped), one copy out of the mapping.
    fn host_copy(&self, r: &Readback) -> Result<ReduceBuf> {
        let view = r
            .buffer
            .slice(..r.bytes)
            .get_mapped_range()
            .map_err(|e| anyhow!("reading the gradient readback: {e:?}"))?;
        // The byte ranges of the view holding each part's values, in order.
        let mut ranges = Vec::new();
        let mut at = 0usize;
        for part in &r.parts {
            let t = &self.params[part.param].grad;
            if part.runs.is_empty() {
                for c in t.chunks() {
                    let data = c.rows * t.row_len() * t.dtype().bits() / 8;
                    ranges.push(at..at + data);
                    at += c.bytes as usize;
                }
            } else {
                let n = part.elements * t.dtype().bits() / 8;
                ranges.push(at..at + n);
                at += n;
            }
        }
        let elements: usize = r.parts.iter().map(|p| p.elements).sum();
        Ok(match r.dtype {
            DType::F32 => {
                let mut v = Vec::with_capacity(elements);
                for range in ranges {
                    v.extend(
                        view[range]
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    );
                }
                ReduceBuf::F32(v)
            }
            _ => {
                let mut v = Vec::with_capacity(elements);
                for range in ranges {
                    v.extend(
                        view[range]
                            .chunks_exact(2)
                            .map(|b| u16::from_le_bytes([b[0], b[1]])),
                    );
                }
                ReduceBuf::Bf16(v)
            }
        })
    }

    /// Waits for every bucket (every gradient must have been reported) and writes the sums into
    /// the gradient buffers, ordered before the next submit (the clipping). Returns this step's
    /// all-reduce payload in bytes.
    pub fn finish(mut self, gpu: &Gpu) -> Result<u64> {
        if let Some(p) = self.done.iter().position(|d| !d) {
            bail!(
                "the model never reported the gradient of `{}` final",
                self.params[p].key
            );
        }
        while !self.reads.is_empty() {
            self.progress(gpu, true)?;
        }
        for (parts, flight) in std::mem::take(&mut self.flights) {
            let sums = flight.wait();
            let bytes: &[u8] = match &sums {
                ReduceBuf::F32(v) => bytemuck::cast_slice(v),
                ReduceBuf::Bf16(v) => bytemuck::cast_slice(v),
            };
            let mut at = 0usize;
            for part in &parts {
                let t = &self.params[part.param].grad;
                let n = part.elements * t.dtype().bits() / 8;
                write_back(gpu, t, &part.runs, &bytes[at..at + n])?;
                at += n;
            }
        }
        Ok(self.bytes)
    }
}

/// Writes `bytes` (the dense tensor, or the rows of `runs` one after the other) into `t`.
fn write_back(gpu: &Gpu, t: &GpuTensor, runs: &[Run], bytes: &[u8]) -> Result<()> {
    let mut at = 0usize;
    if runs.is_empty() {
        let rb = row_bytes(t) as usize;
        for c in t.chunks() {
            let n = c.rows * rb;
            let data = &bytes[at..at + n];
            if n as u64 == c.bytes {
                gpu.queue().write_buffer(c.buffer.buffer(), 0, data);
            } else {
                // The chunk's last word is half padding (an odd bf16 count).
                let mut padded = data.to_vec();
                padded.resize(c.bytes as usize, 0);
                gpu.queue().write_buffer(c.buffer.buffer(), 0, &padded);
            }
            at += n;
        }
    } else {
        for &run in runs {
            for (k, offset, n) in pieces(t, run) {
                let n = n as usize;
                gpu.queue()
                    .write_buffer(t.chunks()[k].buffer.buffer(), offset, &bytes[at..at + n]);
                at += n;
            }
        }
    }
    ensure!(
        at == bytes.len(),
        "gradient write-back: {at} of {} bytes",
        bytes.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_runs_of_consecutive_rows() {
        assert_eq!(
            runs_of(&[1, 2, 3, 7, 9, 10]),
            vec![
                Run { first: 1, rows: 3 },
                Run { first: 7, rows: 1 },
                Run { first: 9, rows: 2 }
            ]
        );
        assert!(runs_of(&[]).is_empty());
    }
}
