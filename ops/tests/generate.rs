//! The `generate` op on the offline fixture chains (MMIU miniature: 2-4 images per prompt;
//! llava miniature: one image, a multi-turn row) against transformers' and PEFT's
//! `model.generate(do_sample=False)` (tools/fixtures/generate_golden.py, golden/generate/):
//! token for token, with and without the generation adapter, in batches of 1 and of 2
//! (left-padded). Plus: sampling reproducible for a seed whatever the batch, and the KV-cache
//! decode of an NF4 base agreeing with the full forward of the same tokens.

use std::collections::BTreeMap;

use ops::generation::{read_generations, GenerationRecord};
use ops::Artifact;
use serde_json::Value;

use crate::common::*;

/// The chain of ops each test builds (seed 42), offline on the fixture Hub cache.
type Chain = OpHarness;

impl Chain {
    fn model(&self) -> Artifact {
        self.run(
            &ops::load::Load,
            "base",
            "model = \"runner-test/tiny-gemma-3\"",
            &[],
        )
    }

    fn adapter(&self) -> Artifact {
        let dir = repo().join("tests/fixtures/golden/generate/adapter");
        self.run(
            &ops::load::Load,
            "adapter",
            &format!(
                "repo_type = \"adapter\"\npath = {:?}",
                dir.display().to_string()
            ),
            &[],
        )
    }

    /// The conversations of a fixture dataset, formatted as the guide's recipes format them.
    fn chats(&self, dataset: &str) -> Artifact {
        match dataset {
            "mmiu" => {
                let raw = self.run(
                    &ops::load::Load,
                    "mmiu-raw",
                    "dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"test\"",
                    &[],
                );
                let images = self.run(&ops::unzip::Unzip, "mmiu-images", "", &[("archives", &raw)]);
                self.run(
                    &ops::format::FormatOp,
                    "mmiu-chats",
                    "system = \"{context}\"\nuser = { images = \"{input_image_path}\", text = \"{question}\" }\nassistant = \"{output}\"",
                    &[("rows", &raw), ("files", &images)],
                )
            }
            "llava" => {
                let raw = self.run(
                    &ops::load::Load,
                    "llava-raw",
                    "dataset = \"HuggingFaceH4/llava-instruct-mix-vsft\"\nsplit = \"train\"",
                    &[],
                );
                self.run(
                    &ops::format::FormatOp,
                    "llava-chats",
                    "messages = \"messages\"\nimages = \"images\"",
                    &[("rows", &raw)],
                )
            }
            other => panic!("no dataset {other}"),
        }
    }
}

