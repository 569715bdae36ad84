//! The `lora-train` op end to end on the offline fixture chain (MMIU miniature -> templated ->
//! collated batches, tiny Gemma 3), through the op's `build_model` seam, checked against the
//! reference's own optimizer loop (`model::reference::train::train_step`) on the same batches.

use std::path::{Path, PathBuf};

use ops::data::collate::{BatchStream, StreamOptions};
use ops::lora_train::LoraTrainOp;
use ops::model::config::ModelConfig;
use ops::model::reference::lora::Adapter;
use ops::model::reference::train::{linear_lr, train_step, AdamWConfig, AdamWState};
use ops::model::reference::Gemma3Reference;
use ops::model::Weights;
use ops::train::adapter;
use ops::train::metrics::{read_metrics, METRICS_FILE};
use ops::train::reference_model::to_reference_batch;
use ops::Op;

use crate::common::*;

/// The chain of ops each test builds (seed 42), offline on the fixture Hub cache.
type Chain = OpHarness;

#[test]
fn lora_train_op_on_the_fixture_chain() {
    let c = Chain::new(42);
    let raw = c.run(
        &ops::load::Load,
        "raw",
        "dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"test\"",
        &[],
    );
    let images = c.run(&ops::unzip::Unzip, "images", "", &[("archives", &raw)]);
    let model = c.run(
        &ops::load::Load,
        "base",
        "model = \"runner-test/tiny-gemma-3\"",
        &[],
    );
    let chats = c.run(
        &ops::format::FormatOp,
        "chats",
        "system = \"{context}\"\nuser = { images = \"{input_image_path}\", text = \"{question}\" }\nassistant = \"{output}\"",
        &[("rows", &raw), ("files", &images)],
    );
    let templated = c.run(
        &ops::template::TemplateOp,
        "templated",
        "",
        &[("conversations", &chats), ("model", &model)],
    );
    let batches = c.run(
        &ops::collate::CollateOp,
        "batches",
        "batch_size = 2\nshuffle = false",
        &[("templated", &templated), ("model", &model)],
    );
    let init = repo().join("tests/fixtures/golden/lora/adapter_init");
    let params = format!(
        "init_adapter = {:?}\nlearning_rate = 1e-2\nweight_decay = 0.01\nmax_grad_norm = 0.05\n\
         gradient_accumulation_steps = 2\nmax_steps = 3\nlogging_steps = 1\nsave_steps = 2\nsave_total_limit = 1",
        init.display().to_string()
    );
    let trained = c.run(
        &LoraTrainOp::default(),
        "train",
        &params,
        &[("model", &model), ("batches", &batches)],
    );

    // The artifact: a PEFT folder the save op reads, the metrics, a TensorBoard run.
    let (config, metas) = adapter::inspect_adapter(&trained.dir).unwrap();
    assert_eq!(metas.len(), 82);
    assert_eq!(
        config.base_model_name_or_path.as_deref(),
        Some("runner-test/tiny-gemma-3")
    );
    let runs: Vec<_> = std::fs::read_dir(trained.dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    assert!(std::fs::read_dir(&runs[0]).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    // Checkpoints beside the output folder, pruned to the newest.
    let ckpts = ops::train::checkpoint::list(&c.root.join("out-checkpoints")).unwrap();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), vec![3]);

    // The reference's optimizer loop on the same batches: shuffle off, 3 batches per epoch,
    // accumulation 2 -> steps [b0, b1], [b2], [b0', b1'] (the epoch's short last cycle steps alone).
    let root = ops::model::artifact_model_root(&model.dir).unwrap().0;
    let mcfg = ModelConfig::from_file(&root.join("config.json")).unwrap();
    let reference =
        Gemma3Reference::from_weights(&mcfg, &Weights::open(&root, &mcfg).unwrap()).unwrap();
    let stream: Vec<_> = BatchStream::open(
        &batches.dir,
        StreamOptions {
            epochs: 2,
            ..Default::default()
        },
    )
    .unwrap()
    .map(|b| to_reference_batch(&b.unwrap()))
    .collect();
    assert_eq!(stream.len(), 6);
    let mut want_adapter = Adapter::load(&init).unwrap();
    let mut state = AdamWState::default();
    let optimizer = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    let steps = [&stream[0..2], &stream[2..3], &stream[3..5]];
    let logged = read_metrics(&trained.dir.join(METRICS_FILE)).unwrap();
    assert_eq!(logged.len(), 3);
    for (s, micro) in steps.iter().enumerate() {
        let lr = linear_lr(1e-2, s, 3, 0);
        let report = train_step(
            &reference,
            &mut want_adapter,
            micro,
            &mut state,
            &optimizer,
            lr,
            Some(0.05),
        )
        .unwrap();
        let got = &logged[s];
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        eprintln!(
            "step {}: loss {} vs {} ({:.1e}), grad_norm {} vs {} ({:.1e})",
            s + 1,
            got.loss,
            report.loss,
            rel(got.loss, report.loss),
            got.grad_norm,
            report.grad_norm_pre_clip,
            rel(got.grad_norm, report.grad_norm_pre_clip)
        );
        assert!(rel(got.loss, report.loss) <= 1e-5);
        assert!(rel(got.grad_norm, report.grad_norm_pre_clip) <= 1e-4);
        assert_eq!(got.learning_rate, lr);
    }
    let got = adapter::read_adapter(&trained.dir).unwrap();
    let mut worst = 0.0f64;
    for (key, want) in want_adapter.by_peft_key() {
        worst = worst.max(rel_frobenius(&got.tensors[&key].to_f32(), want));
    }
    eprintln!("adapter vs the reference loop: worst {worst:.2e}");
    assert!(worst <= 1e-3, "{worst}");
}

#[test]
fn bad_params_name_the_key() {
    let op = LoraTrainOp::default();
    for (params, key) in [
        ("bias = \"all\"", "bias"),
        ("report_to = \"wandb\"", "report_to"),
        (
            "lr_scheduler_type = \"cosine_with_restarts\"",
            "lr_scheduler_type",
        ),
        ("save_strategy = \"best\"", "save_strategy"),
        ("target_modules = \"(unclosed\"", "target_modules"),
        (
            "modules_to_save = [\"multi_modal_projector\"]",
            "modules_to_save",
        ),
        ("warmup_steps = 2\nwarmup_ratio = 0.1", "warmup_steps"),
    ] {
        let table: toml::Table = params.parse().unwrap();
        let err = op.check(&table).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{params}: {}", err.message);
    }
    let ok: toml::Table = "target_modules = [\"q_proj\", \"v_proj\"]\nreport_to = [\"tensorboard\"]\nresume_from_checkpoint = \"ckpt/checkpoint-10\""
        .parse()
        .unwrap();
    op.check(&ok).unwrap();
    assert_eq!(
        ops::train::setup::default_checkpoint_dir(Path::new("/x/gemma-sft")),
        PathBuf::from("/x/gemma-sft-checkpoints")
    );
}
