//! The `model` artifact: `model.json` pointing at a folder (a Hub cache snapshot or a local
//! folder) with config.json, safetensors weights, tokenizer and processor files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use op_api::artifact::resolve_root;

/// File name of the manifest inside a `model` artifact directory.
pub const MANIFEST: &str = "model.json";

/// The weight index of a sharded checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// The weights of an unsharded checkpoint.
pub const SAFETENSORS_SINGLE: &str = "model.safetensors";

/// The files a model needs besides its weight shards; each is taken when the repo has it.
/// Anything else (`*.bin`, `original/`, `*.gguf`, ...) is neither downloaded nor listed.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    SAFETENSORS_SINGLE,
    SAFETENSORS_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
];

/// Contents of `model.json`, the manifest of a `model` or `quantized-model` artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    pub repo_id: Option<String>,
    /// The resolved commit sha of a Hub model.
    pub revision: Option<String>,
    /// The folder with config.json, *.safetensors, tokenizer.json, ...: absolute, or relative to
    /// the artifact directory (a `quantized-model` writes ".": the runner moves its directory
    /// into the cache after the op returns). [`open`] resolves it.
    pub root: PathBuf,
    /// The model files present under `root`, relative to it.
    #[serde(default)]
    pub files: Vec<String>,
}

impl ModelManifest {
    pub fn write(&self, artifact_dir: &Path) -> Result<()> {
        let path = artifact_dir.join(MANIFEST);
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// A model folder.
#[derive(Debug, Clone)]
pub struct ModelDir {
    manifest: ModelManifest,
}

/// Opens the model of a `model` or `quantized-model` artifact directory, its root resolved.
pub fn open(artifact_dir: &Path) -> Result<ModelDir> {
    let path = artifact_dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading model manifest {}", path.display()))?;
    let mut manifest: ModelManifest =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    manifest.root = resolve_root(artifact_dir, &manifest.root);
    Ok(ModelDir { manifest })
}

impl ModelDir {
    pub fn new(manifest: ModelManifest) -> Self {
        Self { manifest }
    }

    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    pub fn root(&self) -> &Path {
        &self.manifest.root
    }

    pub fn repo_id(&self) -> Option<&str> {
        self.manifest.repo_id.as_deref()
    }

    pub fn revision(&self) -> Option<&str> {
        self.manifest.revision.as_deref()
    }

    /// `root/name` when that file exists.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let path = self.manifest.root.join(name);
        path.is_file().then_some(path)
    }

    /// `root/name`, or an error naming the model folder.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        self.file(name).with_context(|| {
            format!(
                "model folder {} has no {name}",
                self.manifest.root.display()
            )
        })
    }

    /// Parsed config.json.
    pub fn config(&self) -> Result<serde_json::Value> {
        read_json(&self.require("config.json")?)
    }

    /// The weight files: the shards named by the index (in first-use order), else the
    /// single `model.safetensors`.
    pub fn safetensors(&self) -> Result<Vec<PathBuf>> {
        if let Some(index) = self.file(SAFETENSORS_INDEX) {
            let shards = shards_of_index(&read_json(&index)?)
                .with_context(|| format!("reading {}", index.display()))?;
            return shards.iter().map(|s| self.require(s)).collect();
        }
        Ok(vec![self.require(SAFETENSORS_SINGLE)?])
    }
}

/// The shard files a `model.safetensors.index.json` names, in first-use order.
pub fn shards_of_index(index: &serde_json::Value) -> Result<Vec<String>> {
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("no `weight_map` object in the safetensors index");
    };
    let mut seen = BTreeSet::new();
    let mut shards = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!("weight_map entry `{tensor}` is not a file name");
        };
        if file.contains("..") || file.starts_with('/') {
            bail!("weight_map entry `{tensor}` points outside the model folder: {file}");
        }
        if seen.insert(file.to_string()) {
            shards.push(file.to_string());
        }
    }
    Ok(shards)
}

/// Of a repo's files, the ones a model load takes: [`MODEL_FILES`] that exist, plus the
/// shards of the index when one is given.
pub fn select_model_files(
    repo_files: &[String],
    index: Option<&serde_json::Value>,
) -> Result<Vec<String>> {
    let present: BTreeSet<&str> = repo_files.iter().map(String::as_str).collect();
    let mut out: Vec<String> = MODEL_FILES
        .iter()
        .filter(|f| present.contains(**f))
        .map(|f| f.to_string())
        .collect();
    if let Some(index) = index {
        for shard in shards_of_index(index)? {
            if !present.contains(shard.as_str()) {
                bail!("the safetensors index names shard `{shard}`, which the repo does not have");
            }
            if !out.contains(&shard) {
                out.push(shard);
            }
        }
    }
    Ok(out)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_only_model_files_and_index_shards() {
        let files: Vec<String> = [
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin",
            "original/consolidated.safetensors",
            "tokenizer.json",
            "README.md",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let index = serde_json::json!({"weight_map": {
            "a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors"}});
        let picked = select_model_files(&files, Some(&index)).unwrap();
        assert_eq!(
            picked,
            [
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "model-00002-of-00002.safetensors",
                "model-00001-of-00002.safetensors"
            ]
        );
        let missing = serde_json::json!({"weight_map": {"a": "model-9.safetensors"}});
        let err = select_model_files(&files, Some(&missing)).unwrap_err();
        assert!(err.to_string().contains("model-9.safetensors"), "{err}");
    }

    #[test]
    fn model_dir_finds_sharded_weights() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
        std::fs::write(
            root.join(SAFETENSORS_INDEX),
            r#"{"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(root.join("s1.safetensors"), b"").unwrap();
        let model = ModelDir::new(ModelManifest {
            repo_id: None,
            revision: None,
            root: root.to_path_buf(),
            files: vec![],
        });
        assert_eq!(model.config().unwrap()["model_type"], "gemma3");
        let err = model.safetensors().unwrap_err();
        assert!(format!("{err:#}").contains("s2.safetensors"), "{err:#}");
        std::fs::write(root.join("s2.safetensors"), b"").unwrap();
        assert_eq!(
            model.safetensors().unwrap(),
            vec![root.join("s1.safetensors"), root.join("s2.safetensors")]
        );
        assert!(model.file("tokenizer.json").is_none());
    }
}
