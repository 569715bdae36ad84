//! Operands staged in textures for kernels on CPU adapters.
//!
//! Why: Mesa's llvmpipe (lavapipe 22.x) builds a storage-buffer load as a loop over the SIMD
//! lanes with a bounds check per lane, while it reads a texel through its texture code as
//! straight-line vector code, and a read-only *storage* texture (an image load) through a
//! shorter path than a sampled one. Measured on lavapipe 22.3.6 (`load_probe`, idle machine, per
//! core): a subgroup-wide vec4 load costs ~22 ns from a storage buffer, ~17 ns from a sampled
//! texture and ~8 ns from a read-only storage texture (`gemv_probe`, a decode-shaped x·Wᵀ of
//! 32768 × 640: 6.8, 6.9 and 15.2 GB/s), and the matmul's inner loop is dominated by its loads.
//! Kernels whose loads are their bottleneck copy their inputs into a *linear texture* first and
//! read it as `texture_storage_2d<rgba32float | rgba32uint, read>`: the bytes of a buffer range
//! laid out row after row, [`STAGE_WIDTH`] texels of 16 bytes per row, so texel `t` sits at
//! `(t % STAGE_WIDTH, t / STAGE_WIDTH)` and element `e` of an f32 (u32) range is component
//! `e % 4` of texel `e / 4`. The copy is a plain buffer→texture copy (a memcpy on lavapipe).
//! The textures are [`StagingSlots`]: a few per device, reused by every dispatch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::engine::{Gpu, PooledBuffer};
use super::tensor::BufView;

impl Gpu {
    /// Creates the staging textures for a run whose largest binding is `bytes` (see
    /// [`StagingSlots::reserve`]); nothing on adapters that do not stage.
    pub fn reserve_staging(&self, bytes: u64) {
        if self.stages_operands() {
            let max_dim = self.limits().max_texture_dimension_2d;
            self.staging
                .lock()
                .unwrap()
                .reserve(&self.device, bytes, max_dim);
        }
    }

    /// Whether kernels stage their operands in textures on this adapter: CPU adapters whose
    /// subgroups of one width run the generated subgroup kernels (lavapipe) and that can read
    /// both staging formats as read-only storage textures (elsewhere the kernels read the
    /// buffers).
    pub fn stages_operands(&self) -> bool {
        !forced_off()
            && self.adapter_info().device_type == wgpu::DeviceType::Cpu
            && self.storage_texture_reads()
            && crate::gpu::kernels::matmul::subgroup_width(self).is_some()
    }
}

/// Tests of the storage-buffer paths (the fallback, and what GPUs run) switch staging off on
/// their own thread with [`FORCE_UNSTAGED`].
#[cfg(test)]
fn forced_off() -> bool {
    FORCE_UNSTAGED.with(|f| f.get())
}
#[cfg(not(test))]
fn forced_off() -> bool {
    false
}

#[cfg(test)]
thread_local! {
    pub(crate) static FORCE_UNSTAGED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with staging switched off on this thread (tests).
#[cfg(test)]
pub(crate) fn without_staging(f: impl FnOnce()) {
    FORCE_UNSTAGED.with(|c| c.set(true));
    f();
    FORCE_UNSTAGED.with(|c| c.set(false));
}

/// Texels per row of a linear texture (64 KiB of data per row, a multiple of the 256-byte row
/// alignment of buffer-to-texture copies).
pub const STAGE_WIDTH: u32 = 4096;

/// Texel formats a linear texture can have: four f32 or four u32 per texel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageFormat {
    F32,
    U32,
}

impl StageFormat {
    pub const ALL: [StageFormat; 2] = [StageFormat::F32, StageFormat::U32];

    pub(crate) fn wgpu(self) -> wgpu::TextureFormat {
        match self {
            StageFormat::F32 => wgpu::TextureFormat::Rgba32Float,
            StageFormat::U32 => wgpu::TextureFormat::Rgba32Uint,
        }
    }
}

/// A linear texture (see the module docs). Dropping it gives its bytes back to the count.
pub struct StagedTexture {
    pub(crate) texture: wgpu::Texture,
    pub(crate) view: wgpu::TextureView,
    format: StageFormat,
    rows: u32,
    counter: Arc<Mutex<ByteCount>>,
}

impl StagedTexture {
    pub(crate) fn fits(&self, format: StageFormat, rows: u32) -> bool {
        self.format == format && self.rows >= rows
    }

