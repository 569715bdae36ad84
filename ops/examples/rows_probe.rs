//! Probe: the engine's decode-shaped products (one row x times Wᵀ, W [N, K] a frozen weight
//! kept staged as during generation, so the rows kernels run) on the bench model's shapes:
//! the output embedding (32768 x 640), down_proj (640 x 2048) and o_proj (640 x 1024), W in
//! bf16 and f32. For each, the best time per product of submissions of 21 products:
//!
//! - `hot`: the same W each time (what a loop of one product measures: W stays in the caches
//!   as far as it fits);
//! - `cold`: three weights of the shape in turn, as a decode step reads each weight once
//!   between reads of the others (the bench model's 90 MB step missed this machine's share of
//!   the caches);
//!
//! in the layout the engine keeps W in (row blocks where K allows) and, from a second run of
//! this probe with `RUNNER_ROW_BLOCKS=0`, in the linear layout, with the ratio; and the
//! largest error of the first rows against an f64 product of the values W holds.
//!
//! `cargo run --release -p ops --example rows_probe`
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use ops::gpu::{DType, Gpu, GpuTensor, MatmulOpts, Recorder};

const SHAPES: [(usize, usize, DType); 5] = [
    (32768, 640, DType::BF16),
    (640, 2048, DType::BF16),
    (640, 1024, DType::BF16),
    (32768, 640, DType::F32),
    (640, 2048, DType::F32),
];

/// Best seconds per product of `rounds` submissions of 21 products, cycling through `ws`.
fn best_of(
    gpu: &Gpu,
    a: &GpuTensor,
    ws: &[&GpuTensor],
    c: &GpuTensor,
    rounds: usize,
) -> Result<f64> {
    let opts = MatmulOpts {
        trans_b: true,
        frozen_b: true,
        ..Default::default()
    };
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let mut rec = Recorder::new(gpu);
        for i in 0..21 {
            gpu.matmul(&mut rec, a, ws[i % ws.len()], c, opts)?;
        }
        let t = Instant::now();
        rec.submit_and_wait()?;
        best = best.min(t.elapsed().as_secs_f64() / 21.0);
    }
    Ok(best)
}

/// (hot, cold) milliseconds per shape, and the largest error, in this process's layout.
fn measure() -> Result<Vec<(f64, f64, f64)>> {
    let gpu = Gpu::get()?;
    let _hold = gpu.hold_staged_weights();
    let mut rng = ops::gpu::testing::TestRng::new(1);
    let mut out = Vec::new();
    for (n, k, dtype) in SHAPES {
        let x = rng.vec_normal(k);
        let wv = rng.vec_normal(n * k);
        let a = gpu.upload_f32(&[1, k], &x)?;
        let w = gpu.upload_f32_as(&[n, k], &wv, dtype)?;
        let others = [
            gpu.upload_f32_as(&[n, k], &rng.vec_normal(n * k), dtype)?,
            gpu.upload_f32_as(&[n, k], &rng.vec_normal(n * k), dtype)?,
        ];
        let c = gpu.upload_f32(&[1, n], &vec![0.0; n])?;
        let hot = best_of(gpu, &a, &[&w], &c, 15)?;
        // the last of the 21 products is w's
        let cold = best_of(gpu, &a, &[&others[0], &others[1], &w], &c, 10)?;
        let got = gpu.read_f32(&c)?;
        let wb = gpu.read_f32(&w)?;
        let err = (0..n.min(512))
            .map(|r| {
                let want: f64 = (0..k).map(|j| x[j] as f64 * wb[r * k + j] as f64).sum();
                (got[r] as f64 - want).abs()
            })
            .fold(0.0, f64::max);
        out.push((hot * 1e3, cold * 1e3, err));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let rows = measure()?;
    if std::env::var_os("RUNNER_ROW_BLOCKS").is_some() {
        // the child run: one line per shape for the parent
        for (hot, cold, err) in rows {
            println!("{hot} {cold} {err}");
        }
        return Ok(());
    }
    let child = Command::new(std::env::current_exe()?)
        .env("RUNNER_ROW_BLOCKS", "0")
        .output()
        .context("running the probe again with RUNNER_ROW_BLOCKS=0")?;
    let text = String::from_utf8_lossy(&child.stdout);
    let linear: Vec<Vec<f64>> = text
        .lines()
        .map(|l| l.split(' ').filter_map(|v| v.parse().ok()).collect())
        .collect();
    println!("{}", Gpu::get()?.describe().lines().next().unwrap_or(""));
    println!(
        "{:<18} {:>9} {:>9} {:>11} {:>11} {:>9}  max err",
        "W", "hot ms", "cold ms", "linear hot", "linear cold", "cold x"
    );
    for (i, ((n, k, dtype), (hot, cold, err))) in SHAPES.iter().zip(rows).enumerate() {
        let (lh, lc) = linear
            .get(i)
            .filter(|v| v.len() == 3)
            .map_or((f64::NAN, f64::NAN), |v| (v[0], v[1]));
        println!(
            "{:<18} {hot:>9.3} {cold:>9.3} {lh:>11.3} {lc:>11.3} {:>9.2}  {err:.2e}",
            format!("{n} x {k} {dtype:?}"),
            lc / cold
        );
    }
    Ok(())
}
