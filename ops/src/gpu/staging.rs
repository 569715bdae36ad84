//! Operands staged in textures for kernels on CPU adapters.
//!
//! Why: Mesa's llvmpipe (lavapipe 22.x) turns every storage-buffer load into a loop over the
//! SIMD lanes with a bounds check and a branch per component, while a texel fetch is built by
//! its texture code as straight-line vector code. Measured on lavapipe (`load_probe`): a
//! subgroup-wide vec4 load costs ~440 ns from a storage buffer and ~42 ns from a sampled
//! texture, and the matmul's inner loop is dominated by its loads. Kernels whose loads are
//! their bottleneck copy their inputs into a *linear texture* first: the bytes of a buffer range
//! laid out row after row, [`STAGE_WIDTH`] texels of 16 bytes per row, so texel `t` sits at
//! `(t % STAGE_WIDTH, t / STAGE_WIDTH)` and element `e` of an f32 (u32) range is component
//! `e % 4` of texel `e / 4`. The copy is a plain buffer→texture copy (a memcpy on lavapipe).

use std::sync::{Arc, Mutex};

use super::tensor::BufView;

/// Texels per row of a linear texture (16 KiB-aligned rows: 64 KiB of data per row).
pub const STAGE_WIDTH: u32 = 4096;

/// Texel formats a linear texture can have: four f32 or four u32 per texel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageFormat {
    F32,
    U32,
}

impl StageFormat {
    fn wgpu(self) -> wgpu::TextureFormat {
        match self {
            StageFormat::F32 => wgpu::TextureFormat::Rgba32Float,
            StageFormat::U32 => wgpu::TextureFormat::Rgba32Uint,
        }
    }
}

/// A linear texture (see the module docs).
pub struct StagedTexture {
    pub(crate) texture: wgpu::Texture,
    pub(crate) view: wgpu::TextureView,
    format: StageFormat,
    rows: u32,
}

impl StagedTexture {
    pub(crate) fn fits(&self, format: StageFormat, rows: u32) -> bool {
        self.format == format && self.rows >= rows
    }

    pub fn bytes(&self) -> u64 {
        self.rows as u64 * STAGE_WIDTH as u64 * 16
    }
}

/// Textures not bound by any open recorder, reused across steps (like the buffer pool).
#[derive(Default)]
pub struct StagingPool {
    free: Vec<Arc<StagedTexture>>,
    /// Bytes of every live staging texture, and the most ever live at once.
    pub live_bytes: u64,
    pub peak_bytes: u64,
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

impl StagingPool {
    /// A free texture of `format` with at least `rows` rows, or a new one (rows rounded up to
    /// a power of two so steps of varying length settle on a few sizes). Free textures too
    /// small for the request are released, so the pool does not grow without bound.
    pub fn take(
        pool: &Mutex<StagingPool>,
        device: &wgpu::Device,
        format: StageFormat,
        rows: u32,
        max_dimension: u32,
    ) -> Arc<StagedTexture> {
        let mut p = pool.lock().unwrap();
        if let Some(i) = p
            .free
            .iter()
            .position(|t| t.fits(format, rows) && t.rows <= rows.saturating_mul(4))
        {
            return p.free.swap_remove(i);
        }
        let (keep, release): (Vec<_>, Vec<_>) = std::mem::take(&mut p.free)
            .into_iter()
            .partition(|t| t.format != format || t.rows > rows);
        p.free = keep;
        p.live_bytes -= release.iter().map(|t| t.bytes()).sum::<u64>();
        let rows = rows.next_power_of_two().min(max_dimension);
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
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        let t = StagedTexture {
            texture,
            view,
            format,
            rows,
        };
        p.live_bytes += t.bytes();
        p.peak_bytes = p.peak_bytes.max(p.live_bytes);
        Arc::new(t)
    }

    /// Returns a texture no recorder binds any more.
    pub fn give_back(pool: &Mutex<StagingPool>, t: Arc<StagedTexture>) {
        pool.lock().unwrap().free.push(t);
    }
}

/// Records the copy of `view`'s bytes into `texture` (rounded up to whole texels; see
/// [`can_stage`]).
pub fn record_copy(encoder: &mut wgpu::CommandEncoder, view: &BufView, texture: &StagedTexture) {
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
        copy(encoder, view.offset, 0, STAGE_WIDTH, full_rows);
    }
    if rest > 0 {
        copy(
            encoder,
            view.offset + full_rows as u64 * row_bytes,
            full_rows,
            rest,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::recorder::Bound;
    use crate::gpu::testing::{test_gpu, TestRng};
    use crate::gpu::{BufView, DType, Recorder, ShaderSource};

    /// Reads every element of a staged linear texture back into a buffer through textureLoad,
    /// addressed the way the kernels do.
    const READBACK: &str = r#"
@group(0) @binding(0) var<uniform> p: vec4<u32>;
@group(0) @binding(1) var T: texture_2d<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64, 1, 1)
fn readback(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x + gid.y * 65535u * 64u;
    if (e >= p.x) { return; }
    let t = e >> 2u;
    out[e] = textureLoad(T, vec2<u32>(t % 4096u, t / 4096u), 0)[e & 3u];
}
"#;

    fn roundtrip(floats: usize, skip: usize) {
        let gpu = test_gpu();
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
        let out = gpu.empty(&[floats], DType::F32).unwrap();
        gpu.poison(&out);
        let kernel = gpu.kernel(
            &ShaderSource::plain("staging_readback", READBACK),
            "readback",
            &[],
        );
        let mut rec = Recorder::new(gpu);
        let staged = rec.stage(3, &view, StageFormat::F32).expect("stageable");
        let groups = (floats as u32).div_ceil(64);
        let params = [floats as u32, 0, 0, 0];
        rec.dispatch_bound(
            &kernel,
            bytemuck::cast_slice(&params),
            &[Bound::Texture(&staged), Bound::Buffer(out.view().unwrap())],
            [groups.min(65535), groups.div_ceil(65535), 1],
        );
        rec.submit_and_wait().unwrap();
        assert_eq!(
            gpu.read_f32(&out).unwrap(),
            host[skip..],
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

    #[test]
    fn misaligned_ranges_are_not_staged() {
        let gpu = test_gpu();
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
