//! GPU kernel benchmark: `cargo run -p ops --example gpu_bench` (add `--release` for a faster
//! host side; GPU time is what is measured). Prints time, GFLOP/s and the ratio to this
//! adapter's FMA peak measured in the same run by a pure-FMA kernel, and — when python3 with
//! numpy is found (`RUNNER_BENCH_PYTHON`, else /work/venv/bin/python, else python3) — the ratio
//! to numpy's (OpenBLAS) matmul on the same shapes. Env: `RUNNER_BENCH_REPS` (default 3),
//! `RUNNER_BENCH_SHAPES` (e.g. `1024x1024x1024,512x10240x2560`: M x N x K), `RUNNER_MATMUL_TILE`.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use bytemuck::{Pod, Zeroable};
use ops::gpu::testing::TestRng;
use ops::gpu::{groups_1d, DType, Gpu, MatmulOpts, MatmulPrecision, Recorder, Shader};

#[path = "support/bench_json.rs"]
mod bench_json;
use ops::reference::nf4 as nf4_ref;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FmaParams {
    iters: u32,
    _pad: [u32; 3],
}

/// Median GPU seconds of `reps` runs of `record` (timestamps when available, else wall clock
/// around submit-and-wait).
fn time_it(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Recorder) -> Result<()>,
) -> Result<f64> {
    // Warm-up compiles the pipeline.
    let mut rec = Recorder::new(gpu);
    record(&mut rec)?;
    rec.submit_and_wait()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let mut rec = Recorder::timed(gpu);
        record(&mut rec)?;
        let start = Instant::now();
        let timed = rec.submit_timed()?;
        let wall = start.elapsed().as_secs_f64();
        times.push(match timed {
            Some(t) if !t.is_empty() => t.iter().map(|k| k.seconds).sum(),
            _ => wall,
        });
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(times[times.len() / 2])
}

fn fma_peak(gpu: &Gpu, reps: usize) -> Result<f64> {
    let kernel = gpu.kernel(&Shader::compose("bench", &[])?, "fma_peak", &[])?;
    let invocations = 64 * 1024usize;
    let iters = 4096u32;
    let sink = gpu.empty(&[invocations], DType::F32)?;
    let params = FmaParams {
        iters,
        _pad: [0; 3],
    };
    let secs = time_it(gpu, reps, |rec| {
        rec.dispatch(
            &kernel,
            bytemuck::bytes_of(&params),
            &[sink.view()?],
            groups_1d(gpu, (invocations / 64) as u32),
        );
        Ok(())
    })?;
    let flops = invocations as f64 * iters as f64 * 8.0 * 4.0 * 2.0;
    Ok(flops / secs / 1e9)
}

fn numpy_gflops(shapes: &[(usize, usize, usize)], reps: usize) -> Option<Vec<f64>> {
    let python = std::env::var("RUNNER_BENCH_PYTHON").ok().or_else(|| {
        if std::path::Path::new("/work/venv/bin/python").exists() {
            Some("/work/venv/bin/python".into())
        } else {
            Some("python3".into())
        }
    })?;
    let list = shapes
        .iter()
        .map(|(m, n, k)| format!("({m},{n},{k})"))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "import numpy as np, time\nfor m,n,k in [{list}]:\n    a=np.random.rand(m,k).astype(np.float32); b=np.random.rand(n,k).astype(np.float32)\n    a@b.T\n    ts=[]\n    for _ in range({reps}):\n        t=time.perf_counter(); a@b.T; ts.append(time.perf_counter()-t)\n    ts.sort(); print(2*m*n*k/ts[len(ts)//2]/1e9)\n"
    );
    let out = Command::new(python).arg("-c").arg(script).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let v: Vec<f64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    (v.len() == shapes.len()).then_some(v)
}

