//! The typed values that flow along the recipe's edges.
//!
//! Every artifact is a directory written by the op that produced it (its cache entry); the
//! type says what the consumer may expect inside. Streams (collated batches) are represented by a
//! small descriptor in that directory and opened lazily by the consumer, so nothing large is ever
//! materialised twice.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What an edge carries. Edges are type-checked by `runner validate` before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactType {
    /// Rows of a dataset: the data files (parquet/json/jsonl) and the repo's other files.
    Dataset,
    /// A tree of extracted files (e.g. the images of MMIU's zip archives).
    Files,
    /// Conversations (system/user/assistant messages with image references), one per row.
    Conversations,
    /// Conversations plus the chat-template-rendered text of each.
    Templated,
    /// A model folder: config.json, safetensors, tokenizer and processor files.
    Model,
    /// A model whose linear weights are NF4 (bitsandbytes layout), plus its non-quantized tensors.
    QuantizedModel,
    /// A lazily produced stream of training batches (a descriptor; batches are made on demand).
    Batches,
    /// A trained LoRA adapter (PEFT layout) with its training metrics.
    Adapter,
    /// A saved output folder (adapter, processor files, model card).
    Saved,
    /// The receipt of a Hub upload (repo, commit).
    Receipt,
    /// An evaluation: loss and accuracy of a model on batches, optionally logits.
    Evaluation,
    /// Scores of generated answers (`scores.json`).
    Scores,
    /// Test-only ops use this for values with no meaning to the real ops.
    Blob,
}

impl ArtifactType {
    pub const ALL: [ArtifactType; 13] = [
        ArtifactType::Dataset,
        ArtifactType::Files,
        ArtifactType::Conversations,
        ArtifactType::Templated,
        ArtifactType::Model,
        ArtifactType::QuantizedModel,
        ArtifactType::Batches,
        ArtifactType::Adapter,
        ArtifactType::Saved,
        ArtifactType::Receipt,
        ArtifactType::Evaluation,
        ArtifactType::Scores,
        ArtifactType::Blob,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ArtifactType::Dataset => "dataset",
            ArtifactType::Files => "files",
            ArtifactType::Conversations => "conversations",
            ArtifactType::Templated => "templated",
            ArtifactType::Model => "model",
            ArtifactType::QuantizedModel => "quantized-model",
            ArtifactType::Batches => "batches",
            ArtifactType::Adapter => "adapter",
            ArtifactType::Saved => "saved",
            ArtifactType::Receipt => "receipt",
            ArtifactType::Evaluation => "evaluation",
            ArtifactType::Scores => "scores",
            ArtifactType::Blob => "blob",
        }
    }
}

impl fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A produced value: its type, the directory holding it, and the cache key that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub ty: ArtifactType,
    pub dir: PathBuf,
    pub key: String,
}

/// How an op's output records another cache entry it reads later (`input`): as `../<key>`
/// when the output is being written into the same cache (`out_dir` = `<cache>/.tmp/…`), so a
/// cache folder that is moved or renamed keeps working; otherwise (library use, tests) as given.
pub fn entry_ref(input: &std::path::Path, out_dir: &std::path::Path) -> PathBuf {
    let cache = out_dir.parent().and_then(std::path::Path::parent);
    match (input.parent(), cache, input.file_name()) {
        (Some(parent), Some(cache), Some(name)) if parent == cache => {
            std::path::Path::new("..").join(name)
        }
        _ => input.to_path_buf(),
    }
}

/// Resolves a path recorded with [`entry_ref`] in the artifact at `own_dir`.
pub fn resolve_entry_ref(own_dir: &std::path::Path, stored: &std::path::Path) -> PathBuf {
    // `../KEY` becomes `<cache>/KEY`, so messages name the entry by its own path.
    match (stored.strip_prefix(".."), own_dir.parent()) {
        (Ok(rest), Some(cache)) if stored.is_relative() => cache.join(rest),
        _ if stored.is_relative() => own_dir.join(stored),
        _ => stored.to_path_buf(),
    }
}
