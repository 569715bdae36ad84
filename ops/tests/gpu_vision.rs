//! The GPU vision tower and projector (`ops::model::gpu::{siglip, projector}`) against the golden
//! transformers outputs and the CPU reference (`ops::model::reference`), on the tiny fixture model:
//! forward (≤ 1e-4), and the backward with LoRA pairs (and dropout) on the tower's linears —
//! LoRA grads ≤ 1e-3, the projector's d_vision_out ≤ 1e-4.

use std::collections::BTreeMap;

use ops::gpu::testing::{test_gpu, TestRng};
use ops::gpu::Recorder;
use ops::model::config::ModelConfig;
use ops::model::gpu::projector::GpuProjector;
use ops::model::gpu::siglip::GpuVisionTower;
use ops::model::gpu::{GpuLoraPair, LoraRun};
use ops::model::reference::lora::{Adapter, AdapterGrads, LoraCall, LoraPair, LoraSettings};
use ops::model::reference::Gemma3Reference;
use ops::model::safetensors_io::SafetensorsSet;
use ops::model::Weights;

use crate::common::*;

fn tiny() -> (ModelConfig, Weights) {
    let hub = fixtures().join("hf-cache/hub/models--runner-test--tiny-gemma-3");
    let commit = std::fs::read_to_string(hub.join("refs/main")).unwrap();
    let dir = hub.join("snapshots").join(commit.trim());
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir, &config).unwrap();
    (config, weights)
}

/// A golden tensor as f32 with its shape.
fn golden(file: &str, key: &str) -> (Vec<usize>, Vec<f32>) {
    let set = SafetensorsSet::open_file(&fixtures().join("golden").join(file)).unwrap();
    let t = set
        .tensors()
        .find(|t| t.key == key)
        .unwrap_or_else(|| panic!("{file} has no {key}"));
    let v = ops::model::safetensors_io::to_f32(t.dtype, set.bytes(t)).unwrap();
    (t.shape.clone(), v)
}

/// Forward without LoRA on the mmiu batch (6 images): the tower's last hidden state and the
/// projector's image features against transformers and the reference.
#[test]
fn vision_forward_matches_transformers() {
    let gpu = test_gpu();
    let (config, weights) = tiny();
    let tower = GpuVisionTower::from_weights(gpu, &config, &weights, Default::default()).unwrap();
    let projector = GpuProjector::from_weights(gpu, &config, &weights).unwrap();
    assert!(!tower.has_lora());
    let (shape, pixels) = golden("collate_mmiu.safetensors", "pixel_values");
    let images = shape[0];
    let run = LoraRun {
        settings: LoraSettings::new(1, 1.0, false, 0.0),
        training: false,
        call: 0,
        precision: ops::gpu::MatmulPrecision::F32,
    };
    let pixels_g = gpu.upload_f32(&shape, &pixels).unwrap();
    let mut rec = Recorder::new(gpu);
    let (vision, cache) = tower
        .forward(gpu, &mut rec, &pixels_g, &run, false)
        .unwrap();
    let (features, _) = projector.forward(gpu, &mut rec, &vision, images).unwrap();
    // Without LoRA the backward is a no-op (nothing in the tower trains).
    tower.backward(gpu, &mut rec, cache, &vision, &run).unwrap();
    rec.submit_and_wait().unwrap();
    let vision = gpu.read_f32(&vision).unwrap();
    let features = gpu.read_f32(&features).unwrap();

    let (_, want_vision) = golden("forward_mmiu.safetensors", "vision_last_hidden_state");
    let (_, want_features) = golden("forward_mmiu.safetensors", "image_features");
    let reference = Gemma3Reference::from_weights(&config, &weights).unwrap();
    let call = LoraCall {
        adapter: None,
        training: false,
        call: 0,
    };
    let (ref_vision, _) = reference
        .vision
        .as_ref()
        .unwrap()
        .forward(&pixels, images, &call)
        .unwrap();
    let errors = [
        (
            "vision vs transformers",
            rel_frobenius(&vision, &want_vision),
        ),
        ("vision vs reference", rel_frobenius(&vision, &ref_vision)),
        (
            "features vs transformers",
            rel_frobenius(&features, &want_features),
        ),
    ];
    eprintln!("{errors:?}");
    for (what, e) in errors {
        assert!(e <= 1e-4, "{what}: rel err {e}");
    }
}

