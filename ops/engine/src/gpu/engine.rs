//! Device setup and the pipeline cache; adapter choice in `engine/adapter.rs`, the buffer pool in
//! `engine/pool.rs`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};

use super::shader::Shader;

mod adapter;
mod pool;

use adapter::*;
use pool::*;
pub use pool::{pooled_capacity, PooledBuffer, StorageStats};

/// How kernels with a tiled inner loop (matmul, fused NF4 matmul) are shaped on this adapter.
///
/// llvmpipe (lavapipe) loads storage and workgroup memory one lane at a time, so there the
/// fastest kernels keep a large block of outputs in registers and use no workgroup memory;
/// real GPUs want workgroup-tiled kernels (README, Performance: the measurements behind it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tiling {
    /// Large register block per invocation, no workgroup memory (CPU adapters).
    Register,
    /// Tiles staged in workgroup memory, small register block per invocation (GPUs).
    Workgroup,
}

impl std::str::FromStr for Tiling {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "register" => Ok(Tiling::Register),
            "workgroup" => Ok(Tiling::Workgroup),
            _ => bail!("unknown tiling `{s}`: expected `register` or `workgroup`"),
        }
    }
}

/// Options for [`Gpu::new`]. Every field falls back to an environment variable, then a default.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Adapter name substring (case-insensitive) or index in the enumeration `runner gpu`
    /// prints. Env: `RUNNER_ADAPTER`. Default: discrete > integrated > virtual > CPU.
    pub adapter: Option<String>,
    /// Lowers the largest storage binding (bytes) below the adapter's limit, so that chunked
    /// tensors can be tested on small data. Env: `RUNNER_GPU_MAX_BINDING`.
    pub max_binding_bytes: Option<u64>,
    /// Forces a kernel tiling strategy (tests exercise both on one adapter).
    /// Env: `RUNNER_GPU_TILING` = `register` | `workgroup`. Default: by adapter type.
    pub tiling: Option<Tiling>,
    /// Without `adapter`: the data-parallel rank on this machine, which picks among several
    /// adapters of the preferred kind (one GPU per rank).
    pub local_rank: usize,
}

/// The process-wide engine: instance, adapter, device, queue, pools and caches.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    adapter_info: wgpu::AdapterInfo,
    features: wgpu::Features,
    limits: wgpu::Limits,
    /// Whether the linear staging textures' formats can be bound as read-only storage textures
    /// (how the staged kernels read them; [`Gpu::stages_operands`] needs it).
    storage_texture_reads: bool,
    max_binding_bytes: u64,
    tiling: Tiling,
    all_adapters: Vec<wgpu::AdapterInfo>,
    pub(crate) pool: Arc<Mutex<BufferPool>>,
    pub(crate) staging: Mutex<super::staging::StagingSlots>,
    pub(crate) frozen: Arc<Mutex<super::staging::FrozenTextures>>,
    /// Matmul tilings tuned on this adapter ([`super::tune`]).
    pub(crate) tuner: Mutex<super::tune::Tuner>,
    /// The cooperative-matrix configurations of this adapter that the coop matmul has.
    pub(crate) coop_configs: Vec<super::CoopConfig>,
    /// The configuration [`Gpu::verify_coop_matmul`] is checking (forced while set).
    pub(crate) coop_trial: Mutex<Option<super::CoopConfig>>,
    modules: Mutex<HashMap<u128, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Kernel>>>,
}

/// A compiled compute pipeline and its (auto-derived) bind group layout.
pub struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// `shader:entry` for labels and timing tables.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    /// The module's content hash ([`Shader::hash`]).
    shader: u128,
    entry: String,
    /// Overridable constants as (name, f64 bits): tile shapes are part of the key.
    constants: Vec<(String, u64)>,
}

static SELECTED_ADAPTER: Mutex<Option<String>> = Mutex::new(None);
/// This process's rank among the data-parallel ranks of its machine ([`select_local_rank`]).
static LOCAL_RANK: Mutex<usize> = Mutex::new(0);
static GLOBAL: OnceLock<Gpu> = OnceLock::new();
static GLOBAL_INIT: Mutex<()> = Mutex::new(());