    pub fn bytes(&self) -> u64 {
        texture_bytes(self.rows)
    }
}

impl Drop for StagedTexture {
    fn drop(&mut self) {
        self.counter.lock().unwrap().live -= self.bytes();
    }
}

/// Live and peak bytes of all staging textures.
#[derive(Default, Clone, Copy)]
pub struct ByteCount {
    pub live: u64,
    pub peak: u64,
}

/// Rows of a linear texture holding `bytes` (texels rounded up).
pub fn rows_for(bytes: u64) -> u32 {
    bytes.div_ceil(16).div_ceil(STAGE_WIDTH as u64).max(1) as u32
}

/// Whether `view` can be staged on this device: its start is texel-aligned, the rounded-up
/// copy stays inside its buffer, and the texture fits the adapter's 2-D limit.
pub fn can_stage(view: &BufView, max_dimension: u32) -> bool {
    let texels = view.size.div_ceil(16);
    view.offset.is_multiple_of(16)
        && view.offset + texels * 16 <= view.buffer.buffer().size()
        && rows_for(view.size) <= max_dimension
}

/// Device bytes of a linear texture of `rows` rows.
pub fn texture_bytes(rows: u32) -> u64 {
    rows as u64 * STAGE_WIDTH as u64 * 16
}

/// Rows of the texture that holds `bytes`: whole texels and rows, rounded up to a power of two
/// so that a slot settles on its final size after a few growths.
pub fn texture_rows(bytes: u64) -> u32 {
    rows_for(bytes).next_power_of_two()
}

/// The (slot, format) textures the kernels stage into: matmul A, B and the NF4 absmax (f32
/// slots 0–2, the packed NF4 words in u32 slot 1), attention Q, K, V and dO, AdamW's four
/// inputs (f32 slots 0–3), the gradient norm and clipping (f32 slot 0).
pub const STAGING_KEYS: [(usize, StageFormat); 5] = [
    (0, StageFormat::F32),
    (1, StageFormat::F32),
    (1, StageFormat::U32),
    (2, StageFormat::F32),
    (3, StageFormat::F32),
];
pub const STAGING_TEXTURES: u64 = STAGING_KEYS.len() as u64;

/// One texture per (slot, format), kept across steps. A slot is overwritten by each stage:
/// safe because a queue runs commands in submission order and every dispatch is recorded
/// right after the copies it reads. It only grows (to the next power of two of rows) when an
/// operand does not fit; recorders that bound the old one keep it alive until they submit.
#[derive(Default)]
pub struct StagingSlots {
    slots: std::collections::HashMap<(usize, StageFormat), Arc<StagedTexture>>,
    counter: Arc<Mutex<ByteCount>>,
}

impl StagingSlots {
    /// The texture of `slot` for `format` with at least `rows` rows.
    pub fn get(
        &mut self,
        device: &wgpu::Device,
        slot: usize,
        format: StageFormat,
        rows: u32,
        max_dimension: u32,
    ) -> Arc<StagedTexture> {
        let key = (slot, format);
        if let Some(t) = self.slots.get(&key).filter(|t| t.fits(format, rows)) {
            return t.clone();
        }
        let rows = rows.next_power_of_two().min(max_dimension);
        let t = self.texture(device, format, rows);
        self.slots.insert(key, t.clone());
        t
    }

