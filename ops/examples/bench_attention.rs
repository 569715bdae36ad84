//! Benchmark rows for the attention, fused cross-entropy and pooling kernels:
//! `cargo run -p ops --example bench_attention [-- quick]`.
//!
//! Prints time, GFLOP/s and the ratio to the adapter's FMA peak, measured in the same run by a
//! pure-FMA kernel. FLOPs are the useful ones: attention counts only visible (query, key) pairs
//! (causal: half), forward 4·d per pair and backward 10·d per pair (the FlashAttention
//! convention; the kernels execute 18·d per pair in backward because dQ and dK/dV each
//! recompute the scores); cross-entropy counts its three matmuls (logits, dHidden, dWeight) at
//! 2·N·V·H each (the backward's logits recompute is extra work, not counted).

use std::time::Instant;

use anyhow::Result;
use ops::gpu::attention::AttentionGrads;
use ops::gpu::cross_entropy::CrossEntropyArgs;
use ops::gpu::{DType, Gpu, Recorder, Shader};
use ops::reference::attention::{AttentionDims, AttentionMask};

/// Seconds of the best of `reps` runs of `record` (one submit each, waited).
fn time_it(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Recorder) -> Result<()>,
) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let mut rec = Recorder::new(gpu);
        record(&mut rec)?;
        let start = Instant::now();
        rec.submit_and_wait()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn fma_peak_gflops(gpu: &Gpu) -> Result<f64> {
    let threads = 64 * 256u32;
    let iters = 4096u32;
    let out = gpu.empty(&[threads as usize * 4], DType::F32)?;
    let kernel = gpu.kernel(&Shader::compose("bench", &[])?, "fma_peak", &[])?;
    let params = [iters, 0, 0, 0];
    let secs = time_it(gpu, 3, |rec| {
        rec.dispatch(
            &kernel,
            bytemuck::cast_slice(&params),
            &[out.view()?],
            [threads / 64, 1, 1],
        );
        Ok(())
    })?;
    // 8 vec4 FMAs per iteration = 64 flops
    Ok(threads as f64 * iters as f64 * 64.0 / secs / 1e9)
}

