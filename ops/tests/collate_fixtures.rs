//! The whole chain load -> unzip -> format -> template -> collate -> BatchStream, offline
//! (HF_HUB_OFFLINE=1) against the fixture Hub cache made by Python (tests/fixtures), compared
//! with the guide's collate_fn outputs (tests/fixtures/golden): templated strings, input_ids,
//! attention_mask, token_type_ids, labels exactly; pixel_values within one 8-bit level.

use std::path::Path;

use ops::data::collate::{BatchStream, StreamOptions};
use ops::{Artifact, ArtifactType, Op};

use crate::common::*;

/// The chain of ops each test builds (seed 42), offline on the fixture Hub cache.
type Chain = OpHarness;

fn golden_json(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo().join("tests/fixtures/golden").join(name)).unwrap())
        .unwrap()
}

impl Chain {
    /// The tiny model and the llava fixture rows as conversations (load → format), as the
    /// guide's single-image case.
    fn llava_chats(&self) -> (Artifact, Artifact) {
        let c = self;
        let raw = c
            .try_run(
                &ops::load::Load,
                "raw",
                "dataset = \"HuggingFaceH4/llava-instruct-mix-vsft\"\nsplit = \"train\"",
                &[],
            )
            .unwrap();
        let model = c
            .try_run(
                &ops::load::Load,
                "base",
                "model = \"runner-test/tiny-gemma-3\"",
                &[],
            )
            .unwrap();
        let chats = c
            .try_run(&ops::format::FormatOp, "chats", "", &[("rows", &raw)])
            .unwrap();
        (model, chats)
    }

    /// The tiny model and the MMIU fixture rows as conversations (load → unzip → format), as
    /// the guide's multi-image case.
    fn mmiu_chats(&self) -> (Artifact, Artifact) {
        let c = self;
        let raw = c
            .try_run(
                &ops::load::Load,
                "raw",
                "dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"test\"",
                &[],
            )
            .unwrap();
        let images = c
            .try_run(&ops::unzip::Unzip, "images", "", &[("archives", &raw)])
            .unwrap();
        let model = c
            .try_run(
                &ops::load::Load,
                "base",
                "model = \"runner-test/tiny-gemma-3\"",
                &[],
            )
            .unwrap();
        let chats = c
            .try_run(
                &ops::format::FormatOp,
                "chats",
                "system = \"{context}\"\nuser = { images = \"{input_image_path}\", text = \"{question}\" }\nassistant = \"{output}\"\non_error = \"fail\"",
                &[("rows", &raw), ("files", &images)],
            )
            .unwrap();
        (model, chats)
    }
}

