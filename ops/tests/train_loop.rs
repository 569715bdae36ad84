//! The training loop (`ops::train::trainer`) against the golden SFTTrainer run of
//! tests/fixtures/golden/lora/train.json (transformers 5.24 + PEFT 0.21.2 + TRL 1.16), with the
//! model's forward/backward done by the CPU reference (`ReferenceTrainModel`), so the loop's own
//! parts — accumulation and loss normalisation, clipping, AdamW on the GPU, the schedule, the
//! logged metrics, checkpoints and resume — are what is tested.

use std::path::Path;

use ops::data::collate::Batch;
use ops::gpu::testing::{rel_frobenius, test_gpu};
use ops::gpu::{Gpu, GpuTensor, Recorder};
use ops::model::config::ModelConfig;
use ops::model::reference::lora::Adapter;
use ops::model::reference::Gemma3Reference;
use ops::model::Weights;
use ops::train::adapter::{self, AdapterConfig};
use ops::train::metrics::{read_metrics, LogRecord, METRICS_FILE};
use ops::train::model::{Parameter, TrainModel};
use ops::train::optimizer::write_f32;
use ops::train::optimizer::AdamWConfig;
use ops::train::reference_model::ReferenceTrainModel;
use ops::train::schedule::ScheduleKind;
use ops::train::trainer::{
    train, LossNormalizationKind, NonFiniteError, Resume, SaveStrategy, TrainConfig, TrainOutputs,
    VecSource,
};
use ops::NoProgress;

use crate::common::*;

fn tiny_model() -> Gemma3Reference {
    let dir = tiny();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir, &config).unwrap();
    Gemma3Reference::from_weights(&config, &weights).unwrap()
}

fn golden_run() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("lora/train.json")).unwrap()).unwrap()
}

/// The micro-batches of the golden run in the order the Trainer drew them (collated by
/// tools/refmodel/replay_batches.py), as two epochs of three batches.
fn golden_batches() -> VecSource {
    let info = golden_run();
    let order: Vec<Vec<usize>> =
        serde_json::from_value(info["micro_batch_rows_in_order"].clone()).unwrap();
    let t = tensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/replay_batches.safetensors"),
    );
    let image_token = 572;
    let mm_tokens = 4;
    let batches: Vec<Batch> = order
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let (shape, input_ids) = i64s(&t, &format!("mb{i}.input_ids"));
            let (b, s) = (shape[0], shape[1]);
            let pixel_shape = t[&format!("mb{i}.pixel_values")].1.clone();
            let images_per_sample = (0..b)
                .map(|r| {
                    input_ids[r * s..(r + 1) * s]
                        .iter()
                        .filter(|&&id| id == image_token)
                        .count()
                        / mm_tokens
                })
                .collect();
            Batch {
                batch_size: b,
                seq_len: s,
                attention_mask: i64s(&t, &format!("mb{i}.attention_mask")).1,
                token_type_ids: i64s(&t, &format!("mb{i}.token_type_ids")).1,
                labels: i64s(&t, &format!("mb{i}.labels")).1,
                pixel_values: f32s(&t, &format!("mb{i}.pixel_values")),
                input_ids,
                num_images: pixel_shape[0],
                image_height: pixel_shape[2],
                image_width: pixel_shape[3],
                images_per_sample,
                rows: rows.clone(),
                epoch: i / 3,
                index_in_epoch: i % 3,
            }
        })
        .collect();
    assert_eq!(batches.len(), 6);
    VecSource {
        epochs: vec![batches[..3].to_vec(), batches[3..].to_vec()],
    }
}

/// The golden run's arguments (train.json `args`).
fn golden_config() -> TrainConfig {
    let info = golden_run();
    let a = &info["args"];
    TrainConfig {
        learning_rate: a["learning_rate"].as_f64().unwrap(),
        lr_scheduler_type: ScheduleKind::Linear,
        warmup_steps: a["warmup_steps"].as_f64().unwrap(),
        warmup_ratio: 0.0,
        adamw: AdamWConfig {
            beta1: a["adam_beta1"].as_f64().unwrap(),
            beta2: a["adam_beta2"].as_f64().unwrap(),
            eps: a["adam_epsilon"].as_f64().unwrap(),
            weight_decay: a["weight_decay"].as_f64().unwrap(),
        },
        max_grad_norm: a["max_grad_norm"].as_f64().unwrap(),
        gradient_accumulation_steps: a["gradient_accumulation_steps"].as_u64().unwrap() as usize,
        num_train_epochs: 3.0,
        max_steps: Some(a["max_steps"].as_u64().unwrap()),
        logging_steps: a["logging_steps"].as_u64().unwrap(),
        save_strategy: SaveStrategy::No,
        save_total_limit: None,
        loss_normalization: LossNormalizationKind::TokenMean,
        seed: a["seed"].as_u64().unwrap(),
    }
}