    /// A new linear texture of `rows` rows outside the slots (counted with them).
    pub fn texture(
        &self,
        device: &wgpu::Device,
        format: StageFormat,
        rows: u32,
    ) -> Arc<StagedTexture> {
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("staged operand"),
            size: wgpu::Extent3d {
                width: STAGE_WIDTH,
                height: rows,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: format.wgpu(),
            usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        {
            let mut c = self.counter.lock().unwrap();
            c.live += texture_bytes(rows);
            c.peak = c.peak.max(c.live);
        }
        Arc::new(StagedTexture {
            texture,
            view,
            format,
            rows,
            counter: self.counter.clone(),
        })
    }

    /// Creates every slot at the size of a `bytes` binding up front, so that a run whose
    /// largest binding is `bytes` never grows one (while a slot grows, the recorders that bound
    /// the old texture keep it alive: both would count).
    pub fn reserve(&mut self, device: &wgpu::Device, bytes: u64, max_dimension: u32) {
        let rows = rows_for(bytes).min(max_dimension);
        for (slot, format) in STAGING_KEYS {
            self.get(device, slot, format, rows, max_dimension);
        }
    }

    pub fn bytes(&self) -> ByteCount {
        *self.counter.lock().unwrap()
    }

    pub fn reset_peak(&self) {
        let mut c = self.counter.lock().unwrap();
        c.peak = c.live;
    }
}

/// Frozen weights staged once and kept in their own textures while at least one
/// [`StagedWeightsHold`] lives (a generation, on CPU adapters): a decode step reads every weight
/// once, so copying them into the slots each step would cost as much as the products. Keyed by
/// the buffer range; each entry keeps its buffer alive, so a key cannot be reused by another
/// allocation while the entry exists. Only matmuls whose B is marked frozen
/// (`MatmulOpts::frozen_b`) use it: a weight whose bytes change would be read stale. A weight is
/// kept once: the rows kernels' layouts (row blocks, a group) replace a linear copy, and a
/// weight kept in one of them is not kept linearly again (a prompt's product copies it into a
/// slot). So a generate op's decode steps keep reading the row blocks across its batches, and
/// its prompts the linear bytes of a slot.
#[derive(Default)]
pub struct FrozenTextures {
    holds: usize,
    textures: HashMap<FrozenKey, (Arc<PooledBuffer>, Arc<StagedTexture>)>,
    /// Weights multiplied by one x in one dispatch (`Gpu::matmul_grouped`), staged together:
    /// each from the start of a texture row (the rows where each starts).
    groups: HashMap<Vec<FrozenKey>, FrozenGroup>,
}

/// Several frozen weights in one texture, each from texture row `first_rows[j]`.
#[derive(Clone)]
pub struct FrozenGroup {
    pub texture: Arc<StagedTexture>,
    pub first_rows: Vec<u32>,
    _buffers: Vec<Arc<PooledBuffer>>,
}

/// How a frozen weight's bytes sit in its texture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// The buffer's bytes in order (what every staged kernel reads).
    Linear,
    /// The rows kernels' row blocks for `lanes` lanes
    /// ([`crate::gpu::kernels::row_blocks`]): what a generation's decode steps read.
    RowBlocks { lanes: u32 },
}

/// A row-block layout's shape: rows of `row_texels` texels, for a rows kernel of `lanes` lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBlocks {
    pub row_texels: u32,
    pub lanes: u32,
}

/// A buffer range (the buffer's address, offset, size), the texel format it is staged as and
/// its layout there.
type FrozenKey = (usize, u64, u64, StageFormat, WeightLayout);

impl FrozenTextures {
    /// Whether a hold is alive (frozen weights may be kept).
    pub fn held(&self) -> bool {
        self.holds > 0
    }

    /// The texture already holding `view` as `format` in `layout`, if any.
    pub fn get(
        &self,
        view: &BufView,
        format: StageFormat,
        layout: WeightLayout,
    ) -> Option<Arc<StagedTexture>> {
        self.textures
            .get(&frozen_key(view, format, layout))
            .map(|(_, t)| t.clone())
    }

    pub fn insert(
        &mut self,
        view: &BufView,
        format: StageFormat,
        layout: WeightLayout,
        texture: Arc<StagedTexture>,
    ) {
        self.forget(&[view]);
        self.textures.insert(
            frozen_key(view, format, layout),
            (view.buffer.clone(), texture),
        );
    }

    /// Whether the range of `view` is kept in any layout, alone or in a group.
    pub fn keeps(&self, view: &BufView) -> bool {
        let range = range_of(view);
        let same = |k: &FrozenKey| (k.0, k.1, k.2) == range;
        self.textures.keys().any(same) || self.groups.keys().any(|m| m.iter().any(same))
    }

    /// Drops every copy of the ranges `views`, alone or in a group (recorders that bound one
    /// keep it alive until they submit).
    fn forget(&mut self, views: &[&BufView]) {
        let ranges: Vec<_> = views.iter().map(|v| range_of(v)).collect();
        let same = |k: &FrozenKey| ranges.contains(&(k.0, k.1, k.2));
        self.textures.retain(|k, _| !same(k));
        self.groups.retain(|members, _| !members.iter().any(same));
    }

    /// Whether no weight is kept staged.
    pub fn is_empty(&self) -> bool {
        self.textures.is_empty() && self.groups.is_empty()
    }

