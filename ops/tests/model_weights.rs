//! Config parsing and weight loading on the committed tiny Gemma 3 fixtures (tools/fixtures/make.py):
//! both key layouts, sharded bf16 and single-file f32, transformers' saved 4-bit checkpoints, and
//! the bad-input errors (truncated file, shape mismatch, missing shard, missing tensor).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ops::model::config::{FloatDtype, LayerType, ModelConfig, Rope};
use ops::model::names::TensorKind;
use ops::model::safetensors_io::{write_safetensors, Dtype, OutTensor, SafetensorsSet};
use ops::model::Weights;

use crate::common::*;

fn hub_layout() -> PathBuf {
    snapshot("tiny-gemma-3-hub-layout")
}

fn nf4_golden() -> PathBuf {
    fixtures().join("golden/nf4")
}

fn open(dir: &Path) -> (ModelConfig, Weights) {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(dir, &config).unwrap();
    (config, weights)
}

#[test]
fn tiny_fixture_config_resolves() {
    let c = ModelConfig::from_file(&tiny().join("config.json")).unwrap();
    let t = c.text();
    assert_eq!(c.architecture(), "Gemma3ForConditionalGeneration");
    assert_eq!(
        t.layer_types(),
        vec![
            LayerType::Sliding,
            LayerType::Sliding,
            LayerType::Full,
            LayerType::Sliding
        ]
    );
    assert_eq!(
        t.rope(2),
        Rope {
            theta: 1e6,
            linear_factor: 8.0
        }
    );
    assert_eq!(
        t.rope(3),
        Rope {
            theta: 1e4,
            linear_factor: 1.0
        }
    );
    assert_eq!(
        (t.head_dim(), t.num_kv_groups(), t.sliding_window()),
        (32, 2, Some(16))
    );
    assert_eq!(t.attn_scale(), 24f64.powf(-0.5));
    // sqrt(64) = 8 exactly in every dtype.
    assert_eq!(t.embed_scale(FloatDtype::BF16), 8.0);
    let v = c.vision().unwrap();
    assert_eq!(
        (v.num_patches(), v.head_dim(), v.intermediate_size),
        (16, 16, 37)
    );
    let ModelConfig::ConditionalGeneration(g) = &c else {
        panic!()
    };
    assert_eq!(
        (g.tokens_per_side(), g.pool_kernel(), g.image_token_index),
        (2, 2, 572)
    );

    // The Hub-layout copy states the same model in the old config keys.
    let old = ModelConfig::from_file(&hub_layout().join("config.json")).unwrap();
    let o = old.text();
    assert!(o.layer_types.is_none() && o.rope_parameters.is_none());
    assert_eq!(o.layer_types(), t.layer_types());
    for l in 0..4 {
        assert_eq!(o.rope(l), t.rope(l), "layer {l}");
    }
    assert_eq!(old.declared_dtype(), Some("bfloat16"));
}

#[test]
fn tiny_fixture_weights_load_in_canonical_names() {
    let (_, w) = open(&tiny());
    assert!(w.unexpected().is_empty(), "{:?}", w.unexpected());
    let present = w.expected().iter().filter(|e| w.contains(&e.name)).count();
    // 93 tensors in the file; lm_head is tied and absent.
    assert_eq!(present, 93);
    assert!(!w.contains("lm_head.weight"));
    let q = w
        .tensor("model.language_model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(
        q.key,
        "language_model.model.layers.0.self_attn.q_proj.weight"
    );
    assert_eq!((q.dtype, q.shape), (Dtype::F32, &[128usize, 64][..]));
    let fc1 = w
        .tensor("model.vision_tower.encoder.layers.1.mlp.fc1.weight")
        .unwrap();
    assert_eq!(fc1.key, "vision_tower.encoder.layers.1.mlp.fc1.weight");
    assert_eq!(fc1.shape, &[37, 32]);
    let linears = w
        .expected()
        .iter()
        .filter(|e| e.kind == TensorKind::LinearWeight)
        .count();
    assert_eq!(linears, 40);
}

