//! Issue 7's benchmark: `lora-train`'s step (forward + backward of one micro-batch, gradient
//! norm and clipping, AdamW) on a small Gemma-3-shaped model
//! (recipes/configs/bench-small-gemma-3.config.json: text hidden 640, 4 layers, 4 heads × 256,
//! 1 KV head, vocab 32768; SigLIP 224 px, patch 14, 4 layers × 384; 64 image tokens), random
//! f32 weights, the guide's LoRA (r 16, α 16, dropout 0.05, all-linear, lm_head + embed_tokens
//! saved), batch 1 of SEQ tokens holding one image. Prints step time, tokens/s and peak device
//! memory with and without gradient checkpointing, the per-kernel time breakdown (timestamp
//! queries, without checkpointing), and PyTorch + PEFT on the CPU on the same config measured in
//! the same run by tools/bench/train_baseline.py ("skipped" without python3 + torch).
//!
//! `cargo run --release -p ops --example train_bench -- [SEQ=512] [STEPS=3]`
//!
//! Any config, at scale: `train_bench --config FILE [--seq N=512] [--images K=1] [--steps S=1]
//! [--nf4] [--checkpointing] [--bf16]` builds random weights of that config's shape (bf16, written in
//! shards), quantizes them to NF4 with the quantize op's own code (`--nf4`: double quant, as the
//! guide), attaches the guide's LoRA and runs S steps of batch 1 × N tokens holding K images.
//! It prints the plan, the step time and the engine's measured peak, and as its last line
//! `4b step: S s, peak device X GiB, plan Y GiB` (never needs the Hub). With
//! recipes/configs/gemma-3-4b-it.config.json this is the full-size step: tens of minutes on 2
//! cores, by hand only.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use ops::data::collate::Batch;
use ops::gpu::{DType, Gpu, Recorder};
use ops::model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use ops::model::{ModelConfig, Weights};
use ops::train::lora_init::{new_adapter, LoraOptions, TargetSpec};
use ops::train::model::TrainModel;
use ops::train::optimizer::{record_norm_and_clip, zero_grads, AdamWConfig, GpuAdamW};

/// The guide's LoraConfig: r 16, alpha 16, dropout 0.05, all-linear, lm_head and embed_tokens
/// in modules_to_save (what both benchmark modes train).
fn guide_lora() -> LoraOptions {
    LoraOptions {
        r: 16,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        target_modules: TargetSpec::AllLinear,
        modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
        use_rslora: false,
        seed: 42,
    }
}

#[path = "train_bench/at_scale.rs"]
mod at_scale;
#[path = "support/bench_json.rs"]
mod bench_json;

const CONFIG: &str = include_str!("../../recipes/configs/bench-small-gemma-3.config.json");

