//! Merging a LoRA adapter into its base model: `W' = W + scaling · B·A` for every LoRA module,
//! the trained modules_to_save copies in place of the originals, written as a bf16 checkpoint
//! that transformers loads (what PEFT's `merge_and_unload()` followed by `save_pretrained` gives).
//!
//! The merged tensor is `bf16(f32(W) + scaling · B·A)` with the product in f32, as PEFT's
//! in-place `weight.data += delta` does for a bf16 base (one rounding). Checkpoint key layouts
//! differ between the Hub (`language_model.model.*`, `vision_tower.vision_model.*`), transformers
//! 5 `save_pretrained` (`language_model.model.*`, `vision_tower.encoder.*`) and the in-memory
//! module names PEFT uses (`model.language_model.*`, `model.vision_tower.encoder.*`): each adapter
//! module is matched to exactly one base key, and the merged checkpoint keeps the base's layout.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

use crate::train::adapter::{self, AdapterConfig, AdapterKey, DType};

/// The Hub's shard size (huggingface_hub `MAX_SHARD_SIZE = "5GB"`, decimal).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Parses `"5GB"`, `"500MB"`, `"10KiB"`, `"123"` like huggingface_hub's `parse_size_to_int`
/// (decimal units; binary with `i`).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number with a unit such as \"5GB\""))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        u => bail!("size {s:?}: unknown unit {u:?} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"),
    };
    Ok((value * mult as f64) as u64)
}