    /// The texture already holding the weights `views` together as `format` in `layout`, if
    /// any.
    pub fn group(
        &self,
        views: &[BufView],
        format: StageFormat,
        layout: WeightLayout,
    ) -> Option<FrozenGroup> {
        self.groups.get(&group_key(views, format, layout)).cloned()
    }

    /// Keeps `texture` as the group of `views` and returns it.
    pub(crate) fn insert_group(
        &mut self,
        views: &[BufView],
        format: StageFormat,
        layout: WeightLayout,
        texture: Arc<StagedTexture>,
        first_rows: Vec<u32>,
    ) -> FrozenGroup {
        self.forget(&views.iter().collect::<Vec<_>>());
        let group = FrozenGroup {
            texture,
            first_rows,
            _buffers: views.iter().map(|v| v.buffer.clone()).collect(),
        };
        self.groups
            .insert(group_key(views, format, layout), group.clone());
        group
    }
}

fn group_key(views: &[BufView], format: StageFormat, layout: WeightLayout) -> Vec<FrozenKey> {
    views
        .iter()
        .map(|v| frozen_key(v, format, layout))
        .collect()
}

fn range_of(view: &BufView) -> (usize, u64, u64) {
    (Arc::as_ptr(&view.buffer) as usize, view.offset, view.size)
}

fn frozen_key(view: &BufView, format: StageFormat, layout: WeightLayout) -> FrozenKey {
    let (buffer, offset, size) = range_of(view);
    (buffer, offset, size, format, layout)
}

/// Keeps frozen weights staged (see [`FrozenTextures`]) until dropped; the last hold to drop
/// frees their textures.
pub struct StagedWeightsHold {
    frozen: Arc<Mutex<FrozenTextures>>,
}

impl Drop for StagedWeightsHold {
    fn drop(&mut self) {
        let mut f = self.frozen.lock().unwrap();
        f.holds -= 1;
        if f.holds == 0 {
            f.textures.clear();
            f.groups.clear();
        }
    }
}

impl Gpu {
    /// Frozen weights (linear layers' base weights, the output embedding) stay staged in
    /// textures from their first use until the returned hold drops: for generation, which reads
    /// every weight once per token. A no-op on adapters that do not stage.
    pub fn hold_staged_weights(&self) -> StagedWeightsHold {
        self.frozen.lock().unwrap().holds += 1;
        StagedWeightsHold {
            frozen: self.frozen.clone(),
        }
    }
}

/// Records the copy of `view`'s bytes (rounded up to whole texels; see [`can_stage`]) into
/// `texture`'s rows from `first_row` on (texel `first_row * STAGE_WIDTH` holds the view's first
/// 16 bytes).
pub fn record_copy_at(
    encoder: &mut wgpu::CommandEncoder,
    view: &BufView,
    texture: &StagedTexture,
    first_row: u32,
) {
    let texels = view.size.div_ceil(16);
    let full_rows = (texels / STAGE_WIDTH as u64) as u32;
    let rest = (texels % STAGE_WIDTH as u64) as u32;
    let row_bytes = STAGE_WIDTH as u64 * 16;
    let copy = |encoder: &mut wgpu::CommandEncoder, offset: u64, y: u32, width: u32, rows: u32| {
        encoder.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: view.buffer.buffer(),
                layout: wgpu::TexelCopyBufferLayout {
                    offset,
                    bytes_per_row: Some(row_bytes as u32),
                    rows_per_image: None,
                },
            },
            wgpu::TexelCopyTextureInfo {
                texture: &texture.texture,
                mip_level: 0,
                origin: wgpu::Origin3d { x: 0, y, z: 0 },
                aspect: wgpu::TextureAspect::All,
            },
            wgpu::Extent3d {
                width,
                height: rows,
                depth_or_array_layers: 1,
            },
        );
    };
    if full_rows > 0 {
        copy(encoder, view.offset, first_row, STAGE_WIDTH, full_rows);
    }
    if rest > 0 {
        copy(
            encoder,
            view.offset + full_rows as u64 * row_bytes,
            first_row + full_rows,
            rest,
            1,
        );
    }
}