fn main() -> Result<()> {
    let gpu = Gpu::get()?;
    let reps: usize = std::env::var("RUNNER_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let shapes: Vec<(usize, usize, usize)> = match std::env::var("RUNNER_BENCH_SHAPES") {
        Ok(v) => v
            .split(',')
            .map(|s| {
                let d: Vec<usize> = s
                    .split('x')
                    .map(|x| x.trim().parse().expect("MxNxK"))
                    .collect();
                (d[0], d[1], d[2])
            })
            .collect(),
        // M x N x K: square, and a Gemma-3-4B MLP up-projection (512 tokens, 2560 → 10240).
        Err(_) => vec![(1024, 1024, 1024), (2048, 2048, 2048), (512, 10240, 2560)],
    };
    let info = gpu.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}), tiling {:?}",
        info.name,
        info.device_type,
        info.backend,
        gpu.tiling()
    );
    let peak = fma_peak(gpu, reps)?;
    println!("measured FMA peak: {peak:.1} GFLOP/s\n");
    let numpy = numpy_gflops(&shapes, reps);
    println!("| kernel | M×N×K | time ms | GFLOP/s | % of FMA peak | vs numpy |");
    println!("|---|---|---|---|---|---|");
    let mut rng = TestRng::new(42);
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let flops = 2.0 * m as f64 * n as f64 * k as f64;
        let a = gpu.upload_f32(&[m, k], &rng.vec_normal(m * k))?;
        let w_host = rng.vec_normal(n * k);
        let w = gpu.upload_f32(&[n, k], &w_host)?;
        let c = gpu.empty(&[m, n], DType::F32)?;
        let f32_secs = time_it(gpu, reps, |rec| {
            gpu.matmul(
                rec,
                &a,
                &w,
                &c,
                MatmulOpts {
                    trans_b: true,
                    ..Default::default()
                },
            )
        })
        .context("f32 matmul")?;
        let (packed, absmax) = nf4_ref::quantize_nf4(&w_host, 64);
        let wq = gpu.upload_nf4(&packed, &absmax, [n, k], 64)?;
        let nf4_secs = time_it(gpu, reps, |rec| {
            gpu.matmul_nf4(
                rec,
                &a,
                &wq,
                &c,
                MatmulOpts {
                    trans_b: true,
                    ..Default::default()
                },
            )
        })
        .context("nf4 matmul")?;
        // f16 operands, f32 accumulation (matmul_precision = "f16"), where the adapter has them
        let f16_secs = if gpu.features().contains(wgpu::Features::SHADER_F16) {
            Some(
                time_it(gpu, reps, |rec| {
                    gpu.matmul(
                        rec,
                        &a,
                        &w,
                        &c,
                        MatmulOpts {
                            trans_b: true,
                            precision: MatmulPrecision::F16,
                            ..Default::default()
                        },
                    )
                })
                .context("f16 matmul")?,
            )
        } else {
            None
        };
        let mut rows = vec![
            ("matmul f32 x·Wᵀ", "f32", f32_secs),
            ("matmul NF4 fused x·Wᵀ", "nf4", nf4_secs),
        ];
        rows.extend(f16_secs.map(|s| ("matmul f16 operands x·Wᵀ", "f16", s)));
        for (name, kind, secs) in rows {
            bench_json::record(&serde_json::json!({
                "bench": "matmul", "kernel": kind, "m": m, "n": n, "k": k,
                "ms": secs * 1e3, "adapter": info.name,
            }));
            let gf = flops / secs / 1e9;
            let vs_numpy = numpy
                .as_ref()
                .map_or("n/a".to_string(), |v| format!("{:.3}", gf / v[i]));
            println!(
                "| {name} | {m}×{n}×{k} | {:.1} | {gf:.2} | {:.1}% | {vs_numpy} |",
                secs * 1e3,
                100.0 * gf / peak
            );
        }
        println!(
            "| (NF4 / f32 time) | {m}×{n}×{k} | {:.2}× | | | |",
            nf4_secs / f32_secs
        );
    }
    if let Some(v) = &numpy {
        for (&(m, n, k), g) in shapes.iter().zip(v) {
            println!("numpy (OpenBLAS) {m}×{n}×{k}: {g:.1} GFLOP/s");
        }
    } else {
        println!("numpy not available: no comparison");
    }
    Ok(())
}