/// A memory-mapped safetensors checkpoint, single file or sharded with an index.
pub struct Checkpoint {
    maps: Vec<memmap2::Mmap>,
    /// key → (index into `maps`)
    where_: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` + shards if present, else `model.safetensors`.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let index = root.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v: Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("parsing {}", index.display()))?;
            let map = v["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", index.display()))?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| root.join(n)).collect()
        } else if root.join("model.safetensors").exists() {
            vec![root.join("model.safetensors")]
        } else {
            bail!(
                "{} holds neither model.safetensors nor model.safetensors.index.json",
                root.display()
            );
        };
        let mut maps = Vec::new();
        let mut where_ = BTreeMap::new();
        for (i, path) in files.iter().enumerate() {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: checkpoint files are read-only inputs that nothing modifies while we run.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .with_context(|| format!("parsing {}", path.display()))?;
            for name in st.names() {
                where_.insert(name.to_string(), i);
            }
            maps.push(map);
        }
        Ok(Self { maps, where_ })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.where_.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.where_.contains_key(key)
    }

    pub fn tensor(&self, key: &str) -> anyhow::Result<safetensors::tensor::TensorView<'_>> {
        let i = *self
            .where_
            .get(key)
            .with_context(|| format!("no tensor `{key}` in the base checkpoint"))?;
        let st = safetensors::SafeTensors::deserialize(&self.maps[i])?;
        Ok(st.tensor(key)?)
    }
}

/// Widens floating tensor bytes to f32.
pub fn to_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        safetensors::Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        d => bail!("cannot merge a tensor of dtype {d:?}"),
    })
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
        .collect()
}

/// The base checkpoint key of an in-memory module name (see the module docs).
pub fn resolve_module(module: &str, base: &Checkpoint) -> anyhow::Result<String> {
    let mut candidates = vec![module.to_string()];
    if let Some(rest) = module.strip_prefix("model.language_model.") {
        candidates.push(format!("language_model.model.{rest}"));
    }
    if let Some(rest) = module.strip_prefix("model.vision_tower.") {
        candidates.push(format!("vision_tower.{rest}"));
        candidates.push(format!("vision_tower.vision_model.{rest}"));
    }
    if let Some(rest) = module.strip_prefix("model.") {
        candidates.push(rest.to_string());
    }
    if module == "lm_head" {
        candidates.push("language_model.lm_head".into());
    }
    let mut unique: Vec<String> = Vec::new();
    for c in candidates {
        if !unique.contains(&c) {
            unique.push(c);
        }
    }
    let candidates = unique;
    let found: Vec<&String> = candidates
        .iter()
        .filter(|c| base.contains(&format!("{c}.weight")))
        .collect();
    match found.as_slice() {
        [one] => Ok(format!("{one}.weight")),
        [] => bail!(
            "adapter module `{module}` has no weight in the base checkpoint (looked for {}): is this the adapter's base model?",
            candidates.iter().map(|c| format!("`{c}.weight`")).collect::<Vec<_>>().join(", ")
        ),
        many => bail!("adapter module `{module}` matches several base weights: {many:?}"),
    }
}

/// What [`merge_adapter`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub files: Vec<String>,
    pub merged_lora_modules: usize,
    pub replaced_modules: Vec<String>,
    pub total_size: u64,
}

/// Writes the merged model into `out_dir` (which must exist): safetensors (one file, or shards of
/// at most `max_shard_bytes` with `model.safetensors.index.json`), and `config.json` from the
/// base with `dtype = bfloat16`, no `quantization_config`, and `tie_word_embeddings = false` when
/// a trained lm_head copy is written beside a tied embedding.
pub fn merge_adapter(
    base_root: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    max_shard_bytes: u64,
) -> anyhow::Result<MergeReport> {
    let base = Checkpoint::open(base_root)?;
    if base
        .keys()
        .any(|k| k.ends_with(".absmax") || k.contains("quant_state"))
    {
        bail!(
            "the base checkpoint in {} is NF4-quantized; merging into it needs dequantization (ops::reference::nf4), which this build does not have yet — merge into the bf16 base model instead (connect the `load` output, not the `quantize` output, to save's `model` input)",
            base_root.display()
        );
    }
    let (config, adapter_map) = map_adapter(adapter_dir)?;
    let ad = safetensors::SafeTensors::deserialize(&adapter_map)
        .context("parsing the adapter weights")?;

    // base key → list of (module) with LoRA; base key → saved copy adapter key.
    let mut lora_for: HashMap<String, String> = HashMap::new();
    let mut saved_for: BTreeMap<String, String> = BTreeMap::new();
    let mut untie = false;
    for name in ad.names() {
        match AdapterKey::parse(name) {
            Some(AdapterKey::LoraA(m)) => {
                let key = resolve_module(m, &base)?;
                ensure!(
                    lora_for.insert(key.clone(), m.to_string()).is_none(),
                    "two adapter modules merge into `{key}`"
                );
            }
            Some(AdapterKey::Saved(m)) => {
                let key = match resolve_module(m, &base) {
                    Ok(k) => k,
                    // A tied lm_head has no weight of its own in the checkpoint: the trained copy
                    // becomes one, and the embeddings are untied (as PEFT's merge does).
                    Err(_) if m == "lm_head" => {
                        untie = true;
                        "lm_head.weight".to_string()
                    }
                    Err(e) => return Err(e),
                };
                saved_for.insert(key, name.to_string());
            }
            _ => {}
        }
    }

    let mut keys: Vec<String> = base.keys().map(str::to_string).collect();
    for k in saved_for.keys() {
        if !base.contains(k) {
            keys.push(k.clone());
        }
    }
    keys.sort();

    // Greedy sharding in key order (huggingface_hub `split_state_dict_into_shards_factory`).
    let mut sizes = Vec::with_capacity(keys.len());
    let mut total_params = 0u64;
    for k in &keys {
        let n: usize = if let Some(ak) = saved_for.get(k) {
            ad.tensor(ak)?.shape().iter().product()
        } else {
            base.tensor(k)?.shape().iter().product()
        };
        total_params += n as u64;
        sizes.push(2 * n as u64);
    }
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max_shard_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    let total_size: u64 = sizes.iter().sum();

    let n_shards = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    let mut merged_lora = 0;
    for (si, shard) in shards.iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", si + 1)
        };
        let mut tensors: BTreeMap<String, adapter::HostTensor> = BTreeMap::new();
        for &i in shard {
            let key = &keys[i];
            let (shape, values) = if let Some(ak) = saved_for.get(key) {
                let t = ad.tensor(ak)?;
                (t.shape().to_vec(), to_f32(t.dtype(), t.data())?)
            } else {
                let t = base.tensor(key)?;
                let mut w =
                    to_f32(t.dtype(), t.data()).with_context(|| format!("base tensor `{key}`"))?;
                if let Some(module) = lora_for.get(key) {
                    add_lora_delta(&mut w, t.shape(), &ad, &config, module)?;
                    merged_lora += 1;
                }
                (t.shape().to_vec(), w)
            };
            tensors.insert(
                key.clone(),
                adapter::HostTensor {
                    dtype: DType::BF16,
                    shape,
                    bytes: bf16_bytes(&values),
                },
            );
            weight_map.insert(key.clone(), file.clone());
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(tensors.iter(), Some(metadata), &out_dir.join(&file))
            .with_context(|| format!("writing {}", out_dir.join(&file).display()))?;
        files.push(file);
    }
    ensure!(
        merged_lora == lora_for.len(),
        "only {merged_lora} of {} LoRA modules were merged",
        lora_for.len()
    );
    if n_shards > 1 {
        let index = json!({
            "metadata": {"total_parameters": total_params, "total_size": total_size},
            "weight_map": weight_map,
        });
        std::fs::write(
            out_dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)? + "\n",
        )?;
        files.push("model.safetensors.index.json".into());
    }

    let config_path = base_root.join("config.json");
    let mut model_config: Value = serde_json::from_slice(
        &std::fs::read(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let obj = model_config
        .as_object_mut()
        .context("config.json is not a JSON object")?;
    obj.remove("quantization_config");
    obj.remove("torch_dtype");
    obj.insert("dtype".into(), json!("bfloat16"));
    for sub in ["text_config", "vision_config"] {
        if let Some(Value::Object(s)) = obj.get_mut(sub) {
            s.remove("torch_dtype");
            s.insert("dtype".into(), json!("bfloat16"));
        }
    }
    if untie {
        obj.insert("tie_word_embeddings".into(), json!(false));
    }
    std::fs::write(
        out_dir.join("config.json"),
        serde_json::to_string_pretty(&model_config)? + "\n",
    )?;
    files.push("config.json".into());
    if base_root.join("generation_config.json").exists() {
        std::fs::copy(
            base_root.join("generation_config.json"),
            out_dir.join("generation_config.json"),
        )?;
        files.push("generation_config.json".into());
    }
    Ok(MergeReport {
        files,
        merged_lora_modules: merged_lora,
        replaced_modules: saved_for.into_keys().collect(),
        total_size,
    })
}

fn map_adapter(dir: &Path) -> anyhow::Result<(AdapterConfig, memmap2::Mmap)> {
    let (config, _) = adapter::inspect_adapter(dir)?;
    let path = dir.join(adapter::WEIGHTS_FILE);
    let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the adapter artifact is immutable while we read it.
    let map = unsafe { memmap2::Mmap::map(&f) }?;
    Ok((config, map))
}

/// `w [out, in] += scaling · B [out, r] · A [r, in]`, in f32.
fn add_lora_delta(
    w: &mut [f32],
    shape: &[usize],
    ad: &safetensors::SafeTensors,
    config: &AdapterConfig,
    module: &str,
) -> anyhow::Result<()> {
    let a = ad.tensor(&adapter::lora_a_key(module))?;
    let b = ad.tensor(&adapter::lora_b_key(module))?;
    let (r, in_f) = (a.shape()[0], a.shape()[1]);
    let out_f = b.shape()[0];
    ensure!(
        shape == [out_f, in_f],
        "LoRA of `{module}` is [{out_f}, {r}]·[{r}, {in_f}] but the base weight has shape {shape:?}"
    );
    ensure!(
        !config.fan_in_fan_out,
        "fan_in_fan_out adapters (Conv1D bases) are not supported"
    );
    let a = to_f32(a.dtype(), a.data())?;
    let b = to_f32(b.dtype(), b.data())?;
    let s = config.scaling_for(module) as f32;
    use rayon::prelude::*;
    w.par_chunks_mut(in_f).enumerate().for_each(|(o, row)| {
        let b_row = &b[o * r..(o + 1) * r];
        for (i, wi) in row.iter_mut().enumerate() {
            let mut acc = 0f32;
            for k in 0..r {
                acc += b_row[k] * a[k * in_f + i];
            }
            *wi += acc * s;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/publish")
            .join(rel)
    }

    #[test]
    fn sizes_parse_like_huggingface_hub() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("8KB").unwrap(), 8_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5 parsecs").is_err());
    }

    /// PEFT's merge_and_unload + save_pretrained (tests/fixtures/publish/merged) against ours.
    #[test]
    fn merge_matches_peft_merge_and_unload() {
        let out = tempfile::tempdir().unwrap();
        let report = merge_adapter(
            &fixture("tiny_base"),
            &fixture("peft_adapter"),
            out.path(),
            8_000,
        )
        .unwrap();
        assert_eq!(report.merged_lora_modules, 20);
        assert_eq!(
            report.replaced_modules,
            vec!["language_model.model.embed_tokens.weight", "lm_head.weight"]
        );
        assert!(report
            .files
            .contains(&"model.safetensors.index.json".to_string()));

        let golden = Checkpoint::open(&fixture("merged")).unwrap();
        let ours = Checkpoint::open(out.path()).unwrap();
        let gk: Vec<&str> = golden.keys().collect();
        let ok: Vec<&str> = ours.keys().collect();
        assert_eq!(ok, gk);
        let (mut total, mut off_by_one_ulp) = (0usize, 0usize);
        for k in gk {
            let (g, o) = (golden.tensor(k).unwrap(), ours.tensor(k).unwrap());
            assert_eq!(o.dtype(), safetensors::Dtype::BF16, "{k}");
            assert_eq!(o.shape(), g.shape(), "{k}");
            for (gb, ob) in g.data().chunks_exact(2).zip(o.data().chunks_exact(2)) {
                let (gv, ov) = (
                    i32::from(u16::from_le_bytes([gb[0], gb[1]]) as i16),
                    i32::from(u16::from_le_bytes([ob[0], ob[1]]) as i16),
                );
                total += 1;
                if gv != ov {
                    // The f32 product B·A may round differently in torch's matmul: at most one
                    // bf16 unit in the last place, and rarely.
                    assert!((gv - ov).abs() <= 1, "{k}: {gv:#06x} vs {ov:#06x}");
                    off_by_one_ulp += 1;
                }
            }
        }
        assert!(
            off_by_one_ulp * 100 <= total,
            "{off_by_one_ulp} of {total} values differ by one ulp"
        );
        eprintln!(
            "merge vs PEFT: {off_by_one_ulp} of {total} bf16 values differ by 1 ulp, none by more"
        );

        let gi: Value = serde_json::from_slice(
            &std::fs::read(fixture("merged/model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let oi: Value = serde_json::from_slice(
            &std::fs::read(out.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(oi["metadata"], gi["metadata"]);
        let files: std::collections::BTreeSet<&str> = oi["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(files.len() > 1);
        for f in &files {
            let bytes = std::fs::read(out.path().join(f)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let data: usize = st.tensors().iter().map(|(_, t)| t.data().len()).sum();
            assert!(
                data <= 8_000,
                "{f} holds {data} bytes of tensors, over max_shard_size"
            );
        }
        let gc: Value =
            serde_json::from_slice(&std::fs::read(fixture("merged/config.json")).unwrap()).unwrap();
        let oc: Value =
            serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            oc, gc,
            "config.json as transformers writes it after PEFT's merge"
        );
    }

    #[test]
    fn unknown_module_is_a_clear_error() {
        let base = Checkpoint::open(&fixture("tiny_base")).unwrap();
        let err = resolve_module("model.language_model.layers.9.mlp.up_proj", &base)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is this the adapter's base model"), "{err}");
        assert_eq!(
            resolve_module("model.vision_tower.encoder.layers.0.mlp.fc1", &base).unwrap(),
            "vision_tower.encoder.layers.0.mlp.fc1.weight"
        );
    }
}
