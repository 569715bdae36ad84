//! Records of the `conversations` and `templated` artifacts (JSON lines) and their image
//! references. Images are never copied: a reference names a file under the `files` artifact, a
//! file on disk, or an image stored in a dataset row (row, column, index).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Where an image's encoded bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageRef {
    /// A file: relative paths are relative to the `files` artifact named in the metadata.
    File { path: String },
    /// Bytes inside a dataset row: `row` is the global row number, `column` the field, `index`
    /// the position in that field's list (0 for a single image).
    Row {
        row: usize,
        column: String,
        index: usize,
    },
}

impl ImageRef {
    /// A short name for messages: the file path, or where in the row the bytes are.
    pub fn describe(&self) -> String {
        match self {
            ImageRef::File { path } => path.clone(),
            ImageRef::Row { column, index, .. } => format!("bytes {index} of `{column}`"),
        }
    }
}

/// One line of `conversations.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// Global row number in the dataset, and the data file it came from (for error messages).
    pub row: usize,
    pub file: String,
    /// Messages in the transformers chat format: `[{"role", "content": [{"type": "text", "text"} |
    /// {"type": "image"}]}]`; image items carry no payload (see `images`).
    pub messages: serde_json::Value,
    /// One reference per image item, in message order.
    pub images: Vec<ImageRef>,
}

/// One line of `templated.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplatedRecord {
    pub row: usize,
    pub file: String,
    /// The chat template's output, `.strip()`ped.
    pub text: String,
    /// Byte ranges of `text` rendered inside `{% generation %}` (for `assistant_only_loss`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assistant_spans: Vec<(usize, usize)>,
    pub images: Vec<ImageRef>,
}

/// Where the references of an artifact resolve (stored as `source.json` beside the records).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageSources {
    /// The `dataset` artifact the rows came from (for `ImageRef::Row`).
    pub dataset_dir: Option<PathBuf>,
    /// The root that relative `ImageRef::File` paths resolve against (a `files` artifact).
    pub files_root: Option<PathBuf>,
}

impl ImageSources {
    /// `source.json` of the artifact at `dir`, its folders resolved (they may be recorded
    /// relative to it: [`op_api::artifact::entry_ref`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let s: Self = read_json(&dir.join("source.json"))?;
        let resolve = |p: PathBuf| op_api::artifact::resolve_entry_ref(dir, &p);
        Ok(Self {
            dataset_dir: s.dataset_dir.map(resolve),
            files_root: s.files_root.map(resolve),
        })
    }

    pub fn file_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        match (&self.files_root, p.is_absolute()) {
            (Some(root), false) => root.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// Writes JSON lines to `path` atomically ([`op_api::atomic_file`]), so a failure never leaves a
/// complete-looking file.
pub fn write_jsonl<T: Serialize>(
    path: &Path,
    records: impl IntoIterator<Item = T>,
) -> Result<usize> {
    let mut n = 0;
    op_api::atomic_file::write_with(path, |w| {
        for r in records {
            serde_json::to_writer(&mut *w, &r)?;
            w.write_all(b"\n")?;
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

/// Reads JSON lines; a bad line is an error naming the file and line.
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        if line.is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).with_context(|| {
            format!("{}: line {} is not a valid record", path.display(), i + 1)
        })?);
    }
    Ok(out)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    op_api::atomic_file::write(path, &serde_json::to_vec_pretty(value)?)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// Counts images in transformers-format messages the way the guide's `process_vision_info`
/// does: content items that are dicts with `type == "image"` (or an `image` key).
pub fn count_image_items(messages: &serde_json::Value) -> usize {
    let Some(msgs) = messages.as_array() else {
        return 0;
    };
    msgs.iter()
        .filter_map(|m| m.get("content").and_then(|c| c.as_array()))
        .flatten()
        .filter(|item| {
            item.as_object().is_some_and(|o| {
                o.contains_key("image") || o.get("type").and_then(|t| t.as_str()) == Some("image")
            })
        })
        .count()
}