/// Random LoRA pairs (dropout on, training mode) on the tower's linears: forward outputs, the
/// projector's input gradient and every LoRA gradient against the reference, on 2 images (the
/// llava batch) and 3 (of the mmiu batch). The GPU tower runs one image at a time and the
/// reference the batch whole: each image must draw the batch's dropout masks for its rows, and
/// the LoRA gradients summed over images must be the batch's. The second case of each puts
/// pairs only on layer 1, so the backward stops above layer 0.
#[test]
fn vision_lora_backward_matches_reference() {
    let gpu = test_gpu();
    let (config, weights) = tiny();
    let reference = Gemma3Reference::from_weights(&config, &weights).unwrap();
    let (ref_tower, ref_projector) = (
        reference.vision.as_ref().unwrap(),
        reference.projector.as_ref().unwrap(),
    );
    let seed = TestRng::fresh_seed();
    let mut rng = TestRng::new(seed);
    for ((file, images), only_layer1) in [
        (("collate_llava.safetensors", 2), false),
        (("collate_llava.safetensors", 2), true),
        (("collate_mmiu.safetensors", 3), false),
        (("collate_mmiu.safetensors", 3), true),
    ] {
        let (all_shape, all_pixels) = golden(file, "pixel_values");
        assert!(all_shape[0] >= images, "{file} has {} images", all_shape[0]);
        let shape = [images, all_shape[1], all_shape[2], all_shape[3]];
        let pixels = &all_pixels[..shape.iter().product::<usize>()];
        let mut tower =
            GpuVisionTower::from_weights(gpu, &config, &weights, Default::default()).unwrap();
        let projector = GpuProjector::from_weights(gpu, &config, &weights).unwrap();
        let settings = LoraSettings {
            dropout_seed: rng.next_u64(),
            ..LoraSettings::new(4, 8.0, false, 0.25)
        };
        let mut pairs = BTreeMap::new();
        for (i, linear) in tower.linears_mut().into_iter().enumerate() {
            if only_layer1 && (!linear.module.contains("layers.1.") || i % 2 == 1) {
                continue;
            }
            let rank = 2 + i % 3;
            let pair = LoraPair {
                a: rng
                    .vec_normal(rank * linear.in_features)
                    .iter()
                    .map(|v| v * 0.2)
                    .collect(),
                b: rng
                    .vec_normal(linear.out_features * rank)
                    .iter()
                    .map(|v| v * 0.2)
                    .collect(),
                rank,
            };
            linear.lora = Some(
                GpuLoraPair::upload(gpu, &pair, linear.in_features, linear.out_features).unwrap(),
            );
            pairs.insert(linear.module.clone(), pair);
        }
        assert!(tower.has_lora());
        let adapter = Adapter {
            settings,
            pairs,
            lm_head: None,
            embed_tokens: None,
        };
        let call = LoraCall {
            adapter: Some(&adapter),
            training: true,
            call: 3,
        };
        let (ref_vision, ref_vcache) = ref_tower.forward(pixels, images, &call).unwrap();
        let (ref_features, ref_pcache) = ref_projector.forward(&ref_vision, images).unwrap();
        let d_features = rng.vec_normal(ref_features.len());
        let ref_d_vision = ref_projector.backward(&ref_pcache, &d_features).unwrap();
        let mut grads = AdapterGrads::zeros_like(&adapter);
        ref_tower
            .backward(&ref_vcache, &ref_d_vision, &call, Some(&mut grads))
            .unwrap();

        let run = LoraRun {
            settings,
            training: true,
            call: 3,
            precision: ops::gpu::MatmulPrecision::F32,
        };
        let pixels_g = gpu.upload_f32(&shape, pixels).unwrap();
        let d_features_g = gpu
            .upload_f32(&[ref_features.len() / 64, 64], &d_features)
            .unwrap();
        // The forward and backward, without and with gradient checkpointing (each SigLIP layer
        // recomputed right before its backward, same dropout masks): the LoRA gradients of both
        // must be identical, bit for bit (same kernels on the same inputs).
        let forward_backward = |checkpoint: bool| {
            for pair in tower.linears().iter().filter_map(|l| l.lora.as_ref()) {
                gpu.fill_f32(&pair.grad_a, 0.0).unwrap();
                gpu.fill_f32(&pair.grad_b, 0.0).unwrap();
            }
            let mut rec = Recorder::new(gpu);
            let (vision, vcache) = tower
                .forward(gpu, &mut rec, &pixels_g, &run, checkpoint)
                .unwrap();
            let (features, pcache) = projector.forward(gpu, &mut rec, &vision, images).unwrap();
            let d_vision = projector
                .backward(gpu, &mut rec, &pcache, &d_features_g)
                .unwrap();
            tower
                .backward(gpu, &mut rec, vcache, &d_vision, &run)
                .unwrap();
            rec.submit_and_wait().unwrap();
            let grads: Vec<Vec<f32>> = tower
                .linears()
                .iter()
                .filter_map(|l| l.lora.as_ref())
                .flat_map(|p| [&p.grad_a, &p.grad_b])
                .map(|g| gpu.read_f32(g).unwrap())
                .collect();
            (vision, features, d_vision, grads)
        };
        let (_, _, _, checkpointed) = forward_backward(true);
        let (vision, features, d_vision, kept) = forward_backward(false);
        assert_eq!(checkpointed.len(), 2 * adapter.pairs.len());
        assert!(
            checkpointed == kept,
            "gradient checkpointing changed the tower's LoRA gradients"
        );

        let case = format!(
            "{images} images, {}",
            if only_layer1 {
                "layer 1 only"
            } else {
                "every linear"
            }
        );
        for (what, got, want, tol) in [
            ("vision", &vision, &ref_vision, 1e-4),
            ("features", &features, &ref_features, 1e-4),
            ("d_vision_out", &d_vision, &ref_d_vision, 1e-4),
        ] {
            let e = rel_frobenius(&gpu.read_f32(got).unwrap(), want);
            eprintln!("{case}: {what} {e:.2e}");
            assert!(e <= tol, "{case}: {what} rel err {e} (seed {seed})");
        }
        let mut worst = (0.0f64, String::new());
        let mut checked = 0;
        for linear in tower.linears() {
            let Some(pair) = &linear.lora else { continue };
            let (want_a, want_b) = &grads.pairs[&linear.module];
            for (which, got, want) in [("A", &pair.grad_a, want_a), ("B", &pair.grad_b, want_b)] {
                let e = rel_frobenius(&gpu.read_f32(got).unwrap(), want);
                if e > worst.0 {
                    worst = (e, format!("{}.{which}", linear.module));
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 2 * adapter.pairs.len());
        eprintln!("{case}: worst LoRA gradient {:.2e} at {}", worst.0, worst.1);
        assert!(
            worst.0 <= 1e-3,
            "{case}: {} rel err {} (seed {seed})",
            worst.1,
            worst.0
        );
    }
}
