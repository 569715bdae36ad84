//! Probe: a decode-shaped product (one row x [K] times Wᵀ, W [N, K] f32) on this adapter, x and
//! the weights read from a sampled texture (`tex`), a storage buffer (`ssbo`) or a read-only
//! storage texture (`img`), in the layouts tried for the rows kernel: `split R×S` (S subgroups
//! of 8 lanes per workgroup, each owning R rows, its lanes splitting K over neighbouring texels:
//! `matmul_rows_split` was 8×1 and is 8×8; 16×8 reads x half as often: 10–25% faster at
//! 32768 × 640, within noise of 8×8 at 2048 × 640 and 640 × 2048), `lane_row` (one lane per
//! row), and `fetch_only` (every weight read once, no product: the load floor). Each variant is
//! its own module. Prints time, GB/s of weights and the max error against an f64 product.
//!
//! `cargo run --release -p ops --example gemv_probe -- [N=32768] [K=640]`

use anyhow::Result;
use ops::gpu::Gpu;

#[path = "support/probe.rs"]
mod probe;

/// Where x and W are read from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    Tex,
    Ssbo,
    Img,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Tex => "tex",
            Source::Ssbo => "ssbo",
            Source::Img => "img",
        }
    }

    /// Bindings 0 (x) and 1 (W) and their vec4 loads `a4`, `b4` from an element index.
    fn declarations(self) -> &'static str {
        match self {
            Source::Tex => {
                "@group(0) @binding(0) var A: texture_2d<f32>;
@group(0) @binding(1) var B: texture_2d<f32>;
fn a4(e: u32) -> vec4<f32> { return textureLoad(A, st(e >> 2u), 0); }
fn b4(e: u32) -> vec4<f32> { return textureLoad(B, st(e >> 2u), 0); }"
            }
            Source::Ssbo => {
                "@group(0) @binding(0) var<storage, read> A: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> B: array<vec4<f32>>;
fn a4(e: u32) -> vec4<f32> { return A[e >> 2u]; }
fn b4(e: u32) -> vec4<f32> { return B[e >> 2u]; }"
            }
            Source::Img => {
                "@group(0) @binding(0) var A: texture_storage_2d<rgba32float, read>;
@group(0) @binding(1) var B: texture_storage_2d<rgba32float, read>;
fn a4(e: u32) -> vec4<f32> { return textureLoad(A, st(e >> 2u)); }
fn b4(e: u32) -> vec4<f32> { return textureLoad(B, st(e >> 2u)); }"
            }
        }
    }
}

/// How the outputs are spread over lanes.
#[derive(Clone, Copy)]
enum Layout {
    Split { rows: u32, subgroups: u32 },
    LaneRow,
    FetchOnly,
}

impl Layout {
    fn name(self) -> String {
        match self {
            Layout::Split { rows, subgroups } => format!("split {rows}x{subgroups}"),
            Layout::LaneRow => "lane_row".into(),
            Layout::FetchOnly => "fetch_only".into(),
        }
    }

    /// Outputs (rows of W) per workgroup.
    fn rows_per_workgroup(self) -> usize {
        match self {
            Layout::Split { rows, subgroups } => (rows * subgroups) as usize,
            Layout::LaneRow | Layout::FetchOnly => 8,
        }
    }

    fn kernel(self) -> String {
        match self {
            Layout::Split { rows, subgroups } => SPLIT
                .replace("ROWS", &format!("{rows}u"))
                .replace("SUBGROUPS", &format!("{subgroups}u")),
            Layout::LaneRow => LANE_ROW.into(),
            Layout::FetchOnly => FETCH_ONLY.into(),
        }
    }
}

const PRELUDE: &str = "@group(0) @binding(2) var<storage, read_write> C: array<f32>;
override N: u32 = 1u;
override K: u32 = 4u;
fn st(t: u32) -> vec2<u32> { return vec2<u32>(t & 4095u, t >> 12u); }
";

const SPLIT: &str = "
@compute @workgroup_size(8u * SUBGROUPS)
fn probe(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid & 7u;
    let n0 = (wid.x * SUBGROUPS + (lid >> 3u)) * ROWS;
    var b: array<u32, ROWS>;
    for (var r = 0u; r < ROWS; r++) { b[r] = min(n0 + r, N - 1u) * K; }
    var c: array<vec4<f32>, ROWS>;
    for (var r = 0u; r < ROWS; r++) { c[r] = vec4<f32>(0.0); }
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = a4(k);
        for (var r = 0u; r < ROWS; r++) { c[r] = fma(a, b4(b[r] + k), c[r]); }
    }
    for (var r = 0u; r < ROWS; r++) {
        let s = subgroupAdd((c[r].x + c[r].y) + (c[r].z + c[r].w));
        if (lane == (r & 7u) && n0 + r < N) { C[n0 + r] = s; }
    }
}
";

