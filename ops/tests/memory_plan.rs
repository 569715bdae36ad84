//! The device memory plan (`ops::model::memory`) against what `Gemma3Gpu` really allocates:
//! the engine's live storage bytes on the tiny fixture model, measured on an engine of its own
//! (fresh pool), for one training step with and without gradient checkpointing and LoRA
//! dropout, image batches (the guide's mmiu collate: SigLIP tower, projector, text stack); and
//! the SigLIP tower alone (one image at a time), whose peak the text stack's hides in a step.

use ops::gpu::testing::TestRng;
use ops::gpu::{Gpu, GpuOptions, MatmulPrecision, Recorder};
use ops::model::config::FloatDtype;
use ops::model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use ops::model::gpu::siglip::GpuVisionTower;
use ops::model::gpu::{GpuLoraPair, LoraRun};
use ops::model::memory::{
    vision_tower_peak, ActivationPlan, BaseFormat, LoraPlan, MemoryPlan, PlanOptions,
};
use ops::model::reference::lora::{Adapter, LoraSettings};
use ops::train::model::TrainModel;
use ops::train::optimizer::{AdamWConfig, GpuAdamW};

use crate::common::*;

/// Plan vs measured, per part, for one configuration: `(plan, measured)` device bytes of
/// weights + trainable (after the model and AdamW are set up) and of the step's activations
/// (peak during `accumulate` minus what was live before it).
fn plan_and_measure(
    checkpointing: bool,
    dropout: f32,
    bf16: bool,
    bf16_checkpoint: bool,
) -> [(u64, u64); 2] {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let copy = bf16_checkpoint.then(|| bf16_copy(&tiny()));
    let (config, weights) = load(
        copy.as_ref()
            .map_or(tiny(), |d| d.path().to_path_buf())
            .as_path(),
    );
    let model_options = Gemma3GpuOptions {
        gradient_checkpointing: checkpointing,
        bf16,
        ..Default::default()
    };
    let (base, frozen_tables) =
        Gemma3Gpu::device_storage(&config, &weights, &model_options).unwrap();
    assert_eq!(
        base,
        BaseFormat::Dense(if bf16_checkpoint {
            FloatDtype::BF16
        } else {
            FloatDtype::F32
        }),
        "a bf16 checkpoint's linears stay bf16"
    );
    let mut adapter = Adapter::load(&golden("lora/adapter_init")).unwrap();
    if bf16_checkpoint {
        // without trainable copies the frozen (tied) table is on the device: bf16 as stored
        adapter.lm_head = None;
        adapter.embed_tokens = None;
    }
    let modules_to_save: Vec<String> = [
        adapter.lm_head.as_ref().map(|_| "lm_head".to_string()),
        adapter
            .embed_tokens
            .as_ref()
            .map(|_| "embed_tokens".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let b = golden_batch("mmiu");
    assert!(
        b.images > 0 && b.images.is_multiple_of(b.batch),
        "{} images",
        b.images
    );
    let settings = LoraSettings {
        dropout,
        ..adapter.settings
    };
    let plan = MemoryPlan::build(
        &config,
        &PlanOptions {
            base,
            base_dtype: FloatDtype::F32,
            frozen_tables,
            lora: Some(LoraPlan {
                r: adapter.pairs.values().map(|p| p.rank).max().unwrap(),
                modules_to_save,
                modules_to_save_dtype: if bf16 {
                    FloatDtype::BF16
                } else {
                    FloatDtype::F32
                },
                vision: true,
                dropout: dropout > 0.0,
                optimizer_offload: false,
            }),
            activations: Some(ActivationPlan {
                batch: b.batch,
                seq_len: b.seq,
                images_per_sample: b.images / b.batch,
                gradient_checkpointing: checkpointing,
                activation_dtype: FloatDtype::F32,
                max_binding_bytes: gpu.max_binding_bytes(),
                staged_operands: gpu.stages_operands(),
            }),
        },
    )
    .unwrap();

    let mut model = Gemma3Gpu::from_weights(
        &gpu,
        &config,
        &weights,
        Some(&adapter),
        Gemma3GpuOptions {
            lora: Some(settings),
            ..model_options
        },
    )
    .unwrap();
    let params = model.parameters();
    let optimizer = GpuAdamW::new(&gpu, &params, AdamWConfig::default()).unwrap();
    // The training loop's gradient norm (`train::trainer`), counted with the trainable part.
    let norm = gpu.empty(&[1], ops::gpu::DType::F32).unwrap();
    gpu.reserve_staging(plan.staging_reserve_bytes(gpu.max_binding_bytes()));
    gpu.wait().unwrap();
    let resident = gpu.storage_stats().live;
    gpu.reset_peak_storage();
    let mut rec = Recorder::new(&gpu);
    let totals = model
        .accumulate(&gpu, &mut rec, &to_gpu_batch(&b), 0.01, 0)
        .unwrap();
    rec.submit_and_wait().unwrap();
    let stats = gpu.read_cross_entropy_totals(&totals).unwrap();
    assert!(stats.counted > 0 && stats.loss_sum.is_finite());
    let stats_after = gpu.storage_stats();
    let peak = stats_after.peak;
    drop((totals, optimizer, params, norm));
    // Staging textures (CPU adapters): reserved from the plan, so a step that grew a slot
    // (staged a range larger than any planned binding) shows as a larger peak.
    assert_eq!(
        stats_after.staging_peak,
        plan.device_part_total("staging"),
        "staging textures: measured peak vs plan"
    );

    println!(
        "checkpointing {checkpointing}, dropout {dropout}, bf16 {bf16}, bf16 checkpoint {bf16_checkpoint}: batch {} x {} tokens, {} images\n{}",
        b.batch,
        b.seq,
        b.images,
        plan.table()
    );
    let resident_plan = plan.device_part_total("weights") + plan.device_part_total("trainable");
    [
        (resident_plan, resident),
        (plan.device_part_total("activations"), peak - resident),
    ]
}

/// The plan counts each buffer at its pool size class and follows the step's flushes (one
/// per layer and phase: a buffer returns to the pool at the flush after its owner drops it),
/// so it equals the engine's count to the byte, in both combinations of checkpointing (text
/// and SigLIP layers) and dropout; any buffer the plan misses or any lifetime it gets wrong
/// shows as a difference.
#[test]
fn plan_matches_the_gpu_models_allocations() {
    // the last: a bf16 checkpoint, whose linears and frozen table stay bf16 on the device
    for (checkpointing, dropout, bf16, bf16_checkpoint) in [
        (false, 0.0, false, false),
        (true, 0.1, false, false),
        (true, 0.1, true, false),
        (false, 0.1, false, true),
    ] {
        let [(res_plan, res_got), (act_plan, act_got)] =
            plan_and_measure(checkpointing, dropout, bf16, bf16_checkpoint);
        eprintln!(
            "checkpointing {checkpointing}, dropout {dropout}, bf16 {bf16}, bf16 checkpoint \
             {bf16_checkpoint}: weights + trainable \
             plan {res_plan} vs measured {res_got}; activations plan {act_plan} vs measured peak \
             {act_got}"
        );
        assert_eq!(res_plan, res_got, "weights + trainable: plan vs measured");
        assert_eq!(act_plan, act_got, "activations: plan vs measured peak");
    }
}

/// The SigLIP tower alone against `memory::vision_tower_peak`, on a fresh engine: forward and
/// backward of 1, 2, 3 and 6 images of the mmiu batch (one image at a time), with and without
/// checkpointing and dropout, with the tiny adapter's pairs. In a whole step on the tiny model
/// the text stack's peak is higher and would hide a wrong tower plan; here the tower's own
/// peak (its per-image working set, the kept inputs of every image, the batch-wide output)
/// must equal the engine's to the byte.
#[test]
fn vision_tower_plan_matches_the_towers_allocations() {
    let (config, weights) = load(&tiny());
    let adapter = Adapter::load(&golden("lora/adapter_init")).unwrap();
    let b = golden_batch("mmiu");
    let image_len = b.pixel_values.len() / b.images;
    let mut rng = TestRng::new(TestRng::fresh_seed());
    for (images, checkpointing, dropout, bf16) in [
        (1, true, 0.1, false),
        (2, true, 0.1, false),
        (3, false, 0.1, false),
        (6, false, 0.0, false),
        (3, true, 0.1, true),
        (2, false, 0.0, true),
    ] {
        let gpu = Gpu::new(GpuOptions::default()).unwrap();
        let mut tower =
            GpuVisionTower::from_weights(&gpu, &config, &weights, Default::default()).unwrap();
        tower.bf16 = bf16;
        let mut ranks = Vec::new();
        for linear in tower.linears_mut() {
            if let Some(pair) = adapter.pairs.get(&linear.module) {
                linear.lora = Some(
                    GpuLoraPair::upload(&gpu, pair, linear.in_features, linear.out_features)
                        .unwrap(),
                );
                ranks.push(pair.rank);
            }
        }
        assert!(tower.has_lora(), "the tiny adapter has pairs on the tower");
        let act = ActivationPlan {
            batch: 1,
            seq_len: b.seq,
            images_per_sample: images,
            gradient_checkpointing: checkpointing,
            activation_dtype: FloatDtype::F32,
            max_binding_bytes: gpu.max_binding_bytes(),
            staged_operands: gpu.stages_operands(),
        };
        let lora = LoraPlan {
            r: ranks.iter().copied().max().unwrap(),
            modules_to_save: Vec::new(),
            // the plan reads lora-train's `bf16` from the tables' dtype
            modules_to_save_dtype: if bf16 {
                FloatDtype::BF16
            } else {
                FloatDtype::F32
            },
            vision: true,
            dropout: dropout > 0.0,
            optimizer_offload: false,
        };
        let plan = vision_tower_peak(&config, &act, Some(&lora)).unwrap();

        let size = tower.dims().image_size;
        let pixels = gpu
            .upload_f32(
                &[images, 3, size, size],
                &b.pixel_values[..images * image_len],
            )
            .unwrap();
        let tokens = images * tower.dims().num_patches();
        let d_out = gpu
            .upload_f32(
                &[tokens, tower.dims().hidden],
                &rng.vec_normal(tokens * tower.dims().hidden),
            )
            .unwrap();
        let run = LoraRun {
            settings: LoraSettings {
                dropout,
                ..adapter.settings
            },
            training: true,
            call: 0,
            precision: MatmulPrecision::F32,
        };
        gpu.wait().unwrap();
        let resident = gpu.storage_stats().live;
        gpu.reset_peak_storage();
        let mut rec = Recorder::new(&gpu);
        let (out, cache) = tower
            .forward(&gpu, &mut rec, &pixels, &run, checkpointing)
            .unwrap();
        tower.backward(&gpu, &mut rec, cache, &d_out, &run).unwrap();
        rec.submit_and_wait().unwrap();
        let measured = gpu.storage_stats().peak - resident;
        drop(out);
        eprintln!(
            "{images} image(s), checkpointing {checkpointing}, dropout {dropout}, bf16 {bf16}: \
             tower plan {plan} vs measured {measured}"
        );
        assert_eq!(
            plan, measured,
            "{images} image(s), checkpointing {checkpointing}, dropout {dropout}, bf16 {bf16}: \
             tower plan vs measured peak"
        );
    }
}