fn init_adapter() -> (AdapterConfig, Adapter) {
    let dir = golden("lora/adapter_init");
    (
        adapter::read_config(&dir).unwrap(),
        Adapter::load(&dir).unwrap(),
    )
}

fn outputs(root: &Path, name: &str) -> TrainOutputs {
    TrainOutputs {
        out_dir: root.join(name),
        tensorboard_dir: Some(root.join(name).join("runs/test")),
        checkpoint_dir: root.join(format!("{name}-checkpoints")),
    }
}

#[test]
fn three_steps_match_sft_trainer() {
    let gpu = test_gpu();
    let (_, init) = init_adapter();
    let mut model = ReferenceTrainModel::new(gpu, tiny_model(), init).unwrap();
    three_steps_match_sft_trainer_with(&mut model);
}

/// The same golden run with the model on the GPU kernels (what `lora-train` trains).
#[test]
fn three_steps_on_the_gpu_model_match_sft_trainer() {
    let mut model = gpu_model(false);
    three_steps_match_sft_trainer_with(&mut model);
}

/// The tiny model on the GPU kernels with the initial adapter, checkpointed, f32 or `bf16`.
fn gpu_model(bf16: bool) -> ops::model::gpu::model::Gemma3Gpu {
    let (_, init) = init_adapter();
    let dir = tiny();
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir, &config).unwrap();
    ops::model::gpu::model::Gemma3Gpu::from_weights(
        test_gpu(),
        &config,
        &weights,
        Some(&init),
        ops::model::gpu::model::Gemma3GpuOptions {
            gradient_checkpointing: true,
            lora: Some(init.settings),
            bf16,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `bf16 = true` against SFTTrainer with the guide's precision (the model loaded in bfloat16,
/// `bf16=True`: tests/fixtures/golden/lora_bf16, tools/fixtures/bf16_train.py). PEFT keeps the
/// LoRA pairs in f32 and the modules_to_save copies in bf16 with bf16 gradients and moments, as
/// this engine does under `bf16`; torch also runs every matmul in bf16 under autocast, where this
/// engine computes in f32.
///
/// Tolerances. bf16's unit roundoff is u = 2⁻⁹ ≈ 2e-3, and torch's own f32 and bf16 runs differ
/// in loss by ≤ 1e-3 and in grad norm by ≤ 3e-3 (the two goldens): loss within 2e-3 (≈ u) and grad
/// norm within 5e-3. The trained tensors are noisier: lr 1e-2 with clipping makes each AdamW
/// update nearly lr·sign(g), so a gradient element near zero whose sign bf16 rounding flips moves
/// by a full step; torch's own f32 and bf16 runs differ by up to 0.2 in a tensor's change from the
/// initial adapter (relative Frobenius). So each tensor's change must agree within 0.25, and over
/// all tensors together within 1.25× the spread between torch's f32 and bf16 runs. A lost update
/// (a bf16 gradient rounded away, rows scattered to the wrong place) is off by ~1.
#[test]
fn three_steps_in_bf16_match_sft_trainer_in_bf16() {
    let gpu = test_gpu();
    let (config, _) = init_adapter();
    let mut model = gpu_model(true);
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("lora_bf16/train.json")).unwrap())
            .unwrap();
    assert_eq!(
        gold["micro_batch_rows_in_order"],
        golden_run()["micro_batch_rows_in_order"],
        "the bf16 golden drew its micro-batches in another order"
    );
    let root = tempfile::tempdir().unwrap();
    let out = outputs(root.path(), "run");
    let summary = train(
        gpu,
        &mut model,
        &golden_batches(),
        &golden_config(),
        &config,
        &out,
        &Resume::No,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(summary.global_step, 3);
    let history = gold["log_history"].as_array().unwrap();
    let logged = read_metrics(&out.out_dir.join(METRICS_FILE)).unwrap();
    assert_eq!(logged.len(), 3);
    for (got, want) in logged.iter().zip(history) {
        let f = |k: &str| want[k].as_f64().unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        eprintln!(
            "bf16 step {}: loss {} vs {} ({:.1e}), grad_norm {} vs {} ({:.1e})",
            got.step,
            got.loss,
            f("loss"),
            rel(got.loss, f("loss")),
            got.grad_norm,
            f("grad_norm"),
            rel(got.grad_norm, f("grad_norm")),
        );
        assert!(rel(got.loss, f("loss")) <= 2e-3, "loss {got:?}");
        assert!(
            rel(got.grad_norm, f("grad_norm")) <= 5e-3,
            "grad_norm {got:?}"
        );
        assert_eq!(got.num_tokens as f64, f("num_tokens"));
    }
    let want = tensors(&golden("lora_bf16/adapter_step3/adapter_model.safetensors"));
    let start = tensors(&golden("lora/adapter_init/adapter_model.safetensors"));
    let f32_gold = tensors(&golden("lora/adapter_step3/adapter_model.safetensors"));
    let got = adapter::read_adapter(&out.out_dir).unwrap();
    assert_eq!(got.tensors.len(), want.len());
    let mut worst = (0.0, String::new());
    // Σ‖Δgot − Δwant‖², Σ‖Δf32 − Δwant‖², Σ‖Δwant‖² over every tensor
    let (mut ours, mut torch_spread, mut norm) = (0.0f64, 0.0f64, 0.0f64);
    let sq = |a: &[f32], b: &[f32]| -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
    };
    for (key, t) in &got.tensors {
        let copy = !key.contains("lora_");
        assert_eq!(
            t.dtype == ops::train::adapter::DType::BF16,
            copy,
            "{key}: the copies are saved as bf16, the LoRA pairs as f32"
        );
        let s = f32s(&start, key);
        let delta = |v: &[f32]| -> Vec<f32> { v.iter().zip(&s).map(|(a, b)| a - b).collect() };
        let (d_got, d_want) = (delta(&t.to_f32()), delta(&f32s(&want, key)));
        let d_f32 = delta(&f32s(&f32_gold, key));
        ours += sq(&d_got, &d_want);
        torch_spread += sq(&d_f32, &d_want);
        norm += sq(&d_want, &vec![0.0; d_want.len()]);
        let e = rel_frobenius(&d_got, &d_want);
        if e > worst.0 {
            worst = (e, key.clone());
        }
    }
    let (ours, torch_spread) = ((ours / norm).sqrt(), (torch_spread / norm).sqrt());
    eprintln!(
        "bf16 adapter after 3 steps vs PEFT bf16 (change from init): worst {:.2e} at {}; all \
         tensors {ours:.2e} (torch f32 vs bf16: {torch_spread:.2e})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 0.25, "{} off by {}", worst.1, worst.0);
    assert!(
        ours <= 1.25 * torch_spread,
        "all tensors off by {ours}, torch's own f32/bf16 spread is {torch_spread}"
    );
}

fn three_steps_match_sft_trainer_with(model: &mut dyn ops::train::model::TrainModel) {
    let gpu = test_gpu();
    let (config, _) = init_adapter();
    let root = tempfile::tempdir().unwrap();
    let out = outputs(root.path(), "run");
    let summary = train(
        gpu,
        model,
        &golden_batches(),
        &golden_config(),
        &config,
        &out,
        &Resume::No,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(summary.global_step, 3);

    // Logged metrics vs the Trainer's log_history.
    let info = golden_run();
    let history = info["log_history"].as_array().unwrap();
    let logged = read_metrics(&out.out_dir.join(METRICS_FILE)).unwrap();
    // (serde_json's float parsing may differ from the written value in the last bit)
    assert_eq!(logged.len(), summary.records.len());
    assert_eq!(logged.len(), 3);
    for (got, want) in logged.iter().zip(history) {
        let f = |k: &str| want[k].as_f64().unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        eprintln!(
            "step {}: loss {} ({:.1e}), grad_norm {} ({:.1e}), lr {}, accuracy {} vs {}, tokens {}, epoch {}",
            got.step,
            got.loss,
            rel(got.loss, f("loss")),
            got.grad_norm,
            rel(got.grad_norm, f("grad_norm")),
            got.learning_rate,
            got.mean_token_accuracy,
            f("mean_token_accuracy"),
            got.num_tokens,
            got.epoch
        );
        assert_eq!(got.step, want["step"].as_u64().unwrap());
        assert!(rel(got.loss, f("loss")) <= 1e-4, "loss {got:?}");
        assert!(
            rel(got.grad_norm, f("grad_norm")) <= 1e-4,
            "grad_norm {got:?}"
        );
        assert!((got.learning_rate - f("learning_rate")).abs() <= 1e-12);
        assert!((got.epoch - f("epoch")).abs() <= 1e-12);
        assert_eq!(got.num_tokens as f64, f("num_tokens"));
        assert!(
            (got.mean_token_accuracy - f("mean_token_accuracy")).abs() <= 1e-6,
            "accuracy {got:?}"
        );
    }

    // The adapter written vs PEFT's after SFTTrainer.train().
    let want = tensors(&golden("lora/adapter_step3/adapter_model.safetensors"));
    let got = adapter::read_adapter(&out.out_dir).unwrap();
    assert_eq!(got.tensors.len(), want.len());
    let mut worst = (0.0, String::new());
    for (key, t) in &got.tensors {
        let e = rel_frobenius(&t.to_f32(), &f32s(&want, key));
        if e > worst.0 {
            worst = (e, key.clone());
        }
    }
    eprintln!(
        "adapter after 3 steps vs PEFT: worst {:.2e} at {}",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-3, "{} off by {}", worst.1, worst.0);
    assert_eq!(got.config.r, config.r);

    // A TensorBoard event file with the six scalars of each log.
    let runs: Vec<_> = std::fs::read_dir(out.out_dir.join("runs/test"))
        .unwrap()
        .collect();
    assert_eq!(runs.len(), 1);
    let records = ops::train::tensorboard::read_records(&runs[0].as_ref().unwrap().path()).unwrap();
    assert_eq!(records.len(), 1 + 3 * 6);
}

/// What a [`Faulty`] model does at its chosen micro-batch.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The process dies (an error) before the micro-batch runs.
    Crash,
    NanLoss,
    NanGradient,
}

/// The reference model with one fault injected at micro-batch `at_call`.
struct Faulty {
    inner: ReferenceTrainModel,
    at_call: u64,
    fault: Fault,
}

impl TrainModel for Faulty {
    fn parameters(&self) -> Vec<Parameter> {
        self.inner.parameters()
    }
    fn accumulate(
        &mut self,
        gpu: &Gpu,
        rec: &mut Recorder,
        batch: &Batch,
        loss_scale: f32,
        call: u64,
    ) -> anyhow::Result<GpuTensor> {
        if call == self.at_call && self.fault == Fault::Crash {
            anyhow::bail!("injected crash at micro-batch {call}");
        }
        let totals = self.inner.accumulate(gpu, rec, batch, loss_scale, call)?;
        if call != self.at_call {
            return Ok(totals);
        }
        match self.fault {
            Fault::NanLoss => gpu.upload_u32(&[4], &[f32::NAN.to_bits(), 1, 0, 0]),
            Fault::NanGradient => {
                let p = &self.inner.parameters()[5];
                let mut poisoned = vec![0.0f32; p.grad.numel()];
                poisoned[0] = f32::NAN;
                write_f32(gpu, rec, &p.grad, &poisoned)?;
                Ok(totals)
            }
            Fault::Crash => unreachable!(),
        }
    }
}

fn resume_config() -> TrainConfig {
    TrainConfig {
        max_steps: Some(4),
        save_strategy: SaveStrategy::Steps(2),
        save_total_limit: Some(1),
        lr_scheduler_type: ScheduleKind::Cosine,
        warmup_steps: 1.0,
        ..golden_config()
    }
}

#[test]
fn resume_continues_the_same_curve() {
    let gpu = test_gpu();
    let data = golden_batches();
    let (config, _) = init_adapter();
    let fresh = || ReferenceTrainModel::new(gpu, tiny_model(), init_adapter().1).unwrap();
    let root = tempfile::tempdir().unwrap();

    // 4 steps straight.
    let straight = outputs(root.path(), "straight");
    train(
        gpu,
        &mut fresh(),
        &data,
        &resume_config(),
        &config,
        &straight,
        &Resume::No,
        &NoProgress,
    )
    .unwrap();

    // The same run dying in step 3 (micro-batches 0-1 step 1, 2 step 2, 3-4 step 3), after the
    // checkpoint of step 2; then resumed in a fresh output folder with a fresh model.
    let broken = outputs(root.path(), "broken");
    let err = train(
        gpu,
        &mut Faulty {
            inner: fresh(),
            at_call: 4,
            fault: Fault::Crash,
        },
        &data,
        &resume_config(),
        &config,
        &broken,
        &Resume::No,
        &NoProgress,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("injected crash"), "{err:#}");
    let resumed = TrainOutputs {
        out_dir: root.path().join("resumed"),
        ..broken.clone()
    };
    let summary = train(
        gpu,
        &mut fresh(),
        &data,
        &resume_config(),
        &config,
        &resumed,
        &Resume::Latest,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        summary.resumed_from,
        Some(broken.checkpoint_dir.join("checkpoint-2"))
    );

    let a = read_metrics(&straight.out_dir.join(METRICS_FILE)).unwrap();
    let b = read_metrics(&resumed.out_dir.join(METRICS_FILE)).unwrap();
    assert_eq!(a.len(), 4);
    let values = |r: &[LogRecord]| {
        r.iter()
            .map(|r| (r.step, r.loss, r.grad_norm, r.learning_rate, r.num_tokens))
            .collect::<Vec<_>>()
    };
    eprintln!("straight {:?}", values(&a));
    assert_eq!(a, b, "identical metrics.jsonl after a resume");
    let (x, y) = (
        adapter::read_adapter(&straight.out_dir).unwrap(),
        adapter::read_adapter(&resumed.out_dir).unwrap(),
    );
    assert_eq!(x.tensors, y.tensors, "identical adapters");
    // save_total_limit 1: only the final checkpoint remains.
    let left = ops::train::checkpoint::list(&broken.checkpoint_dir).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, 4);
    // Different settings cannot resume from these checkpoints.
    let other = TrainConfig {
        learning_rate: 1e-3,
        ..resume_config()
    };
    let err = train(
        gpu,
        &mut fresh(),
        &data,
        &other,
        &config,
        &outputs(root.path(), "other"),
        &Resume::Path(left[0].1.clone()),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("other training settings"),
        "{err:#}"
    );
}

