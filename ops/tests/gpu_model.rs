//! The GPU model (`ops::model::gpu::model::Gemma3Gpu`) against the CPU reference
//! (`ops::model::reference`, itself checked against the transformers/PEFT golden files in
//! reference_model.rs) and against the golden files directly, on the tiny fixture model.

use std::collections::BTreeMap;

use ops::gpu::testing::test_gpu;
use ops::gpu::{Gpu, Recorder};
use ops::model::gpu::model::{Gemma3Gpu, Gemma3GpuOptions};
use ops::model::reference::lora::{Adapter, AdapterGrads, LoraCall};
use ops::model::reference::loss::{count_label_tokens, LossNormalization};
use ops::model::reference::{Batch, Gemma3Reference};
use ops::train::model::TrainModel;

use crate::common::*;

/// The golden batch without its images: image soft tokens become "\n" (265) text tokens.
fn text_only(mut b: Batch) -> Batch {
    for id in b.input_ids.iter_mut() {
        if *id == 572 {
            *id = 265;
        }
    }
    b.token_type_ids.iter_mut().for_each(|t| *t = 0);
    b.pixel_values.clear();
    b.images = 0;
    b
}

/// The golden initial adapter without its vision-tower pairs (text-only GPU model).
fn text_adapter() -> Adapter {
    let mut a = Adapter::load(&golden("lora/adapter_init")).unwrap();
    a.pairs.retain(|m, _| m.contains("language_model"));
    assert_eq!(a.pairs.len(), 28);
    a
}

/// One micro-batch's loss and every trainable gradient from the GPU model.
fn gpu_step(
    gpu: &Gpu,
    model: &mut Gemma3Gpu,
    b: &Batch,
    num_items: usize,
    call: u64,
) -> (f64, BTreeMap<String, Vec<f32>>) {
    for p in model.parameters() {
        gpu.fill_f32(&p.grad, 0.0).unwrap();
    }
    let mut rec = Recorder::new(gpu);
    let totals = model
        .accumulate(
            gpu,
            &mut rec,
            &to_gpu_batch(b),
            1.0 / num_items as f32,
            call,
        )
        .unwrap();
    rec.submit_and_wait().unwrap();
    let stats = gpu.read_cross_entropy_totals(&totals).unwrap();
    assert_eq!(stats.counted as usize, num_items);
    let grads = model
        .parameters()
        .into_iter()
        .map(|p| (p.key, gpu.read_f32(&p.grad).unwrap()))
        .collect();
    (stats.loss_sum / num_items as f64, grads)
}

#[test]
fn text_only_logits_loss_and_gradients_match_reference() {
    let gpu = test_gpu();
    let (config, weights) = load(&tiny());
    let reference = Gemma3Reference::from_weights(&config, &weights).unwrap();
    let b = text_only(golden_batch("llava"));

    // Base model logits (no adapter).
    let t0 = std::time::Instant::now();
    let base = Gemma3Gpu::from_weights(gpu, &config, &weights, None, Default::default()).unwrap();
    let got = base.logits(gpu, &to_gpu_batch(&b)).unwrap();
    let call = LoraCall {
        adapter: None,
        training: false,
        call: 0,
    };
    let (want, _) = reference.forward(&b, &call).unwrap();
    let e_logits = rel_frobenius(&got, &want.logits);
    eprintln!("text-only base logits: {e_logits:.2e} ({:?})", t0.elapsed());
    assert!(e_logits <= 1e-4, "logits {e_logits}");

    // LoRA on the 28 text linears + lm_head/embed_tokens copies, with dropout to check the masks.
    for dropout in [0.0f32, 0.15] {
        let mut adapter = text_adapter();
        adapter.settings.dropout = dropout;
        adapter.settings.dropout_seed = 11;
        let t0 = std::time::Instant::now();
        let mut model = Gemma3Gpu::from_weights(
            gpu,
            &config,
            &weights,
            Some(&adapter),
            Gemma3GpuOptions {
                gradient_checkpointing: false,
                lora: Some(adapter.settings),
                ..Default::default()
            },
        )
        .unwrap();
        let labels = Gemma3Reference::shifted_labels(&b, true).unwrap();
        let num_items = count_label_tokens(&labels);
        let (loss, grads) = gpu_step(gpu, &mut model, &b, num_items, 3);
        let gpu_time = t0.elapsed();
        let call = LoraCall {
            adapter: Some(&adapter),
            training: true,
            call: 3,
        };
        let mut want = AdapterGrads::zeros_like(&adapter);
        let out = reference
            .forward_backward(
                &b,
                &call,
                LossNormalization::TokenMean { num_items },
                &mut want,
            )
            .unwrap();
        let e_loss = rel(loss, out.loss);
        let want = want.by_peft_key();
        assert_eq!(grads.len(), want.len(), "one gradient per adapter tensor");
        let mut worst = (0.0f64, String::new());
        for (key, w) in &want {
            let e = rel_frobenius(&grads[key], w);
            if e > worst.0 {
                worst = (e, key.clone());
            }
        }
        eprintln!(
            "text-only dropout {dropout}: loss {loss} ({e_loss:.2e}), worst gradient {:.2e} at {} (GPU {gpu_time:?})",
            worst.0, worst.1
        );
        assert!(e_loss <= 1e-5, "loss {e_loss}");
        assert!(worst.0 <= 1e-3, "{} off by {}", worst.1, worst.0);
    }
}

