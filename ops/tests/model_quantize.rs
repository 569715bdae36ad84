//! The `quantize` op against transformers + bitsandbytes: quantizing the tiny fixture model gives
//! the checkpoint `from_pretrained(..., BitsAndBytesConfig(...))` + `save_pretrained` wrote
//! (tests/fixtures/golden/nf4/transformers-4bit-*), tensor by tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ops::model::bnb::{QuantState, QuantStorage, SkipRule};
use ops::model::config::{FloatDtype, ModelConfig};
use ops::model::names::TensorKind;
use ops::model::quantize::{quantize_checkpoint, QuantizeOptions};
use ops::model::safetensors_io::{Dtype, SafetensorsSet};
use ops::model::Weights;
use ops::{Artifact, ArtifactType, NoProgress, Op, RecipeInfo, RunCtx};

use crate::common::fixtures;

fn tiny() -> PathBuf {
    let hub = fixtures().join("hf-cache/hub/models--runner-test--tiny-gemma-3");
    let commit = std::fs::read_to_string(hub.join("refs/main")).unwrap();
    hub.join("snapshots").join(commit.trim())
}

fn golden(name: &str) -> PathBuf {
    fixtures().join("golden/nf4").join(name)
}

fn f32s(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    ops::model::safetensors_io::to_f32(dtype, bytes).unwrap()
}

/// Differences between our checkpoint and transformers'.
#[derive(Debug, Default)]
struct Diff {
    tensors: usize,
    exact: usize,
    absmax_codes_off_by_one: usize,
}

/// Compares two checkpoints key by key: everything byte-identical except what bitsandbytes'
/// summation order may change: double-quant 8-bit absmax codes within one code, the
/// nested absmax and the offset within 1e-6 relative.
fn compare(ours: &Path, theirs: &Path) -> Diff {
    let a = SafetensorsSet::open_file(&ours.join("model.safetensors")).unwrap();
    let b = SafetensorsSet::open_file(&theirs.join("model.safetensors")).unwrap();
    let ka: Vec<&str> = a.tensors().map(|t| t.key.as_str()).collect();
    let kb: Vec<&str> = b.tensors().map(|t| t.key.as_str()).collect();
    assert_eq!(ka, kb, "key sets differ");
    let mut d = Diff::default();
    for tb in b.tensors() {
        let ta = a.get(&tb.key).unwrap();
        d.tensors += 1;
        // The quant-state JSON's length follows the offset's digits, which may differ (see above).
        if !tb.key.ends_with(".quant_state.bitsandbytes__nf4") {
            assert_eq!((ta.dtype, &ta.shape), (tb.dtype, &tb.shape), "{}", tb.key);
        }
        let (xa, xb) = (a.bytes(ta), b.bytes(tb));
        if xa == xb {
            d.exact += 1;
            continue;
        }
        if tb.key.ends_with(".quant_state.bitsandbytes__nf4") {
            let (sa, sb) = (
                QuantState::parse(xa).unwrap(),
                QuantState::parse(xb).unwrap(),
            );
            let (oa, ob) = (sa.nested_offset.unwrap(), sb.nested_offset.unwrap());
            assert!(
                ((oa - ob) / ob).abs() <= 1e-6,
                "{}: offset {oa} vs {ob}",
                tb.key
            );
            assert_eq!(
                QuantState {
                    nested_offset: None,
                    ..sa
                },
                QuantState {
                    nested_offset: None,
                    ..sb
                },
                "{}",
                tb.key
            );
        } else if tb.key.ends_with(".absmax") && tb.dtype == Dtype::U8 {
            for (i, (p, q)) in xa.iter().zip(xb).enumerate() {
                assert!(
                    (*p as i32 - *q as i32).abs() <= 1,
                    "{} [{i}]: code {p} vs {q}",
                    tb.key
                );
            }
            d.absmax_codes_off_by_one += xa.iter().zip(xb).filter(|(p, q)| p != q).count();
        } else if tb.key.ends_with(".nested_absmax") {
            let (va, vb) = (f32s(ta.dtype, xa), f32s(tb.dtype, xb));
            for (p, q) in va.iter().zip(&vb) {
                assert!(((p - q) / q).abs() <= 1e-6, "{}: {p} vs {q}", tb.key);
            }
        } else {
            panic!("{}: bytes differ", tb.key);
        }
    }
    d
}

