//! Where `load`'s artifacts come from: a Hub repo (through the standard cache) or a local path,
//! for datasets (the split's data files), models (config, tokenizer and safetensors weights)
//! and PEFT adapters. Each returns the manifest `load` writes; files are never copied (an
//! adapter's two files are hard-linked or copied into the artifact).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::data::data_files::{select_split, DataFilesSpec};
use crate::data::dataset::DatasetManifest;
use crate::data::model_dir::{self, ModelManifest, SAFETENSORS_INDEX};
use crate::hub::cache::RepoType;
use crate::hub::download::{Hub, RepoSnapshot};
use crate::model::peft::{import_adapter_folder, ADAPTER_FILES};
use crate::Progress;

/// Which rows of a dataset repo or folder: the `load` op's `revision`, `config`, `split` and
/// `data_files`.
#[derive(Debug, Clone)]
pub struct DatasetRequest {
    /// A branch, tag or commit (Hub repos only).
    pub revision: String,
    pub config: Option<String>,
    pub split: Option<String>,
    pub data_files: Option<DataFilesSpec>,
}

fn note(snapshot: &RepoSnapshot, progress: &dyn Progress) {
    if let Some(note) = &snapshot.note {
        progress.println(format!("warning: {note}"));
    }
}

/// Resolves the split of a Hub dataset, downloads its data files (not its other files: the
/// `unzip` op fetches archives it needs) and returns the manifest.
pub fn load_hub_dataset(
    hub: &Hub,
    repo_id: &str,
    req: &DatasetRequest,
    progress: &dyn Progress,
) -> Result<DatasetManifest> {
    let snapshot = hub.resolve(repo_id, RepoType::Dataset, &req.revision)?;
    note(&snapshot, progress);
    let files = snapshot.file_names();
    let readme = if files.iter().any(|f| f == "README.md") {
        let path = hub.fetch(&snapshot, "README.md", progress)?;
        Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
    } else {
        None
    };
    let selection = select_split(
        &files,
        readme.as_deref(),
        req.config.as_deref(),
        req.split.as_deref(),
        req.data_files.as_ref(),
    )
    .with_context(|| format!("dataset `{repo_id}`"))?;
    for file in &selection.data_files {
        progress.message(format!("{repo_id}: {file}"));
        hub.fetch(&snapshot, file, progress)?;
    }
    Ok(DatasetManifest {
        repo_id: Some(repo_id.to_string()),
        revision: Some(snapshot.sha.clone()),
        root: snapshot.dir(),
        split: Some(selection.split),
        data_files: selection.data_files,
        files,
    })
}

/// A local data file, or a folder read with the same split rules as a Hub repo.
pub fn load_local_dataset(path: &Path, req: &DatasetRequest) -> Result<DatasetManifest> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("dataset path {} not found", path.display()))?;
    let path = path.canonicalize()?;
    if meta.is_file() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if req.data_files.is_some() || req.config.is_some() {
            bail!(
                "`data_files` and `config` apply to a dataset folder, not to the single file {}",
                path.display()
            );
        }
        return Ok(DatasetManifest {
            repo_id: None,
            revision: None,
            root: path.parent().unwrap().to_path_buf(),
            split: req.split.clone(),
            data_files: vec![name.clone()],
            files: vec![name],
        });
    }
    let files = list_files(&path)?;
    let readme = match std::fs::read_to_string(path.join("README.md")) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading README.md"),
    };
    let selection = select_split(
        &files,
        readme.as_deref(),
        req.config.as_deref(),
        req.split.as_deref(),
        req.data_files.as_ref(),
    )
    .with_context(|| format!("dataset folder {}", path.display()))?;
    Ok(DatasetManifest {
        repo_id: None,
        revision: None,
        root: path,
        split: Some(selection.split),
        data_files: selection.data_files,
        files,
    })
}

