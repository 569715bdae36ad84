//! Recording many kernel dispatches into one command encoder and submitting once.

use std::sync::Arc;

use anyhow::{anyhow, Result};

use super::engine::{Gpu, Kernel, PooledBuffer};
use super::staging::{self, RowBlocks, StageFormat, StagedTexture, WeightLayout};
use super::tensor::{BufView, GpuTensor, PendingRead};

/// Most dispatches a timed recorder measures (two timestamps each; wgpu caps a query set at 4096).
const MAX_TIMED: u32 = 2048;

/// Collects dispatches for one submit. Kernel wrappers take `&mut Recorder`; nothing runs
/// until [`Recorder::submit`]. Every bound buffer is kept alive (and out of the pool) until then.
pub struct Recorder<'g> {
    gpu: &'g Gpu,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    keep: Vec<Arc<PooledBuffer>>,
    /// Staging textures this recorder bound, alive until its submit (a slot may grow meanwhile).
    staged: Vec<Arc<StagedTexture>>,
    timing: Option<Timing>,
    dispatches: usize,
}

/// One binding of a dispatch: a storage buffer range or a staged texture.
pub enum Bound<'a> {
    Buffer(BufView),
    Texture(&'a StagedTexture),
}

struct Timing {
    queries: wgpu::QuerySet,
    labels: Vec<String>,
}