const LANE_ROW: &str = "
@compute @workgroup_size(8)
fn probe(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = min(gid.x, N - 1u);
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    for (var k = 0u; k < K; k += 8u) {
        c0 = fma(a4(k), b4(n * K + k), c0);
        c1 = fma(a4(k + 4u), b4(n * K + k + 4u), c1);
    }
    if (gid.x < N) { C[gid.x] = dot(c0 + c1, vec4(1.0)); }
}
";

const FETCH_ONLY: &str = "
@compute @workgroup_size(8)
fn probe(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let base = wid.x * 8u * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < 8u * K; k += 64u) {
        c0 += b4(base + k);
        c1 += b4(base + k + 32u);
    }
    let s = subgroupAdd(dot(c0 + c1, vec4(1.0)));
    if (lane == 0u) { C[wid.x] = s; }
}
";

/// Dispatches per timed submission, and timed submissions (the best is kept).
const DISPATCHES: usize = 10;
const REPS: usize = 5;

fn main() -> Result<()> {
    let gpu = Gpu::get()?;
    let dev = gpu.device();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = *args.first().unwrap_or(&32768);
    let k = *args.get(1).unwrap_or(&640);
    let mut rng = ops::gpu::testing::TestRng::new(1);
    let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
    let reference: Vec<f32> = (0..n)
        .map(|r| {
            (0..k)
                .map(|j| x[j] as f64 * w[r * k + j] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    // each operand as a linear texture (4096 texels a row) and as a storage buffer
    let upload = |data: &[f32]| {
        let rows = data.len().div_ceil(4).div_ceil(4096) as u32;
        let mut padded = data.to_vec();
        padded.resize(rows as usize * 4096 * 4, 0.0);
        let size = wgpu::Extent3d {
            width: 4096,
            height: rows,
            depth_or_array_layers: 1,
        };
        let tex = dev.create_texture(&wgpu::TextureDescriptor {
            label: None,
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::STORAGE_BINDING
                | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        gpu.queue().write_texture(
            tex.as_image_copy(),
            bytemuck::cast_slice(&padded),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(4096 * 16),
                rows_per_image: None,
            },
            size,
        );
        let buf = dev.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (padded.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        gpu.queue()
            .write_buffer(&buf, 0, bytemuck::cast_slice(&padded));
        (tex.create_view(&Default::default()), buf)
    };
    let operands = [upload(&x), upload(&w)];
    let out_size = (n as u64 + 64) * 4;
    let out = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: out_size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: out_size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let constants = [("N", n as f64), ("K", k as f64)];
    let split = |rows, subgroups| Layout::Split { rows, subgroups };
    for (layout, source) in [
        (Layout::FetchOnly, Source::Tex),
        (Layout::FetchOnly, Source::Img),
        (split(8, 1), Source::Tex),
        (split(8, 1), Source::Img),
        (split(8, 8), Source::Tex),
        (split(8, 8), Source::Ssbo),
        (split(8, 8), Source::Img),
        (split(16, 8), Source::Img),
        (Layout::LaneRow, Source::Tex),
    ] {
        let src = format!("{PRELUDE}{}\n{}", source.declarations(), layout.kernel());
        let module = unsafe {
            dev.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor {
                    label: None,
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                },
                wgpu::ShaderRuntimeChecks::unchecked(),
            )
        };
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("probe"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                ..Default::default()
            },
            cache: None,
        });
        // fetch_only reads no x: its binding 0 is not in the layout
        let fetch_only = matches!(layout, Layout::FetchOnly);
        let mut entries: Vec<wgpu::BindGroupEntry> = operands
            .iter()
            .enumerate()
            .filter(|&(i, _)| !(fetch_only && i == 0))
            .map(|(i, (view, buf))| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: match source {
                    Source::Ssbo => buf.as_entire_binding(),
                    Source::Tex | Source::Img => wgpu::BindingResource::TextureView(view),
                },
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: 2,
            resource: out.as_entire_binding(),
        });
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipe.get_bind_group_layout(0),
            entries: &entries,
        });
        let groups = n.div_ceil(layout.rows_per_workgroup()) as u32;
        let best = probe::seconds_per_dispatch(gpu, &pipe, &bg, groups, DISPATCHES, REPS)?;
        let mut enc = dev.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&out, 0, &readback, 0, out_size);
        gpu.queue().submit([enc.finish()]);
        let slice = readback.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        gpu.wait()?;
        let got: Vec<f32> = bytemuck::cast_slice(&slice.get_mapped_range().unwrap()).to_vec();
        readback.unmap();
        let err = if fetch_only {
            f32::NAN
        } else {
            (0..n)
                .map(|i| (got[i] - reference[i]).abs())
                .fold(0.0, f32::max)
        };
        let gb = (n * k * 4) as f64 / best / 1e9;
        println!(
            "{:>12} {:>4}: {:.2} ms, {gb:.1} GB/s, max err {err:.2e}",
            layout.name(),
            source.name(),
            best * 1e3
        );
    }
    Ok(())
}