fn run_quantize(opts: &QuantizeOptions) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(&tiny(), out.path(), opts, &|_| {}).unwrap();
    assert!(report.unexpected_keys.is_empty());
    out
}

fn quantization_config(dir: &Path) -> serde_json::Value {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["quantization_config"].clone()
}

#[test]
fn f32_uint8_matches_transformers_save() {
    let opts = QuantizeOptions {
        double_quant: true,
        compute_dtype: FloatDtype::F32,
        quant_storage: QuantStorage::U8,
        skip_modules: None,
        skip_rule: SkipRule::Boundary,
        load_dtype: Some(FloatDtype::F32),
    };
    let out = run_quantize(&opts);
    let theirs = golden("transformers-4bit-u8-f32");
    let d = compare(out.path(), &theirs);
    println!("f32/uint8: {d:?}");
    assert_eq!(d.tensors, 293);
    assert_eq!(
        quantization_config(out.path()),
        quantization_config(&theirs)
    );
    // What we wrote loads back: 40 NF4 linears, and lm_head stayed tied and absent.
    let config = ModelConfig::from_file(&out.path().join("config.json")).unwrap();
    let w = Weights::open(out.path(), &config).unwrap();
    let nf4 = w.expected().iter().filter(|e| w.is_nf4(&e.name)).count();
    assert_eq!(nf4, 40);
    assert!(!w.contains("lm_head.weight"));
    // Processor and tokenizer files come along.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
}

#[test]
fn guide_bf16_settings_match_transformers_save() {
    let opts = QuantizeOptions {
        double_quant: true,
        compute_dtype: FloatDtype::BF16,
        quant_storage: QuantStorage::BF16,
        skip_modules: None,
        skip_rule: SkipRule::Boundary,
        load_dtype: Some(FloatDtype::BF16),
    };
    let out = run_quantize(&opts);
    let theirs = golden("transformers-4bit-guide-bf16");
    let d = compare(out.path(), &theirs);
    println!("guide bf16: {d:?}");
    assert_eq!(d.tensors, 293);
    assert_eq!(
        quantization_config(out.path()),
        quantization_config(&theirs)
    );
}

#[test]
fn skip_modules_replace_the_default() {
    let opts = QuantizeOptions {
        double_quant: false,
        compute_dtype: FloatDtype::F32,
        quant_storage: QuantStorage::U8,
        skip_modules: Some(vec!["model.vision_tower".into(), "down_proj".into()]),
        skip_rule: SkipRule::Boundary,
        load_dtype: None,
    };
    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(&tiny(), out.path(), &opts, &|_| {}).unwrap();
    // 28 text linears - 4 down_proj = 24; the 12 vision linears and 4 down_proj stay dense.
    assert_eq!(report.quantized_modules, 24);
    assert_eq!(report.skipped_linears.len(), 16);
    let config = ModelConfig::from_file(&out.path().join("config.json")).unwrap();
    let w = Weights::open(out.path(), &config).unwrap();
    let src_config = ModelConfig::from_file(&tiny().join("config.json")).unwrap();
    let src = Weights::open(&tiny(), &src_config).unwrap();
    for e in w
        .expected()
        .iter()
        .filter(|e| e.kind == TensorKind::LinearWeight)
    {
        let dense = e.name.contains("vision_tower") || e.name.contains("down_proj");
        assert_eq!(w.is_nf4(&e.name), !dense, "{}", e.name);
        if dense {
            assert_eq!(
                w.tensor(&e.name).unwrap().bytes,
                src.tensor(&e.name).unwrap().bytes
            );
        } else {
            // Without double quant the absmax is plain f32.
            let t = w.nf4(&e.name).unwrap();
            assert!(matches!(t.absmax, ops::model::Nf4Absmax::Plain(_)));
        }
    }
}