/// Sharded bf16 in the Hub's key layout loads to the bf16-rounded weights of the main repo.
#[test]
fn hub_layout_sharded_bf16_matches_main_repo() {
    let (_, main) = open(&tiny());
    let (_, hub) = open(&hub_layout());
    assert!(hub.unexpected().is_empty(), "{:?}", hub.unexpected());
    assert_eq!(hub.files().files().count(), 3);
    let mut checked = 0;
    for e in main.expected().iter().filter(|e| main.contains(&e.name)) {
        let a = hub.tensor(&e.name).unwrap();
        assert_eq!(a.dtype, Dtype::BF16, "{}", e.name);
        let want: Vec<u16> = main.tensor(&e.name).unwrap().to_bf16_bits().unwrap();
        assert_eq!(a.to_bf16_bits().unwrap(), want, "{}", e.name);
        checked += 1;
    }
    assert_eq!(checked, 93);
    assert!(hub
        .source_key("model.vision_tower.post_layernorm.bias")
        .unwrap()
        .starts_with("vision_tower.vision_model."));
}

/// Copies every tensor of `src` into `dst` under keys `rename(key)`, split into `shards` files.
fn rewrite(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>, shards: usize) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let set = SafetensorsSet::open_dir(src).unwrap();
    let mut files: Vec<BTreeMap<String, OutTensor>> =
        (0..shards).map(|_| BTreeMap::new()).collect();
    let mut index = serde_json::Map::new();
    for (i, t) in set.tensors().enumerate() {
        let Some(key) = rename(&t.key) else { continue };
        let shard = i % shards;
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", shard + 1, shards)
        };
        index.insert(key.clone(), serde_json::Value::String(name));
        files[shard].insert(
            key,
            OutTensor {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: std::borrow::Cow::Borrowed(set.bytes(t)),
            },
        );
    }
    for (s, tensors) in files.iter().enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        write_safetensors(&dst.join(name), tensors).unwrap();
    }
    if shards > 1 {
        let json = serde_json::json!({"metadata": {}, "weight_map": index});
        std::fs::write(dst.join("model.safetensors.index.json"), json.to_string()).unwrap();
    }
}

