//! The README's first command runs `recipes/demo.toml`: this runs the real binary on it, offline,
//! against the miniature Hub cache the project ships, and checks that a second run reuses it all.

mod offline_run;
use offline_run::{repo_root, run_recipe, Outcome};

#[test]
fn demo_recipe_runs_offline_then_reuses_every_output() {
    let work = tempfile::tempdir().unwrap();
    let Outcome {
        code,
        stdout,
        stderr,
    } = run_recipe("demo.toml", work.path(), &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let ops_in_recipe = std::fs::read_to_string(repo_root().join("recipes/demo.toml"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("[ops."))
        .count();
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran {}, reused 0, failed 0", ops_in_recipe - 1),
        "every op but the disabled push runs"
    );
    assert!(stdout.contains("6 rows"), "{stdout}");
    assert!(stdout.contains("quantized 40 Linear weights"), "{stdout}");
    let out = work.path().join("out");
    assert!(
        stdout.contains(&format!("adapter saved to {}", out.display())),
        "{stdout}"
    );
    // The loss visibly falls: the last logged loss is well below the first.
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(losses.len() >= 3, "{losses:?}");
    assert!(
        losses.last().unwrap() < &(0.8 * losses[0]),
        "the demo's loss does not fall: {losses:?}"
    );
    assert_matches_peft_compat_golden(&out);
    // The chain ends with a scored generation: the generate op's speed line and the score table.
    assert!(stdout.contains("6 answers"), "{stdout}");
    assert!(stdout.contains("tokens/s"), "{stdout}");
    assert!(stdout.contains("overall (mean of tasks)"), "{stdout}");

    let Outcome {
        code,
        stdout,
        stderr,
    } = run_recipe("demo.toml", work.path(), &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran 0, reused {}, failed 0", ops_in_recipe - 1)
    );
    side_effects_and_guards(work.path(), &out, ops_in_recipe - 1);
}

/// On the cache of a complete demo run: what `save` wrote outside the cache is checked, the
/// output folder cannot swallow the cache, push refuses offline mode at once, and an unwritable
/// checkpoint folder is found before training.
fn side_effects_and_guards(work: &std::path::Path, out: &std::path::Path, active_ops: usize) {
    // The output folder deleted: `save` runs again and writes it again.
    std::fs::remove_dir_all(out).unwrap();
    let o = run_recipe("demo.toml", work, &[]);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("stale save (save)"), "{}", o.stdout);
    assert_eq!(
        o.stdout.lines().last().unwrap(),
        format!("ran 1, reused {}, failed 0", active_ops - 1)
    );
    assert!(out.join("adapter_model.safetensors").is_file());
    // A file of the folder changed: written again too.
    std::fs::write(out.join("adapter_config.json"), "{}").unwrap();
    let o = run_recipe("demo.toml", work, &[]);
    assert!(o.stdout.contains("stale save (save)"), "{}", o.stdout);
    assert!(
        std::fs::read(out.join("adapter_config.json"))
            .unwrap()
            .len()
            > 2
    );

    // A file the user added to the folder survives a rewrite of it.
    std::fs::write(out.join("my-notes.txt"), "mine").unwrap();
    let o = run_recipe("demo.toml", work, &["ops.save.model_card=false"]);
    assert_eq!(o.code, 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(
        std::fs::read_to_string(out.join("my-notes.txt")).unwrap(),
        "mine"
    );
    assert!(!out.join("README.md").exists(), "the card is gone");

    // An output_dir holding the cache (or the recipe, or the current folder) is refused, with
    // overwrite = true too, and nothing is deleted.
    let o = run_recipe(
        "demo.toml",
        work,
        &[
            &format!("recipe.output_dir={}", work.display()),
            "ops.save.overwrite=true",
        ],
    );
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("replacing it would delete it"),
        "{}",
        o.stderr
    );
    assert!(work.join("cache").is_dir() && out.is_dir());

    // Offline, push fails at once and says why.
    let started = std::time::Instant::now();
    let o = run_recipe(
        "demo.toml",
        work,
        &["ops.push.enabled=true", "ops.push.repo_id=someone/demo"],
    );
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("HF_HUB_OFFLINE is set"), "{}", o.stderr);
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());

    // A checkpoint folder that cannot be written fails the op before its first step.
    let blocker = work.join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let o = run_recipe(
        "demo.toml",
        work,
        &[&format!(
            "ops.train.checkpoint_dir={}",
            blocker.join("checkpoints").display()
        )],
    );
    assert_eq!(o.code, 1, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("is not writable"), "{}", o.stderr);
}

/// The saved folder has exactly the layout PEFT loaded without a warning of its own and with
/// logits within 3e-7 of ours (tests/fixtures/golden/peft_compat.json, made by
/// tools/peft_compat/check.py from a demo run): tensor keys, shapes and dtypes, config keys.
fn assert_matches_peft_compat_golden(out: &std::path::Path) {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("tests/fixtures/golden/peft_compat.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(golden["load_warnings"], serde_json::json!([]));
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let got: serde_json::Map<String, serde_json::Value> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let dtype = format!("{:?}", v.dtype());
            (k, serde_json::json!({"shape": v.shape(), "dtype": dtype}))
        })
        .collect();
    assert_eq!(
        serde_json::Value::Object(got),
        golden["adapter_tensors"],
        "adapter tensors differ from the layout PEFT loaded"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    let mut keys: Vec<&String> = config.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        serde_json::json!(keys),
        golden["adapter_config_keys"],
        "adapter_config.json keys differ"
    );
    for (k, v) in golden["adapter_config"].as_object().unwrap() {
        assert_eq!(&config[k], v, "adapter_config.json `{k}`");
    }
}
