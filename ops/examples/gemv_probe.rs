//! Probe: a decode-shaped product (one row x [K] times Wᵀ, W [N, K] f32) on this adapter, the
//! weights read from a sampled texture, a storage buffer and a read-only storage texture, with
//! the layouts tried for the rows kernel: `split8` (the shipped `matmul_rows_split`: one
//! subgroup per workgroup owning 8 rows, lanes splitting K), `split8u` (the same unrolled),
//! `split8x8` (8 such subgroups per workgroup), `split16x8_img` (16 rows per subgroup: x read
//! half as often; faster at 32768 rows, slower at 2048 where fewer workgroups remain),
//! `lane_row` (one lane per row), and `fetch_only` (every weight read once, no product: the
//! load floor). Prints time, GB/s of weights and the
//! max error against an f64 product.
//!
//! `cargo run --release -p ops --example gemv_probe -- [N=32768] [K=640]`
use std::time::Instant;

use anyhow::Result;
use ops::gpu::Gpu;

const SRC: &str = r#"
@group(0) @binding(0) var A: texture_2d<f32>;
@group(0) @binding(1) var B: texture_2d<f32>;
@group(0) @binding(2) var<storage, read_write> C: array<f32>;
override N: u32 = 1u;
override K: u32 = 4u;
fn st(t: u32) -> vec2<u32> { return vec2<u32>(t & 4095u, t >> 12u); }
fn a4(e: u32) -> vec4<f32> { return textureLoad(A, st(e >> 2u), 0); }
fn b4(e: u32) -> vec4<f32> { return textureLoad(B, st(e >> 2u), 0); }
@group(0) @binding(3) var<storage, read> As: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> Bs: array<vec4<f32>>;
@group(0) @binding(5) var Ai: texture_storage_2d<rgba32float, read>;
@group(0) @binding(6) var Bi: texture_storage_2d<rgba32float, read>;
fn as4(e: u32) -> vec4<f32> { return As[e >> 2u]; }
fn bs4(e: u32) -> vec4<f32> { return Bs[e >> 2u]; }
fn ai4(e: u32) -> vec4<f32> { return textureLoad(Ai, st(e >> 2u)); }
fn bi4(e: u32) -> vec4<f32> { return textureLoad(Bi, st(e >> 2u)); }

@compute @workgroup_size(8)
fn split8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n0 = wid.x * 8u;
    var b_base: array<u32, 8>;
    for (var r = 0u; r < 8u; r++) { b_base[r] = min(n0 + r, N - 1u) * K; }
    var acc: array<vec4<f32>, 8>;
    for (var r = 0u; r < 8u; r++) { acc[r] = vec4<f32>(0.0); }
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = a4(k);
        for (var r = 0u; r < 8u; r++) { acc[r] = fma(a, b4(b_base[r] + k), acc[r]); }
    }
    for (var r = 0u; r < 8u; r++) {
        let s = subgroupAdd((acc[r].x + acc[r].y) + (acc[r].z + acc[r].w));
        if (lane == r && n0 + r < N) { C[n0 + r] = s; }
    }
}

