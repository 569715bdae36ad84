//! Probe: the engine's decode-shaped products (one row x times Wᵀ, W [N, K] a frozen weight
//! kept staged as during generation, so the rows kernels run) on the bench model's shapes:
//! the output embedding (32768 x 640), down_proj (640 x 2048) and o_proj (640 x 1024), W in
//! bf16 and f32. Prints the best time per product of 15 submissions of 20, and the largest
//! error of the first rows against an f64 product of the values W holds.
//!
//! `cargo run --release -p ops --example rows_probe`
use std::time::Instant;

use anyhow::Result;
use ops::gpu::{DType, Gpu, MatmulOpts, Recorder};

fn main() -> Result<()> {
    let gpu = Gpu::get()?;
    let _hold = gpu.hold_staged_weights();
    let mut rng = ops::gpu::testing::TestRng::new(1);
    let shapes = [
        (32768usize, 640usize, DType::BF16),
        (640, 2048, DType::BF16),
        (640, 1024, DType::BF16),
        (32768, 640, DType::F32),
        (640, 2048, DType::F32),
    ];
    for (n, k, dtype) in shapes {
        let x = rng.vec_normal(k);
        let wv = rng.vec_normal(n * k);
        let a = gpu.upload_f32(&[1, k], &x)?;
        let w = gpu.upload_f32_as(&[n, k], &wv, dtype)?;
        let c = gpu.upload_f32(&[1, n], &vec![0.0; n])?;
        let opts = MatmulOpts {
            trans_b: true,
            frozen_b: true,
            ..Default::default()
        };
        let mut best = f64::INFINITY;
        for _ in 0..15 {
            let mut rec = Recorder::new(gpu);
            for _ in 0..20 {
                gpu.matmul(&mut rec, &a, &w, &c, opts)?;
            }
            let t = Instant::now();
            rec.submit_and_wait()?;
            best = best.min(t.elapsed().as_secs_f64() / 20.0);
        }
        let got = gpu.read_f32(&c)?;
        let wb = gpu.read_f32(&w)?;
        let err = (0..n.min(512))
            .map(|r| {
                let want: f64 = (0..k).map(|j| x[j] as f64 * wb[r * k + j] as f64).sum();
                (got[r] as f64 - want).abs()
            })
            .fold(0.0, f64::max);
        println!(
            "{n} x {k} {dtype:?}: {:.3} ms, max err {err:.2e}",
            best * 1e3
        );
    }
    Ok(())
}
