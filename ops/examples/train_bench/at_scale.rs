//! `train_bench --config FILE [--seq N] [--images K] [--steps S] [--nf4] [--checkpointing] [--bf16]`:
//! lora-train's step on random weights of any config's shape, at its real size (see the
//! example's doc). Host memory stays bounded while the weights are made: they are written in
//! bf16 shards of at most 1 GiB (what a Hub checkpoint looks like), then quantized by
//! `quantize_checkpoint`, the quantize op's own code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use ops::data::collate::Batch;
use ops::gpu::{DType, Gpu, Recorder};
use ops::model::bnb::{QuantStorage, SkipRule};
use ops::model::config::FloatDtype;
use ops::model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use ops::model::memory::{ActivationPlan, DeviceLimits, LoraPlan, MemoryPlan};
use ops::model::names::expected_tensors;
use ops::model::quantize::{quantize_checkpoint, QuantizeOptions};
use ops::model::safetensors_io::{write_safetensors, OutTensor, INDEX_FILE};
use ops::model::{ModelConfig, Weights};
use ops::reference::cast::f32_to_bf16;
use ops::train::lora_init::new_adapter;
use ops::train::model::TrainModel;
use ops::train::optimizer::{record_norm_and_clip, zero_grads, AdamWConfig, GpuAdamW};
use ops::train::setup::plan_options;

const GIB: f64 = (1u64 << 30) as f64;
const SHARD_BYTES: usize = 1 << 30;

struct Args {
    config: PathBuf,
    seq: usize,
    images: usize,
    steps: usize,
    nf4: bool,
    checkpointing: bool,
    /// lora-train's `bf16`: the vocabulary tables (trainable copies, their state) in bf16.
    bf16: bool,
}

const USAGE: &str = "usage: train_bench --config FILE [--seq N=512] [--images K=1] [--steps S=1] [--nf4] [--checkpointing] [--bf16]";

fn parse() -> Result<Args> {
    let mut a = Args {
        config: PathBuf::new(),
        seq: 512,
        images: 1,
        steps: 1,
        nf4: false,
        checkpointing: false,
        bf16: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        let number = |name: &str, v: String| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{name} takes a whole number, got `{v}`; {USAGE}"))
        };
        match flag.as_str() {
            "--config" => a.config = PathBuf::from(value("--config")?),
            "--seq" => a.seq = number("--seq", value("--seq")?)?,
            "--images" => a.images = number("--images", value("--images")?)?,
            "--steps" => a.steps = number("--steps", value("--steps")?)?,
            "--nf4" => a.nf4 = true,
            "--checkpointing" => a.checkpointing = true,
            "--bf16" => a.bf16 = true,
            other => bail!("unknown argument `{other}`; {USAGE}"),
        }
    }
    ensure!(
        !a.config.as_os_str().is_empty(),
        "--config is required; {USAGE}"
    );
    ensure!(a.steps >= 1, "--steps must be at least 1");
    Ok(a)
}