// the same with the 8 rows written out (no private arrays)
@compute @workgroup_size(8)
fn split8u(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n0 = wid.x * 8u;
    let b0 = min(n0, N - 1u) * K; let b1 = min(n0 + 1u, N - 1u) * K;
    let b2 = min(n0 + 2u, N - 1u) * K; let b3 = min(n0 + 3u, N - 1u) * K;
    let b5 = min(n0 + 5u, N - 1u) * K; let b4_ = min(n0 + 4u, N - 1u) * K;
    let b6 = min(n0 + 6u, N - 1u) * K; let b7 = min(n0 + 7u, N - 1u) * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = a4(k);
        c0 = fma(a, b4(b0 + k), c0); c1 = fma(a, b4(b1 + k), c1);
        c2 = fma(a, b4(b2 + k), c2); c3 = fma(a, b4(b3 + k), c3);
        c4 = fma(a, b4(b4_ + k), c4); c5 = fma(a, b4(b5 + k), c5);
        c6 = fma(a, b4(b6 + k), c6); c7 = fma(a, b4(b7 + k), c7);
    }
    let s0 = subgroupAdd(dot(c0, vec4(1.0))); let s1 = subgroupAdd(dot(c1, vec4(1.0)));
    let s2 = subgroupAdd(dot(c2, vec4(1.0))); let s3 = subgroupAdd(dot(c3, vec4(1.0)));
    let s4 = subgroupAdd(dot(c4, vec4(1.0))); let s5 = subgroupAdd(dot(c5, vec4(1.0)));
    let s6 = subgroupAdd(dot(c6, vec4(1.0))); let s7 = subgroupAdd(dot(c7, vec4(1.0)));
    if (lane == 0u) {
        C[n0] = s0; C[n0 + 1u] = s1; C[n0 + 2u] = s2; C[n0 + 3u] = s3;
        C[n0 + 4u] = s4; C[n0 + 5u] = s5; C[n0 + 6u] = s6; C[n0 + 7u] = s7;
    }
}

// the same with the 8 rows written out (no private arrays)
@compute @workgroup_size(8)
fn split8u_img(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let n0 = wid.x * 8u;
    let b0 = min(n0, N - 1u) * K; let b1 = min(n0 + 1u, N - 1u) * K;
    let b2 = min(n0 + 2u, N - 1u) * K; let b3 = min(n0 + 3u, N - 1u) * K;
    let b5 = min(n0 + 5u, N - 1u) * K; let bq = min(n0 + 4u, N - 1u) * K;
    let b6 = min(n0 + 6u, N - 1u) * K; let b7 = min(n0 + 7u, N - 1u) * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = ai4(k);
        c0 = fma(a, bi4(b0 + k), c0); c1 = fma(a, bi4(b1 + k), c1);
        c2 = fma(a, bi4(b2 + k), c2); c3 = fma(a, bi4(b3 + k), c3);
        c4 = fma(a, bi4(bq + k), c4); c5 = fma(a, bi4(b5 + k), c5);
        c6 = fma(a, bi4(b6 + k), c6); c7 = fma(a, bi4(b7 + k), c7);
    }
    let s0 = subgroupAdd(dot(c0, vec4(1.0))); let s1 = subgroupAdd(dot(c1, vec4(1.0)));
    let s2 = subgroupAdd(dot(c2, vec4(1.0))); let s3 = subgroupAdd(dot(c3, vec4(1.0)));
    let s4 = subgroupAdd(dot(c4, vec4(1.0))); let s5 = subgroupAdd(dot(c5, vec4(1.0)));
    let s6 = subgroupAdd(dot(c6, vec4(1.0))); let s7 = subgroupAdd(dot(c7, vec4(1.0)));
    if (lane == 0u) {
        C[n0] = s0; C[n0 + 1u] = s1; C[n0 + 2u] = s2; C[n0 + 3u] = s3;
        C[n0 + 4u] = s4; C[n0 + 5u] = s5; C[n0 + 6u] = s6; C[n0 + 7u] = s7;
    }
}

// one lane per output row, 4 outputs' worth of K per texel, lanes rows apart
@compute @workgroup_size(8)
fn lane_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = min(gid.x, N - 1u);
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    for (var k = 0u; k < K; k += 8u) {
        c0 = fma(a4(k), b4(n * K + k), c0);
        c1 = fma(a4(k + 4u), b4(n * K + k + 4u), c1);
    }
    if (gid.x < N) { C[gid.x] = dot(c0 + c1, vec4(1.0)); }
}

