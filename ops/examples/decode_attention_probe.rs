//! Probe: decode attention alone on the bench model's shapes (batch 1, 4 query heads over 1 KV
//! head, head_dim 256; a sliding layer's 128-key window in its ring, and a full layer at
//! position 319), timed per dispatch as the best of 8 submissions of 50, with the time of the
//! two cache stagings a step records on adapters that stage operands (included in the first
//! figure). Prints the first outputs so that variants can be compared by eye; the tests in
//! `gpu::kernels::decode_attention` are the check.
//!
//! `cargo run --release -p ops --example decode_attention_probe`

use std::time::Instant;

use anyhow::Result;
use ops::gpu::kernels::decode_attention::DecodeShape;
use ops::gpu::staging::StageFormat;
use ops::gpu::{Gpu, Recorder};

const SUBMISSIONS: usize = 8;
const PER_SUBMISSION: usize = 50;

/// Seconds per repetition of `record`: the best of SUBMISSIONS submissions.
fn time_it(gpu: &Gpu, mut record: impl FnMut(&mut Recorder) -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..SUBMISSIONS {
        let mut rec = Recorder::new(gpu);
        for _ in 0..PER_SUBMISSION {
            record(&mut rec)?;
        }
        let t = Instant::now();
        rec.submit_and_wait()?;
        best = best.min(t.elapsed().as_secs_f64() / PER_SUBMISSION as f64);
    }
    Ok(best)
}

fn main() -> Result<()> {
    let gpu = Gpu::get()?;
    let mut rng = ops::gpu::testing::TestRng::new(1);
    let (heads, head_dim) = (4usize, 256usize);
    for (window, capacity, pos) in [(128usize, 128usize, 319usize), (0, 384, 319)] {
        let s = DecodeShape {
            batch: 1,
            heads,
            kv_heads: 1,
            head_dim,
            capacity,
            pos,
            window,
            scale: 1.0 / 16.0,
        };
        let q = gpu.upload_f32(&[1, heads, head_dim], &rng.vec_normal(heads * head_dim))?;
        let cache = [1, 1, capacity, head_dim];
        let k = gpu.upload_f32(&cache, &rng.vec_normal(capacity * head_dim))?;
        let v = gpu.upload_f32(&cache, &rng.vec_normal(capacity * head_dim))?;
        let start = gpu.upload_u32(&[1], &[0])?;
        let out = gpu.upload_f32(&[1, heads, head_dim], &vec![0.0; heads * head_dim])?;
        let attention = time_it(gpu, |rec| {
            gpu.decode_attention(rec, &s, &q, &k, &v, &start, &out)
        })?;
        let stagings = time_it(gpu, |rec| {
            rec.stage(1, &k.view()?, StageFormat::F32);
            rec.stage(2, &v.view()?, StageFormat::F32);
            Ok(())
        })?;
        let got = gpu.read_f32(&out)?;
        let kind = if window == 0 { "full" } else { "sliding" };
        println!(
            "{kind} (window {window}, capacity {capacity}, position {pos}): {:.1} us per dispatch, of which the two cache stagings {:.1} us; out[0..2] {:?}",
            attention * 1e6,
            stagings * 1e6,
            &got[..2]
        );
    }
    Ok(())
}