/// `matmul_precision = "f16"`: the base's linear layers read f16-rounded operands. Each layer's
/// products then carry a relative error of about 4e-4 to 8e-4 (the matmul kernel's bound); over
/// the tiny model's layers the logits stay within 1e-2 of the f32 reference, and differ from it
/// by more than f32 rounding (the mode is on).
#[test]
fn f16_matmul_operands_stay_close_to_the_f32_logits() {
    let gpu = test_gpu();
    if !gpu.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("no SHADER_F16 on this adapter");
        return;
    }
    let (config, weights) = load(&tiny());
    let reference = Gemma3Reference::from_weights(&config, &weights).unwrap();
    let b = text_only(golden_batch("llava"));
    let opts = Gemma3GpuOptions {
        matmul_precision: ops::gpu::MatmulPrecision::F16,
        ..Default::default()
    };
    let base = Gemma3Gpu::from_weights(gpu, &config, &weights, None, opts).unwrap();
    let got = base.logits(gpu, &to_gpu_batch(&b)).unwrap();
    let call = LoraCall {
        adapter: None,
        training: false,
        call: 0,
    };
    let (want, _) = reference.forward(&b, &call).unwrap();
    let e = rel_frobenius(&got, &want.logits);
    eprintln!("f16 matmul operands: logits {e:.2e}");
    assert!((1e-5..1e-2).contains(&e), "logits {e}");
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let gpu = test_gpu();
    let (config, weights) = load(&tiny());
    let b = text_only(golden_batch("mmiu"));
    let mut adapter = text_adapter();
    adapter.settings.dropout = 0.1;
    let labels = Gemma3Reference::shifted_labels(&b, true).unwrap();
    let num_items = count_label_tokens(&labels);
    let mut runs = Vec::new();
    for checkpointing in [false, true] {
        let mut model = Gemma3Gpu::from_weights(
            gpu,
            &config,
            &weights,
            Some(&adapter),
            Gemma3GpuOptions {
                gradient_checkpointing: checkpointing,
                lora: Some(adapter.settings),
                ..Default::default()
            },
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let (loss, grads) = gpu_step(gpu, &mut model, &b, num_items, 1);
        let bytes = model.last_activation_bytes;
        eprintln!(
            "checkpointing {checkpointing}: loss {loss}, kept activations {} of {} bytes, {:?}",
            bytes.kept,
            bytes.full,
            t0.elapsed()
        );
        runs.push((loss, grads, bytes));
    }
    let (l0, g0, b0) = &runs[0];
    let (l1, g1, b1) = &runs[1];
    assert_eq!(b0.full, b1.full);
    assert_eq!(b0.kept, b0.full);
    assert!(
        b1.kept * 5 < b1.full,
        "checkpointing keeps {} of {}",
        b1.kept,
        b1.full
    );
    assert!(rel(*l1, *l0) <= 1e-6, "loss {l0} vs {l1}");
    for (key, g) in g0 {
        let e = rel_frobenius(&g1[key], g);
        assert!(e <= 1e-6, "{key}: {e}");
    }
}

