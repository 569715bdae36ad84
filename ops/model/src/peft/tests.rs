use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;

use super::*;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/publish/peft_adapter")
}

/// A config built from scratch with the fixture's settings serializes byte for byte as PEFT
/// 0.21.2 wrote it (every key, order, layout).
#[test]
fn new_config_matches_peft_bytes() {
    let golden = fs::read_to_string(fixture().join(CONFIG_FILE)).unwrap();
    let golden_json: Value = serde_json::from_str(&golden).unwrap();
    // PEFT stores target_modules as a set: take the order it happened to write.
    let targets: Vec<String> = golden_json["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut c = AdapterConfig::new(4, 8.0, 0.05, TargetModules::Names(targets));
    c.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
    c.base_model_name_or_path = Some("runner-test/tiny-gemma-3".into());
    assert_eq!(c.to_json_string(), golden);
}

#[test]
fn golden_adapter_reads_and_rewrites_identically() {
    let a = read_adapter(&fixture()).unwrap();
    assert_eq!(a.config.r, 4);
    assert_eq!(a.config.lora_alpha, 8.0);
    assert_eq!(
        a.config
            .scaling_for("model.language_model.layers.0.self_attn.q_proj"),
        2.0
    );
    assert_eq!(a.lora_modules().len(), 2 * 7 + 6);
    assert_eq!(
        a.saved_modules(),
        vec!["lm_head", "model.language_model.embed_tokens"]
    );
    let lm = &a.tensors[&saved_module_key("lm_head")];
    assert_eq!((lm.dtype, lm.shape.clone()), (DType::BF16, vec![64, 16]));
    let qa = &a.tensors[&lora_a_key("model.language_model.layers.1.self_attn.q_proj")];
    assert_eq!((qa.dtype, qa.shape.clone()), (DType::F32, vec![4, 16]));
    let fc1b = &a.tensors[&lora_b_key("model.vision_tower.encoder.layers.0.mlp.fc1")];
    assert_eq!(fc1b.shape, vec![12, 4]);

    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), &a.config, &a.tensors).unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap(),
        fs::read_to_string(fixture().join(CONFIG_FILE)).unwrap()
    );
    let back = read_adapter(dir.path()).unwrap();
    assert_eq!(back, a);
    let st_bytes = fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st_bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    // Python's safetensors uses the same Rust serializer: the files are identical.
    assert_eq!(st_bytes, fs::read(fixture().join(WEIGHTS_FILE)).unwrap());
}

#[test]
fn target_and_pattern_matching_as_peft() {
    let mut c = AdapterConfig::new(
        8,
        16.0,
        0.0,
        TargetModules::Names(vec!["q_proj".into(), "fc1".into()]),
    );
    c.modules_to_save = Some(vec!["lm_head".into(), "embed_tokens".into()]);
    assert!(c
        .targets("model.language_model.layers.0.self_attn.q_proj")
        .unwrap());
    assert!(c.targets("q_proj").unwrap());
    assert!(!c
        .targets("model.language_model.layers.0.self_attn.xq_proj")
        .unwrap());
    assert!(!c.targets("lm_head").unwrap());
    assert!(c.saves_module("model.language_model.embed_tokens"));
    c.target_modules = TargetModules::Regex(r".*language_model.*\.(q|v)_proj".into());
    assert!(c
        .targets("model.language_model.layers.3.self_attn.v_proj")
        .unwrap());
    assert!(!c
        .targets("model.vision_tower.encoder.layers.0.self_attn.v_proj")
        .unwrap());
    c.rank_pattern.insert("v_proj".into(), 4);
    c.alpha_pattern
        .insert("layers.3.self_attn.v_proj".into(), 2.0);
    assert_eq!(
        c.rank_for("model.language_model.layers.3.self_attn.v_proj"),
        4
    );
    assert_eq!(
        c.rank_for("model.language_model.layers.3.self_attn.q_proj"),
        8
    );
    assert_eq!(
        c.scaling_for("model.language_model.layers.3.self_attn.v_proj"),
        0.5
    );
    c.use_rslora = true;
    assert_eq!(
        c.scaling_for("model.language_model.layers.3.self_attn.q_proj"),
        16.0 / 8f64.sqrt()
    );
}

#[test]
fn write_rejects_what_peft_would_not_save() {
    let c = AdapterConfig::new(2, 2.0, 0.0, TargetModules::Names(vec!["q_proj".into()]));
    let dir = tempfile::tempdir().unwrap();
    let a = HostTensor::from_f32(vec![2, 3], &[1.0; 6]);
    let b = HostTensor::from_f32(vec![4, 2], &[1.0; 8]);
    let mut t = BTreeMap::from([(lora_a_key("m.q_proj"), a.clone())]);
    let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
    assert!(
        err.contains("no matching") && err.contains("lora_B"),
        "{err}"
    );
    t.insert(
        lora_b_key("m.q_proj"),
        HostTensor::from_f32(vec![4, 3], &[1.0; 12]),
    );
    let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
    assert!(err.contains("expected [out_features, 2]"), "{err}");
    t.insert(lora_b_key("m.q_proj"), b.clone());
    t.insert("model.k_proj.weight".into(), a.clone());
    let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
    assert!(err.contains("not a PEFT key"), "{err}");
    t.remove("model.k_proj.weight");
    t.insert(lora_a_key("m.k_proj"), a);
    t.insert(lora_b_key("m.k_proj"), b);
    let err = write_adapter(dir.path(), &c, &t).unwrap_err().to_string();
    assert!(err.contains("not matched by target_modules"), "{err}");
    assert!(
        !dir.path().join(WEIGHTS_FILE).exists(),
        "nothing is written for an invalid adapter"
    );
}

#[test]
fn json_escapes_non_ascii_like_python() {
    let mut c = AdapterConfig::new(1, 1.0, 0.0, TargetModules::Names(vec![]));
    c.base_model_name_or_path = Some("örg/m😀".into());
    assert!(c
        .to_json_string()
        .contains(r#""base_model_name_or_path": "\u00f6rg/m\ud83d\ude00","#));
    let back =
        AdapterConfig::from_json(&serde_json::from_str(&c.to_json_string()).unwrap()).unwrap();
    assert_eq!(back, c);
}