#[test]
fn non_finite_values_stop_with_the_step_and_keep_the_last_checkpoint() {
    let gpu = test_gpu();
    let data = golden_batches();
    let (config, _) = init_adapter();
    let root = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        save_strategy: SaveStrategy::Steps(1),
        ..golden_config()
    };
    for (fault, at_call, step, name) in [
        (Fault::NanGradient, 3, 3, "gradient"),
        (Fault::NanLoss, 0, 1, "loss"),
    ] {
        let out = outputs(root.path(), name);
        let err = train(
            gpu,
            &mut Faulty {
                inner: ReferenceTrainModel::new(gpu, tiny_model(), init_adapter().1).unwrap(),
                at_call,
                fault,
            },
            &data,
            &cfg,
            &config,
            &out,
            &Resume::No,
            &NoProgress,
        )
        .unwrap_err();
        eprintln!("{err}");
        let nf = err
            .downcast_ref::<NonFiniteError>()
            .expect("a NonFiniteError");
        assert_eq!(nf.step, step);
        let want_checkpoint =
            (step > 1).then(|| out.checkpoint_dir.join(format!("checkpoint-{}", step - 1)));
        assert_eq!(nf.last_checkpoint, want_checkpoint);
        assert!(err.to_string().contains(&format!("step {step}")));
        assert!(
            !out.out_dir.join(adapter::WEIGHTS_FILE).exists(),
            "no final adapter after a failed run"
        );
        if let Some(dir) = want_checkpoint {
            adapter::read_adapter(&dir).unwrap();
        }
    }
}