/// NF4 base (transformers' own 4-bit save of the fixture, every Linear but lm_head) against the
/// reference on the same weights dequantized as bitsandbytes does.
#[test]
fn nf4_base_text_only_matches_reference_on_dequantized_weights() {
    let gpu = test_gpu();
    let (config, weights) = load(&golden("nf4/transformers-4bit-u8-f32"));
    assert!(weights.is_nf4("model.language_model.layers.0.self_attn.q_proj.weight"));
    let reference = Gemma3Reference::from_weights(&config, &weights).unwrap();
    let b = text_only(golden_batch("mmiu"));
    let adapter = text_adapter();
    let mut model = Gemma3Gpu::from_weights(
        gpu,
        &config,
        &weights,
        Some(&adapter),
        Gemma3GpuOptions::default(),
    )
    .unwrap();
    let labels = Gemma3Reference::shifted_labels(&b, true).unwrap();
    let num_items = count_label_tokens(&labels);
    let (loss, grads) = gpu_step(gpu, &mut model, &b, num_items, 0);
    let call = LoraCall {
        adapter: Some(&adapter),
        training: true,
        call: 0,
    };
    let mut want = AdapterGrads::zeros_like(&adapter);
    let out = reference
        .forward_backward(
            &b,
            &call,
            LossNormalization::TokenMean { num_items },
            &mut want,
        )
        .unwrap();
    let e_loss = rel(loss, out.loss);
    let worst = want
        .by_peft_key()
        .iter()
        .map(|(k, w)| (rel_frobenius(&grads[k], w), k.clone()))
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!(
        "NF4 text-only: loss {loss} vs {} ({e_loss:.2e}), worst gradient {:.2e} at {}",
        out.loss, worst.0, worst.1
    );
    assert!(e_loss <= 1e-4, "loss {e_loss}");
    assert!(worst.0 <= 1e-3, "{} off by {}", worst.1, worst.0);
}

/// The whole multimodal model (SigLIP → projector → merged image features → decoder) against
/// transformers and PEFT themselves: base logits of the mmiu batch (two images in one example,
/// padding, a sliding window shorter than the sequence) ≤ 1e-4, and with the golden initial
/// adapter (LoRA on all 40 linears, vision included, plus the lm_head / embed_tokens copies)
/// the step-0 loss ≤ 1e-4 and every one of the 82 gradients ≤ 1e-3, for both guide batches.
#[test]
fn image_batches_match_transformers_and_peft_golden() {
    let gpu = test_gpu();
    let (config, weights) = load(&tiny());
    let b = golden_batch("mmiu");
    assert!(b.images >= 2);
    let base = Gemma3Gpu::from_weights(gpu, &config, &weights, None, Default::default()).unwrap();
    let got = base.logits(gpu, &to_gpu_batch(&b)).unwrap();
    let want = tensors(&golden("forward_mmiu.safetensors"));
    let e_logits = rel_frobenius(&got, &f32s(&want, "logits"));
    eprintln!("mmiu base logits vs transformers: {e_logits:.2e}");
    assert!(e_logits <= 1e-4, "logits {e_logits}");

    let adapter = Adapter::load(&golden("lora/adapter_init")).unwrap();
    assert_eq!(adapter.pairs.len(), 40);
    for name in ["mmiu", "llava"] {
        let b = golden_batch(name);
        let mut model = Gemma3Gpu::from_weights(
            gpu,
            &config,
            &weights,
            Some(&adapter),
            Gemma3GpuOptions {
                gradient_checkpointing: name == "llava",
                lora: Some(adapter.settings),
                ..Default::default()
            },
        )
        .unwrap();
        let labels = Gemma3Reference::shifted_labels(&b, true).unwrap();
        let num_items = count_label_tokens(&labels);
        let (loss, grads) = gpu_step(gpu, &mut model, &b, num_items, 0);
        let want = tensors(&golden(&format!("lora/grads_step0_{name}.safetensors")));
        let e_loss = rel(loss, f32s(&want, "loss")[0] as f64);
        assert_eq!(grads.len(), 82, "one gradient per adapter tensor");
        let mut worst = (0.0f64, String::new());
        for (key, g) in &grads {
            let e = rel_frobenius(g, &f32s(&want, key));
            if e > worst.0 {
                worst = (e, key.clone());
            }
        }
        eprintln!(
            "{name}: loss {loss} ({e_loss:.2e} vs PEFT), worst gradient {:.2e} at {}",
            worst.0, worst.1
        );
        assert!(e_loss <= 1e-4, "{name} loss {e_loss}");
        assert!(worst.0 <= 1e-3, "{name}: {} off by {}", worst.1, worst.0);
    }
}