/// Downloads the model files a load takes (see [`model_dir::MODEL_FILES`]) and returns the manifest.
pub fn load_hub_model(
    hub: &Hub,
    repo_id: &str,
    revision: &str,
    progress: &dyn Progress,
) -> Result<ModelManifest> {
    let snapshot = hub.resolve(repo_id, RepoType::Model, revision)?;
    note(&snapshot, progress);
    let files = snapshot.file_names();
    if !files.iter().any(|f| f == "config.json") {
        bail!(
            "model `{repo_id}` at `{revision}` has no config.json{}",
            if hub.env().offline {
                " in the Hub cache (HF_HUB_OFFLINE is set)"
            } else {
                ""
            }
        );
    }
    let index = if files.iter().any(|f| f == SAFETENSORS_INDEX) {
        let path = hub.fetch(&snapshot, SAFETENSORS_INDEX, progress)?;
        Some(read_json(&path)?)
    } else {
        None
    };
    let selected = model_dir::select_model_files(&files, index.as_ref())
        .with_context(|| format!("model `{repo_id}`"))?;
    check_has_weights(&selected, &format!("model `{repo_id}`"))?;
    for file in &selected {
        progress.message(format!("{repo_id}: {file}"));
        hub.fetch(&snapshot, file, progress)?;
    }
    Ok(ModelManifest {
        repo_id: Some(repo_id.to_string()),
        revision: Some(snapshot.sha.clone()),
        root: snapshot.dir(),
        files: selected,
    })
}

pub fn load_local_model(path: &Path) -> Result<ModelManifest> {
    let root = path
        .canonicalize()
        .with_context(|| format!("model folder {} not found", path.display()))?;
    if !root.join("config.json").is_file() {
        bail!("model folder {} has no config.json", root.display());
    }
    let files = list_files(&root)?;
    let index = match root.join(SAFETENSORS_INDEX) {
        p if p.is_file() => Some(read_json(&p)?),
        _ => None,
    };
    let selected = model_dir::select_model_files(&files, index.as_ref())
        .with_context(|| format!("model folder {}", root.display()))?;
    check_has_weights(&selected, &format!("model folder {}", root.display()))?;
    Ok(ModelManifest {
        repo_id: None,
        revision: None,
        root,
        files: selected,
    })
}

fn check_has_weights(selected: &[String], what: &str) -> Result<()> {
    if !selected.iter().any(|f| f.ends_with(".safetensors")) {
        bail!("{what} has no safetensors weights (model.safetensors or model.safetensors.index.json); other formats are not read");
    }
    Ok(())
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every file under `root`, relative with `/` separators, sorted.
fn list_files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            let meta = std::fs::metadata(entry.path())?;
            if meta.is_dir() {
                stack.push(child);
            } else if meta.is_file() {
                let parts: Vec<String> = child
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A hash of every file's relative path, size and modification time under `path`.
pub fn local_fingerprint(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{} not found", path.display()))?;
    let (root, files) = if meta.is_file() {
        (
            path.parent().unwrap().to_path_buf(),
            vec![path.file_name().unwrap().to_string_lossy().into_owned()],
        )
    } else {
        (path.to_path_buf(), list_files(path)?)
    };
    let mut hasher = Sha256::new();
    for rel in &files {
        let meta = std::fs::metadata(root.join(rel))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.update(format!("{rel}\0{}\0{mtime}\n", meta.len()).as_bytes());
    }
    Ok(format!(
        "local {} files {}",
        files.len(),
        hex::encode(hasher.finalize())
    ))
}

/// Downloads (or finds in the HF cache) the adapter files of a Hub repo and imports them.
pub fn load_hub_adapter(
    hub: &Hub,
    repo_id: &str,
    revision: &str,
    out_dir: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let what = || format!("adapter repo `{repo_id}` at `{revision}`");
    let snapshot = hub
        .resolve(repo_id, RepoType::Model, revision)
        .with_context(what)?;
    note(&snapshot, progress);
    for file in ADAPTER_FILES {
        hub.fetch(&snapshot, file, progress).with_context(what)?;
    }
    import_adapter_folder(&snapshot.dir(), out_dir).with_context(what)
}

/// Local paths of the archives: in the Hub cache (downloaded when missing), or in the
/// dataset's local folder.
pub fn locate_archives(
    dataset: &DatasetManifest,
    names: &[String],
    hub: &Hub,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>> {
    match (&dataset.repo_id, &dataset.revision) {
        // Archives already in the snapshot are read there, without asking the Hub.
        (Some(_), Some(_)) if names.iter().all(|n| dataset.root.join(n).is_file()) => {
            Ok(names.iter().map(|n| dataset.root.join(n)).collect())
        }
        (Some(repo_id), Some(sha)) => {
            let snapshot = hub.resolve(repo_id, RepoType::Dataset, sha)?;
            names
                .iter()
                .map(|name| {
                    progress.message(format!("{repo_id}: {name}"));
                    hub.fetch(&snapshot, name, progress)
                })
                .collect()
        }
        _ => names
            .iter()
            .map(|name| {
                let path = dataset.root.join(name);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(anyhow!("archive {} not found", path.display()))
                }
            })
            .collect(),
    }
}
