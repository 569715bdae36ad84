//! The guide's recipes (`recipes/mmiu.toml`, `recipes/llava.toml`) run end to end, offline,
//! against the miniature copies of both dataset repos and the tiny Gemma 3 model shipped in
//! tests/fixtures/hf-cache: the real files, changing only the model, the sizes and the push.

use std::path::Path;

mod offline_run;
use offline_run::{repo_root, run_recipe, Outcome};

/// The guide's recipe with the tiny fixture model and push disabled, plus `extra` overrides.
fn run_guide_recipe(recipe: &str, work: &Path, extra: &[&str]) -> Outcome {
    let mut sets = vec![
        "vars.model=runner-test/tiny-gemma-3",
        "ops.push.enabled=false",
    ];
    sets.extend_from_slice(extra);
    run_recipe(recipe, work, &sets)
}

fn ops_in(recipe: &str) -> usize {
    std::fs::read_to_string(repo_root().join("recipes").join(recipe))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("[ops."))
        .count()
}

/// What `save` must have written: a PEFT folder whose adapter covers every all-linear module of
/// the tiny model (the golden list PEFT resolved) plus the two modules_to_save copies.
fn assert_saved_adapter(out_dir: &Path) {
    let targets: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("tests/fixtures/golden/lora/targets.json")).unwrap(),
    )
    .unwrap();
    let want: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_value(targets["trainable_parameters"].clone()).unwrap();
    let bytes = std::fs::read(out_dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let got: std::collections::BTreeMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    assert_eq!(got, want, "adapter keys and shapes differ from PEFT's");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 16);
    assert_eq!(config["lora_alpha"], 16);
    assert!(out_dir.join("README.md").exists());
}

#[test]
fn mmiu_recipe_trains_offline_on_the_miniatures() {
    let work = tempfile::tempdir().unwrap();
    let Outcome {
        code,
        stdout,
        stderr,
    } = run_guide_recipe("mmiu.toml", work.path(), &["ops.train.max_steps=2"]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let n = ops_in("mmiu.toml");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran {}, reused 0, failed 0", n - 1),
        "every op but the disabled push runs:\n{stdout}"
    );
    assert_saved_adapter(&work.path().join("out"));

    // recipes/mmiu-eval.toml: the saved adapter loaded back as a PEFT folder, base and adapter
    // evaluated on the other side of the split (half of the 6 miniature rows here: 5% of 6 rows
    // would hold out none).
    let adapter = format!("vars.adapter={}", work.path().join("out").display());
    let eval_work = tempfile::tempdir().unwrap();
    let Outcome {
        code,
        stdout,
        stderr,
    } = run_recipe(
        "mmiu-eval.toml",
        eval_work.path(),
        &[
            "vars.model=runner-test/tiny-gemma-3",
            &adapter,
            "ops.raw.holdout.fraction=0.5",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran {}, reused 0, failed 0", ops_in("mmiu-eval.toml")),
        "{stdout}"
    );
    assert!(
        stdout.contains("of 6 rows"),
        "the holdout keeps part of the rows:\n{stdout}"
    );
}

#[test]
fn llava_recipe_trains_offline_on_the_miniatures() {
    let work = tempfile::tempdir().unwrap();
    let Outcome {
        code,
        stdout,
        stderr,
    } = run_guide_recipe(
        "llava.toml",
        work.path(),
        &[
            "ops.batches.batch_size=2",
            "ops.train.gradient_accumulation_steps=2",
            "ops.train.max_steps=1",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let n = ops_in("llava.toml");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran {}, reused 0, failed 0", n - 1),
        "{stdout}"
    );
    assert_saved_adapter(&work.path().join("out"));
}

/// A `quantized-model` (whose model.json names its own folder as ".") feeds template, collate
/// and save exactly as the `model` it came from: each resolves the folder against the cache
/// entry, not the current directory. Regression test: they read `./config.json` before.
#[test]
fn quantized_model_feeds_template_collate_and_save() {
    let work = tempfile::tempdir().unwrap();
    let sets = [
        "ops.texts.inputs.model=nf4",
        "ops.batches.inputs.model=nf4",
        "ops.save.inputs.model=nf4",
        "ops.train.num_train_epochs=1",
        "ops.train.max_steps=1",
    ];
    let Outcome {
        code,
        stdout,
        stderr,
    } = run_recipe("demo.toml", work.path(), &sets);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("done texts"), "{stdout}");
    assert!(stdout.contains("done batches"), "{stdout}");
    assert!(stdout.contains("done save"), "{stdout}");
    let saved = work.path().join("out");
    assert!(saved.join("adapter_model.safetensors").exists(), "{stdout}");
}