/// What a data-parallel step relies on (`train::grad_sync` starts summing a gradient across
/// ranks when the model reports it final): `accumulate_notify` reports every trainable tensor
/// exactly once, the lm_head copy first (right after the loss), the decoder layers last layer
/// first, the embed_tokens copy last; a gradient read when it is reported already holds its
/// value at the end of the micro-batch; and `gradient_rows` names every row of the
/// embed_tokens gradient that is not zero.
#[test]
fn gradients_are_reported_final_once_each_in_backward_order() {
    let gpu = test_gpu();
    let (config, weights) = load(&tiny());
    let adapter = Adapter::load(&golden("lora/adapter_init")).unwrap();
    let mut model = Gemma3Gpu::from_weights(
        gpu,
        &config,
        &weights,
        Some(&adapter),
        Gemma3GpuOptions {
            gradient_checkpointing: true,
            lora: Some(adapter.settings),
            ..Default::default()
        },
    )
    .unwrap();
    let batch = to_gpu_batch(&golden_batch("mmiu"));
    let params = model.parameters();
    for p in &params {
        gpu.fill_f32(&p.grad, 0.0).unwrap();
    }
    let mut order: Vec<usize> = Vec::new();
    let mut when_reported: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    let mut rec = Recorder::new(gpu);
    model
        .accumulate_notify(gpu, &mut rec, &batch, 1e-2, 0, &mut |indices| {
            for &i in indices {
                order.push(i);
                when_reported.insert(i, gpu.read_f32(&params[i].grad)?);
            }
            Ok(())
        })
        .unwrap();
    rec.submit_and_wait().unwrap();

    let mut once = order.clone();
    once.sort_unstable();
    assert_eq!(once, (0..params.len()).collect::<Vec<_>>(), "{order:?}");
    let key = |i: usize| params[i].key.as_str();
    assert!(
        key(order[0]).ends_with("lm_head.weight"),
        "{}",
        key(order[0])
    );
    let last = *order.last().unwrap();
    assert!(key(last).ends_with("embed_tokens.weight"), "{}", key(last));
    let layers: Vec<usize> = order
        .iter()
        .filter_map(|&i| {
            let rest = key(i).split("language_model.layers.").nth(1)?;
            rest.split('.').next()?.parse().ok()
        })
        .collect();
    assert_eq!(layers.first(), Some(&(config.text().num_hidden_layers - 1)));
    assert!(layers.windows(2).all(|w| w[0] >= w[1]), "{layers:?}");
    for (&i, early) in &when_reported {
        assert_eq!(early, &gpu.read_f32(&params[i].grad).unwrap(), "{}", key(i));
    }
    let rows = model.gradient_rows(last, &batch).unwrap();
    let embed = gpu.read_f32(&params[last].grad).unwrap();
    let hidden = params[last].grad.row_len();
    let touched: Vec<u32> = (0..embed.len() / hidden)
        .filter(|&r| {
            embed[r * hidden..(r + 1) * hidden]
                .iter()
                .any(|&v| v != 0.0)
        })
        .map(|r| r as u32)
        .collect();
    assert!(!touched.is_empty());
    assert!(
        touched.iter().all(|r| rows.binary_search(r).is_ok()),
        "rows with a gradient outside gradient_rows: {touched:?} vs {rows:?}"
    );
    assert!(
        model.gradient_rows(order[0], &batch).is_none(),
        "lm_head is dense"
    );
}

/// Row 0 of a right-padded golden batch without its padding, with its own images.
fn first_row(b: &Batch) -> Batch {
    let len = b.attention_mask[..b.seq]
        .iter()
        .filter(|&&m| m == 1)
        .count();
    let ids = b.input_ids[..len].to_vec();
    let image_tokens_per_image = b.input_ids.iter().filter(|&&id| id == 572).count() / b.images;
    let images = ids.iter().filter(|&&id| id == 572).count() / image_tokens_per_image;
    let per_image = b.pixel_values.len() / b.images;
    Batch {
        batch: 1,
        seq: len,
        input_ids: ids,
        attention_mask: vec![1; len],
        token_type_ids: b.token_type_ids[..len].to_vec(),
        labels: Some(vec![-100; len]),
        pixel_values: b.pixel_values[..images * per_image].to_vec(),
        images,
    }
}

