//! Helpers shared by the ops integration tests: where the committed fixtures live, how to read
//! the golden safetensors files, and the error measure every comparison uses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ops::model::config::ModelConfig;
use ops::model::reference::Batch;
use ops::model::safetensors_io::{Dtype, SafetensorsSet};
use ops::model::Weights;

mod harness;
pub use harness::OpHarness;

pub use ops::gpu::testing::rel_frobenius;

/// A safetensors file held in memory: key → (dtype, shape, little-endian bytes).
pub type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `tests/fixtures` (made by tools/fixtures/make.py; MANIFEST.md lists every file).
pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// A file under `tests/fixtures/golden`.
pub fn golden(rel: &str) -> PathBuf {
    fixtures().join("golden").join(rel)
}

/// The snapshot folder of the fixture model `runner-test/<name>` in the fixture HF cache.
pub fn snapshot(name: &str) -> PathBuf {
    let hub = fixtures()
        .join("hf-cache/hub")
        .join(format!("models--runner-test--{name}"));
    let commit = std::fs::read_to_string(hub.join("refs/main")).unwrap();
    hub.join("snapshots").join(commit.trim())
}

/// The tiny Gemma 3 fixture model's snapshot folder.
pub fn tiny() -> PathBuf {
    snapshot("tiny-gemma-3")
}

/// A copy of the model folder `dir` (every file) whose `model.safetensors` holds every
/// floating-point tensor rounded to bf16 and stored as bf16, as Gemma 3's Hub checkpoints are.
pub fn bf16_copy(dir: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "model.safetensors" {
            std::fs::copy(&path, out.path().join(name)).unwrap();
        }
    }
    let converted: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        tensors(&dir.join("model.safetensors"))
            .into_iter()
            .map(|(name, (dtype, shape, bytes))| match dtype {
                Dtype::F32 => {
                    let bf16 = bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                        .collect();
                    (name, Dtype::BF16, shape, bf16)
                }
                _ => (name, dtype, shape, bytes),
            })
            .collect();
    let views = converted.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.clone(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &out.path().join("model.safetensors")).unwrap();
    out
}

/// A model folder's config and weights.
pub fn load(dir: &Path) -> (ModelConfig, Weights) {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(dir, &config).unwrap();
    (config, weights)
}

pub fn tensors(path: &Path) -> Tensors {
    let set = SafetensorsSet::open_file(path).unwrap();
    set.tensors()
        .map(|t| {
            (
                t.key.clone(),
                (t.dtype, t.shape.clone(), set.bytes(t).to_vec()),
            )
        })
        .collect()
}

/// A tensor of any float dtype, widened to f32.
pub fn f32s(t: &Tensors, key: &str) -> Vec<f32> {
    let (dtype, _, bytes) = t.get(key).unwrap_or_else(|| panic!("no tensor {key}"));
    ops::model::safetensors_io::to_f32(*dtype, bytes).unwrap()
}

/// An I64 tensor's shape and values.
pub fn i64s(t: &Tensors, key: &str) -> (Vec<usize>, Vec<i64>) {
    let (dtype, shape, bytes) = t.get(key).unwrap_or_else(|| panic!("no tensor {key}"));
    assert_eq!(*dtype, Dtype::I64, "{key}");
    let v = bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape.clone(), v)
}

/// Relative error of a scalar.
pub fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs()
}

/// A golden collated batch (`golden/collate_<name>.safetensors`, the guide's collate_fn output)
/// in the reference model's layout.
pub fn golden_batch(name: &str) -> Batch {
    let t = tensors(&golden(&format!("collate_{name}.safetensors")));
    let (shape, input_ids) = i64s(&t, "input_ids");
    Batch {
        batch: shape[0],
        seq: shape[1],
        input_ids,
        attention_mask: i64s(&t, "attention_mask").1,
        token_type_ids: i64s(&t, "token_type_ids").1,
        labels: Some(i64s(&t, "labels").1),
        pixel_values: f32s(&t, "pixel_values"),
        images: t["pixel_values"].1[0],
    }
}

/// A reference-layout batch in the collate stream's layout (what `Gemma3Gpu` consumes): square
/// images, one epoch, rows in order.
pub fn to_gpu_batch(b: &Batch) -> ops::data::collate::Batch {
    let side = (b.pixel_values.len() / 3)
        .checked_div(b.images)
        .map_or(0, |per_image| (per_image as f64).sqrt() as usize);
    ops::data::collate::Batch {
        batch_size: b.batch,
        seq_len: b.seq,
        input_ids: b.input_ids.clone(),
        attention_mask: b.attention_mask.clone(),
        token_type_ids: b.token_type_ids.clone(),
        labels: b.labels.clone().unwrap(),
        pixel_values: b.pixel_values.clone(),
        num_images: b.images,
        image_height: side,
        image_width: side,
        images_per_sample: Vec::new(),
        rows: (0..b.batch).collect(),
        epoch: 0,
        index_in_epoch: 0,
    }
}