fn row(name: &str, secs: f64, flops: f64, peak: f64) {
    let gflops = flops / secs / 1e9;
    println!(
        "| {name} | {:.3} s | {gflops:.2} | {:.1}% |",
        secs,
        100.0 * gflops / peak
    );
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "quick");
    let gpu = Gpu::get()?;
    println!(
        "adapter: {} ({:?})",
        gpu.adapter_info().name,
        gpu.adapter_info().backend
    );
    let peak = fma_peak_gflops(gpu)?;
    println!("FMA peak: {peak:.1} GFLOP/s\n");
    println!("| kernel | time | GFLOP/s | of FMA peak |\n|---|---|---|---|");

    // The first use of a pipeline compiles it (seconds to minutes on llvmpipe): warm every
    // pipeline up on a tiny problem with the same constants before timing anything.
    // Env `RUNNER_BENCH_SEQS` (e.g. `1024`) and `RUNNER_BENCH_CE` (`TOKENSxHIDDENxVOCAB`)
    // replace the default sizes: the full ones take hours on a 2-core lavapipe.
    let env_list = |name: &str, sep: char| -> Option<Vec<usize>> {
        let v = std::env::var(name).ok()?;
        Some(
            v.split(sep)
                .map(|x| x.trim().parse().expect("a list of integers"))
                .collect(),
        )
    };
    let seqs: Vec<usize> = match env_list("RUNNER_BENCH_SEQS", ',') {
        Some(v) => [16].into_iter().chain(v).collect(),
        None if quick => vec![16, 256],
        None => vec![16, 1024, 4096],
    };
    for &seq in &seqs {
        let warmup = seq == 16;
        let d = AttentionDims {
            batch: 1,
            seq,
            q_heads: 8,
            kv_heads: 4,
            head_dim: 256,
        };
        let fill = |n: usize, salt: f32| -> Result<_> {
            let data: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.618 + salt).fract() - 0.5) * 2.0)
                .collect();
            gpu.upload_f32(&[n], &data)
        };
        let (q, k, v, d_out) = (
            fill(d.q_len(), 0.1)?,
            fill(d.kv_len(), 0.2)?,
            fill(d.kv_len(), 0.3)?,
            fill(d.q_len(), 0.4)?,
        );
        let (out, lse) = (
            gpu.empty(&[d.q_len()], DType::F32)?,
            gpu.empty(&[d.lse_len()], DType::F32)?,
        );
        let (dq, dk, dv) = (
            gpu.empty(&[d.q_len()], DType::F32)?,
            gpu.empty(&[d.kv_len()], DType::F32)?,
            gpu.empty(&[d.kv_len()], DType::F32)?,
        );
        let mask = gpu.attention_mask(
            &d,
            &AttentionMask {
                causal: true,
                ..Default::default()
            },
        )?;
        let pairs = (seq * (seq + 1) / 2 * d.q_heads) as f64;
        let scale = 0.0625;
        let fwd = time_it(gpu, 1, |rec| {
            gpu.attention_forward(rec, &q, &k, &v, &mask, scale, &out, &lse)
        })?;
        let grads = AttentionGrads {
            q: &q,
            k: &k,
            v: &v,
            out: &out,
            lse: &lse,
            d_out: &d_out,
        };
        let bwd = time_it(gpu, 1, |rec| {
            gpu.attention_backward(rec, &grads, &mask, scale, &dq, &dk, &dv)
        })?;
        if warmup {
            continue;
        }
        let name = format!("attention causal T={seq} 8x256 (GQA 2)");
        row(&format!("{name} fwd"), fwd, 4.0 * 256.0 * pairs, peak);
        row(&format!("{name} bwd"), bwd, 10.0 * 256.0 * pairs, peak);
        row(
            &format!("{name} fwd+bwd"),
            fwd + bwd,
            14.0 * 256.0 * pairs,
            peak,
        );
    }

    let sizes: Vec<(usize, usize, usize)> = match env_list("RUNNER_BENCH_CE", 'x') {
        Some(v) => vec![(8, 8, 64), (v[0], v[1], v[2])],
        None if quick => vec![(8, 8, 64), (64, 256, 16_384)],
        None => vec![(8, 8, 64), (512, 2560, 262_208)],
    };
    for &(tokens, hidden, vocab) in &sizes {
        let warmup = tokens == 8;
        let fill = |shape: &[usize], salt: f32| -> Result<_> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|i| ((i as f32 * 0.618 + salt).fract() - 0.5) * 0.1)
                .collect();
            gpu.upload_f32(shape, &data)
        };
        let hidden_t = fill(&[tokens, hidden], 0.1)?;
        let weight = fill(&[vocab, hidden], 0.2)?;
        let d_weight = gpu.empty(&[vocab, hidden], DType::F32)?;
        let labels: Vec<i32> = (0..tokens).map(|i| ((i * 7919) % vocab) as i32).collect();
        let labels = gpu.upload_labels(&labels, vocab)?;
        let d_hidden = gpu.empty(&[tokens, hidden], DType::F32)?;
        let totals = gpu.empty(&[4], DType::U32)?;
        let args = CrossEntropyArgs {
            hidden: &hidden_t,
            weight: &weight,
            labels: &labels,
            grad_scale: 1.0 / tokens as f32,
            d_hidden: &d_hidden,
            d_weight: Some(&d_weight),
            totals: &totals,
        };
        let secs = time_it(gpu, 1, |rec| gpu.lm_head_cross_entropy(rec, &args))?;
        if warmup {
            continue;
        }
        let flops = 3.0 * 2.0 * (tokens * vocab * hidden) as f64;
        row(
            &format!("lm_head+CE N={tokens} V={vocab} H={hidden} (loss, dH, dW)"),
            secs,
            flops,
            peak,
        );
        let stats = gpu.read_cross_entropy_totals(&totals)?;
        println!(
            "\n(cross-entropy check: mean loss {:.4} over {} tokens)",
            stats.loss_sum / stats.counted as f64,
            stats.counted
        );
    }
    Ok(())
}