#[test]
fn micro_batch_mean_is_the_mean_of_micro_batch_means() {
    use ops::model::reference::lora::LoraCall;
    use ops::model::reference::loss::{count_label_tokens, LossNormalization};
    use ops::train::reference_model::to_reference_batch;
    let gpu = test_gpu();
    let data = golden_batches();
    let (config, init) = init_adapter();
    let cfg = TrainConfig {
        max_steps: Some(1),
        loss_normalization: LossNormalizationKind::MicroBatchMean,
        ..golden_config()
    };
    let root = tempfile::tempdir().unwrap();
    let out = outputs(root.path(), "mbm");
    let mut model = ReferenceTrainModel::new(gpu, tiny_model(), init.clone()).unwrap();
    let summary = train(
        gpu,
        &mut model,
        &data,
        &cfg,
        &config,
        &out,
        &Resume::No,
        &NoProgress,
    )
    .unwrap();
    // Step 1 = micro-batches 0 and 1: (mean CE of each) / 2, summed (transformers ~4.53).
    let reference = tiny_model();
    let call = LoraCall {
        adapter: Some(&init),
        training: true,
        call: 0,
    };
    let mut want = 0.0;
    for b in &data.epochs[0][..2] {
        let rb = to_reference_batch(b);
        let counted = count_label_tokens(&Gemma3Reference::shifted_labels(&rb, true).unwrap());
        assert!(counted > 0);
        want += reference
            .loss(
                &rb,
                &call,
                LossNormalization::MicroBatchMean {
                    accumulation_steps: 2,
                },
            )
            .unwrap()
            .loss;
    }
    let got = summary.records[0].loss;
    eprintln!("micro-batch mean loss {got} vs {want}");
    assert!((got - want).abs() / want <= 1e-6, "{got} vs {want}");
    // And it differs from the token mean of the same step (13.2534): the option matters.
    assert!((got - 13.2534).abs() > 1e-3);
}
