//! Checks the committed golden fixtures (tests/fixtures/, made by tools/fixtures/make.py) against
//! tests/fixtures/manifest.json and against the contracts tools/fixtures/MANIFEST.md documents, so that a
//! fixture that is missing, truncated, regenerated with other shapes, or laid out wrongly fails here first.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::fixtures;

fn hub() -> PathBuf {
    fixtures().join("hf-cache/hub")
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn snapshot(repo_dir: &str) -> PathBuf {
    let root = hub().join(repo_dir);
    let commit = fs::read_to_string(root.join("refs/main")).expect("refs/main");
    root.join("snapshots").join(commit.trim())
}

/// A safetensors file held in memory with typed accessors for the few tensors the contract checks read.
struct St {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl St {
    fn open(path: PathBuf) -> St {
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        St { bytes, path }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.st()
            .tensor(name)
            .unwrap_or_else(|e| panic!("{} {name}: {e}", self.path.display()))
            .shape()
            .to_vec()
    }
    fn dtype(&self, name: &str) -> Dtype {
        self.st().tensor(name).unwrap().dtype()
    }
    fn names(&self) -> BTreeSet<String> {
        self.st().names().into_iter().map(String::from).collect()
    }
    fn i64s(&self, name: &str) -> Vec<i64> {
        let t = self.st().tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let t = self.st().tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

#[test]
fn every_file_matches_the_manifest() {
    let manifest = read_json(&fixtures().join("manifest.json"));
    let files = manifest["files"].as_object().expect("files");
    assert!(
        files.len() > 40,
        "manifest lists only {} files",
        files.len()
    );
    for (rel, entry) in files {
        let path = fixtures().join(rel);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(
            bytes.len() as u64,
            entry["size"].as_u64().unwrap(),
            "{rel}: size"
        );
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            entry["sha256"].as_str().unwrap(),
            "{rel}: sha256"
        );
        if let Some(tensors) = entry.get("tensors").and_then(Value::as_object) {
            let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
            let names: BTreeSet<&str> = st.names().into_iter().collect();
            let expected: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
            assert_eq!(names, expected, "{rel}: tensor names");
            for (name, info) in tensors {
                let view = st.tensor(name).unwrap();
                assert_eq!(
                    format!("{:?}", view.dtype()),
                    info["dtype"].as_str().unwrap(),
                    "{rel} {name}: dtype"
                );
                let shape: Vec<usize> = info["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(view.shape(), shape.as_slice(), "{rel} {name}: shape");
            }
        }
    }
}

#[test]
fn hub_cache_has_the_huggingface_hub_layout() {
    let repos = [
        (
            "models--runner-test--tiny-gemma-3",
            vec![
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "processor_config.json",
                "chat_template.jinja",
            ],
        ),
        (
            "models--runner-test--tiny-gemma-3-hub-layout",
            vec![
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00003.safetensors",
                "preprocessor_config.json",
                "tokenizer_config.json",
            ],
        ),
        (
            "datasets--HuggingFaceH4--llava-instruct-mix-vsft",
            vec![
                "data/train-00000-of-00001.parquet",
                "data/test-00000-of-00001.parquet",
                "README.md",
            ],
        ),
        (
            "datasets--FanqingM--MMIU-Benchmark",
            vec![
                "all.parquet",
                "Low-level-semantic.zip",
                "2D-spatial.zip",
                "Discrete-temporal.zip",
            ],
        ),
    ];
    for (dir, must_have) in repos {
        let root = hub().join(dir);
        let commit = fs::read_to_string(root.join("refs/main"))
            .unwrap_or_else(|e| panic!("{dir}/refs/main: {e}"));
        assert!(
            commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
            "{dir}: refs/main = {commit:?}"
        );
        let snap = snapshot(dir);
        for rel in must_have {
            assert!(snap.join(rel).is_file(), "{dir}: snapshot lacks {rel}");
        }
        let mut stack = vec![snap.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = fs::symlink_metadata(&p).unwrap();
                if meta.is_dir() {
                    stack.push(p);
                    continue;
                }
                assert!(
                    meta.file_type().is_symlink(),
                    "{}: not a symlink",
                    p.display()
                );
                let target = fs::read_link(&p).unwrap();
                assert!(target.is_relative(), "{}: absolute link", p.display());
                let blob = p.parent().unwrap().join(&target).canonicalize().unwrap();
                assert_eq!(
                    blob.parent().unwrap(),
                    root.join("blobs").canonicalize().unwrap(),
                    "{}",
                    p.display()
                );
                let name = blob.file_name().unwrap().to_str().unwrap().to_string();
                if name.len() == 64 {
                    // LFS files are named by their sha256, as huggingface_hub names them.
                    assert_eq!(
                        hex::encode(Sha256::digest(fs::read(&blob).unwrap())),
                        name,
                        "{}",
                        p.display()
                    );
                } else {
                    assert_eq!(name.len(), 40, "{}: blob name {name}", p.display());
                }
            }
        }
    }
}

#[test]
fn tiny_model_config_and_tokenizer_match_the_manifest() {
    let snap = snapshot("models--runner-test--tiny-gemma-3");
    let cfg = read_json(&snap.join("config.json"));
    assert_eq!(cfg["architectures"][0], "Gemma3ForConditionalGeneration");
    assert_eq!(
        (
            cfg["boi_token_index"].as_u64(),
            cfg["eoi_token_index"].as_u64()
        ),
        (Some(7), Some(8))
    );
    assert_eq!(cfg["image_token_index"], 572);
    assert_eq!(cfg["mm_tokens_per_image"], 4);
    let t = &cfg["text_config"];
    for (key, want) in [
        ("vocab_size", 576.0),
        ("hidden_size", 64.0),
        ("intermediate_size", 96.0),
        ("num_hidden_layers", 4.0),
        ("num_attention_heads", 4.0),
        ("num_key_value_heads", 2.0),
        ("head_dim", 32.0),
        ("query_pre_attn_scalar", 24.0),
        ("sliding_window", 16.0),
        ("rms_norm_eps", 1e-6),
    ] {
        assert_eq!(t[key].as_f64(), Some(want), "text_config.{key}");
    }
    let layer_types: Vec<&str> = t["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        layer_types,
        [
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]
    );
    assert_eq!(
        t["rope_parameters"]["full_attention"]["rope_type"],
        "linear"
    );
    assert_eq!(
        t["rope_parameters"]["full_attention"]["factor"].as_f64(),
        Some(8.0)
    );
    assert_eq!(
        t["rope_parameters"]["full_attention"]["rope_theta"].as_f64(),
        Some(1e6)
    );
    assert_eq!(
        t["rope_parameters"]["sliding_attention"]["rope_theta"].as_f64(),
        Some(1e4)
    );
    let v = &cfg["vision_config"];
    for (key, want) in [
        ("hidden_size", 32),
        ("intermediate_size", 37),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 2),
        ("image_size", 56),
        ("patch_size", 14),
    ] {
        assert_eq!(v[key].as_u64(), Some(want), "vision_config.{key}");
    }

    let weights = St::open(snap.join("model.safetensors"));
    assert_eq!(
        weights.shape("language_model.model.embed_tokens.weight"),
        [576, 64]
    );
    assert_eq!(
        weights.shape("language_model.model.layers.0.self_attn.q_proj.weight"),
        [128, 64]
    );
    assert_eq!(
        weights.shape("language_model.model.layers.0.self_attn.k_proj.weight"),
        [64, 64]
    );
    assert_eq!(
        weights.shape("language_model.model.layers.0.self_attn.q_norm.weight"),
        [32]
    );
    assert_eq!(
        weights.shape("vision_tower.embeddings.patch_embedding.weight"),
        [32, 3, 14, 14]
    );
    assert_eq!(
        weights.shape("vision_tower.embeddings.position_embedding.weight"),
        [16, 32]
    );
    assert_eq!(
        weights.shape("multi_modal_projector.mm_input_projection_weight"),
        [32, 64]
    );
    assert!(
        !weights.names().contains("lm_head.weight"),
        "lm_head is tied and not saved"
    );
    assert_eq!(weights.names().len(), 93);
    assert!(weights
        .names()
        .iter()
        .all(|n| weights.dtype(n) == Dtype::F32));
    // Norm weights are random (the 1+w of Gemma's RMSNorm must matter).
    assert!(weights
        .f32s("language_model.model.norm.weight")
        .iter()
        .any(|w| w.abs() > 0.1));

    let tokenizer = tokenizers::Tokenizer::from_file(snap.join("tokenizer.json")).unwrap();
    for (token, id) in [
        ("<pad>", 0),
        ("<eos>", 1),
        ("<bos>", 2),
        ("<unk>", 3),
        ("<mask>", 4),
        ("<start_of_turn>", 5),
        ("<end_of_turn>", 6),
        ("<start_of_image>", 7),
        ("<end_of_image>", 8),
        ("<image_soft_token>", 572),
    ] {
        assert_eq!(tokenizer.token_to_id(token), Some(id), "{token}");
    }
    assert_eq!(tokenizer.get_vocab_size(true), 573);
}

/// The Rust tokenizers crate reproduces the Python processor's input_ids from the processor-expanded texts
/// (so the golden ids are reachable from Rust, double BOS included).
#[test]
fn rust_tokenizer_reproduces_collated_input_ids() {
    let tokenizer = tokenizers::Tokenizer::from_file(
        snapshot("models--runner-test--tiny-gemma-3").join("tokenizer.json"),
    )
    .unwrap();
    let info = read_json(&fixtures().join("golden/collate.json"));
    for name in ["llava", "mmiu"] {
        let batch = St::open(fixtures().join(format!("golden/collate_{name}.safetensors")));
        let shape = batch.shape("input_ids");
        let (rows, len) = (shape[0], shape[1]);
        let ids = batch.i64s("input_ids");
        let mask = batch.i64s("attention_mask");
        for (r, text) in info[name]["expanded_texts"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let enc = tokenizer.encode(text.as_str().unwrap(), true).unwrap();
            let real = mask[r * len..(r + 1) * len]
                .iter()
                .filter(|&&m| m == 1)
                .count();
            let expect: Vec<u32> = ids[r * len..r * len + real]
                .iter()
                .map(|&i| i as u32)
                .collect();
            assert_eq!(enc.get_ids(), expect.as_slice(), "{name} row {r}");
            assert_eq!(
                &expect[..3],
                &[2, 2, 5],
                "{name} row {r}: double BOS then <start_of_turn>"
            );
        }
        assert_eq!(info[name]["rows"].as_array().unwrap().len(), rows);
    }
}

#[test]
fn collated_batches_follow_the_guide() {
    let info = read_json(&fixtures().join("golden/collate.json"));
    for (name, n_images) in [("llava", 2usize), ("mmiu", 6)] {
        let b = St::open(fixtures().join(format!("golden/collate_{name}.safetensors")));
        let shape = b.shape("input_ids");
        for key in [
            "attention_mask",
            "token_type_ids",
            "labels",
            "labels_literal_guide",
        ] {
            assert_eq!(b.shape(key), shape, "{name} {key}");
        }
        assert_eq!(b.shape("pixel_values"), [n_images, 3, 56, 56], "{name}");
        let pixels = b.f32s("pixel_values");
        assert!(pixels.iter().all(|p| (-1.0..=1.0).contains(p)));
        let ids = b.i64s("input_ids");
        let mask = b.i64s("attention_mask");
        let tt = b.i64s("token_type_ids");
        let labels = b.i64s("labels");
        let literal = b.i64s("labels_literal_guide");
        assert_eq!(
            ids.iter().filter(|&&i| i == 572).count(),
            n_images * 4,
            "{name}: 4 soft tokens per image"
        );
        assert!(mask.contains(&0), "{name}: the batch must have padding");
        for i in 0..ids.len() {
            assert_eq!(
                tt[i] == 1,
                ids[i] == 572,
                "{name}[{i}]: token_type_ids is 1 exactly on image soft tokens"
            );
            assert_eq!(
                mask[i] == 0,
                ids[i] == 0,
                "{name}[{i}]: right padding with <pad>"
            );
            let masked = matches!(ids[i], 0 | 7 | 572);
            assert_eq!(
                labels[i],
                if masked { -100 } else { ids[i] },
                "{name}[{i}]: labels"
            );
            let literal_masked = matches!(ids[i], 0 | 572);
            assert_eq!(
                literal[i],
                if literal_masked { -100 } else { ids[i] },
                "{name}[{i}]: literal labels keep boi"
            );
        }
        assert_eq!(info[name]["literal_guide_masks_boi"], false);
    }
}

#[test]
fn golden_outputs_have_consistent_shapes() {
    let g = fixtures().join("golden");
    for name in ["llava", "mmiu"] {
        let batch = St::open(g.join(format!("collate_{name}.safetensors")));
        let (b, t) = (batch.shape("input_ids")[0], batch.shape("input_ids")[1]);
        let n_img = batch.shape("pixel_values")[0];
        let fwd = St::open(g.join(format!("forward_{name}.safetensors")));
        assert_eq!(fwd.shape("logits"), [b, t, 576]);
        assert_eq!(fwd.shape("loss"), [1]);
        assert_eq!(fwd.shape("vision_last_hidden_state"), [n_img, 16, 32]);
        assert_eq!(fwd.shape("image_features"), [n_img, 4, 64]);
        for i in 0..=4 {
            assert_eq!(fwd.shape(&format!("hidden_states.{i}")), [b, t, 64]);
        }
        let loss = fwd.f32s("loss")[0];
        assert!(loss.is_finite() && loss > 1.0, "{name}: loss {loss}");
    }

    let hub_layout = St::open(g.join("forward_hub_layout.safetensors"));
    let mmiu_shape = St::open(g.join("collate_mmiu.safetensors")).shape("input_ids");
    assert_eq!(
        hub_layout.shape("mmiu.logits"),
        [mmiu_shape[0], mmiu_shape[1], 576]
    );
    for key in [
        "llava.loss",
        "mmiu.loss",
        "llava.lora_init_loss",
        "mmiu.lora_init_loss",
    ] {
        assert_eq!(hub_layout.shape(key), [1], "{key}");
    }

    let init = St::open(g.join("lora/adapter_init/adapter_model.safetensors"));
    let step3 = St::open(g.join("lora/adapter_step3/adapter_model.safetensors"));
    assert_eq!(init.names(), step3.names());
    let after_step1 = St::open(g.join("lora/replay_after_step1.safetensors"));
    assert_eq!(after_step1.names(), init.names());
    let peft_logits = St::open(g.join("lora/peft_logits_mmiu.safetensors"));
    let mmiu_ids = St::open(g.join("collate_mmiu.safetensors")).shape("input_ids");
    for tag in ["init", "step3"] {
        assert_eq!(
            peft_logits.shape(&format!("{tag}.mmiu.logits")),
            [mmiu_ids[0], mmiu_ids[1], 576]
        );
        assert_eq!(peft_logits.shape(&format!("{tag}.mmiu.loss")), [1]);
    }
    // 4 text layers x 7 + 2 vision layers x 6 linears, A and B each, plus the two modules_to_save copies.
    assert_eq!(init.names().len(), 40 * 2 + 2);
    assert!(init.names().contains("base_model.model.lm_head.weight"));
    assert!(init
        .names()
        .contains("base_model.model.model.language_model.embed_tokens.weight"));
    assert_eq!(
        init.shape("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"),
        [16, 64]
    );
    assert_eq!(
        init.shape("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"),
        [128, 16]
    );
    assert_eq!(
        init.shape("base_model.model.model.vision_tower.encoder.layers.1.mlp.fc1.lora_B.weight"),
        [37, 16]
    );
    for name in ["llava", "mmiu"] {
        let grads = St::open(g.join(format!("lora/grads_step0_{name}.safetensors")));
        let mut names = grads.names();
        assert!(names.remove("loss"));
        assert_eq!(
            names,
            init.names(),
            "{name}: a gradient for every adapter tensor"
        );
        for n in &names {
            assert_eq!(grads.shape(n), init.shape(n), "{name} {n}");
        }
        let embed = grads.f32s("base_model.model.model.language_model.embed_tokens.weight");
        assert!(
            embed[..64].iter().all(|&x| x == 0.0),
            "{name}: the pad row gets no gradient"
        );
    }
    let adapter_cfg = read_json(&g.join("lora/adapter_init/adapter_config.json"));
    assert_eq!(adapter_cfg["r"], 16);
    assert_eq!(adapter_cfg["lora_alpha"], 16);
    let targets: BTreeSet<&str> = adapter_cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        "down_proj",
        "fc1",
        "fc2",
        "gate_proj",
        "k_proj",
        "o_proj",
        "out_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    .into_iter()
    .collect();
    assert_eq!(targets, expected);

    let train = read_json(&g.join("lora/train.json"));
    let logs: Vec<&Value> = train["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .collect();
    assert_eq!(logs.len(), 3);
    let max_norm = train["args"]["max_grad_norm"].as_f64().unwrap();
    assert!(
        logs.iter()
            .all(|e| e["grad_norm"].as_f64().unwrap() > max_norm),
        "clipping must be active at every step"
    );
}

#[test]
fn nf4_fixtures_have_the_bitsandbytes_layout() {
    let nf4 = St::open(fixtures().join("golden/nf4/nf4_tensors.safetensors"));
    let mut sources = BTreeMap::new();
    for n in nf4.names() {
        if let Some(base) = n.strip_suffix(".source") {
            sources.insert(base.to_string(), nf4.shape(&n).iter().product::<usize>());
        }
    }
    assert_eq!(sources.len(), 6);
    assert!(
        sources.values().any(|n| n % 64 != 0),
        "a size that is not a multiple of the block"
    );
    assert!(
        sources.values().any(|n| n.div_ceil(64) > 256),
        "more than one nested block"
    );
    for (base, n) in &sources {
        let blocks = n.div_ceil(64);
        assert_eq!(
            nf4.shape(&format!("{base}.packed")),
            [n.div_ceil(2)],
            "{base}"
        );
        assert_eq!(nf4.dtype(&format!("{base}.packed")), Dtype::U8);
        assert_eq!(nf4.shape(&format!("{base}.absmax")), [blocks], "{base}");
        assert_eq!(nf4.dtype(&format!("{base}.absmax")), Dtype::U8);
        assert_eq!(
            nf4.shape(&format!("{base}.plain_absmax")),
            [blocks],
            "{base}"
        );
        assert_eq!(nf4.dtype(&format!("{base}.plain_absmax")), Dtype::F32);
        assert_eq!(
            nf4.shape(&format!("{base}.nested_absmax")),
            [blocks.div_ceil(256)],
            "{base}"
        );
        assert_eq!(nf4.shape(&format!("{base}.nested_quant_map")), [256]);
        assert_eq!(nf4.shape(&format!("{base}.quant_map")), [16]);
        assert_eq!(nf4.shape(&format!("{base}.offset")), [1]);
        assert_eq!(
            nf4.shape(&format!("{base}.dequantized")),
            nf4.shape(&format!("{base}.source"))
        );
    }
    let saved = St::open(fixtures().join("golden/nf4/transformers-4bit-u8-f32/model.safetensors"));
    let key = "language_model.model.layers.0.self_attn.q_proj.weight";
    for suffix in [
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    ] {
        assert!(
            saved.names().contains(&format!("{key}{suffix}")),
            "{key}{suffix}"
        );
    }
    assert!(saved
        .names()
        .contains("vision_tower.encoder.layers.0.mlp.fc1.weight.quant_state.bitsandbytes__nf4"));
    assert!(
        !saved.names().iter().any(|n| n.starts_with("lm_head")),
        "lm_head is tied and not quantized"
    );
}

/// The hf-hub crate's offline cache reader resolves the fixture repos (refs/main -> snapshot -> blob).
#[test]
fn hf_hub_crate_reads_the_fixture_cache() {
    let cache = hf_hub::Cache::new(hub());
    let model = cache.model("runner-test/tiny-gemma-3".to_string());
    let config = model
        .get("config.json")
        .expect("config.json through hf-hub");
    assert_eq!(read_json(&config)["model_type"], "gemma3");
    assert!(model.get("model.safetensors").is_some());
    let mmiu = cache.dataset("FanqingM/MMIU-Benchmark".to_string());
    for file in [
        "all.parquet",
        "Low-level-semantic.zip",
        "2D-spatial.zip",
        "Discrete-temporal.zip",
    ] {
        assert!(mmiu.get(file).is_some(), "{file}");
    }
    let llava = cache.dataset("HuggingFaceH4/llava-instruct-mix-vsft".to_string());
    assert!(llava.get("data/train-00000-of-00001.parquet").is_some());
    assert!(llava.get("data/test-00000-of-00001.parquet").is_some());
    assert!(mmiu.get("no-such-file.zip").is_none());
}

/// pixel_values of the collated batches are the per-image resized bytes of images.safetensors, normalised
/// as the processor does: (u8 / 255 - 0.5) / 0.5, channels first, images in batch order.
#[test]
fn collated_pixels_are_the_resized_images_normalised() {
    let images = St::open(fixtures().join("golden/images.safetensors"));
    let info = read_json(&fixtures().join("golden/collate.json"));
    for name in ["llava", "mmiu"] {
        let batch = St::open(fixtures().join(format!("golden/collate_{name}.safetensors")));
        let pixels = batch.f32s("pixel_values");
        let split = info[name]["split"].as_str().unwrap();
        let counts = info[name]["n_images_per_example"].as_array().unwrap();
        let mut image_index = 0;
        for (row, count) in info[name]["rows"].as_array().unwrap().iter().zip(counts) {
            for i in 0..count.as_u64().unwrap() {
                let key = format!("{name}.{split}.{}.{i}.resized", row.as_u64().unwrap());
                assert_eq!(images.shape(&key), [56, 56, 3], "{key}");
                let st = images.st();
                let resized = st.tensor(&key).unwrap();
                let base = image_index * 3 * 56 * 56;
                for c in 0..3 {
                    for y in 0..56 {
                        for x in 0..56 {
                            let u = resized.data()[(y * 56 + x) * 3 + c] as f32;
                            let want = (u * (1.0 / 255.0) - 0.5) / 0.5;
                            let got = pixels[base + (c * 56 + y) * 56 + x];
                            assert!(
                                (got - want).abs() < 1e-6,
                                "{key} c{c} y{y} x{x}: {got} vs {want}"
                            );
                        }
                    }
                }
                image_index += 1;
            }
        }
        assert_eq!(
            image_index * 3 * 56 * 56,
            pixels.len(),
            "{name}: every image accounted for"
        );
    }
}