/// Writes `config.json` and a `model.safetensors` of random weights (canonical transformers 5
/// names, f32) for `config_json` into `dir`: N(0, 0.02) matrices and embeddings, zero biases,
/// Gemma RMSNorm weights 0 (they scale by 1 + w), SigLIP LayerNorm weights 1.
fn write_random_model(config_json: &str, dir: &std::path::Path, seed: u64) -> anyhow::Result<()> {
    use ops::model::names::expected_tensors;
    let config = ModelConfig::from_json(config_json)?;
    std::fs::write(dir.join("config.json"), config_json)?;
    let mut rng = ops::gpu::testing::TestRng::new(seed);
    let mut tensors = Vec::new();
    for e in expected_tensors(&config)
        .into_iter()
        .filter(|e| !e.optional)
    {
        let n = e.numel();
        let values: Vec<f32> = if e.name.ends_with(".bias") {
            vec![0.0; n]
        } else if e.name.contains("layer_norm") || e.name.contains("post_layernorm") {
            vec![1.0; n]
        } else if e.name.ends_with("norm.weight") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| rng.normal() * 0.02).collect()
        };
        tensors.push((e.name, e.shape, values));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, v)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytemuck::cast_slice(v),
                )
                .expect("shape matches"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

/// One example of `seq` tokens: BOS, a boi + image soft tokens + eoi block, then text.
fn batch(config: &ModelConfig, seq: usize) -> Batch {
    let ModelConfig::ConditionalGeneration(g) = config else {
        panic!("the bench config is multimodal")
    };
    let mm = g.mm_tokens_per_image;
    let mut ids: Vec<i64> = (0..seq).map(|i| 10 + (i as i64 * 7919) % 30000).collect();
    ids[0] = 2;
    ids[4] = g.boi_token_index;
    for id in &mut ids[5..5 + mm] {
        *id = g.image_token_index;
    }
    ids[5 + mm] = g.eoi_token_index;
    let token_type_ids: Vec<i64> = ids
        .iter()
        .map(|&i| (i == g.image_token_index) as i64)
        .collect();
    let labels: Vec<i64> = ids
        .iter()
        .zip(&token_type_ids)
        .map(|(&i, &t)| {
            if t == 1 || i == g.boi_token_index {
                -100
            } else {
                i
            }
        })
        .collect();
    let side = g.vision_config.image_size();
    let pixel_values = (0..3 * side * side)
        .map(|i| ((i % 255) as f32 / 127.5) - 1.0)
        .collect();
    Batch {
        batch_size: 1,
        seq_len: seq,
        input_ids: ids,
        attention_mask: vec![1; seq],
        token_type_ids,
        labels,
        pixel_values,
        num_images: 1,
        image_height: side,
        image_width: side,
        images_per_sample: vec![1],
        rows: vec![0],
        epoch: 0,
        index_in_epoch: 0,
    }
}

struct Measured {
    step_s: f64,
    peak_bytes: u64,
    kernels: Option<BTreeMap<String, f64>>,
}

fn measure(
    gpu: &Gpu,
    config: &ModelConfig,
    weights: &Weights,
    b: &Batch,
    steps: usize,
    checkpointing: bool,
) -> anyhow::Result<Measured> {
    let (_, adapter) = new_adapter(config, weights, &guide_lora())?;
    let mut model = Gemma3Gpu::from_weights(
        gpu,
        config,
        weights,
        Some(&adapter),
        Gemma3GpuOptions {
            gradient_checkpointing: checkpointing,
            lora: Some(adapter.settings),
            ..Default::default()
        },
    )?;
    let params = model.parameters();
    let mut adamw = GpuAdamW::new(gpu, &params, AdamWConfig::default())?;
    let norm = gpu.empty(&[1], DType::F32)?;
    let items = b.labels.iter().filter(|&&l| l != -100).count();
    let mut times = Vec::new();
    let mut kernels = None;
    // Step 0 warms up (pipelines, pool); without checkpointing one more step is timed per kernel.
    let last = if checkpointing { steps } else { steps + 1 };
    for step in 0..=last {
        let timed = !checkpointing && step == last;
        let t0 = Instant::now();
        zero_grads(gpu, &params);
        let mut rec = if timed {
            Recorder::timed(gpu)
        } else {
            Recorder::new(gpu)
        };
        let totals = model.accumulate(gpu, &mut rec, b, 1.0 / items as f32, step as u64)?;
        record_norm_and_clip(gpu, &mut rec, &params, &norm, 1.0)?;
        adamw.step(gpu, &mut rec, &params, 2e-5)?;
        if timed {
            let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
            for k in rec.submit_timed()?.unwrap_or_default() {
                *by_name.entry(k.name).or_default() += k.seconds;
            }
            kernels = Some(by_name);
        } else {
            rec.submit_and_wait()?;
        }
        let stats = gpu.read_cross_entropy_totals(&totals)?;
        anyhow::ensure!(stats.loss_sum.is_finite(), "non-finite loss");
        if step > 0 && !timed {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(Measured {
        step_s: times[times.len() / 2],
        peak_bytes: gpu.pooled_bytes(),
        kernels,
    })
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a.starts_with("--")) {
        return at_scale::main();
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seq = args.first().copied().unwrap_or(512);
    let steps = args.get(1).copied().unwrap_or(3).max(1);
    let dir = tempfile::tempdir()?;
    write_random_model(CONFIG, dir.path(), 0)?;
    let config = ModelConfig::from_file(&dir.path().join("config.json"))?;
    let weights = Weights::open(dir.path(), &config)?;
    let b = batch(&config, seq);
    let gpu = Gpu::get()?;
    println!("adapter: {}", gpu.adapter_info().name);
    println!("config: recipes/configs/bench-small-gemma-3.config.json, batch 1 x {seq} tokens (1 image), {steps} timed steps");
    let mut ours = Vec::new();
    for checkpointing in [false, true] {
        let m = measure(gpu, &config, &weights, &b, steps, checkpointing)?;
        bench_json::record(&serde_json::json!({
            "bench": "train", "config": "bench-small-gemma-3.config.json", "seq": seq, "nf4": false, "bf16": false,
            "checkpointing": checkpointing, "step_s": m.step_s, "peak_bytes": m.peak_bytes,
            "adapter": gpu.adapter_info().name,
        }));
        println!(
            "runner  gradient_checkpointing={checkpointing:<5} step {:.2} s  {:.1} tokens/s  device pool {:.0} MiB",
            m.step_s,
            seq as f64 / m.step_s,
            m.peak_bytes as f64 / (1 << 20) as f64
        );
        if let Some(k) = &m.kernels {
            let total: f64 = k.values().sum();
            let mut rows: Vec<_> = k.iter().collect();
            rows.sort_by(|a, b| b.1.total_cmp(a.1));
            println!("  kernel time breakdown (one step, {total:.2} s of GPU time):");
            for (name, s) in rows.iter().take(12) {
                println!(
                    "    {:<40} {:>7.3} s {:>5.1}%",
                    name,
                    s,
                    100.0 * **s / total
                );
            }
        }
        ours.push(m.step_s);
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python = std::env::var("RUNNER_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = Command::new(&python)
        .arg(format!("{root}/tools/bench/train_baseline.py"))
        .arg(format!(
            "{root}/recipes/configs/bench-small-gemma-3.config.json"
        ))
        .arg(seq.to_string())
        .arg(steps.to_string())
        .arg(threads.to_string())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            for (line, our) in String::from_utf8_lossy(&o.stdout).lines().zip(&ours) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let theirs = v["step_s"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "pytorch gradient_checkpointing={:<5} step {:.2} s  {:.1} tokens/s  peak RSS {:.0} MiB  -> runner/pytorch step time {:.2}x",
                    v["gradient_checkpointing"],
                    theirs,
                    seq as f64 / theirs,
                    v["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                    our / theirs
                );
            }
        }
        _ => println!("pytorch: skipped ({python} with torch, transformers and peft not available; set RUNNER_BENCH_PYTHON)"),
    }
    Ok(())
}