/// GPU time of one timed dispatch.
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub name: String,
    pub seconds: f64,
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        let encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("runner step"),
            });
        Recorder {
            gpu,
            encoder: Some(encoder),
            pass: None,
            keep: Vec::new(),
            staged: Vec::new(),
            timing: None,
            dispatches: 0,
        }
    }

    /// A recorder that measures each dispatch with timestamp queries (when the adapter has
    /// them; otherwise it records untimed and [`Recorder::submit_timed`] returns `None`).
    /// Each timed dispatch gets its own compute pass, which adds overhead: benchmarks only.
    pub fn timed(gpu: &'g Gpu) -> Self {
        let mut r = Recorder::new(gpu);
        if gpu.has_timestamps() {
            let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: MAX_TIMED * 2,
            });
            r.timing = Some(Timing {
                queries,
                labels: Vec::new(),
            });
        }
        r
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Dispatches recorded so far.
    pub fn dispatch_count(&self) -> usize {
        self.dispatches
    }

    /// Records one dispatch. Binding 0 is a uniform holding `params` (a `#[repr(C)]` Pod
    /// struct matching the WGSL struct); `buffers` bind to 1, 2, ... in order.
    pub fn dispatch(
        &mut self,
        kernel: &Kernel,
        params: &[u8],
        buffers: &[BufView],
        groups: [u32; 3],
    ) {
        let bound: Vec<Bound> = buffers.iter().cloned().map(Bound::Buffer).collect();
        self.dispatch_bound(kernel, params, &bound, groups);
    }

    /// Copies `view` into the linear texture of staging slot `slot` (see [`staging`]) and
    /// returns it for a [`Bound::Texture`] binding, or `None` when this adapter does not stage
    /// ([`Gpu::stages_operands`]) or the range cannot be staged (misaligned, or past the
    /// adapter's texture size): the caller binds the buffer instead.
    /// A later stage into the same slot overwrites the texture, which is safe because the
    /// dispatches recorded before it run first; one dispatch must use distinct slots.
    pub fn stage(
        &mut self,
        slot: usize,
        view: &BufView,
        format: StageFormat,
    ) -> Option<Arc<StagedTexture>> {
        let max_dim = self.gpu.limits().max_texture_dimension_2d;
        if !self.gpu.stages_operands() || !staging::can_stage(view, max_dim) {
            return None;
        }
        let rows = staging::rows_for(view.size);
        let texture =
            self.gpu
                .staging
                .lock()
                .unwrap()
                .get(&self.gpu.device, slot, format, rows, max_dim);
        self.copy_to_texture(view, &texture, 0);
        self.staged.push(texture.clone());
        Some(texture)
    }

    /// `view` (a frozen weight) staged once and kept while a
    /// [`crate::gpu::staging::StagedWeightsHold`] lives: the copy is recorded on first use only.
    /// `None` where this adapter does not stage, no hold is alive, `view` cannot be staged, or it
    /// is kept in another layout (the caller stages it into a slot).
    pub fn stage_frozen(
        &mut self,
        view: &BufView,
        format: StageFormat,
    ) -> Option<Arc<StagedTexture>> {
        let gpu = self.gpu;
        let max_dim = gpu.limits().max_texture_dimension_2d;
        if !gpu.stages_operands() || !staging::can_stage(view, max_dim) {
            return None;
        }
        let mut frozen = gpu.frozen.lock().unwrap();
        if !frozen.held() {
            return None;
        }
        if let Some(t) = frozen.get(view, format, WeightLayout::Linear) {
            return Some(t);
        }
        if frozen.keeps(view) {
            // kept for the decode steps' rows kernels (row blocks, a group): a prompt's product
            // copies it into a slot rather than replace that copy, which every step reads
            return None;
        }
        let texture =
            gpu.staging
                .lock()
                .unwrap()
                .texture(&gpu.device, format, staging::rows_for(view.size));
        self.copy_to_texture(view, &texture, 0);
        frozen.insert(view, format, WeightLayout::Linear, texture.clone());
        Some(texture)
    }

    /// `view`, a frozen weight of `rows` rows of `row_texels` texels, staged once in the rows
    /// kernels' row-block layout for `lanes` lanes ([`crate::gpu::kernels::row_blocks`]) and
    /// kept while a [`crate::gpu::staging::StagedWeightsHold`] lives, replacing a linear copy.
    /// `None` as [`Recorder::stage_frozen`], and where the layout would pass one binding or the
    /// adapter's texture height ([`crate::gpu::kernels::row_blocks::row_blocks_fit`]).
    pub fn stage_frozen_row_blocks(
        &mut self,
        view: &BufView,
        format: StageFormat,
        rows: usize,
        row_texels: u32,
        lanes: u32,
    ) -> Result<Option<Arc<StagedTexture>>> {
        use super::kernels::row_blocks::{row_block_texture_rows, row_blocks_fit};
        let gpu = self.gpu;
        if !gpu.stages_operands() || !row_blocks_fit(gpu, rows, row_texels) {
            return Ok(None);
        }
        let texture_rows = row_block_texture_rows(rows, row_texels);
        let layout = WeightLayout::RowBlocks { lanes };
        {
            let frozen = gpu.frozen.lock().unwrap();
            if !frozen.held() {
                return Ok(None);
            }
            if let Some(t) = frozen.get(view, format, layout) {
                return Ok(Some(t));
            }
        }
        let texture = gpu
            .staging
            .lock()
            .unwrap()
            .texture(&gpu.device, format, texture_rows);
        gpu.record_row_blocks(self, view, &texture, 0, rows, row_texels, lanes)?;
        gpu.frozen
            .lock()
            .unwrap()
            .insert(view, format, layout, texture.clone());
        Ok(Some(texture))
    }

    /// Records the copy of `view` into `texture` from its row `first_row` on (see
    /// [`staging::record_copy_at`]), keeping `view` alive until the submit.
    pub(crate) fn copy_to_texture(
        &mut self,
        view: &BufView,
        texture: &StagedTexture,
        first_row: u32,
    ) {
        self.pass = None;
        staging::record_copy_at(
            self.encoder.as_mut().expect("open"),
            view,
            texture,
            first_row,
        );
        self.keep.push(view.buffer.clone());
    }

    /// Frozen weights `views` (all f32 or all packed words, as `format` reads them) staged
    /// together in one texture, each from the start of a texture row, once and kept while a
    /// [`crate::gpu::staging::StagedWeightsHold`] lives (`Gpu::matmul_grouped`): linearly, or
    /// with `row_blocks` each in the rows kernels' row-block layout (its rows of
    /// `row_texels` texels). `None` as [`Recorder::stage_frozen`].
    pub fn stage_frozen_group(
        &mut self,
        views: &[BufView],
        format: StageFormat,
        row_blocks: Option<RowBlocks>,
    ) -> Result<Option<staging::FrozenGroup>> {
        use super::kernels::row_blocks::{row_block_texture_rows, row_blocks_fit};
        let gpu = self.gpu;
        let max_dim = gpu.limits().max_texture_dimension_2d;
        if !gpu.stages_operands() || !views.iter().all(|v| staging::can_stage(v, max_dim)) {
            return Ok(None);
        }
        let layout = match row_blocks {
            Some(b) => WeightLayout::RowBlocks { lanes: b.lanes },
            None => WeightLayout::Linear,
        };
        {
            let frozen = gpu.frozen.lock().unwrap();
            if !frozen.held() {
                return Ok(None);
            }
            if let Some(g) = frozen.group(views, format, layout) {
                return Ok(Some(g));
            }
        }
        let mut first_rows = Vec::with_capacity(views.len());
        let mut member_rows = Vec::with_capacity(views.len());
        let mut rows = 0u32;
        for v in views {
            first_rows.push(rows);
            let texture_rows = match row_blocks {
                Some(b) => {
                    let weight_rows = (v.size / (b.row_texels as u64 * 16)) as usize;
                    if !row_blocks_fit(gpu, weight_rows, b.row_texels) {
                        return Ok(None);
                    }
                    member_rows.push(weight_rows);
                    row_block_texture_rows(weight_rows, b.row_texels)
                }
                None => staging::rows_for(v.size),
            };
            rows = rows.saturating_add(texture_rows);
        }
        if rows > max_dim {
            return Ok(None);
        }
        let texture = gpu
            .staging
            .lock()
            .unwrap()
            .texture(&gpu.device, format, rows);
        match row_blocks {
            Some(b) => {
                for ((v, &first), &weight_rows) in views.iter().zip(&first_rows).zip(&member_rows) {
                    gpu.record_row_blocks(
                        self,
                        v,
                        &texture,
                        first,
                        weight_rows,
                        b.row_texels,
                        b.lanes,
                    )?;
                }
            }
            None => {
                for (v, &first) in views.iter().zip(&first_rows) {
                    self.copy_to_texture(v, &texture, first);
                }
            }
        }
        let group = gpu
            .frozen
            .lock()
            .unwrap()
            .insert_group(views, format, layout, texture, first_rows);
        Ok(Some(group))
    }

    /// [`Recorder::dispatch`] with buffers and staged textures: `bindings` bind to 1, 2, ...
    pub fn dispatch_bound(
        &mut self,
        kernel: &Kernel,
        params: &[u8],
        bindings: &[Bound],
        groups: [u32; 3],
    ) {
        if groups.contains(&0) {
            return;
        }
        let max = self.gpu.limits().max_compute_workgroups_per_dimension;
        assert!(
            groups.iter().all(|&g| g <= max),
            "{}: workgroup grid {groups:?} exceeds {max} per dimension",
            kernel.name
        );
        let uniform = self.gpu.alloc(
            (params.len() as u64).max(16).next_multiple_of(16),
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let mut padded = params.to_vec();
        padded.resize(params.len().max(16).next_multiple_of(16), 0);
        self.gpu.queue.write_buffer(uniform.buffer(), 0, &padded);
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: uniform.buffer(),
                offset: 0,
                size: wgpu::BufferSize::new(padded.len() as u64),
            }),
        }];
        for (k, b) in bindings.iter().enumerate() {
            let resource = match b {
                Bound::Buffer(b) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer.buffer(),
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size.max(4)),
                }),
                Bound::Texture(t) => wgpu::BindingResource::TextureView(&t.view),
            };
            entries.push(wgpu::BindGroupEntry {
                binding: k as u32 + 1,
                resource,
            });
        }
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&kernel.name),
                layout: &kernel.layout,
                entries: &entries,
            });
        self.keep.push(uniform);
        self.keep.extend(bindings.iter().filter_map(|b| match b {
            Bound::Buffer(b) => Some(b.buffer.clone()),
            Bound::Texture(_) => None,
        }));

        let timed_index = match &mut self.timing {
            Some(t) if (t.labels.len() as u32) < MAX_TIMED => {
                t.labels.push(kernel.name.clone());
                Some(t.labels.len() as u32 - 1)
            }
            _ => None,
        };
        if let Some(i) = timed_index {
            self.pass = None;
            let t = self.timing.as_ref().expect("timed");
            let pass = self.encoder.as_mut().expect("open").begin_compute_pass(
                &wgpu::ComputePassDescriptor {
                    label: Some(&kernel.name),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &t.queries,
                        beginning_of_pass_write_index: Some(2 * i),
                        end_of_pass_write_index: Some(2 * i + 1),
                    }),
                },
            );
            self.pass = Some(pass.forget_lifetime());
        } else if self.pass.is_none() {
            let pass = self.encoder.as_mut().expect("open").begin_compute_pass(
                &wgpu::ComputePassDescriptor {
                    label: Some("kernels"),
                    timestamp_writes: None,
                },
            );
            self.pass = Some(pass.forget_lifetime());
        }
        let pass = self.pass.as_mut().expect("pass");
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        if timed_index.is_some() {
            self.pass = None;
        }
        self.dispatches += 1;
    }

    /// Copies `src` into `dst` (byte ranges; sizes must match).
    pub fn copy(&mut self, src: &BufView, dst: &BufView) {
        assert_eq!(src.size, dst.size, "copy size mismatch");
        self.pass = None;
        self.encoder.as_mut().expect("open").copy_buffer_to_buffer(
            src.buffer.buffer(),
            src.offset,
            dst.buffer.buffer(),
            dst.offset,
            src.size,
        );
        self.keep.push(src.buffer.clone());
        self.keep.push(dst.buffer.clone());
    }

    /// Submits what is recorded so far and keeps recording into a fresh encoder: the buffers
    /// this recorder held return to the pool unless something else still references them
    /// (queue order keeps the later work after the submitted one). Models call it between
    /// layers so a step's peak is one layer's working set plus what is kept, not the sum of
    /// every layer's buffers. A timed recorder keeps its query set: timestamps written before a
    /// flush resolve at [`Recorder::submit_timed`] with the rest.
    pub fn flush(&mut self) {
        self.pass = None;
        let fresh = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("runner step"),
            });
        let enc = self.encoder.replace(fresh).expect("open");
        self.gpu.queue.submit([enc.finish()]);
        self.keep.clear();
        self.staged.clear();
    }

    /// Submits everything recorded (one queue submit). Does not wait.
    pub fn submit(mut self) {
        self.pass = None;
        let enc = self.encoder.take().expect("open");
        self.gpu.queue.submit([enc.finish()]);
    }

    /// Submits, waits, and returns each timed dispatch's GPU time (`None` without timestamps).
    pub fn submit_timed(mut self) -> Result<Option<Vec<KernelTime>>> {
        self.pass = None;
        let mut enc = self.encoder.take().expect("open");
        let Some(timing) = self.timing.take() else {
            self.gpu.queue.submit([enc.finish()]);
            self.gpu.wait()?;
            return Ok(None);
        };
        let n = timing.labels.len() as u32 * 2;
        if n == 0 {
            self.gpu.queue.submit([enc.finish()]);
            self.gpu.wait()?;
            return Ok(Some(Vec::new()));
        }
        let bytes = n as u64 * 8;
        let resolve = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&timing.queries, 0..n, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &readback, 0, bytes);
        self.gpu.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        readback.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.gpu.wait()?;
        rx.recv()
            .map_err(|_| anyhow!("timestamp readback dropped"))?
            .map_err(|e| anyhow!("mapping timestamps: {e}"))?;
        let view = readback
            .slice(..)
            .get_mapped_range()
            .map_err(|e| anyhow!("mapping timestamps: {e:?}"))?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&view[..]);
        drop(view);
        let period_ns = self.gpu.queue.get_timestamp_period() as f64;
        Ok(Some(
            timing
                .labels
                .into_iter()
                .enumerate()
                .map(|(i, name)| KernelTime {
                    name,
                    seconds: ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64
                        * period_ns
                        * 1e-9,
                })
                .collect(),
        ))
    }

    /// Submits everything recorded followed by a copy of `t` to the host, and returns without
    /// waiting: [`PendingRead::wait`] blocks until this submission has run, not until later
    /// ones have, so the host can record and submit more work meanwhile.
    pub fn submit_reading(mut self, t: &GpuTensor) -> PendingRead {
        self.pass = None;
        PendingRead::submit(self.gpu, self.encoder.take().expect("open"), t)
    }

    /// Submits and waits for completion (tests, and the end of a step before reading scalars).
    pub fn submit_and_wait(self) -> Result<()> {
        let gpu = self.gpu;
        self.submit();
        gpu.wait()
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        // An unsubmitted recorder is discarded; end the pass before the encoder goes.
        self.pass = None;
    }
}

/// Splits `n` workgroups over x and y so neither exceeds the per-dimension limit; kernels
/// recover the linear workgroup index as `wid.x + wid.y * nwg.x`.
pub fn groups_1d(gpu: &Gpu, n: u32) -> [u32; 3] {
    let max = gpu.limits().max_compute_workgroups_per_dimension.max(1);
    if n <= max {
        [n, 1, 1]
    } else {
        let y = n.div_ceil(max);
        [n.div_ceil(y), y, 1]
    }
}