fn golden_cases() -> Value {
    let path = repo().join("tests/fixtures/golden/generate/generate.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn generations(a: &Artifact) -> Vec<GenerationRecord> {
    read_generations(&a.dir.join(ops::generate::GENERATIONS_FILE)).unwrap()
}

/// Every golden case: same prompts, same new token ids (stop id included), same stop reasons
/// and decoded text as transformers / PEFT. The golden answers vary token to token and some rows
/// of a padded batch stop while the other goes on.
#[test]
fn greedy_answers_equal_transformers_token_for_token() {
    let c = Chain::new(42);
    let golden = golden_cases();
    let max_new = golden["max_new_tokens"].as_u64().unwrap();
    let model = c.model();
    let adapter = c.adapter();
    let mut chats = BTreeMap::new();
    let mut varied = 0;
    for (name, case) in golden["cases"].as_object().unwrap() {
        let ds = case["dataset"].as_str().unwrap();
        let chats = chats.entry(ds.to_string()).or_insert_with(|| c.chats(ds));
        let samples = case["samples"].as_array().unwrap();
        let params = format!(
            "max_new_tokens = {max_new}\nbatch_size = {}\nmax_rows = {}",
            case["batch_size"],
            samples.len()
        );
        let mut inputs = vec![("conversations", &*chats), ("model", &model)];
        if case["adapter"].as_bool().unwrap() {
            inputs.push(("adapter", &adapter));
        }
        let out = c.run(
            &ops::generate::GenerateOp,
            &format!("gen-{name}"),
            &params,
            &inputs,
        );
        let got = generations(&out);
        assert_eq!(got.len(), samples.len(), "{name}");
        for (g, want) in got.iter().zip(samples) {
            let what = format!("{name} row {}", g.row);
            assert_eq!(g.row as u64, want["row"].as_u64().unwrap(), "{what}");
            assert_eq!(g.prompt, want["prompt"].as_str().unwrap(), "{what}: prompt");
            assert_eq!(
                g.reference.as_deref(),
                want["reference"].as_str(),
                "{what}: reference"
            );
            let ids: Vec<u32> = want["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(g.token_ids, ids, "{what}: new tokens");
            assert_eq!(
                g.finish_reason.as_deref(),
                want["finish_reason"].as_str(),
                "{what}"
            );
            assert_eq!(g.text, want["text"].as_str().unwrap(), "{what}: text");
            let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
            varied += (distinct.len() >= 5) as usize;
        }
    }
    assert!(
        varied >= 8,
        "only {varied} golden answers have 5+ distinct tokens"
    );
}

/// The prompt tokens the op makes (chat template with the generation prompt, the processor's
/// BOS, expanded image blocks) are those transformers' processor made for the golden.
#[test]
fn prompts_tokenize_as_transformers() {
    let c = Chain::new(42);
    let golden = golden_cases();
    let model = c.model();
    let (root, _) = ops::model::artifact_model_root(&model.dir).unwrap();
    let processor = ops::data::processor::Processor::from_model_dir(&root).unwrap();
    let template = ops::data::chat_template::ChatTemplate::from_model_dir(&root, None).unwrap();
    for ds in ["mmiu", "llava"] {
        let chats = c.chats(ds);
        let records: Vec<ops::data::conversation::ConversationRecord> =
            ops::data::conversation::read_jsonl(&chats.dir.join("conversations.jsonl")).unwrap();
        let case = &golden["cases"][format!("{ds}_base_b1")];
        for want in case["samples"].as_array().unwrap() {
            let row = want["row"].as_u64().unwrap() as usize;
            let p =
                ops::generation::decode::build_prompt(&records[row], &template, &processor, true)
                    .unwrap();
            let ids: Vec<u32> = want["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(p.input_ids, ids, "{ds} row {row}");
        }
    }
}

/// Sampling: the same seed gives the same answers whether rows are decoded alone or in a
/// padded batch (each row has its own random stream); another seed gives other answers.
#[test]
fn sampling_is_reproducible_for_a_seed() {
    let c = Chain::new(42);
    let model = c.model();
    let adapter = c.adapter();
    let chats = c.chats("llava");
    let inputs = [
        ("conversations", &chats),
        ("model", &model),
        ("adapter", &adapter),
    ];
    let run = |name: &str, seed: u64, batch: usize| -> Vec<Vec<u32>> {
        let params = format!(
            "do_sample = true\nseed = {seed}\nbatch_size = {batch}\nmax_rows = 4\nmax_new_tokens = 12\ntemperature = 1.5\ntop_k = 0\ntop_p = 0.98"
        );
        let out = c.run(&ops::generate::GenerateOp, name, &params, &inputs);
        generations(&out).into_iter().map(|g| g.token_ids).collect()
    };
    let a = run("s1", 7, 1);
    let b = run("s2", 7, 1);
    let batched = run("s3", 7, 2);
    let other = run("s4", 8, 1);
    assert_eq!(a, b, "same seed, same answers");
    assert_eq!(a, batched, "same seed, batch 1 vs padded batch 2");
    assert_ne!(a, other, "another seed");
    // The greedy answer of a row is not what sampling at temperature 1.5 gives.
    let greedy = c.run(
        &ops::generate::GenerateOp,
        "g",
        "batch_size = 2\nmax_rows = 4\nmax_new_tokens = 12",
        &inputs,
    );
    let greedy: Vec<Vec<u32>> = generations(&greedy)
        .into_iter()
        .map(|g| g.token_ids)
        .collect();
    assert_ne!(a, greedy);
}

/// NF4 base + adapter: each token the KV-cache decode chose is the argmax of the full forward
/// (no cache) over the prompt and the tokens before it, at every step.
#[test]
fn nf4_decode_agrees_with_the_full_forward() {
    let c = Chain::new(42);
    let model = c.model();
    let nf4 = c.run(
        &ops::quantize::Quantize,
        "nf4",
        "bnb_4bit_quant_type = \"nf4\"\nbnb_4bit_use_double_quant = true",
        &[("model", &model)],
    );
    let adapter = c.adapter();
    let chats = c.chats("mmiu");
    let out = c.run(
        &ops::generate::GenerateOp,
        "gen-nf4",
        "max_new_tokens = 10\nmax_rows = 2\nbatch_size = 2",
        &[
            ("conversations", &chats),
            ("model", &nf4),
            ("adapter", &adapter),
        ],
    );
    let got = generations(&out);
    assert_eq!(got.len(), 2);

    let (root, _) = ops::model::artifact_model_root(&nf4.dir).unwrap();
    let config = ops::model::ModelConfig::from_file(&root.join("config.json")).unwrap();
    let weights = ops::model::Weights::open(&root, &config).unwrap();
    let adapter_host = ops::model::reference::lora::Adapter::load(&adapter.dir).unwrap();
    let gpu = ops::gpu::Gpu::get().unwrap();
    let gm = ops::model::gpu::model::Gemma3Gpu::from_weights(
        gpu,
        &config,
        &weights,
        Some(&adapter_host),
        Default::default(),
    )
    .unwrap();
    let processor = ops::data::processor::Processor::from_model_dir(&root).unwrap();
    let template = ops::data::chat_template::ChatTemplate::from_model_dir(&root, None).unwrap();
    let records: Vec<ops::data::conversation::ConversationRecord> =
        ops::data::conversation::read_jsonl(&chats.dir.join("conversations.jsonl")).unwrap();
    let sources = ops::data::conversation::ImageSources::read(&chats.dir).unwrap();
    let resolver = ops::data::collate::ImageResolver {
        sources,
        rows: None,
    };
    let vocab = gm.dims.vocab;
    let mut distinct = std::collections::BTreeSet::new();
    for g in &got {
        let mut p =
            ops::generation::decode::build_prompt(&records[g.row], &template, &processor, true)
                .unwrap();
        let images = ops::generation::decode::load_images(&resolver, &p).unwrap();
        let prompt_len = p.input_ids.len();
        p.input_ids
            .extend_from_slice(&g.token_ids[..g.token_ids.len() - 1]);
        let batch = ops::generation::decode::left_padded_batch(&processor, &[p], &[images]);
        let logits = gm.logits(gpu, &batch).unwrap();
        for (step, &id) in g.token_ids.iter().enumerate() {
            let t = prompt_len - 1 + step;
            let row = &logits[t * vocab..(t + 1) * vocab];
            assert_eq!(
                ops::generation::decode::argmax(row),
                id,
                "row {} step {step}",
                g.row
            );
            distinct.insert(id);
        }
    }
    assert!(distinct.len() >= 3, "{distinct:?}");
}

/// A score op reads a generate op's answers through its `generations` input.
#[test]
fn score_reads_the_generations_input() {
    let c = Chain::new(42);
    let model = c.model();
    let chats = c.chats("mmiu");
    let gen = c.run(
        &ops::generate::GenerateOp,
        "gen",
        "max_new_tokens = 2\nmax_rows = 2",
        &[("conversations", &chats), ("model", &model)],
    );
    let scores = c.run(&ops::score::ScoreOp, "score", "", &[("generations", &gen)]);
    let v: Value =
        serde_json::from_slice(&std::fs::read(scores.dir.join("scores.json")).unwrap()).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 2, "{v}");
    let err = c
        .try_run(&ops::score::ScoreOp, "score2", "", &[])
        .unwrap_err();
    assert!(format!("{err:#}").contains("generations = "), "{err:#}");
}

/// The KV cache against the full forward, numerically: a left-padded batch of two MMIU prompts
/// (145 and 59 tokens: 86 of padding, sliding layers' windows of 16 wrapped many times) decoded
/// greedily with the generation adapter; at every step each row's logits equal those of the full
/// forward (no cache) over the padded prompts and the tokens fed so far.
/// The tiny model with the generation adapter on the GPU, its config and processor, and the
/// first two MMIU miniature prompts as a left-padded batch.
fn tiny_model_and_batch(
    c: &Chain,
) -> (
    ops::model::gpu::model::Gemma3Gpu,
    ops::model::ModelConfig,
    ops::data::processor::Processor,
    ops::data::collate::Batch,
) {
    let model = c.model();
    let adapter = c.adapter();
    let chats = c.chats("mmiu");
    let (root, _) = ops::model::artifact_model_root(&model.dir).unwrap();
    let config = ops::model::ModelConfig::from_file(&root.join("config.json")).unwrap();
    let weights = ops::model::Weights::open(&root, &config).unwrap();
    let adapter_host = ops::model::reference::lora::Adapter::load(&adapter.dir).unwrap();
    let gpu = ops::gpu::Gpu::get().unwrap();
    let gm = ops::model::gpu::model::Gemma3Gpu::from_weights(
        gpu,
        &config,
        &weights,
        Some(&adapter_host),
        Default::default(),
    )
    .unwrap();
    let processor = ops::data::processor::Processor::from_model_dir(&root).unwrap();
    let template = ops::data::chat_template::ChatTemplate::from_model_dir(&root, None).unwrap();
    let records: Vec<ops::data::conversation::ConversationRecord> =
        ops::data::conversation::read_jsonl(&chats.dir.join("conversations.jsonl")).unwrap();
    let resolver = ops::data::collate::ImageResolver {
        sources: ops::data::conversation::ImageSources::read(&chats.dir).unwrap(),
        rows: None,
    };
    let prompts: Vec<_> = records[..2]
        .iter()
        .map(|r| ops::generation::decode::build_prompt(r, &template, &processor, true).unwrap())
        .collect();
    let images: Vec<_> = prompts
        .iter()
        .map(|p| ops::generation::decode::load_images(&resolver, p).unwrap())
        .collect();
    let batch = ops::generation::decode::left_padded_batch(&processor, &prompts, &images);
    (gm, config, processor, batch)
}

/// Greedy generation with the tokens chosen on the GPU gives the host loop's tokens (each
/// step's logits read back, torch's argmax on the host, stopped rows fed the pad id), running a
/// step ahead of the host or not: a padded batch where one row stops on a stop id while the
/// other goes on.
#[test]
fn greedy_on_the_gpu_equals_the_host_loop_ahead_or_not() {
    use ops::generation::decode::{argmax, generate_batch, DecodeOptions};
    let c = Chain::new(42);
    let (gm, _, processor, batch) = tiny_model_and_batch(&c);
    let gpu = ops::gpu::Gpu::get().unwrap();
    let (steps, vocab, pad) = (10, gm.dims.vocab, processor.ids.pad);
    let host_loop = |stop_ids: &[u32]| -> Vec<Vec<u32>> {
        let (mut cache, mut logits) = gm.start_generation(gpu, &batch, steps).unwrap();
        let mut out = vec![Vec::new(); 2];
        let mut stopped = [false; 2];
        for s in 0..steps {
            let mut next = [pad; 2];
            for r in 0..2 {
                if stopped[r] {
                    continue;
                }
                let id = argmax(&logits[r * vocab..(r + 1) * vocab]);
                out[r].push(id);
                stopped[r] = stop_ids.contains(&id);
                next[r] = id;
            }
            if s + 1 == steps || stopped.iter().all(|&s| s) {
                break;
            }
            logits = gm.decode_step(gpu, &mut cache, &next).unwrap();
        }
        out
    };
    let free = host_loop(&[]);
    // a token row 0 makes for the first time at step k ≥ 2 and row 1 never makes
    let k = (2..steps)
        .find(|&k| !free[0][..k].contains(&free[0][k]) && !free[1].contains(&free[0][k]))
        .expect("row 0 makes a token row 1 never does");
    let stop = [free[0][k]];
    let want = host_loop(&stop);
    assert_eq!(want[0].len(), k + 1, "row 0 stops on its stop id");
    assert_eq!(want[1].len(), steps, "row 1 goes on");
    for run_ahead in [Some(false), Some(true), None] {
        let opts = DecodeOptions {
            max_new_tokens: steps,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop_ids: stop.to_vec(),
            pad_id: pad,
            run_ahead,
        };
        let mut produced = Vec::new();
        let got = generate_batch(&gm, gpu, &batch, &opts, |n| produced.push(n)).unwrap();
        let ids: Vec<Vec<u32>> = got.iter().map(|g| g.token_ids.clone()).collect();
        assert_eq!(ids, want, "run ahead {run_ahead:?}");
        assert_eq!(
            got.iter().map(|g| g.stopped).collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(produced.iter().sum::<usize>(), k + 1 + steps);
    }
}

#[test]
fn decode_logits_equal_the_full_forward_of_the_same_tokens() {
    let c = Chain::new(42);
    let (gm, config, _, mut batch) = tiny_model_and_batch(&c);
    let gpu = ops::gpu::Gpu::get().unwrap();
    let (b, t, vocab) = (2, batch.seq_len, gm.dims.vocab);
    let steps = 8;
    let (mut cache, mut logits) = gm.start_generation(gpu, &batch, steps).unwrap();
    // The memory plan's KV cache row (from the config) is what the engine allocated (from its
    // layers): full layers every position, sliding ones their window.
    let plan = ops::model::memory::kv_cache_row(&config, b, t + steps, gpu.max_binding_bytes());
    assert_eq!(plan.bytes, cache.bytes(), "KV cache: plan vs allocated");
    let full = 2
        * (b * config.text().num_key_value_heads * (t + steps) * config.text().head_dim()) as u64
        * 4;
    assert!(
        plan.bytes < full * config.text().num_hidden_layers as u64,
        "the tiny model's sliding layers keep only their window"
    );
    let mut decoded = vec![logits.clone()];
    let mut fed: Vec<[u32; 2]> = Vec::new();
    for _ in 1..steps {
        let next = [
            ops::generation::decode::argmax(&logits[..vocab]),
            ops::generation::decode::argmax(&logits[vocab..]),
        ];
        fed.push(next);
        logits = gm.decode_step(gpu, &mut cache, &next).unwrap();
        decoded.push(logits.clone());
    }
    // The full batch: each row's padded prompt, then the tokens fed to it.
    let n = t + fed.len();
    let widen = |v: &[i64], extra: &dyn Fn(usize, usize) -> i64| -> Vec<i64> {
        (0..b)
            .flat_map(|r| {
                v[r * t..(r + 1) * t]
                    .iter()
                    .copied()
                    .chain((0..fed.len()).map(move |s| extra(r, s)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    batch.input_ids = widen(&batch.input_ids, &|r, s| fed[s][r] as i64);
    batch.attention_mask = widen(&batch.attention_mask, &|_, _| 1);
    batch.token_type_ids = widen(&batch.token_type_ids, &|_, _| 0);
    batch.labels = vec![-100; b * n];
    batch.seq_len = n;
    let full = gm.logits(gpu, &batch).unwrap();
    for (s, step) in decoded.iter().enumerate() {
        for r in 0..b {
            let pos = r * n + t - 1 + s;
            let want = &full[pos * vocab..(pos + 1) * vocab];
            let got = &step[r * vocab..(r + 1) * vocab];
            let num: f64 = got
                .iter()
                .zip(want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = want.iter().map(|&v| (v as f64).powi(2)).sum();
            let e = (num / den).sqrt();
            assert!(e < 1e-5, "step {s} row {r}: relative error {e}");
        }
    }
    let distinct: std::collections::BTreeSet<_> = fed.iter().flatten().collect();
    assert!(distinct.len() >= 4, "{fed:?}");
}

/// Run-time errors name the op and say what to do.
#[test]
fn errors_name_the_op_and_the_fix() {
    let c = Chain::new(42);
    let model = c.model();
    let chats = c.chats("llava");
    let err = c
        .try_run(
            &ops::generate::GenerateOp,
            "answers",
            "max_new_tokens = 1000000",
            &[("conversations", &chats), ("model", &model)],
        )
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("op `answers` (generate)") && msg.contains("lower `max_new_tokens`"),
        "{msg}"
    );
}