/// Chooses the adapter the process-wide [`Gpu::get`] will open (the CLI's `--adapter`).
/// Must be called before the first `Gpu::get()`; takes precedence over `RUNNER_ADAPTER`.
pub fn select_adapter(spec: &str) -> Result<()> {
    if GLOBAL.get().is_some() {
        bail!("the GPU is already initialised; choose the adapter before any GPU work");
    }
    *SELECTED_ADAPTER.lock().unwrap() = Some(spec.to_string());
    Ok(())
}

/// One GPU per rank: without `--adapter`/`RUNNER_ADAPTER`, the process-wide [`Gpu::get`] takes
/// the `local_rank`-th adapter of the preferred kind (e.g. the third of four discrete Vulkan
/// GPUs for local rank 2), wrapping around when the machine has fewer such adapters than ranks.
pub fn select_local_rank(local_rank: usize) -> Result<()> {
    if GLOBAL.get().is_some() {
        bail!("the GPU is already initialised; choose the adapter before any GPU work");
    }
    *LOCAL_RANK.lock().unwrap() = local_rank;
    Ok(())
}

/// Adapter, backend, features and limits of the process-wide GPU, plus every adapter found
/// (what `runner gpu` prints).
pub fn describe() -> Result<String> {
    Ok(Gpu::get()?.describe())
}

/// The coop matmul's configurations among an adapter's cooperative-matrix properties: 8×8 with
/// f32 A, B and C; 16×16 with f16 A and B and f32 C (where the adapter has SHADER_F16).
fn coop_configs_of(
    props: &[wgpu::CooperativeMatrixProperties],
    features: wgpu::Features,
) -> Vec<super::CoopConfig> {
    use wgpu::CooperativeScalarType as T;
    let mut configs = Vec::new();
    for p in props {
        let square = p.m_size == p.n_size && p.n_size == p.k_size;
        let cfg = match (p.m_size, p.ab_type, p.cr_type) {
            (8, T::F32, T::F32) if square => super::CoopConfig {
                size: 8,
                f16: false,
            },
            (16, T::F16, T::F32) if square && features.contains(wgpu::Features::SHADER_F16) => {
                super::CoopConfig {
                    size: 16,
                    f16: true,
                }
            }
            _ => continue,
        };
        if !configs.contains(&cfg) {
            configs.push(cfg);
        }
    }
    configs
}

const INSTALL_HINT: &str =
    "no usable GPU adapter. To run on the CPU install Mesa's lavapipe Vulkan \
driver: on Debian/Ubuntu `apt-get install mesa-vulkan-drivers libvulkan1` (Fedora: \
`dnf install mesa-vulkan-drivers`); on a GPU install its Vulkan (or Metal/DX12) driver";

