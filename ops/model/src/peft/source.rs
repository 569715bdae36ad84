//! Adapters that `lora-train` did not make: a PEFT folder (or a Hub repo's files, fetched by
//! the `load` op), imported for `load` with `repo_type = "adapter"`, and the check that an
//! adapter fits a base model.
//!
//! An `adapter` artifact is a folder holding `adapter_config.json` and
//! `adapter_model.safetensors` (what `lora-train` writes, and what PEFT's `save_pretrained`
//! writes): a loaded one gets those two files, hard-linked when the filesystem allows (a Hub
//! cache blob or a user's folder is never modified), copied otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::{self as peft, AdapterKey, TargetModules, CONFIG_FILE, WEIGHTS_FILE};
use crate::names::{expected_tensors, TensorKind, LM_HEAD};
use crate::ModelConfig;

/// The files an adapter artifact holds.
pub const ADAPTER_FILES: [&str; 2] = [CONFIG_FILE, WEIGHTS_FILE];

/// Checks that `src` is a PEFT LoRA adapter this runner reads (config, key names, ranks,
/// shapes agreeing with each other) and puts its two files into `out_dir`.
pub fn import_adapter_folder(src: &Path, out_dir: &Path) -> Result<()> {
    if !src.join(WEIGHTS_FILE).is_file() && src.join("adapter_model.bin").is_file() {
        bail!(
            "{}: only adapter_model.safetensors is read, not the pickle adapter_model.bin \
             (re-save it with PEFT's `save_pretrained(safe_serialization=True)`)",
            src.display()
        );
    }
    peft::inspect_adapter(src)
        .with_context(|| format!("{} is not a PEFT LoRA adapter runner reads", src.display()))?;
    for name in ADAPTER_FILES {
        let from = src.join(name);
        // The Hub cache's snapshot files are symlinks to blobs: link the blob itself.
        let from = from
            .canonicalize()
            .with_context(|| format!("{} not found", from.display()))?;
        let to = out_dir.join(name);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// Checks an adapter folder against the base model's config before anything is uploaded:
/// every LoRA module must be a linear layer of the base with the adapter's in/out sizes, every
/// saved module a base tensor of the same shape, and every name of a `target_modules` list
/// must match some linear layer (PEFT refuses such a config too). Errors name the module.
pub fn check_against_base(adapter_dir: &Path, config: &ModelConfig) -> Result<()> {
    let (cfg, metas) = peft::inspect_adapter(adapter_dir)?;
    let expected = expected_tensors(config);
    let linears: BTreeMap<&str, &[usize]> = expected
        .iter()
        .filter(|t| t.kind == TensorKind::LinearWeight)
        .filter_map(|t| Some((t.name.strip_suffix(".weight")?, t.shape.as_slice())))
        .collect();
    let tensors: BTreeMap<&str, &[usize]> = expected
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let text = config.text();
    let head = [text.vocab_size, text.hidden_size];
    let what = || format!("adapter {}", adapter_dir.display());
    for (key, meta) in &metas {
        match AdapterKey::parse(key) {
            Some(AdapterKey::LoraA(m)) => {
                let Some(shape) = linears.get(m) else {
                    bail!(
                        "{}: `{key}` adapts `{m}`, which is no linear layer of the base model \
                         (an adapter for another architecture or size?)",
                        what()
                    );
                };
                ensure!(
                    meta.shape.get(1) == Some(&shape[1]),
                    "{}: `{key}` has shape {:?}, but the base model's `{m}` takes {} inputs \
                     (an adapter trained on another model size?)",
                    what(),
                    meta.shape,
                    shape[1]
                );
            }
            Some(AdapterKey::LoraB(m)) => {
                if let Some(shape) = linears.get(m) {
                    ensure!(
                        meta.shape.first() == Some(&shape[0]),
                        "{}: `{key}` has shape {:?}, but the base model's `{m}` has {} outputs",
                        what(),
                        meta.shape,
                        shape[0]
                    );
                }
            }
            Some(AdapterKey::Saved(m)) => {
                let name = format!("{m}.weight");
                let want: &[usize] = if name == LM_HEAD {
                    &head
                } else {
                    tensors.get(name.as_str()).copied().with_context(|| {
                        format!(
                            "{}: `{key}` replaces `{m}`, which the base model does not have",
                            what()
                        )
                    })?
                };
                ensure!(
                    meta.shape == want,
                    "{}: `{key}` has shape {:?}, the base model's `{m}` {:?}",
                    what(),
                    meta.shape,
                    want
                );
            }
            None => {}
        }
    }
    if let TargetModules::Names(names) = &cfg.target_modules {
        let missing: BTreeSet<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|t| {
                !linears
                    .keys()
                    .any(|m| *m == *t || m.ends_with(&format!(".{t}")))
            })
            .collect();
        ensure!(
            missing.is_empty(),
            "{}: target_modules {:?} match no linear layer of the base model",
            what(),
            missing
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    /// The tiny model the PEFT fixture adapter was trained on, with `edit` applied to its
    /// text config.
    fn tiny_config(edit: impl FnOnce(&mut serde_json::Value)) -> ModelConfig {
        let dir = fixtures().join("hf-cache/hub/models--runner-test--tiny-gemma-3/snapshots");
        let snap = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(snap.join("config.json")).unwrap()).unwrap();
        edit(&mut v);
        ModelConfig::from_json(&v.to_string()).unwrap()
    }

    /// What PEFT saved after 3 SFTTrainer steps on the tiny model (tools/fixtures/make.py).
    fn peft_adapter() -> PathBuf {
        fixtures().join("golden/lora/adapter_step3")
    }

    /// The PEFT-written fixture adapter imported into a fresh folder.
    fn imported() -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        import_adapter_folder(&peft_adapter(), out.path()).unwrap();
        out
    }

    #[test]
    fn imports_a_peft_folder_that_fits_its_base() {
        let out = imported();
        for f in ADAPTER_FILES {
            assert_eq!(
                std::fs::read(out.path().join(f)).unwrap(),
                std::fs::read(peft_adapter().join(f)).unwrap()
            );
        }
        check_against_base(out.path(), &tiny_config(|_| {})).unwrap();
    }

    #[test]
    fn refuses_what_is_not_an_adapter() {
        let empty = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let err = import_adapter_folder(empty.path(), out.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("adapter_config.json"),
            "{err:#}"
        );
        std::fs::write(empty.path().join("adapter_model.bin"), b"x").unwrap();
        let err = import_adapter_folder(empty.path(), out.path()).unwrap_err();
        assert!(format!("{err:#}").contains("adapter_model.bin"), "{err:#}");
    }

    #[test]
    fn names_shape_mismatches_with_the_base() {
        // tests/fixtures/publish/peft_adapter was written by PEFT for an even smaller model
        // (hidden 16, vocabulary 64); PEFT's own load into the tiny model fails on the same sizes.
        let msg = format!(
            "{:#}",
            check_against_base(
                &fixtures().join("publish/peft_adapter"),
                &tiny_config(|_| {})
            )
            .unwrap_err()
        );
        assert!(
            msg.contains("has shape") && msg.contains("[576, 64]"),
            "{msg}"
        );
        let out = imported();
        let bigger_mlp = tiny_config(|v| {
            let t = &mut v["text_config"]["intermediate_size"];
            *t = (t.as_u64().unwrap() * 2).into();
        });
        let err = check_against_base(out.path(), &bigger_mlp).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("mlp.") && msg.contains("has shape"), "{msg}");
        let bigger_vocab = tiny_config(|v| {
            let t = &mut v["text_config"]["vocab_size"];
            *t = (t.as_u64().unwrap() + 8).into();
        });
        let msg = format!(
            "{:#}",
            check_against_base(out.path(), &bigger_vocab).unwrap_err()
        );
        assert!(
            msg.contains("embed_tokens") || msg.contains("lm_head"),
            "{msg}"
        );
        let fewer_layers = tiny_config(|v| {
            v["text_config"]["num_hidden_layers"] = 1.into();
            v["text_config"]["layer_types"] = serde_json::json!(["sliding_attention"]);
        });
        let msg = format!(
            "{:#}",
            check_against_base(out.path(), &fewer_layers).unwrap_err()
        );
        assert!(msg.contains("no linear layer of the base model"), "{msg}");
    }

    #[test]
    fn names_target_modules_the_base_lacks() {
        let out = imported();
        let path = out.path().join(CONFIG_FILE);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        v["target_modules"]
            .as_array_mut()
            .unwrap()
            .push("qkv_proj".into());
        // The imported file may be a hard link to the fixture: replace it, never write through.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, v.to_string()).unwrap();
        let msg = format!(
            "{:#}",
            check_against_base(out.path(), &tiny_config(|_| {})).unwrap_err()
        );
        assert!(
            msg.contains("qkv_proj") && msg.contains("target_modules"),
            "{msg}"
        );
    }
}