/// Random weights of `config_json`'s shape in `dir` (config.json + bf16 shards + index), with
/// the initialisation of the small bench (N(0, 0.02) matrices, zero biases, Gemma RMSNorm
/// weights 0, SigLIP LayerNorm weights 1). One tensor at a time is held in f32.
fn write_random_bf16(config_json: &str, dir: &Path, seed: u64) -> Result<()> {
    let config = ModelConfig::from_json(config_json)?;
    std::fs::write(dir.join("config.json"), config_json)?;
    let mut rng = ops::gpu::testing::TestRng::new(seed);
    let mut weight_map = BTreeMap::new();
    let mut shard: BTreeMap<String, OutTensor<'static>> = BTreeMap::new();
    let mut shard_bytes = 0;
    let mut shards = 0;
    let mut flush = |shard: &mut BTreeMap<String, OutTensor<'static>>,
                     weight_map: &mut BTreeMap<String, String>|
     -> Result<()> {
        shards += 1;
        let name = format!("model-{shards:05}.safetensors");
        write_safetensors(&dir.join(&name), shard)?;
        for key in std::mem::take(shard).into_keys() {
            weight_map.insert(key, name.clone());
        }
        Ok(())
    };
    for e in expected_tensors(&config)
        .into_iter()
        .filter(|e| !e.optional)
    {
        let n = e.numel();
        let value = |rng: &mut ops::gpu::testing::TestRng| -> f32 {
            if e.name.ends_with(".bias") {
                0.0
            } else if e.name.contains("layer_norm") || e.name.contains("post_layernorm") {
                1.0
            } else if e.name.ends_with("norm.weight") {
                0.0
            } else {
                rng.normal() * 0.02
            }
        };
        let mut bytes = Vec::with_capacity(2 * n);
        for _ in 0..n {
            bytes.extend_from_slice(&f32_to_bf16(value(&mut rng)).to_le_bytes());
        }
        shard_bytes += bytes.len();
        shard.insert(
            e.name.clone(),
            OutTensor {
                dtype: safetensors::Dtype::BF16,
                shape: e.shape.clone(),
                data: bytes.into(),
            },
        );
        if shard_bytes >= SHARD_BYTES {
            flush(&mut shard, &mut weight_map)?;
            shard_bytes = 0;
        }
    }
    if !shard.is_empty() {
        flush(&mut shard, &mut weight_map)?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// One example of `seq` tokens: BOS, `images` blocks of boi + soft tokens + eoi, then text;
/// labels on the text only (as the guide's collate_fn).
fn batch(config: &ModelConfig, seq: usize, images: usize) -> Result<Batch> {
    let ModelConfig::ConditionalGeneration(g) = config else {
        bail!("train_bench needs a Gemma3ForConditionalGeneration config (it feeds images)");
    };
    let mm = g.mm_tokens_per_image;
    let need = 1 + images * (mm + 2) + 2;
    ensure!(
        seq >= need,
        "--seq {seq} cannot hold {images} image(s) of {mm} soft tokens: use --seq {need} or more"
    );
    let vocab = config.text().vocab_size as i64;
    let mut ids: Vec<i64> = (0..seq)
        .map(|i| 10 + (i as i64 * 7919) % (vocab.min(30_000) - 10))
        .collect();
    ids[0] = 2;
    for k in 0..images {
        let at = 1 + k * (mm + 2);
        ids[at] = g.boi_token_index;
        for id in &mut ids[at + 1..at + 1 + mm] {
            *id = g.image_token_index;
        }
        ids[at + 1 + mm] = g.eoi_token_index;
    }
    let token_type_ids: Vec<i64> = ids
        .iter()
        .map(|&i| (i == g.image_token_index) as i64)
        .collect();
    let labels = ids
        .iter()
        .map(|&i| {
            if i == g.image_token_index || i == g.boi_token_index || i == g.eoi_token_index {
                -100
            } else {
                i
            }
        })
        .collect();
    let side = g.vision_config.image_size();
    let pixel_values = (0..images * 3 * side * side)
        .map(|i| ((i % 255) as f32 / 127.5) - 1.0)
        .collect();
    Ok(Batch {
        batch_size: 1,
        seq_len: seq,
        input_ids: ids,
        attention_mask: vec![1; seq],
        token_type_ids,
        labels,
        pixel_values,
        num_images: images,
        image_height: side,
        image_width: side,
        images_per_sample: vec![images],
        rows: vec![0],
        epoch: 0,
        index_in_epoch: 0,
    })
}

pub fn main() -> Result<()> {
    let a = parse()?;
    let json = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading --config {}", a.config.display()))?;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("bf16");
    std::fs::create_dir(&src)?;
    let t0 = Instant::now();
    write_random_bf16(&json, &src, 0)?;
    let model_dir = if a.nf4 {
        let out = dir.path().join("nf4");
        std::fs::create_dir(&out)?;
        let report = quantize_checkpoint(
            &src,
            &out,
            &QuantizeOptions {
                double_quant: true,
                compute_dtype: FloatDtype::BF16,
                quant_storage: QuantStorage::BF16,
                skip_modules: None,
                skip_rule: SkipRule::Boundary,
                load_dtype: None,
            },
            &|_| {},
        )?;
        // The bf16 source is no longer needed (8.6 GB at 4B).
        std::fs::remove_dir_all(&src)?;
        println!(
            "weights: random bf16, {} linears ({} params) quantized to NF4 in {:.0} s",
            report.quantized_modules,
            report.quantized_params,
            t0.elapsed().as_secs_f64()
        );
        out
    } else {
        println!(
            "weights: random bf16 in {:.0} s",
            t0.elapsed().as_secs_f64()
        );
        src
    };
    let config = ModelConfig::from_file(&model_dir.join("config.json"))?;
    let weights = Weights::open(&model_dir, &config)?;
    let b = batch(&config, a.seq, a.images)?;
    let gpu = Gpu::get()?;
    let (_, adapter) = new_adapter(&config, &weights, &super::guide_lora())?;
    let model_options = Gemma3GpuOptions {
        gradient_checkpointing: a.checkpointing,
        lora: Some(adapter.settings),
        bf16: a.bf16,
        ..Default::default()
    };
    let (base, frozen_tables) = Gemma3Gpu::device_storage(&config, &weights, &model_options)?;
    let plan = MemoryPlan::build(
        &config,
        &plan_options(
            base,
            frozen_tables,
            LoraPlan {
                r: 16,
                modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
                modules_to_save_dtype: if a.bf16 {
                    FloatDtype::BF16
                } else {
                    FloatDtype::F32
                },
                vision: adapter.pairs.keys().any(|m| m.contains("vision_tower")),
                dropout: true,
                optimizer_offload: false,
            },
            ActivationPlan {
                batch: 1,
                seq_len: a.seq,
                images_per_sample: a.images,
                gradient_checkpointing: a.checkpointing,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes: gpu.max_binding_bytes(),
                staged_operands: gpu.stages_operands(),
            },
        ),
    )?;
    println!(
        "adapter: {}; config {}, batch 1 x {} tokens, {} image(s), nf4 {}, gradient checkpointing {}, bf16 {}",
        gpu.adapter_info().name,
        a.config.display(),
        a.seq,
        a.images,
        a.nf4,
        a.checkpointing,
        a.bf16
    );
    println!("{}", plan.table());
    plan.check(&DeviceLimits {
        max_buffer_size: gpu.limits().max_buffer_size,
        max_storage_buffer_binding_size: gpu.max_binding_bytes(),
        memory_budget: None,
    })?;
    gpu.reserve_staging(plan.staging_reserve_bytes(gpu.max_binding_bytes()));
    let mut model = Gemma3Gpu::from_weights(gpu, &config, &weights, Some(&adapter), model_options)?;
    drop(adapter);
    let params = model.parameters();
    let mut adamw = GpuAdamW::new(gpu, &params, AdamWConfig::default())?;
    let norm = gpu.empty(&[1], DType::F32)?;
    let items = b.labels.iter().filter(|&&l| l != -100).count().max(1);
    gpu.wait()?;
    gpu.reset_peak_storage();
    let mut last = 0.0;
    for step in 0..a.steps {
        let t = Instant::now();
        zero_grads(gpu, &params);
        let mut rec = Recorder::new(gpu);
        let totals = model.accumulate(gpu, &mut rec, &b, 1.0 / items as f32, step as u64)?;
        record_norm_and_clip(gpu, &mut rec, &params, &norm, 1.0)?;
        adamw.step(gpu, &mut rec, &params, 2e-5)?;
        rec.submit_and_wait()?;
        let stats = gpu.read_cross_entropy_totals(&totals)?;
        ensure!(stats.loss_sum.is_finite(), "step {step}: non-finite loss");
        last = t.elapsed().as_secs_f64();
        println!(
            "step {step}: {last:.1} s, loss {:.4}",
            stats.loss_sum / stats.counted.max(1) as f64
        );
    }
    let s = gpu.storage_stats();
    let peak = s.peak + s.staging_peak;
    println!(
        "measured peak: storage {} + staging {} bytes; plan {} bytes",
        s.peak,
        s.staging_peak,
        plan.device_total()
    );
    super::bench_json::record(&serde_json::json!({
        "bench": "train", "config": a.config.file_name().map(|f| f.to_string_lossy()), "seq": a.seq, "nf4": a.nf4, "bf16": a.bf16,
        "checkpointing": a.checkpointing, "step_s": last, "peak_bytes": peak,
        "plan_bytes": plan.device_total(), "adapter": gpu.adapter_info().name,
    }));
    println!(
        "4b step: {last:.1} s, peak device {:.2} GiB, plan {:.2} GiB",
        peak as f64 / GIB,
        plan.device_total() as f64 / GIB
    );
    Ok(())
}