impl Gpu {
    /// The process-wide engine, created on first use (adapter from [`select_adapter`], else
    /// `RUNNER_ADAPTER`, else the preference order).
    pub fn get() -> Result<&'static Gpu> {
        if let Some(g) = GLOBAL.get() {
            return Ok(g);
        }
        let _guard = GLOBAL_INIT.lock().unwrap();
        if let Some(g) = GLOBAL.get() {
            return Ok(g);
        }
        let opts = GpuOptions {
            adapter: SELECTED_ADAPTER.lock().unwrap().clone(),
            local_rank: *LOCAL_RANK.lock().unwrap(),
            ..Default::default()
        };
        let gpu = Gpu::new(opts)?;
        let _ = GLOBAL.set(gpu);
        Ok(GLOBAL.get().expect("just set"))
    }

    /// A separate engine (tests use this to lower limits or force a tiling; production code
    /// uses [`Gpu::get`]).
    pub fn new(opts: GpuOptions) -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all()),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
        if adapters.is_empty() {
            bail!("{INSTALL_HINT}. wgpu found no adapter on any backend.");
        }
        let spec = opts
            .adapter
            .clone()
            .or_else(|| std::env::var("RUNNER_ADAPTER").ok());
        let index = match spec.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(spec) => choose_adapter(&infos, spec)?,
            None => preferred_adapter_for_rank(&infos, opts.local_rank),
        };
        let adapter = &adapters[index];
        let info = infos[index].clone();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let mut features = adapter.features() & wanted;
        // Tensor-unit matmuls where the adapter has them, on one subgroup width (the coop
        // kernel's workgroup is one subgroup); selected only once checked (verify_coop_matmul).
        let info_fixed_width = info.subgroup_min_size == info.subgroup_max_size;
        let coop = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let coop_configs: Vec<super::CoopConfig> =
            if adapter.features().contains(coop | wgpu::Features::SUBGROUP) && info_fixed_width {
                coop_configs_of(&adapter.cooperative_matrix_properties(), adapter.features())
            } else {
                Vec::new()
            };
        if !coop_configs.is_empty() {
            features |= coop;
        }
        let limits = adapter.limits();
        let storage_texture_reads = super::staging::StageFormat::ALL.iter().all(|f| {
            let features = adapter.get_texture_format_features(f.wgpu());
            features
                .allowed_usages
                .contains(wgpu::TextureUsages::STORAGE_BINDING)
                && features
                    .flags
                    .contains(wgpu::TextureFormatFeatureFlags::STORAGE_READ_ONLY)
        });
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("runner"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: if features.contains(coop) {
                // SAFETY: wgpu marks cooperative matrices experimental (possible driver-level
                // bugs); the coop matmul runs only after it matched the reference on this
                // adapter and driver (Gpu::verify_coop_matmul).
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| {
            format!(
                "opening device on adapter `{}` ({:?})",
                info.name, info.backend
            )
        })?;

        let env_binding = std::env::var("RUNNER_GPU_MAX_BINDING")
            .ok()
            .map(|v| {
                v.parse::<u64>()
                    .context("RUNNER_GPU_MAX_BINDING must be a byte count")
            })
            .transpose()?;
        let adapter_max = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let mut max_binding_bytes = adapter_max;
        if let Some(lower) = opts.max_binding_bytes.or(env_binding) {
            if lower < 256 {
                bail!("max binding override {lower} is below 256 bytes");
            }
            max_binding_bytes = max_binding_bytes.min(lower);
        }
        // Bindings must be a multiple of 4 bytes; keep chunks aligned to 256 (offset alignment).
        max_binding_bytes &= !255;

        let env_tiling = std::env::var("RUNNER_GPU_TILING")
            .ok()
            .map(|v| v.parse::<Tiling>())
            .transpose()?;
        let tiling = opts
            .tiling
            .or(env_tiling)
            .unwrap_or(match info.device_type {
                wgpu::DeviceType::Cpu => Tiling::Register,
                _ => Tiling::Workgroup,
            });

        let tuner = {
            let file = super::tune::tune_dir().map(|d| super::tune::tune_file(&d, &info));
            super::tune::Tuner {
                table: file
                    .as_deref()
                    .map(super::tune::TuneTable::load)
                    .unwrap_or_default(),
                auto: super::tune::autotune_default(info.device_type),
                file,
            }
        };
        Ok(Gpu {
            storage_texture_reads,
            tuner: Mutex::new(tuner),
            coop_configs,
            coop_trial: Mutex::new(None),
            device,
            queue,
            adapter_info: info,
            features,
            limits,
            max_binding_bytes,
            tiling,
            all_adapters: infos,
            pool: Arc::new(Mutex::new(BufferPool::default())),
            staging: Mutex::new(Default::default()),
            frozen: Default::default(),
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.adapter_info
    }
    /// Whether staging textures can be read as read-only storage textures here.
    pub(crate) fn storage_texture_reads(&self) -> bool {
        self.storage_texture_reads
    }
    /// The optional features actually enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    /// Largest storage binding a kernel may see (bytes, multiple of 256); tensors above it are chunked.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding_bytes
    }
    pub fn tiling(&self) -> Tiling {
        self.tiling
    }
    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }
    /// Bytes held by the pool for reuse (not in use by any tensor).
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.lock().unwrap().free_bytes
    }

    /// Storage-buffer bytes on loan (live) and their high-water mark since the last
    /// [`Gpu::reset_peak_storage`]; bucket capacities, i.e. what the device really holds for
    /// tensors. Uniform parameter blocks (one small buffer per dispatch) are not counted.
    pub fn storage_stats(&self) -> StorageStats {
        let pool = self.pool.lock().unwrap();
        let staged = self.staging.lock().unwrap().bytes();
        StorageStats {
            live: pool.live_storage,
            peak: pool.peak_storage,
            staging_live: staged.live,
            staging_peak: staged.peak,
        }
    }

    /// Starts a new high-water mark at the current live bytes.
    pub fn reset_peak_storage(&self) {
        let mut pool = self.pool.lock().unwrap();
        pool.peak_storage = pool.live_storage;
        self.staging.lock().unwrap().reset_peak();
    }

    /// Human-readable adapter, backend, features and limits.
    pub fn describe(&self) -> String {
        let i = &self.adapter_info;
        let l = &self.limits;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "adapter:  {} ({:?}, {:?} backend)",
            i.name, i.device_type, i.backend
        );
        let _ = writeln!(s, "driver:   {} {}", i.driver, i.driver_info);
        let _ = writeln!(s, "features: {:?}", self.features);
        let _ = writeln!(s, "tiling:   {:?}", self.tiling);
        {
            let tuner = self.tuner.lock().unwrap();
            let coop: Vec<String> = self
                .coop_configs
                .iter()
                .map(|c| {
                    let checked = tuner.table.coop_verified.contains(&c.to_string());
                    format!(
                        "{c} ({})",
                        if checked {
                            "checked, selected"
                        } else {
                            "unchecked: run `runner gpu --tune`"
                        }
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "cooperative matrices: {}",
                if coop.is_empty() {
                    "none".to_string()
                } else {
                    coop.join(", ")
                }
            );
            let _ = writeln!(
                s,
                "kernel tuning: {} shape classes in {} (tuning at first use: {})",
                tuner.table.classes.len(),
                tuner
                    .file
                    .as_ref()
                    .map_or("no file".to_string(), |f| f.display().to_string()),
                if tuner.auto {
                    "on"
                } else {
                    "off; RUNNER_AUTOTUNE=1 or `runner gpu --tune`"
                }
            );
        }
        let _ = writeln!(s, "limits:");
        for (name, v) in [
            ("max_buffer_size", l.max_buffer_size),
            (
                "max_storage_buffer_binding_size",
                l.max_storage_buffer_binding_size,
            ),
            (
                "max_storage_buffers_per_shader_stage",
                l.max_storage_buffers_per_shader_stage as u64,
            ),
            (
                "max_compute_workgroup_storage_size",
                l.max_compute_workgroup_storage_size as u64,
            ),
            (
                "max_compute_invocations_per_workgroup",
                l.max_compute_invocations_per_workgroup as u64,
            ),
            (
                "max_compute_workgroup_size_x",
                l.max_compute_workgroup_size_x as u64,
            ),
            (
                "max_compute_workgroups_per_dimension",
                l.max_compute_workgroups_per_dimension as u64,
            ),
            ("subgroup_min_size", i.subgroup_min_size as u64),
            ("subgroup_max_size", i.subgroup_max_size as u64),
        ] {
            let _ = writeln!(s, "  {name:<40} {v}");
        }
        if self.max_binding_bytes < l.max_storage_buffer_binding_size.min(l.max_buffer_size) {
            let _ = writeln!(
                s,
                "  (binding size lowered to {} bytes by option)",
                self.max_binding_bytes
            );
        }
        let _ = writeln!(
            s,
            "adapters found (select with --adapter / RUNNER_ADAPTER, by index or name):"
        );
        for (k, a) in self.all_adapters.iter().enumerate() {
            let mark = if a.name == i.name && a.backend == i.backend {
                "*"
            } else {
                " "
            };
            let _ = writeln!(
                s,
                " {mark}{k}: {} ({:?}, {:?})",
                a.name, a.device_type, a.backend
            );
        }
        s
    }

    /// The compiled pipeline for `entry` of `shader` with the given overridable constants
    /// (cached: keyed by the module's content hash, the entry and the constants). An invalid
    /// module or entry point is an error naming them (wgpu's validation, caught in an error
    /// scope), not a panic; `shader::all_variants` is validated in the tests besides.
    pub fn kernel(
        &self,
        shader: &Shader,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<Arc<Kernel>> {
        let key = PipelineKey {
            shader: shader.hash(),
            entry: entry.to_string(),
            constants: constants
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_bits()))
                .collect(),
        };
        if let Some(k) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(k.clone());
        }
        let name = format!("{}:{entry}", shader.label());
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = {
            let mut modules = self.modules.lock().unwrap();
            modules
                .entry(shader.hash())
                .or_insert_with(|| {
                    Arc::new(
                        self.device
                            .create_shader_module(wgpu::ShaderModuleDescriptor {
                                label: Some(shader.label()),
                                source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                            }),
                    )
                })
                .clone()
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&name),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    // Kernels initialise the workgroup memory they read; zeroing costs a pass on lavapipe.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(error) = pollster::block_on(scope.pop()) {
            // an invalid module stays invalid: drop it so the error repeats on every use
            self.modules.lock().unwrap().remove(&shader.hash());
            bail!("GPU kernel {name} is invalid: {error}");
        }
        let layout = pipeline.get_bind_group_layout(0);
        let kernel = Arc::new(Kernel {
            pipeline,
            layout,
            name,
        });
        self.pipelines.lock().unwrap().insert(key, kernel.clone());
        Ok(kernel)
    }

    /// A storage buffer of at least `bytes` from the pool (contents undefined).
    pub(crate) fn alloc_storage(&self, bytes: u64) -> Arc<PooledBuffer> {
        self.alloc(bytes, STORAGE_USAGE)
    }

    pub(crate) fn alloc(&self, bytes: u64, usage: wgpu::BufferUsages) -> Arc<PooledBuffer> {
        let bytes = bytes.max(16);
        let bucket = bucket_size(bytes).min(self.limits.max_buffer_size.max(bytes));
        let reused = {
            let mut pool = self.pool.lock().unwrap();
            if usage.contains(wgpu::BufferUsages::STORAGE) {
                pool.live_storage += bucket;
                pool.peak_storage = pool.peak_storage.max(pool.live_storage);
            }
            pool.take(bucket, usage)
        };
        let buffer = reused.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("pooled"),
                size: bucket,
                usage,
                mapped_at_creation: false,
            })
        });
        Arc::new(PooledBuffer {
            buffer: Some(buffer),
            capacity: bucket,
            usage,
            pool: self.pool.clone(),
        })
    }

    /// A storage buffer of at least `bytes` outside the pool and its counts (autotuning's
    /// scratch operands): freed when dropped, never counted as the run's memory.
    pub(crate) fn alloc_scratch(&self, bytes: u64) -> Arc<PooledBuffer> {
        let bytes = bytes.max(16).next_multiple_of(4);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tuning scratch"),
            size: bytes,
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        });
        // a pool of its own, dropped with the buffer: the device's counts never see it
        let pool = BufferPool {
            live_storage: bytes,
            ..Default::default()
        };
        Arc::new(PooledBuffer {
            buffer: Some(buffer),
            capacity: bytes,
            usage: STORAGE_USAGE,
            pool: Arc::new(Mutex::new(pool)),
        })
    }

    /// Waits for all submitted work.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU: {e}"))?;
        Ok(())
    }
}

pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coop_configurations_are_the_ones_the_kernel_has() {
        use wgpu::CooperativeScalarType as T;
        let prop = |size: u32, ab, cr| wgpu::CooperativeMatrixProperties {
            m_size: size,
            n_size: size,
            k_size: size,
            ab_type: ab,
            cr_type: cr,
            saturating_accumulation: false,
        };
        let props = [
            prop(16, T::F16, T::F16),
            prop(16, T::F16, T::F32),
            prop(8, T::F32, T::F32),
            prop(16, T::F16, T::F32),
            prop(16, T::I32, T::I32),
        ];
        let f16 = super::super::CoopConfig {
            size: 16,
            f16: true,
        };
        let f32 = super::super::CoopConfig {
            size: 8,
            f16: false,
        };
        let all = wgpu::Features::SHADER_F16;
        assert_eq!(coop_configs_of(&props, all), vec![f16, f32]);
        // f16 operands need 16-bit shaders
        assert_eq!(coop_configs_of(&props, wgpu::Features::empty()), vec![f32]);
        assert_eq!(f16.to_string(), "16x16 f16/f32");
    }

    #[test]
    fn buckets_round_up_with_bounded_waste() {
        assert_eq!(bucket_size(1), 256);
        assert_eq!(bucket_size(65536), 65536);
        for bytes in [65537u64, 100_000, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let b = bucket_size(bytes);
            assert!(
                b >= bytes && (b as f64) < bytes as f64 * 1.26,
                "{bytes} -> {b}"
            );
        }
    }

    #[test]
    fn adapter_choice_by_index_and_name() {
        let mk = |name: &str, t, b| wgpu::AdapterInfo {
            name: name.into(),
            ..wgpu::AdapterInfo::new(t, b)
        };
        let infos = vec![
            mk("llvmpipe", wgpu::DeviceType::Cpu, wgpu::Backend::Gl),
            mk("llvmpipe", wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan),
            mk(
                "Intel UHD",
                wgpu::DeviceType::IntegratedGpu,
                wgpu::Backend::Vulkan,
            ),
            mk(
                "NVIDIA RTX",
                wgpu::DeviceType::DiscreteGpu,
                wgpu::Backend::Vulkan,
            ),
        ];
        assert_eq!(preferred_adapter(&infos), 3);
        assert_eq!(preferred_adapter(&infos[..3]), 2);
        assert_eq!(preferred_adapter(&infos[..2]), 1);
        assert_eq!(choose_adapter(&infos, "LLVM").unwrap(), 1);
        assert_eq!(choose_adapter(&infos, "0").unwrap(), 0);
        let err = choose_adapter(&infos, "radeon").unwrap_err().to_string();
        assert!(err.contains("NVIDIA RTX") && err.contains("3:"), "{err}");
        assert!(choose_adapter(&infos, "9").is_err());
    }

    /// One GPU per rank: local rank k takes the k-th adapter of the preferred kind, wrapping
    /// around, never one of another kind or backend.
    #[test]
    fn local_rank_picks_among_adapters_of_the_preferred_kind() {
        let mk = |name: &str, t, b| wgpu::AdapterInfo {
            name: name.into(),
            ..wgpu::AdapterInfo::new(t, b)
        };
        let gpu = |n: &str, b| mk(n, wgpu::DeviceType::DiscreteGpu, b);
        let infos = vec![
            mk("llvmpipe", wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan),
            gpu("H100 #0", wgpu::Backend::Vulkan),
            gpu("H100 #0", wgpu::Backend::Gl),
            gpu("H100 #1", wgpu::Backend::Vulkan),
            gpu("H100 #2", wgpu::Backend::Vulkan),
        ];
        let picks: Vec<usize> = (0..5)
            .map(|r| preferred_adapter_for_rank(&infos, r))
            .collect();
        assert_eq!(picks, vec![1, 3, 4, 1, 3]);
        // One lavapipe adapter: every rank shares it (the CI tests run so).
        assert_eq!(preferred_adapter_for_rank(&infos[..1], 3), 0);
    }
}