/// The in-memory (`model.language_model.*`, `model.vision_tower.*`) layout, sharded, loads to the
/// same tensors.
#[test]
fn in_memory_layout_sharded_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    rewrite(
        &tiny(),
        &dst,
        |k| {
            Some(
                if let Some(rest) = k.strip_prefix("language_model.model.") {
                    format!("model.language_model.{rest}")
                } else {
                    format!("model.{k}")
                },
            )
        },
        2,
    );
    let (_, main) = open(&tiny());
    let (_, w) = open(&dst);
    for e in main.expected().iter().filter(|e| main.contains(&e.name)) {
        assert_eq!(
            w.tensor(&e.name).unwrap().bytes,
            main.tensor(&e.name).unwrap().bytes,
            "{}",
            e.name
        );
        assert!(w.source_key(&e.name).unwrap().starts_with("model."));
    }
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(tiny().join("config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    std::fs::write(dst.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let c = ModelConfig::from_file(&dst.join("config.json")).unwrap();
    let e = format!("{:#}", Weights::open(&dst, &c).err().unwrap());
    assert!(e.contains("truncated safetensors file"), "{e}");
    assert!(
        e.contains(&dst.join("model.safetensors").display().to_string()),
        "{e}"
    );
    assert!(e.contains("tensor `"), "{e}");
    // Cut inside the header.
    std::fs::write(dst.join("model.safetensors"), &bytes[..100]).unwrap();
    let e = format!("{:#}", Weights::open(&dst, &c).err().unwrap());
    assert!(
        e.contains("truncated") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    rewrite(&tiny(), &dst, |k| Some(k.to_string()), 1);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    cfg["vision_config"]["intermediate_size"] = 40.into();
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let c = ModelConfig::from_file(&dst.join("config.json")).unwrap();
    let e = format!("{:#}", Weights::open(&dst, &c).err().unwrap());
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains("vision_tower.encoder.layers.0.mlp.fc1")
            && e.contains("[37")
            && e.contains("[40"),
        "{e}"
    );
}

#[test]
fn missing_shard_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    rewrite(&hub_layout(), &dst, |k| Some(k.to_string()), 3);
    std::fs::remove_file(dst.join("model-00002-of-00003.safetensors")).unwrap();
    let c = ModelConfig::from_file(&dst.join("config.json")).unwrap();
    let e = format!("{:#}", Weights::open(&dst, &c).err().unwrap());
    assert!(
        e.contains("missing shard") && e.contains("model-00002-of-00003.safetensors"),
        "{e}"
    );
    assert!(e.contains("for tensor `"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("m");
    rewrite(
        &tiny(),
        &dst,
        |k| (!k.ends_with("layers.3.mlp.up_proj.weight")).then(|| k.to_string()),
        1,
    );
    let c = ModelConfig::from_file(&dst.join("config.json")).unwrap();
    let e = format!("{:#}", Weights::open(&dst, &c).err().unwrap());
    assert!(
        e.contains("model.language_model.layers.3.mlp.up_proj.weight") && e.contains("is missing"),
        "{e}"
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

/// transformers' own 4-bit `save_pretrained` output loads: every Linear but lm_head is NF4, and
/// dequantizing reproduces bitsandbytes' `dequantize_4bit` (golden) for the recorded weights.
#[test]
fn transformers_4bit_checkpoints_load_and_dequantize_like_bitsandbytes() {
    let golden = SafetensorsSet::open_file(&nf4_golden().join("nf4_tensors.safetensors")).unwrap();
    let (_, main) = open(&tiny());
    let (cfg, w) = open(&nf4_golden().join("transformers-4bit-u8-f32"));
    assert!(w.unexpected().is_empty(), "{:?}", w.unexpected());
    let ModelConfig::ConditionalGeneration(g) = &cfg else {
        panic!()
    };
    assert!(g.quantization_config.is_some());
    let mut nf4 = 0;
    for e in w.expected().iter().filter(|e| w.contains(&e.name)) {
        if e.kind == TensorKind::LinearWeight {
            assert!(w.is_nf4(&e.name), "{}", e.name);
            nf4 += 1;
            let t = w.nf4(&e.name).unwrap();
            assert_eq!((t.storage, t.shape()), (Dtype::U8, &e.shape[..]));
            let deq = t.dequantize_as_stored_dtype().unwrap();
            let src = main.tensor(&e.name).unwrap().to_f32().unwrap();
            // NF4 is a 4-bit code: 5-15 % relative error against the f32 source.
            let err = rel_frobenius(&deq, &src);
            assert!(err > 0.01 && err < 0.2, "{}: {err}", e.name);
            if let Some(want) = golden.get(&format!("{}.dequantized", e.name)) {
                let want =
                    ops::model::safetensors_io::to_f32(want.dtype, golden.bytes(want)).unwrap();
                let err = rel_frobenius(&deq, &want);
                assert!(err <= 1e-6, "{}: {err}", e.name);
                let packed = golden.get(&format!("{}.packed", e.name)).unwrap();
                assert_eq!(t.packed, golden.bytes(packed), "{}", e.name);
            }
        } else {
            assert!(!w.is_nf4(&e.name));
            assert_eq!(
                w.tensor(&e.name).unwrap().bytes,
                main.tensor(&e.name).unwrap().bytes,
                "{}",
                e.name
            );
        }
    }
    assert_eq!(nf4, 40);

    // The guide's config: storage bf16 (packed bytes viewed as BF16 [n/4, 1]), weights bf16.
    let (_, guide) = open(&nf4_golden().join("transformers-4bit-guide-bf16"));
    let q = guide
        .nf4("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
        .unwrap();
    assert_eq!(
        (q.storage, q.packed.len(), q.state.dtype.as_str()),
        (Dtype::BF16, 592, "bfloat16")
    );
    let deq = q.dequantize_as_stored_dtype().unwrap();
    assert!(deq.iter().all(|x| FloatDtype::BF16.round(*x) == *x));
    let src = main
        .tensor("model.vision_tower.encoder.layers.0.mlp.fc1.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let err = rel_frobenius(&deq, &src);
    assert!(err > 0.01 && err < 0.2, "{err}");
}