// 8 subgroups per workgroup, each the split8u body over its own 8 rows
@compute @workgroup_size(64)
fn split8x8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid & 7u;
    let n0 = (wid.x * 8u + (lid >> 3u)) * 8u;
    let b0 = min(n0, N - 1u) * K; let b1 = min(n0 + 1u, N - 1u) * K;
    let b2 = min(n0 + 2u, N - 1u) * K; let b3 = min(n0 + 3u, N - 1u) * K;
    let b5 = min(n0 + 5u, N - 1u) * K; let b4_ = min(n0 + 4u, N - 1u) * K;
    let b6 = min(n0 + 6u, N - 1u) * K; let b7 = min(n0 + 7u, N - 1u) * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = a4(k);
        c0 = fma(a, b4(b0 + k), c0); c1 = fma(a, b4(b1 + k), c1);
        c2 = fma(a, b4(b2 + k), c2); c3 = fma(a, b4(b3 + k), c3);
        c4 = fma(a, b4(b4_ + k), c4); c5 = fma(a, b4(b5 + k), c5);
        c6 = fma(a, b4(b6 + k), c6); c7 = fma(a, b4(b7 + k), c7);
    }
    let s0 = subgroupAdd(dot(c0, vec4(1.0))); let s1 = subgroupAdd(dot(c1, vec4(1.0)));
    let s2 = subgroupAdd(dot(c2, vec4(1.0))); let s3 = subgroupAdd(dot(c3, vec4(1.0)));
    let s4 = subgroupAdd(dot(c4, vec4(1.0))); let s5 = subgroupAdd(dot(c5, vec4(1.0)));
    let s6 = subgroupAdd(dot(c6, vec4(1.0))); let s7 = subgroupAdd(dot(c7, vec4(1.0)));
    if (lane == 0u && n0 < N) {
        C[n0] = s0; C[n0 + 1u] = s1; C[n0 + 2u] = s2; C[n0 + 3u] = s3;
        C[n0 + 4u] = s4; C[n0 + 5u] = s5; C[n0 + 6u] = s6; C[n0 + 7u] = s7;
    }
}

// 8 subgroups per workgroup, each the split8u body over its own 8 rows
@compute @workgroup_size(64)
fn split8x8_ssbo(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid & 7u;
    let n0 = (wid.x * 8u + (lid >> 3u)) * 8u;
    let b0 = min(n0, N - 1u) * K; let b1 = min(n0 + 1u, N - 1u) * K;
    let b2 = min(n0 + 2u, N - 1u) * K; let b3 = min(n0 + 3u, N - 1u) * K;
    let b5 = min(n0 + 5u, N - 1u) * K; let bq = min(n0 + 4u, N - 1u) * K;
    let b6 = min(n0 + 6u, N - 1u) * K; let b7 = min(n0 + 7u, N - 1u) * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = as4(k);
        c0 = fma(a, bs4(b0 + k), c0); c1 = fma(a, bs4(b1 + k), c1);
        c2 = fma(a, bs4(b2 + k), c2); c3 = fma(a, bs4(b3 + k), c3);
        c4 = fma(a, bs4(bq + k), c4); c5 = fma(a, bs4(b5 + k), c5);
        c6 = fma(a, bs4(b6 + k), c6); c7 = fma(a, bs4(b7 + k), c7);
    }
    let s0 = subgroupAdd(dot(c0, vec4(1.0))); let s1 = subgroupAdd(dot(c1, vec4(1.0)));
    let s2 = subgroupAdd(dot(c2, vec4(1.0))); let s3 = subgroupAdd(dot(c3, vec4(1.0)));
    let s4 = subgroupAdd(dot(c4, vec4(1.0))); let s5 = subgroupAdd(dot(c5, vec4(1.0)));
    let s6 = subgroupAdd(dot(c6, vec4(1.0))); let s7 = subgroupAdd(dot(c7, vec4(1.0)));
    if (lane == 0u && n0 < N) {
        C[n0] = s0; C[n0 + 1u] = s1; C[n0 + 2u] = s2; C[n0 + 3u] = s3;
        C[n0 + 4u] = s4; C[n0 + 5u] = s5; C[n0 + 6u] = s6; C[n0 + 7u] = s7;
    }
}

