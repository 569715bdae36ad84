//! The GPU engine: every training kernel is a WGSL compute shader run through wgpu.
//!
//! # API in one screen
//! ```ignore
//! use ops::gpu::{Gpu, Recorder, DType};
//! let gpu = Gpu::get()?;                                   // process-wide; `select_adapter` first for --adapter
//! let a = gpu.upload_f32(&[m, k], &host_a)?;               // tensors: shape + dtype + pooled buffer(s)
//! let c = gpu.empty(&[m, n], DType::F32)?;                 // uninitialised, from the buffer pool
//! let mut rec = Recorder::new(gpu);                        // many dispatches, one submit
//! gpu.matmul(&mut rec, &a, &b, &c, MatmulOpts::default())?; // kernel wrappers record into `rec`
//! rec.submit();                                            // one queue submit per step
//! let loss = gpu.read_f32(&loss_scalar)?;                   // read back only scalars in hot loops
//! ```
//! - [`Gpu`]: instance/adapter/device/queue, [`Gpu::kernel`] (pipeline cache keyed by the
//!   module's content hash + entry + overridable constants), the buffer pool (dropping a [`GpuTensor`] returns its
//!   buffers; a [`Recorder`] keeps what it bound alive until its submit), [`Gpu::tiling`] (tile
//!   strategy chosen per adapter: register blocking on CPUs, workgroup tiles on GPUs).
//! - [`GpuTensor`]: row-major, dtype f32 / bf16 (packed two per u32, low half first) / u32 / u8
//!   (packed four per u32). A tensor larger than [`Gpu::max_binding_bytes`] is split into
//!   chunks of whole rows ([`GpuTensor::chunks`]); kernels that accept chunked operands loop
//!   over the chunks (one dispatch each). `GpuOptions::max_binding_bytes` /
//!   `RUNNER_GPU_MAX_BINDING` lowers the limit to test chunking on small data.
//! - [`Recorder`]: `dispatch(kernel, params, buffers, groups)` with binding 0 = uniform params,
//!   bindings 1.. = storage buffers; [`Recorder::timed`] + [`Recorder::submit_timed`] measure
//!   every dispatch with timestamp queries. [`Recorder::stage`] copies a buffer range into a
//!   linear texture and [`Recorder::dispatch_bound`] binds buffers and textures: on CPU
//!   adapters ([`Gpu::stages_operands`]) load-bound kernels read their inputs that way
//!   ([`staging`] says why).
//! - Kernel families live in [`kernels`], one module per `shaders/<family>.wgsl` (or folder),
//!   each with a plain-Rust reference in `crate::reference`; [`shader`] composes the WGSL
//!   (`#include` of the shared `shaders/lib/` modules, `#if` on features) and lists every
//!   variant for the naga validation test.
//! - Writing a kernel: WGSL with `@group(0) @binding(0) var<uniform> p: Params;` and storage
//!   buffers from binding 1, tile sizes as `override` constants; Rust: a `#[repr(C)]` Pod params
//!   struct, `gpu.kernel(&Shader::compose("family", &[])?, "entry", &[("TILE", 8.0)])?`,
//!   `rec.dispatch(...)`, and the variant in the family's `variants()`.

pub mod engine;
pub mod kernels;
pub mod recorder;
pub mod shader;
pub mod staging;
pub mod tensor;
/// Random operands, relative errors and test devices: the kernel tests' support, also used by
/// `Gpu::verify_coop_matmul`, which checks cooperative-matrix kernels on the user's device.
pub mod testing;
pub mod tune;

pub use engine::{
    describe, select_adapter, select_local_rank, Gpu, GpuOptions, Kernel, PooledBuffer,
    StorageStats, Tiling,
};
pub use kernels::*;
pub use recorder::{groups_1d, KernelTime, Recorder};
pub use shader::Shader;
pub use tensor::{BufView, Chunk, DType, GpuTensor, PendingRead};
