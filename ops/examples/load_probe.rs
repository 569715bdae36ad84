//! Probe: the cost of a subgroup-wide vec4 load on this adapter from a storage buffer, a
//! sampled texture and a read-only storage texture, per-lane and uniform addresses, with and
//! without wgpu's bounds checks: `cargo run --release -p ops --example load_probe`. It is why
//! CPU adapters stage matmul operands in storage textures (`ops::gpu::staging`); the
//! `gemv_probe` example measures the same loads inside a decode-shaped product.
use anyhow::Result;
use ops::gpu::Gpu;

#[path = "support/probe.rs"]
mod probe;

const SRC: &str = r#"
@group(0) @binding(0) var<storage, read> buf: array<vec4<f32>>;
@group(0) @binding(1) var tex: texture_2d<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(3) var img: texture_storage_2d<rgba32float, read>;

const ITERS: u32 = 4096u;

@compute @workgroup_size(8, 1, 1)
fn ssbo_lane(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0);
    let base = wg.x * 64u;
    for (var i = 0u; i < ITERS; i += 2u) {
        s0 += buf[(base + i * 8u + lane) & 262143u];
        s1 += buf[(base + i * 8u + 8u + lane) & 262143u];
    }
    out[wg.x * 8u + lane] = s0 + s1;
}

@compute @workgroup_size(8, 1, 1)
fn ssbo_uniform(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0);
    let base = wg.x * 64u;
    for (var i = 0u; i < ITERS; i += 2u) {
        s0 += buf[(base + i) & 262143u];
        s1 += buf[(base + i + 1u) & 262143u];
    }
    out[wg.x * 8u + lane] = s0 + s1;
}

@compute @workgroup_size(8, 1, 1)
fn tex_lane(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0);
    let base = wg.x * 64u;
    for (var i = 0u; i < ITERS; i += 2u) {
        let e0 = (base + i * 8u + lane) & 262143u;
        let e1 = (base + i * 8u + 8u + lane) & 262143u;
        s0 += textureLoad(tex, vec2<u32>(e0 & 511u, e0 >> 9u), 0);
        s1 += textureLoad(tex, vec2<u32>(e1 & 511u, e1 >> 9u), 0);
    }
    out[wg.x * 8u + lane] = s0 + s1;
}

@compute @workgroup_size(8, 1, 1)
fn img_lane(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0);
    let base = wg.x * 64u;
    for (var i = 0u; i < ITERS; i += 2u) {
        let e0 = (base + i * 8u + lane) & 262143u;
        let e1 = (base + i * 8u + 8u + lane) & 262143u;
        s0 += textureLoad(img, vec2<u32>(e0 & 511u, e0 >> 9u));
        s1 += textureLoad(img, vec2<u32>(e1 & 511u, e1 >> 9u));
    }
    out[wg.x * 8u + lane] = s0 + s1;
}

@compute @workgroup_size(8, 1, 1)
fn tex_uniform(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    var s0 = vec4<f32>(0.0); var s1 = vec4<f32>(0.0);
    let base = wg.x * 64u;
    for (var i = 0u; i < ITERS; i += 2u) {
        let e0 = (base + i) & 262143u;
        let e1 = (base + i + 1u) & 262143u;
        s0 += textureLoad(tex, vec2<u32>(e0 & 511u, e0 >> 9u), 0);
        s1 += textureLoad(tex, vec2<u32>(e1 & 511u, e1 >> 9u), 0);
    }
    out[wg.x * 8u + lane] = s0 + s1;
}
"#;

fn main() -> Result<()> {
    let gpu = Gpu::get()?;
    let dev = gpu.device();
    let texels = 512u32 * 512;
    let buf = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: texels as u64 * 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let out = dev.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 4096 * 8 * 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let tex = dev.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size: wgpu::Extent3d {
            width: 512,
            height: 512,
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
    let view = tex.create_view(&Default::default());
    let module = dev.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: None,
        source: wgpu::ShaderSource::Wgsl(SRC.into()),
    });
    let trusted = unsafe {
        dev.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(SRC.into()),
            },
            wgpu::ShaderRuntimeChecks::unchecked(),
        )
    };
    let groups = 4096u32;
    for (module, entry) in [
        (&module, "ssbo_lane"),
        (&module, "ssbo_uniform"),
        (&module, "tex_lane"),
        (&module, "tex_uniform"),
        (&module, "img_lane"),
        (&trusted, "ssbo_lane"),
        (&trusted, "ssbo_uniform"),
        (&trusted, "tex_lane"),
    ] {
        let pipe = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let layout = pipe.get_bind_group_layout(0);
        let mut entries = vec![];
        if entry.starts_with("ssbo") {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: buf.as_entire_binding(),
            });
        } else if entry.starts_with("img") {
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: wgpu::BindingResource::TextureView(&view),
            });
        } else {
            entries.push(wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::TextureView(&view),
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
        let best = probe::seconds_per_dispatch(gpu, &pipe, &bg, groups, 1, 3)?;
        let loads = groups as f64 * 4096.0; // subgroup-wide vec4 loads
                                            // llvmpipe runs workgroups on every core
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let checks = if std::ptr::eq(module, &trusted) {
            "unchecked"
        } else {
            "checked"
        };
        println!(
            "{entry} ({checks}): {:.3} s, {:.1} ns per subgroup vec4 load per core",
            best,
            best / loads * 1e9 * cores
        );
    }
    Ok(())
}