// 8 subgroups per workgroup, each the split8u body over its own 8 rows
@compute @workgroup_size(64)
fn split8x8_img(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid & 7u;
    let n0 = (wid.x * 8u + (lid >> 3u)) * 8u;
    let b0 = min(n0, N - 1u) * K; let b1 = min(n0 + 1u, N - 1u) * K;
    let b2 = min(n0 + 2u, N - 1u) * K; let b3 = min(n0 + 3u, N - 1u) * K;
    let b5 = min(n0 + 5u, N - 1u) * K; let bq = min(n0 + 4u, N - 1u) * K;
    let b6 = min(n0 + 6u, N - 1u) * K; let b7 = min(n0 + 7u, N - 1u) * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0); var c2 = vec4<f32>(0.0); var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0); var c5 = vec4<f32>(0.0); var c6 = vec4<f32>(0.0); var c7 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = ai4(k);
        c0 = fma(a, bi4(b0 + k), c0); c1 = fma(a, bi4(b1 + k), c1);
        c2 = fma(a, bi4(b2 + k), c2); c3 = fma(a, bi4(b3 + k), c3);
        c4 = fma(a, bi4(bq + k), c4); c5 = fma(a, bi4(b5 + k), c5);
        c6 = fma(a, bi4(b6 + k), c6); c7 = fma(a, bi4(b7 + k), c7);
    }
    let s0 = subgroupAdd(dot(c0, vec4(1.0))); let s1 = subgroupAdd(dot(c1, vec4(1.0)));
    let s2 = subgroupAdd(dot(c2, vec4(1.0))); let s3 = subgroupAdd(dot(c3, vec4(1.0)));
    let s4 = subgroupAdd(dot(c4, vec4(1.0))); let s5 = subgroupAdd(dot(c5, vec4(1.0)));
    let s6 = subgroupAdd(dot(c6, vec4(1.0))); let s7 = subgroupAdd(dot(c7, vec4(1.0)));
    if (lane == 0u && n0 < N) {
        C[n0] = s0; C[n0 + 1u] = s1; C[n0 + 2u] = s2; C[n0 + 3u] = s3;
        C[n0 + 4u] = s4; C[n0 + 5u] = s5; C[n0 + 6u] = s6; C[n0 + 7u] = s7;
    }
}

// floor: fetch every texel of B once, neighbouring lanes neighbouring texels, sum
@compute @workgroup_size(8)
fn fetch_only(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let base = wid.x * 8u * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < 8u * K; k += 64u) {
        c0 += b4(base + k);
        c1 += b4(base + k + 32u);
    }
    let s = subgroupAdd(dot(c0 + c1, vec4(1.0)));
    if (lane == 0u) { C[wid.x] = s; }
}
// the same floor from the storage texture: fetch every texel of B once, neighbouring lanes neighbouring texels, sum
@compute @workgroup_size(8)
fn fetch_only_img(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let base = wid.x * 8u * K;
    var c0 = vec4<f32>(0.0); var c1 = vec4<f32>(0.0);
    for (var k = 4u * lane; k < 8u * K; k += 64u) {
        c0 += bi4(base + k);
        c1 += bi4(base + k + 32u);
    }
    let s = subgroupAdd(dot(c0 + c1, vec4(1.0)));
    if (lane == 0u) { C[wid.x] = s; }
}

// split8x8_img with 16 rows per subgroup (x fetched once per 16 rows)
@compute @workgroup_size(64)
fn split16x8_img(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid & 7u;
    let n0 = (wid.x * 8u + (lid >> 3u)) * 16u;
    var b: array<u32, 16>;
    for (var r = 0u; r < 16u; r++) { b[r] = min(n0 + r, N - 1u) * K; }
    var c: array<vec4<f32>, 16>;
    for (var r = 0u; r < 16u; r++) { c[r] = vec4<f32>(0.0); }
    for (var k = 4u * lane; k < K; k += 32u) {
        let a = ai4(k);
        for (var r = 0u; r < 16u; r++) { c[r] = fma(a, bi4(b[r] + k), c[r]); }
    }
    for (var r = 0u; r < 16u; r++) {
        let s = subgroupAdd((c[r].x + c[r].y) + (c[r].z + c[r].w));
        if (lane == (r & 7u) && n0 + r < N) { C[n0 + r] = s; }
    }
}
"#;