/// Tests: `words` u32 words (f32 bits in an f32 texture) of a staged texture from texel
/// `first_texel` on, read back through textureLoad addressed by the kernels' own `stage_texel`
/// (shaders/lib/staging.wgsl), which ties the WGSL address to [`STAGE_WIDTH`].
#[cfg(test)]
pub(crate) fn read_texture_words(
    gpu: &Gpu,
    texture: &StagedTexture,
    first_texel: u32,
    words: usize,
) -> Vec<u32> {
    use crate::gpu::recorder::{Bound, Recorder};
    use crate::gpu::{DType, Shader};
    let (texel, value) = match texture.format {
        StageFormat::F32 => ("rgba32float", "bitcast<vec4<u32>>(textureLoad(T, at))"),
        StageFormat::U32 => ("rgba32uint", "textureLoad(T, at)"),
    };
    let source = format!(
        r#"
#include "lib/staging"
@group(0) @binding(0) var<uniform> p: vec4<u32>;
@group(0) @binding(1) var T: texture_storage_2d<{texel}, read>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64, 1, 1)
fn readback(@builtin(global_invocation_id) gid: vec3<u32>) {{
    let e = gid.x + gid.y * 65535u * 64u;
    if (e >= p.x) {{ return; }}
    let at = stage_texel(p.y + (e >> 2u));
    out[e] = {value}[e & 3u];
}}
"#
    );
    let kernel = gpu
        .kernel(
            &Shader::inline(&format!("staging_readback_{texel}"), &source).unwrap(),
            "readback",
            &[],
        )
        .unwrap();
    let out = gpu.empty(&[words], DType::U32).unwrap();
    gpu.poison(&out);
    let mut rec = Recorder::new(gpu);
    let groups = (words as u32).div_ceil(64);
    rec.dispatch_bound(
        &kernel,
        bytemuck::cast_slice(&[words as u32, first_texel, 0, 0]),
        &[Bound::Texture(texture), Bound::Buffer(out.view().unwrap())],
        [groups.min(65535), groups.div_ceil(65535), 1],
    );
    rec.submit();
    gpu.read_u32(&out).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::testing::{test_gpu, TestRng};
    use crate::gpu::{BufView, Recorder};

    fn roundtrip(floats: usize, skip: usize) {
        let gpu = test_gpu();
        if !gpu.stages_operands() {
            eprintln!("this adapter does not stage operands");
            return;
        }
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        let host = rng.vec_normal(skip + floats);
        let src = gpu.upload_f32(&[skip + floats], &host).unwrap();
        let whole = src.view().unwrap();
        // a range starting `skip` floats in (a texel-aligned offset, an odd length)
        let view = BufView {
            buffer: whole.buffer.clone(),
            offset: whole.offset + 4 * skip as u64,
            size: 4 * floats as u64,
        };
        let mut rec = Recorder::new(gpu);
        let staged = rec.stage(3, &view, StageFormat::F32).expect("stageable");
        rec.submit();
        let want: Vec<u32> = host[skip..].iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            read_texture_words(gpu, &staged, 0, floats),
            want,
            "seed {seed}: {floats} floats from {skip}"
        );
    }

    #[test]
    fn staged_ranges_read_back_exactly() {
        // one partial row; several full rows plus a partial texel; exactly two rows
        roundtrip(4 * 100 + 3, 0);
        roundtrip(4 * STAGE_WIDTH as usize * 3 + 4 * 17 + 2, 8);
        roundtrip(4 * STAGE_WIDTH as usize * 2, 4);
    }

    /// Staging is chosen by capability, so a driver losing read-only storage textures would
    /// silently move every CPU-adapter kernel to the slower storage-buffer paths: on a CPU
    /// adapter with one subgroup width (lavapipe) both staging formats must be readable.
    #[test]
    fn cpu_adapters_with_subgroups_stage() {
        let gpu = test_gpu();
        let cpu = gpu.adapter_info().device_type == wgpu::DeviceType::Cpu;
        if cpu && crate::gpu::kernels::matmul::subgroup_width(gpu).is_some() {
            assert!(gpu.storage_texture_reads(), "{}", gpu.describe());
            assert!(gpu.stages_operands());
        }
    }

    #[test]
    fn misaligned_ranges_are_not_staged() {
        let gpu = test_gpu();
        if !gpu.stages_operands() {
            eprintln!("this adapter does not stage operands");
            return;
        }
        let t = gpu.upload_f32(&[64], &[1.0; 64]).unwrap();
        let whole = t.view().unwrap();
        let odd = BufView {
            buffer: whole.buffer.clone(),
            offset: whole.offset + 4,
            size: 16,
        };
        let mut rec = Recorder::new(gpu);
        assert!(rec.stage(0, &odd, StageFormat::F32).is_none());
        assert!(rec.stage(0, &whole, StageFormat::F32).is_some());
    }
}
