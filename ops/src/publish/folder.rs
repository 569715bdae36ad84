//! The output folder of `save`: the trained adapter as a folder `PeftModel.from_pretrained(base,
//! folder)` loads, with the processor files, a model card and the recipe, and optionally the
//! merged model; built beside its target and renamed into place only when complete. The `save`
//! op (`crate::save`) documents where things go and what is refused.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::data::model_dir::ModelManifest;
use crate::publish::{card, merge};
use crate::train::{adapter, metrics};

/// Marks a folder written by `save`, so a rerun may replace it.
pub const MARKER_FILE: &str = ".runner-save.json";
/// In the cache output: where the folder was written.
pub const SAVED_JSON: &str = "saved.json";
/// The merged model's subfolder of `output_dir`.
pub const MERGED_DIR: &str = "merged";

/// Processor and tokenizer files copied from the base model folder (what
/// `processor.save_pretrained` writes, old and new layouts).
const PROCESSOR_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
];

/// What [`save`] does, independent of the runner.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub output_dir: PathBuf,
    pub overwrite: bool,
    pub merge: bool,
    pub model_card: bool,
    pub max_shard_bytes: u64,
    pub recipe_name: String,
    pub recipe_path: Option<PathBuf>,
    /// The Hub repo the card's quick start should name.
    pub hub_repo: Option<String>,
    /// Paths `output_dir` must not be or contain (the recipe, the cache, the current
    /// directory): replacing `output_dir` would delete them.
    pub protected: Vec<PathBuf>,
}

/// The absolute path with `.` and `..` removed lexically (the folder may not exist yet), then
/// through any symlinks of the longest part that exists.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    let mut existing = out.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return out,
        }
    }
    let mut real = fs::canonicalize(&existing).unwrap_or(existing);
    real.extend(rest.iter().rev());
    real
}

/// Refuses an `output_dir` that is, or is an ancestor of, a protected path.
fn check_not_protected(dir: &Path, protected: &[PathBuf]) -> anyhow::Result<()> {
    let dir = normalize(dir);
    for p in protected {
        let p = normalize(p);
        if p.starts_with(&dir) {
            bail!(
                "output_dir {} holds {}; replacing it would delete it. Choose an output_dir outside the recipe's folder tree (e.g. a new subfolder), the cache and the current directory",
                dir.display(),
                p.display()
            );
        }
    }
    Ok(())
}

/// Why the folder a cached `save` output (`entry`) wrote is no longer as written, if it is not.
pub fn written_folder_problem(entry: &Path) -> Option<String> {
    let saved: Value = serde_json::from_slice(&fs::read(entry.join(SAVED_JSON)).ok()?).ok()?;
    let dir = PathBuf::from(saved["output_dir"].as_str()?);
    if !dir.join(MARKER_FILE).is_file() {
        return Some(format!("its output folder {} is gone", dir.display()));
    }
    let sizes = saved["sizes"].as_object()?;
    for (rel, size) in sizes {
        match fs::metadata(dir.join(rel)) {
            Ok(m) if Some(m.len()) == size.as_u64() => {}
            Ok(_) => return Some(format!("{} was changed", dir.join(rel).display())),
            Err(_) => return Some(format!("{} is missing", dir.join(rel).display())),
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    pub output_dir: PathBuf,
    pub files: Vec<String>,
    pub merged: Option<merge::MergeReport>,
}

/// Refuses to replace a non-empty folder that is not ours (unless `overwrite`).
fn check_output_dir(dir: &Path, overwrite: bool) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!("output_dir {} exists and is not a folder", dir.display());
    }
    let non_empty = fs::read_dir(dir)?.next().is_some();
    if non_empty && !dir.join(MARKER_FILE).exists() && !overwrite {
        bail!(
            "output_dir {} already holds files that runner did not write; choose another output_dir, or set overwrite = true to replace the folder",
            dir.display()
        );
    }
    Ok(())
}