/// A bf16 checkpoint (the dtype of Gemma 3's Hub checkpoints) keeps its linears and its frozen
/// (tied) table in bf16 on the device (`DenseStorage::AsStored`), which hold exactly the values
/// the checkpoint widened to f32 holds: so the logits of an image batch, a LoRA training step's
/// loss and gradients, and greedy decoding with the KV cache (the bf16 rows kernels) equal the
/// widened model's up to the order of f32 sums.
#[test]
fn bf16_checkpoint_kept_as_stored_matches_its_f32_widening() {
    use ops::generation::decode::argmax;
    use ops::gpu::DType;
    use ops::model::gpu::{BaseWeight, DenseStorage};

    let gpu = test_gpu();
    let dir = bf16_copy(&tiny());
    let (config, weights) = load(dir.path());
    let b = golden_batch("mmiu");
    let build = |dense: DenseStorage, adapter: Option<&Adapter>| {
        Gemma3Gpu::from_weights(
            gpu,
            &config,
            &weights,
            adapter,
            Gemma3GpuOptions {
                lora: adapter.map(|a| a.settings),
                dense,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let dtype_of = |m: &Gemma3Gpu| match &m.layers[0].q_proj.weight {
        BaseWeight::Dense(w) => (w.dtype(), m.embed_tokens.as_ref().unwrap().dtype()),
        BaseWeight::Nf4(_) => panic!("a dense checkpoint"),
    };
    let stored = build(DenseStorage::AsStored, None);
    let widened = build(DenseStorage::F32, None);
    assert_eq!(dtype_of(&stored), (DType::BF16, DType::BF16));
    assert_eq!(dtype_of(&widened), (DType::F32, DType::F32));

    let batch = to_gpu_batch(&b);
    let e = rel_frobenius(
        &stored.logits(gpu, &batch).unwrap(),
        &widened.logits(gpu, &batch).unwrap(),
    );
    eprintln!("bf16 as stored vs widened: logits {e:.2e}");
    assert!(e <= 1e-5, "logits {e}");

    // greedy decoding of the batch's first row, its images included (the training batch is
    // right-padded; generation takes left padding)
    let prompt = to_gpu_batch(&first_row(&b));
    let generate = |m: &Gemma3Gpu| {
        let (mut cache, mut logits) = m.start_generation(gpu, &prompt, 6).unwrap();
        let mut tokens = Vec::new();
        let mut all_logits = Vec::new();
        for step in 0..6 {
            let id = argmax(&logits);
            all_logits.extend_from_slice(&logits);
            tokens.push(id);
            if step < 5 {
                logits = m.decode_step(gpu, &mut cache, &[id]).unwrap();
            }
        }
        (tokens, all_logits)
    };
    let (tokens, logits) = generate(&stored);
    let (want_tokens, want_logits) = generate(&widened);
    let e = rel_frobenius(&logits, &want_logits);
    eprintln!("bf16 as stored vs widened: tokens {tokens:?}, decode logits {e:.2e}");
    assert_eq!(tokens, want_tokens);
    assert!(e <= 1e-5, "decode logits {e}");

    // a training step with LoRA on every linear, the tower's included
    let adapter = Adapter::load(&golden("lora/adapter_init")).unwrap();
    let labels = Gemma3Reference::shifted_labels(&b, true).unwrap();
    let num_items = count_label_tokens(&labels);
    let (loss, grads) = gpu_step(
        gpu,
        &mut build(DenseStorage::AsStored, Some(&adapter)),
        &b,
        num_items,
        2,
    );
    let (want_loss, want_grads) = gpu_step(
        gpu,
        &mut build(DenseStorage::F32, Some(&adapter)),
        &b,
        num_items,
        2,
    );
    assert!(rel(loss, want_loss) <= 1e-6, "loss {loss} vs {want_loss}");
    for (key, g) in &want_grads {
        let e = rel_frobenius(&grads[key], g);
        assert!(e <= 1e-4, "{key}: {e}");
    }
}