fn tensor_i64(st: &safetensors::SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn tensor_f32(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn templated_texts(dir: &Path) -> Vec<(usize, String)> {
    ops::data::collate::read_templated(dir)
        .unwrap()
        .into_iter()
        .map(|r| (r.row, r.text))
        .collect()
}

/// The descriptor's longest example and most images per example (what lora-train's memory
/// plan sizes a micro-batch by) against the examples the stream itself builds.
fn check_descriptor_extremes(kind: &str, batches: &Artifact) {
    let stream = BatchStream::open(&batches.dir, StreamOptions::default()).unwrap();
    let (max_tokens, max_images) = (
        stream.descriptor().max_tokens,
        stream.descriptor().max_images,
    );
    let (mut tokens, mut images) = (0, 0);
    for b in stream {
        let b = b.unwrap();
        for (i, mask) in b.attention_mask.chunks(b.seq_len).enumerate() {
            tokens = tokens.max(mask.iter().filter(|&&m| m != 0).count());
            images = images.max(b.images_per_sample[i]);
        }
    }
    assert_eq!((max_tokens, max_images), (tokens, images), "{kind}");
    assert!(tokens > 0, "{kind}");
}

fn check_batch(kind: &str, batches: &Artifact, batch_size: usize) {
    let golden_meta = &golden_json("collate.json")[kind];
    let bytes =
        std::fs::read(repo().join(format!("tests/fixtures/golden/collate_{kind}.safetensors")))
            .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut stream = BatchStream::open(
        &batches.dir,
        StreamOptions {
            workers: 2,
            prefetch: 2,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(stream.descriptor().batch_size, batch_size);
    check_descriptor_extremes(kind, batches);
    let b = stream.next().unwrap().unwrap();
    let rows: Vec<usize> = golden_meta["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(b.rows, rows, "{kind}: batch rows");
    let shape = golden_meta["shapes"]["input_ids"].as_array().unwrap();
    assert_eq!(
        (b.batch_size, b.seq_len),
        (
            shape[0].as_u64().unwrap() as usize,
            shape[1].as_u64().unwrap() as usize
        ),
        "{kind}: [B, T]"
    );
    assert_eq!(
        b.input_ids,
        tensor_i64(&st, "input_ids"),
        "{kind}: input_ids"
    );
    assert_eq!(
        b.attention_mask,
        tensor_i64(&st, "attention_mask"),
        "{kind}: attention_mask"
    );
    assert_eq!(
        b.token_type_ids,
        tensor_i64(&st, "token_type_ids"),
        "{kind}: token_type_ids"
    );
    assert_eq!(b.labels, tensor_i64(&st, "labels"), "{kind}: labels");
    let per: Vec<usize> = golden_meta["n_images_per_example"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(b.images_per_sample, per, "{kind}: images per sample");
    let want = tensor_f32(&st, "pixel_values");
    assert_eq!(
        b.pixel_values.len(),
        want.len(),
        "{kind}: pixel_values size"
    );
    // Compare 8-bit levels before normalisation: (p + 1) * 127.5.
    let level = |p: f32| (p as f64 + 1.0) * 127.5;
    let same = b
        .pixel_values
        .iter()
        .zip(&want)
        .filter(|(a, b)| (level(**a) - level(**b)).abs() < 0.01)
        .count();
    let within1 = b
        .pixel_values
        .iter()
        .zip(&want)
        .filter(|(a, b)| (level(**a) - level(**b)).abs() < 1.01)
        .count();
    let n = want.len() as f64;
    eprintln!(
        "{kind}: pixel_values same level {:.5}, within one level {:.5}",
        same as f64 / n,
        within1 as f64 / n
    );
    assert!(
        same as f64 / n >= 0.999,
        "{kind}: only {:.5} of pixel values at the same 8-bit level",
        same as f64 / n
    );
    assert_eq!(
        within1,
        want.len(),
        "{kind}: a pixel value is more than one level off"
    );
}

#[test]
fn llava_chain_matches_the_guides_collate_fn() {
    let c = Chain::new(42);
    let (model, chats) = c.llava_chats();
    assert_eq!(model.ty, ArtifactType::Model);
    let templated = c
        .try_run(
            &ops::template::TemplateOp,
            "templated",
            "",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap();
    let golden = golden_json("templated.json");
    let texts = templated_texts(&templated.dir);
    for g in golden["llava"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["split"] == "train")
    {
        let row = g["row"].as_u64().unwrap() as usize;
        let got = &texts.iter().find(|(r, _)| *r == row).unwrap().1;
        assert_eq!(
            got,
            g["text"].as_str().unwrap(),
            "llava row {row}: templated text"
        );
    }
    let batches = c
        .try_run(
            &ops::collate::CollateOp,
            "batches",
            "batch_size = 2\nshuffle = false",
            &[("templated", &templated), ("model", &model)],
        )
        .unwrap();
    check_batch("llava", &batches, 2);
}

#[test]
fn mmiu_chain_matches_the_guides_collate_fn() {
    let c = Chain::new(42);
    let (model, chats) = c.mmiu_chats();
    let templated = c
        .try_run(
            &ops::template::TemplateOp,
            "templated",
            "",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap();
    let golden = golden_json("templated.json");
    let texts = templated_texts(&templated.dir);
    assert_eq!(texts.len(), golden["mmiu"].as_array().unwrap().len());
    for g in golden["mmiu"].as_array().unwrap() {
        let row = g["row"].as_u64().unwrap() as usize;
        assert_eq!(
            &texts[row].1,
            g["text"].as_str().unwrap(),
            "mmiu row {row}: templated text"
        );
    }
    let batches = c
        .try_run(
            &ops::collate::CollateOp,
            "batches",
            "batch_size = 2\nshuffle = false",
            &[("templated", &templated), ("model", &model)],
        )
        .unwrap();
    check_batch("mmiu", &batches, 2);

    // The literal guide (boi masking a no-op) reproduces `labels_literal_guide`.
    let literal = c
        .try_run(
            &ops::collate::CollateOp,
            "literal",
            "batch_size = 2\nshuffle = false\nmask_boi = false",
            &[("templated", &templated), ("model", &model)],
        )
        .unwrap();
    let b = BatchStream::open(&literal.dir, StreamOptions::default())
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let bytes =
        std::fs::read(repo().join("tests/fixtures/golden/collate_mmiu.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(b.labels, tensor_i64(&st, "labels_literal_guide"));
}

// ---- assistant_only_loss against TRL 1.16 (tests/fixtures/trl/assistant_only_loss.json, made by
// tools/fixtures/assistant_only_loss.py through SFTTrainer(assistant_only_loss=True).data_collator).

fn trl_golden() -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(repo().join("tests/fixtures/trl/assistant_only_loss.json")).unwrap(),
    )
    .unwrap()
}

fn flat_i64(rows: &serde_json::Value) -> Vec<i64> {
    rows.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
        .collect()
}

/// The templated artifact and the batch stream against TRL's batches of `kind`, every batch and
/// every value exactly.
fn check_against_trl(kind: &str, templated: &Artifact, batches: &Artifact) {
    let golden = trl_golden();
    let golden_batches = golden["batches"][kind].as_array().unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(templated.dir.join("templated.json")).unwrap())
            .unwrap();
    assert_eq!(meta["template"], "trl:gemma3_training.jinja", "{kind}");
    assert_eq!(meta["strip"], false, "{kind}: TRL does not strip");
    assert_eq!(meta["generation_tags"], true, "{kind}");
    let records = ops::data::collate::read_templated(&templated.dir).unwrap();
    for gb in golden_batches {
        for (i, row) in gb["rows"].as_array().unwrap().iter().enumerate() {
            let row = row.as_u64().unwrap() as usize;
            let rec = records.iter().find(|r| r.row == row).unwrap();
            assert_eq!(
                rec.text,
                gb["texts"][i].as_str().unwrap(),
                "{kind} row {row}: text"
            );
            // transformers records character offsets; the runner byte offsets.
            let chars = |byte: usize| rec.text[..byte].chars().count() as u64;
            let spans: Vec<[u64; 2]> = rec
                .assistant_spans
                .iter()
                .map(|&(s, e)| [chars(s), chars(e)])
                .collect();
            let want: Vec<[u64; 2]> =
                serde_json::from_value(gb["generation_spans_chars"][i].clone()).unwrap();
            assert_eq!(spans, want, "{kind} row {row}: generation spans");
        }
    }
    let mut stream = BatchStream::open(
        &batches.dir,
        StreamOptions {
            workers: 2,
            prefetch: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut straddling = 0;
    for gb in golden_batches {
        let b = stream.next().unwrap().unwrap();
        let rows: Vec<usize> = serde_json::from_value(gb["rows"].clone()).unwrap();
        assert_eq!(b.rows, rows, "{kind}: batch rows");
        let t = gb["input_ids"][0].as_array().unwrap().len();
        assert_eq!(
            (b.batch_size, b.seq_len),
            (rows.len(), t),
            "{kind} {rows:?}: [B, T]"
        );
        assert_eq!(
            b.input_ids,
            flat_i64(&gb["input_ids"]),
            "{kind} {rows:?}: input_ids"
        );
        assert_eq!(
            b.attention_mask,
            flat_i64(&gb["attention_mask"]),
            "{kind} {rows:?}: attention_mask"
        );
        assert_eq!(
            b.token_type_ids,
            flat_i64(&gb["token_type_ids"]),
            "{kind} {rows:?}: token_type_ids"
        );
        assert_eq!(b.labels, flat_i64(&gb["labels"]), "{kind} {rows:?}: labels");
        assert_eq!(
            b.num_label_tokens() as u64,
            gb["label_tokens"].as_u64().unwrap(),
            "{kind} {rows:?}: label tokens"
        );
        let per: Vec<usize> = serde_json::from_value(gb["n_images_per_example"].clone()).unwrap();
        assert_eq!(
            b.images_per_sample, per,
            "{kind} {rows:?}: images per sample"
        );
        straddling += gb["straddling_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().len())
            .sum::<usize>();
    }
    assert!(stream.next().is_none(), "{kind}: more batches than TRL's");
    eprintln!(
        "{kind}: {} batches equal to TRL's, {straddling} straddling tokens",
        golden_batches.len()
    );
}

#[test]
fn llava_assistant_only_loss_matches_trl() {
    let c = Chain::new(42);
    let (model, chats) = c.llava_chats();
    let templated = c
        .try_run(
            &ops::template::TemplateOp,
            "templated",
            "assistant_only_loss = true",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap();
    let batches = c
        .try_run(
            &ops::collate::CollateOp,
            "batches",
            "batch_size = 3\nshuffle = false\nassistant_only_loss = true",
            &[("templated", &templated), ("model", &model)],
        )
        .unwrap();
    check_against_trl("llava", &templated, &batches);

    // The guide's rendering (the model's template, no generation blocks) cannot say which tokens
    // are the assistant's: a clear error that names the fix, not a batch of all -100 labels.
    let plain = c
        .try_run(
            &ops::template::TemplateOp,
            "plain",
            "",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap();
    let e = c
        .try_run(
            &ops::collate::CollateOp,
            "plain_batches",
            "assistant_only_loss = true",
            &[("templated", &plain), ("model", &model)],
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("set `assistant_only_loss = true` on the `template` op"),
        "{e}"
    );
}

#[test]
fn mmiu_assistant_only_loss_matches_trl() {
    let c = Chain::new(42);
    let (model, chats) = c.mmiu_chats();
    let templated = c
        .try_run(
            &ops::template::TemplateOp,
            "templated",
            "assistant_only_loss = true",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap();
    let batches = c
        .try_run(
            &ops::collate::CollateOp,
            "batches",
            "batch_size = 2\nshuffle = false\nassistant_only_loss = true",
            &[("templated", &templated), ("model", &model)],
        )
        .unwrap();
    check_against_trl("mmiu", &templated, &batches);
}

#[test]
fn assistant_only_loss_defaults_follow_trl_unless_set() {
    let canonical = |op: &dyn Op, params: &str| op.check(&params.parse().unwrap()).unwrap();
    let t = &ops::template::TemplateOp;
    assert_eq!(canonical(t, "")["strip"], toml::Value::Boolean(true));
    assert_eq!(
        canonical(t, "assistant_only_loss = true")["strip"],
        toml::Value::Boolean(false)
    );
    assert_eq!(
        canonical(t, "assistant_only_loss = true\nstrip = true")["strip"],
        toml::Value::Boolean(true)
    );
    let c = &ops::collate::CollateOp;
    assert_eq!(
        canonical(c, "")["add_special_tokens"],
        toml::Value::Boolean(true)
    );
    assert_eq!(
        canonical(c, "assistant_only_loss = true")["add_special_tokens"],
        toml::Value::Boolean(false)
    );
    assert_eq!(
        canonical(c, "assistant_only_loss = true\nadd_special_tokens = true")["add_special_tokens"],
        toml::Value::Boolean(true)
    );
}