const REPEAT: usize = 10;

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
    let texture = |data: &[f32]| {
        let texels = data.len().div_ceil(4);
        let rows = texels.div_ceil(4096) as u32;
        let mut padded = data.to_vec();
        padded.resize(rows as usize * 4096 * 4, 0.0);
        let tex = dev.create_texture(&wgpu::TextureDescriptor {
            label: None,
            size: wgpu::Extent3d {
                width: 4096,
                height: rows,
                depth_or_array_layers: 1,
            },
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
            wgpu::Extent3d {
                width: 4096,
                height: rows,
                depth_or_array_layers: 1,
            },
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
    let a = texture(&x);
    let b = texture(&w);
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
    let module = unsafe {
        dev.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(SRC.into()),
            },
            wgpu::ShaderRuntimeChecks::unchecked(),
        )
    };
    let constants = [("N", n as f64), ("K", k as f64)];
    for (entry, groups) in [
        ("fetch_only", n.div_ceil(8)),
        ("fetch_only_img", n.div_ceil(8)),
        ("split8", n.div_ceil(8)),
        ("split8u", n.div_ceil(8)),
        ("split8x8", n.div_ceil(64)),
        ("lane_row", n.div_ceil(8)),
        ("split8x8_ssbo", n.div_ceil(64)),
        ("split8x8_img", n.div_ceil(64)),
        ("split8u_img", n.div_ceil(8)),
        ("split16x8_img", n.div_ceil(128)),
    ] {
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                ..Default::default()
            },
            cache: None,
        });
        let layout = pipe.get_bind_group_layout(0);
        let mut entries = vec![];
        if entry.ends_with("_ssbo") {
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: a.1.as_entire_binding(),
            });
            entries.push(wgpu::BindGroupEntry {
                binding: 4,
                resource: b.1.as_entire_binding(),
            });
        } else if entry == "fetch_only_img" {
            entries.push(wgpu::BindGroupEntry {
                binding: 6,
                resource: wgpu::BindingResource::TextureView(&b.0),
            });
        } else if entry.ends_with("_img") {
            entries.push(wgpu::BindGroupEntry {
                binding: 5,
                resource: wgpu::BindingResource::TextureView(&a.0),
            });
            entries.push(wgpu::BindGroupEntry {
                binding: 6,
                resource: wgpu::BindingResource::TextureView(&b.0),
            });
        } else {
            if entry != "fetch_only" {
                entries.push(wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::TextureView(&a.0),
                });
            }
            entries.push(wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::TextureView(&b.0),
            });
        }
        entries.push(wgpu::BindGroupEntry {
            binding: 2,
            resource: out.as_entire_binding(),
        });
        let bg = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        });
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let mut enc = dev.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipe);
                pass.set_bind_group(0, &bg, &[]);
                // several dispatches per submission: the submission's own cost is not the kernel's
                for _ in 0..REPEAT {
                    pass.dispatch_workgroups(groups as u32, 1, 1);
                }
            }
            enc.copy_buffer_to_buffer(&out, 0, &readback, 0, out_size);
            let t = Instant::now();
            gpu.queue().submit([enc.finish()]);
            gpu.wait()?;
            best = best.min(t.elapsed().as_secs_f64() / REPEAT as f64);
        }
        let slice = readback.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        gpu.wait()?;
        let got: Vec<f32> = bytemuck::cast_slice(&slice.get_mapped_range().unwrap()).to_vec();
        readback.unmap();
        let err = if entry.starts_with("fetch_only") {
            f32::NAN
        } else {
            (0..n)
                .map(|i| (got[i] - reference[i]).abs())
                .fold(0.0, f32::max)
        };
        let gb = (n * k * 4) as f64 / best / 1e9;
        println!(
            "{entry:>10}: {:.2} ms, {gb:.1} GB/s, max err {err:.2e}",
            best * 1e3
        );
    }
    Ok(())
}