/// Hard-links `from` to `to` when possible (both in the cache, immutable), else copies.
fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    // The HF cache's snapshot files are relative symlinks into `blobs/`: `hard_link` would link
    // the symlink itself, which dangles once moved. Link (or copy) what it points to.
    let from = &fs::canonicalize(from).with_context(|| format!("reading {}", from.display()))?;
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path, files: &[String], link: bool) -> anyhow::Result<()> {
    for rel in files {
        let (src, dst) = (from.join(rel), to.join(rel));
        if link {
            link_or_copy(&src, &dst)?;
        } else {
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Builds the adapter folder in `out_dir`, then publishes it (and the merged model) to
/// `opts.output_dir`.
pub fn save(
    adapter_dir: &Path,
    model: &ModelManifest,
    out_dir: &Path,
    opts: &SaveOptions,
    log: &dyn Fn(String),
) -> anyhow::Result<SaveReport> {
    check_not_protected(&opts.output_dir, &opts.protected)?;
    check_output_dir(&opts.output_dir, opts.overwrite)?;
    let (mut config, _) = adapter::inspect_adapter(adapter_dir)?;
    let base_name = model
        .repo_id
        .clone()
        .unwrap_or_else(|| model.root.display().to_string());
    config.base_model_name_or_path = Some(base_name.clone());
    config.inference_mode = true;

    // 1. The adapter folder, in the cache output.
    fs::create_dir_all(out_dir)?;
    let mut files: Vec<String> = Vec::new();
    for (src, rel) in crate::hub::upload::list_folder(adapter_dir)? {
        if rel == adapter::CONFIG_FILE {
            continue;
        }
        link_or_copy(&src, &out_dir.join(&rel))?;
        files.push(rel);
    }
    fs::write(out_dir.join(adapter::CONFIG_FILE), config.to_json_string())?;
    files.push(adapter::CONFIG_FILE.into());
    for name in PROCESSOR_FILES {
        let src = model.root.join(name);
        if src.is_file() {
            link_or_copy(&src, &out_dir.join(name))?;
            files.push(name.into());
        }
    }
    let recipe_text = match &opts.recipe_path {
        Some(p) if p.is_file() => {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = fs::read_to_string(p)
                .with_context(|| format!("reading the recipe {}", p.display()))?;
            fs::write(out_dir.join(&name), &text)?;
            files.push(name.clone());
            Some((name, text))
        }
        _ => None,
    };
    if opts.model_card {
        let recipe_table: Option<toml::Table> =
            recipe_text.as_ref().and_then(|(_, t)| t.parse().ok());
        let metrics_path = adapter_dir.join(metrics::METRICS_FILE);
        let metrics = if metrics_path.exists() {
            metrics::read_metrics(&metrics_path)?
        } else {
            vec![]
        };
        let base_config: Value = fs::read(model.root.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let vision = base_config.get("vision_config").is_some();
        let inputs = card::CardInputs {
            model_name: opts.recipe_name.clone(),
            base_model: base_name.clone(),
            base_model_on_hub: model.repo_id.is_some(),
            datasets: recipe_table
                .as_ref()
                .map(card::recipe_datasets)
                .unwrap_or_default(),
            pipeline_tag: if vision {
                "image-text-to-text"
            } else {
                "text-generation"
            }
            .into(),
            training_params: recipe_table.as_ref().and_then(card::recipe_training_params),
            metrics,
            recipe: recipe_text.clone(),
            hub_repo: opts.hub_repo.clone(),
            merged: opts.merge,
        };
        fs::write(out_dir.join("README.md"), card::render(&inputs, &config))?;
        files.push("README.md".into());
    }
    files.sort();

    // 2. output_dir: staged beside it, renamed into place when complete.
    let parent = opts
        .output_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let leaf = opts
        .output_dir
        .file_name()
        .context("output_dir has no folder name")?
        .to_string_lossy()
        .into_owned();
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{leaf}.runner-tmp-"))
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    copy_tree(out_dir, staging.path(), &files, false)?;
    let merged = if opts.merge {
        log(format!(
            "merging the adapter into {} ...",
            model.root.display()
        ));
        let dir = staging.path().join(MERGED_DIR);
        fs::create_dir_all(&dir)?;
        let report = merge::merge_adapter(&model.root, adapter_dir, &dir, opts.max_shard_bytes)?;
        for name in PROCESSOR_FILES {
            let src = model.root.join(name);
            if src.is_file() {
                fs::copy(&src, dir.join(name))?;
            }
        }
        Some(report)
    } else {
        None
    };
    let marker =
        json!({"written_by": "runner", "op": "save", "recipe": opts.recipe_name, "files": files});
    fs::write(
        staging.path().join(MARKER_FILE),
        serde_json::to_string_pretty(&marker)? + "\n",
    )?;
    let staged = staging.keep();
    replace_dir(&staged, &opts.output_dir, log)?;

    let mut sizes = serde_json::Map::new();
    for rel in files.iter().map(String::as_str).chain([MARKER_FILE]) {
        let len = fs::metadata(opts.output_dir.join(rel))?.len();
        sizes.insert(rel.to_string(), len.into());
    }
    let saved = json!({
        "output_dir": fs::canonicalize(&opts.output_dir).unwrap_or(opts.output_dir.clone()),
        "base_model": base_name,
        "files": files,
        "sizes": sizes,
        "merged": merged.as_ref().map(|m| json!({"dir": opts.output_dir.join(MERGED_DIR), "files": m.files})),
    });
    fs::write(
        out_dir.join(SAVED_JSON),
        serde_json::to_string_pretty(&saved)? + "\n",
    )?;
    Ok(SaveReport {
        output_dir: opts.output_dir.clone(),
        files,
        merged,
    })
}

/// Puts `staged` at `target`, replacing a previous folder: the old one is moved aside first
/// (restored if the rename fails). Only what runner wrote into it (the files its marker lists)
/// is deleted: files added to it since are moved into the new folder, and a folder without a
/// marker (replaced through `overwrite = true`) is kept aside whole, under a name printed.
fn replace_dir(staged: &Path, target: &Path, log: &dyn Fn(String)) -> anyhow::Result<()> {
    if !target.exists() {
        return fs::rename(staged, target)
            .with_context(|| format!("renaming {} to {}", staged.display(), target.display()));
    }
    let ours: Option<Vec<String>> = fs::read(target.join(MARKER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|m| serde_json::from_value(m["files"].clone()).ok());
    let leaf = target.file_name().unwrap_or_default().to_string_lossy();
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let aside = target.with_file_name(match ours {
        Some(_) => format!(".{leaf}.runner-replaced-{stamp}"),
        None => format!("{leaf}.before-runner-{stamp}"),
    });
    fs::rename(target, &aside)
        .with_context(|| format!("moving the previous {} aside", target.display()))?;
    if let Err(e) = fs::rename(staged, target) {
        let _ = fs::rename(&aside, target);
        return Err(e)
            .with_context(|| format!("renaming {} to {}", staged.display(), target.display()));
    }
    let Some(ours) = ours else {
        log(format!(
            "overwrite = true: the previous {} (not written by runner) was moved to {}",
            target.display(),
            aside.display()
        ));
        return Ok(());
    };
    let mut kept = Vec::new();
    for (path, rel) in files_under(&aside)? {
        let written =
            rel == MARKER_FILE || ours.contains(&rel) || rel.starts_with(&format!("{MERGED_DIR}/"));
        if written {
            continue;
        }
        let dest = target.join(&rel);
        if dest.exists() {
            kept.push(rel);
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&path, &dest)
            .with_context(|| format!("moving {} into the new {}", rel, target.display()))?;
    }
    if kept.is_empty() {
        fs::remove_dir_all(&aside)
            .with_context(|| format!("removing the previous folder {}", aside.display()))
    } else {
        log(format!(
            "kept the previous {} as {}: it holds files runner did not write that the new folder also has ({})",
            target.display(),
            aside.display(),
            kept.join(", ")
        ));
        Ok(())
    }
}

/// Every file and symlink under `dir` (symlinks not followed), with its `/`-separated relative
/// path.
fn files_under(dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                stack.push((e.path(), rel));
            } else {
                out.push((e.path(), rel));
            }
        }
    }
    Ok(out)
}

/// The folder a `saved` artifact holds for upload (every file except `saved.json`).
pub fn saved_files(artifact_dir: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    Ok(crate::hub::upload::list_folder(artifact_dir)?
        .into_iter()
        .filter(|(_, rel)| rel != SAVED_JSON)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::metrics::{LogRecord, MetricsWriter};

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/publish")
            .join(rel)
    }

    /// An `adapter` artifact as lora-train leaves it and a `model` artifact for the tiny base.
    fn artifacts(tmp: &Path) -> (PathBuf, ModelManifest) {
        let adapter_dir = tmp.join("adapter");
        fs::create_dir_all(adapter_dir.join("runs/Nov28_10-00-00_host")).unwrap();
        for f in [adapter::CONFIG_FILE, adapter::WEIGHTS_FILE] {
            fs::copy(fixture("peft_adapter").join(f), adapter_dir.join(f)).unwrap();
        }
        fs::write(
            adapter_dir.join("runs/Nov28_10-00-00_host/events.out.tfevents.1.host.1.0"),
            b"tb",
        )
        .unwrap();
        let mut m = MetricsWriter::open(&adapter_dir.join(metrics::METRICS_FILE)).unwrap();
        for step in [10u64, 20] {
            m.log(&LogRecord {
                step,
                loss: 4.0 / step as f64,
                grad_norm: 1.0,
                learning_rate: 1e-5,
                mean_token_accuracy: 0.5,
                num_tokens: 100 * step,
                epoch: step as f64 / 20.0,
            })
            .unwrap();
        }
        let root = tmp.join("base");
        fs::create_dir_all(&root).unwrap();
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            fs::copy(fixture("tiny_base").join(f), root.join(f)).unwrap();
        }
        fs::write(root.join("tokenizer.json"), b"{\"tokenizer\": true}").unwrap();
        fs::write(root.join("processor_config.json"), b"{\"processor\": true}").unwrap();
        (
            adapter_dir,
            ModelManifest {
                repo_id: Some("runner-test/tiny-gemma-3".into()),
                revision: None,
                root,
                files: vec![],
            },
        )
    }

    fn opts(output_dir: PathBuf, recipe: PathBuf) -> SaveOptions {
        SaveOptions {
            output_dir,
            overwrite: false,
            merge: false,
            model_card: true,
            max_shard_bytes: merge::DEFAULT_MAX_SHARD_BYTES,
            recipe_name: "tiny-demo".into(),
            recipe_path: Some(recipe),
            hub_repo: None,
            protected: vec![],
        }
    }

    /// Regression: processor files of a model in the HF cache layout are relative symlinks into
    /// `blobs/`; they were hard-linked as symlinks and dangled in the output folder.
    #[cfg(unix)]
    #[test]
    fn processor_files_behind_hub_cache_symlinks_are_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let (adapter_dir, mut model) = artifacts(tmp.path());
        let snapshot = tmp.path().join("hub/snapshots/abc");
        fs::create_dir_all(&snapshot).unwrap();
        fs::create_dir_all(tmp.path().join("hub/blobs")).unwrap();
        for f in fs::read_dir(&model.root).unwrap() {
            let f = f.unwrap();
            let blob = tmp.path().join("hub/blobs").join(f.file_name());
            fs::copy(f.path(), &blob).unwrap();
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(f.file_name()),
                snapshot.join(f.file_name()),
            )
            .unwrap();
        }
        model.root = snapshot;
        let recipe = tmp.path().join("demo.toml");
        fs::write(&recipe, "[recipe]\nname = \"tiny-demo\"\n").unwrap();
        let out_dir = tmp.path().join("cache-out");
        let output_dir = tmp.path().join("saved");
        save(
            &adapter_dir,
            &model,
            &out_dir,
            &opts(output_dir.clone(), recipe),
            &|_| {},
        )
        .unwrap();
        let cache_copy = out_dir.join("tokenizer.json");
        assert!(!fs::symlink_metadata(&cache_copy).unwrap().is_symlink());
        assert_eq!(
            fs::read(output_dir.join("tokenizer.json")).unwrap(),
            b"{\"tokenizer\": true}"
        );
    }

    #[test]
    fn writes_a_peft_folder_with_card_and_recipe() {
        let tmp = tempfile::tempdir().unwrap();
        let (adapter_dir, model) = artifacts(tmp.path());
        let recipe = tmp.path().join("demo.toml");
        fs::write(&recipe, "[recipe]\nname = \"tiny-demo\"\n\n[ops.raw]\nop = \"load\"\ndataset = \"org/data\"\n\n[ops.train]\nop = \"lora-train\"\nlearning_rate = 1e-4\n").unwrap();
        let out = tmp.path().join("cache-out");
        let output_dir = tmp.path().join("outputs/tiny-demo");
        let report = save(
            &adapter_dir,
            &model,
            &out,
            &opts(output_dir.clone(), recipe.clone()),
            &|_| {},
        )
        .unwrap();
        let expected = [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "demo.toml",
            "metrics.jsonl",
            "processor_config.json",
            "runs/Nov28_10-00-00_host/events.out.tfevents.1.host.1.0",
            "tokenizer.json",
        ];
        assert_eq!(report.files, expected);
        for f in expected {
            assert_eq!(
                fs::read(out.join(f)).unwrap(),
                fs::read(output_dir.join(f)).unwrap(),
                "{f}"
            );
        }
        assert!(output_dir.join(MARKER_FILE).exists());
        assert!(out.join(SAVED_JSON).exists());
        // The adapter reads back, with the base model's repo id, and its tensors untouched.
        let saved = adapter::read_adapter(&output_dir).unwrap();
        let golden = adapter::read_adapter(&fixture("peft_adapter")).unwrap();
        assert_eq!(saved.tensors, golden.tensors);
        assert_eq!(
            saved.config.base_model_name_or_path.as_deref(),
            Some("runner-test/tiny-gemma-3")
        );
        assert_eq!(saved.config, golden.config);
        let readme = fs::read_to_string(output_dir.join("README.md")).unwrap();
        assert!(readme.contains("- \"org/data\""));
        assert!(readme.contains("learning_rate = 0.0001"), "{readme}");
        assert!(readme.contains("| step | 20 |"));
        // Nothing left behind beside output_dir.
        let siblings: Vec<_> = fs::read_dir(tmp.path().join("outputs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, vec![std::ffi::OsString::from("tiny-demo")]);

        // A rerun replaces our own folder, keeping what a user added to it; a folder that is
        // not ours is refused unless overwrite, and then moved aside, never deleted.
        fs::write(output_dir.join("stale.txt"), b"old").unwrap();
        save(
            &adapter_dir,
            &model,
            &tmp.path().join("cache-out2"),
            &opts(output_dir.clone(), recipe.clone()),
            &|_| {},
        )
        .unwrap();
        assert_eq!(fs::read(output_dir.join("stale.txt")).unwrap(), b"old");
        let foreign = tmp.path().join("foreign");
        fs::create_dir_all(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        let err = save(
            &adapter_dir,
            &model,
            &tmp.path().join("c3"),
            &opts(foreign.clone(), recipe.clone()),
            &|_| {},
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("overwrite = true"), "{err:#}");
        assert_eq!(fs::read(foreign.join("notes.txt")).unwrap(), b"mine");
        let mut o = opts(foreign.clone(), recipe);
        o.overwrite = true;
        let lines = std::sync::Mutex::new(Vec::new());
        save(&adapter_dir, &model, &tmp.path().join("c4"), &o, &|l| {
            lines.lock().unwrap().push(l)
        })
        .unwrap();
        assert!(
            !foreign.join("notes.txt").exists() && foreign.join(adapter::WEIGHTS_FILE).exists()
        );
        let aside: Vec<PathBuf> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("foreign.before-runner-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(fs::read(aside[0].join("notes.txt")).unwrap(), b"mine");
        let lines = lines.into_inner().unwrap();
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&*aside[0].to_string_lossy())),
            "{lines:?}"
        );
    }

    #[test]
    fn refuses_an_output_dir_holding_the_recipe_the_cache_or_the_cwd() {
        let tmp = tempfile::tempdir().unwrap();
        let (adapter_dir, model) = artifacts(tmp.path());
        let recipe = tmp.path().join("project/r.toml");
        fs::create_dir_all(recipe.parent().unwrap()).unwrap();
        fs::write(&recipe, "[recipe]\n").unwrap();
        let cache_out = tmp.path().join("project/.runner-cache/.tmp/k.1.0");
        fs::create_dir_all(&cache_out).unwrap();
        for dir in [
            tmp.path().join("project"),
            tmp.path().join("project/sub/../"),
            tmp.path().join("project/.runner-cache"),
            tmp.path().to_path_buf(),
        ] {
            let mut o = opts(dir.clone(), recipe.clone());
            o.overwrite = true;
            o.protected = vec![recipe.clone(), cache_out.clone()];
            let err = save(&adapter_dir, &model, &tmp.path().join("c"), &o, &|_| {}).unwrap_err();
            assert!(
                format!("{err:#}").contains("replacing it would delete it"),
                "{}: {err:#}",
                dir.display()
            );
            assert!(recipe.is_file() && cache_out.is_dir());
        }
    }

    #[test]
    fn merge_writes_a_loadable_model_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let (adapter_dir, model) = artifacts(tmp.path());
        // RUNNER_SAVE_CHECK_DIR keeps the folder for tools/fixtures/publish_check_peft.py.
        let output_dir = std::env::var_os("RUNNER_SAVE_CHECK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| tmp.path().join("out"));
        let mut o = opts(output_dir.clone(), tmp.path().join("missing.toml"));
        o.overwrite = true;
        o.merge = true;
        let report = save(&adapter_dir, &model, &tmp.path().join("cache"), &o, &|_| {}).unwrap();
        let m = report.merged.unwrap();
        assert_eq!(m.merged_lora_modules, 20);
        let merged = output_dir.join(MERGED_DIR);
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
        ] {
            assert!(merged.join(f).exists(), "{f}");
        }
        let golden = merge::Checkpoint::open(&fixture("merged")).unwrap();
        let ours = merge::Checkpoint::open(&merged).unwrap();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            golden.keys().collect::<Vec<_>>()
        );
        // The merged model is not copied into the cache output.
        assert!(!tmp.path().join("cache").join(MERGED_DIR).exists());
    }
}
