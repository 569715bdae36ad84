//! Memory-mapped safetensors files, single or sharded (`model.safetensors.index.json`), with
//! errors that name the file and the tensor; and a writer that publishes atomically.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
pub use safetensors::Dtype;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

/// One tensor as stored: its key in the file, dtype, shape and byte range.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

impl RawTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of a checkpoint folder, keyed as in the files.
pub struct SafetensorsSet {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, RawTensor>,
    /// What the reader opened (`model.safetensors` or the index), for messages.
    source: PathBuf,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsSet {
    /// Opens `dir/model.safetensors.index.json` (and every shard it names) or `dir/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let mut set = SafetensorsSet {
                files: Vec::new(),
                tensors: BTreeMap::new(),
                source: single.clone(),
            };
            set.add_file(&single)?;
            return Ok(set);
        }
        bail!(
            "{}: no {SINGLE_FILE} or {INDEX_FILE} (the model folder must hold safetensors weights)",
            dir.display()
        )
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut set = SafetensorsSet {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            source: path.to_path_buf(),
        };
        set.add_file(path)?;
        Ok(set)
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index)
            .with_context(|| format!("reading {}", index.display()))?;
        let parsed: IndexFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a safetensors index (needs `weight_map`)",
                index.display()
            )
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        // Shard -> the tensors the index places in it.
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &parsed.weight_map {
            shards
                .entry(shard.as_str())
                .or_default()
                .push(tensor.as_str());
        }
        for (shard, tensors) in &shards {
            if !dir.join(shard).is_file() {
                bail!(
                    "missing shard {}: {} lists it for tensor `{}`{}",
                    dir.join(shard).display(),
                    index.display(),
                    tensors[0],
                    if tensors.len() > 1 {
                        format!(" and {} others", tensors.len() - 1)
                    } else {
                        String::new()
                    }
                );
            }
        }
        let mut set = SafetensorsSet {
            files: Vec::new(),
            tensors: BTreeMap::new(),
            source: index.to_path_buf(),
        };
        for shard in shards.keys() {
            set.add_file(&dir.join(shard))?;
        }
        for (tensor, shard) in &parsed.weight_map {
            match set.tensors.get(tensor) {
                None => bail!(
                    "{}: tensor `{tensor}` is listed in {} but absent from the shard",
                    dir.join(shard).display(),
                    index.display()
                ),
                Some(t) if set.files[t.file].path != dir.join(shard) => bail!(
                    "tensor `{tensor}`: {} places it in {shard} but it is in {}",
                    index.display(),
                    set.files[t.file].path.display()
                ),
                Some(_) => {}
            }
        }
        Ok(set)
    }

    /// Maps one file and indexes its tensors, checking the header against the file's size.
    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the checkpoint is read-only input; the map lives as long as the set.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let len = mmap.len();
        if len < 8 {
            bail!(
                "{}: truncated safetensors file ({len} bytes, no header)",
                path.display()
            );
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if header_len > len - 8 {
            bail!(
                "{}: truncated safetensors file: header claims {header_len} bytes, file has {len}",
                path.display()
            );
        }
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..8 + header_len])
                .with_context(|| format!("{}: invalid safetensors header", path.display()))?;
        let data_start = 8 + header_len;
        let data_len = len - data_start;
        let file_index = self.files.len();
        let mut infos: Vec<(String, TensorInfo)> = Vec::with_capacity(header.len());
        for (key, value) in header {
            if key == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value).with_context(|| {
                format!("{}: tensor `{key}`: invalid header entry", path.display())
            })?;
            infos.push((key, info));
        }
        // Name the first tensor (in file order) whose bytes are cut off.
        infos.sort_by_key(|(_, i)| i.data_offsets);
        for (key, info) in infos {
            let (start, end) = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            let want = (numel * info.dtype.bitsize()).div_ceil(8);
            if end < start || end - start != want {
                bail!(
                    "{}: tensor `{key}`: header gives {} bytes for {:?} {:?} (expected {want})",
                    path.display(),
                    end.saturating_sub(start),
                    info.dtype,
                    info.shape
                );
            }
            if end > data_len {
                bail!(
                    "{}: truncated safetensors file: tensor `{key}` needs data bytes {start}..{end} but the file holds only {data_len} ({len} bytes in all)",
                    path.display()
                );
            }
            if let Some(prev) = self.tensors.get(&key) {
                bail!(
                    "tensor `{key}` appears in both {} and {}",
                    self.files[prev.file].path.display(),
                    path.display()
                );
            }
            self.tensors.insert(
                key.clone(),
                RawTensor {
                    key,
                    dtype: info.dtype,
                    shape: info.shape,
                    file: file_index,
                    start,
                    end,
                },
            );
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
        });
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&RawTensor> {
        self.tensors.get(key)
    }

    pub fn tensors(&self) -> impl Iterator<Item = &RawTensor> {
        self.tensors.values()
    }

    pub fn bytes(&self, t: &RawTensor) -> &[u8] {
        let f = &self.files[t.file];
        &f.mmap[f.data_start + t.start..f.data_start + t.end]
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, t: &RawTensor) -> &Path {
        &self.files[t.file].path
    }

    /// `model.safetensors` or the index file.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }
}

/// Converts little-endian stored floats to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not a float type"),
    })
}

/// A tensor to write: dtype, shape and bytes (borrowed from a map or owned).
pub struct OutTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl safetensors::View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors to `path` (with `{"format": "pt"}` metadata, as torch writes it) through a
/// temporary file renamed into place, so a crash never leaves a half-written file.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, OutTensor<'_>>) -> Result<()> {
    let tmp = path.with_extension("safetensors.partial");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(metadata),
        &tmp,
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    // on disk before the rename publishes it, as atomic_file does (safetensors writes only
    // to a path, so that helper cannot stream it)
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}