fn model_artifact(dir: &Path, root: &Path) -> Artifact {
    std::fs::create_dir_all(dir).unwrap();
    let json =
        serde_json::json!({"repo_id": "runner-test/tiny-gemma-3", "revision": null, "root": root});
    std::fs::write(dir.join("model.json"), json.to_string()).unwrap();
    Artifact {
        ty: ArtifactType::Model,
        dir: dir.to_path_buf(),
        key: "test".into(),
    }
}

#[test]
fn op_runs_and_checks_params() {
    let op = ops::quantize::Quantize;
    let e = op
        .check(&"bnb_4bit_quant_type = \"fp4\"".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("bnb_4bit_quant_type"));
    assert!(
        e.message.contains("fp4") && e.message.contains("nf4"),
        "{}",
        e.message
    );
    let e = op
        .check(&"bnb_4bit_quant_storage = \"int4\"".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("bnb_4bit_quant_storage"));
    let e = op
        .check(&"dtype = \"float64\"".parse().unwrap())
        .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("dtype"));
    let params = op.check(&toml::Table::new()).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let input = model_artifact(&tmp.path().join("in"), &tiny());
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let inputs = BTreeMap::from([("model".to_string(), input)]);
    let recipe = RecipeInfo {
        name: "t".into(),
        seed: 0,
        path: tmp.path().join("r.toml"),
        output_dir: tmp.path().join("o"),
        env: ops::Environment::process(),
    };
    let ctx = RunCtx {
        name: "nf4",
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        recipe: &recipe,
        progress: &NoProgress,
    };
    op.run(&ctx).unwrap();
    // The runner moves the directory into the cache: the root is relative.
    let moved = tmp.path().join("cache-entry");
    std::fs::rename(&out_dir, &moved).unwrap();
    let (root, manifest) = ops::model::artifact_model_root(&moved).unwrap();
    assert_eq!(manifest["repo_id"], "runner-test/tiny-gemma-3");
    // The default params are the guide's BitsAndBytesConfig (bf16 weights, compute and storage).
    let d = compare(&root, &golden("transformers-4bit-guide-bf16"));
    assert_eq!(d.tensors, 293);
    assert!(root.join("tokenizer.json").is_file());
}

/// The guide-era (transformers 4.x) rule: `vision_tower` skips every vision Linear, and the
/// recorded list names each skipped module so transformers 5's boundary rule agrees on load.
#[test]
fn contains_rule_skips_everything_under_a_name() {
    let opts = QuantizeOptions {
        double_quant: false,
        compute_dtype: FloatDtype::F32,
        quant_storage: QuantStorage::U8,
        skip_modules: Some(vec!["lm_head".into(), "vision_tower".into()]),
        skip_rule: SkipRule::Contains,
        load_dtype: None,
    };
    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(&tiny(), out.path(), &opts, &|_| {}).unwrap();
    // the 28 text linears are quantized; the 12 vision linears stay dense
    assert_eq!(report.quantized_modules, 28);
    assert_eq!(report.skipped_linears.len(), 12);
    assert!(report
        .skipped_linears
        .iter()
        .all(|n| n.contains("vision_tower")));
    let recorded = quantization_config(out.path())["llm_int8_skip_modules"].clone();
    let names: Vec<String> = serde_json::from_value(recorded).unwrap();
    assert_eq!(names.len(), 2 + 12);
    assert!(names[2..]
        .iter()
        .all(|n| n.starts_with("model.vision_tower.")));
    // transformers 5's rule on the recorded list skips exactly what was skipped
    let boundary = |path: &str| {
        names
            .iter()
            .any(|p| SkipRule::Boundary.matches(path, p).unwrap())
    };
    assert!(names[2..].iter().all(|p| boundary(p)));
    assert!(!boundary("model.language_model.layers.0.mlp.up_proj"));

    // the same names under the default rule quantize the vision tower too
    let boundary_opts = QuantizeOptions {
        skip_rule: SkipRule::Boundary,
        ..opts
    };
    let out = tempfile::tempdir().unwrap();
    let report = quantize_checkpoint(&tiny(), out.path(), &boundary_opts, &|_| {}).unwrap();
    assert_eq!(report.quantized_modules, 40);
}
