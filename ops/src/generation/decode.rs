//! The host side of generation: prompts from conversations (chat template with the generation
//! prompt, tokenized as `collate` tokenizes, images processed as in training, left padding as
//! transformers pads for generation), the choice of each new token (greedy, or sampling with
//! temperature, top-k and top-p in transformers' order), and the stop rule.

use anyhow::{bail, ensure, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::data::chat_template::ChatTemplate;
use crate::data::collate::{zeroed_pixel_buffer, Batch, DatasetImages, ImageResolver, RowImages};
use crate::data::conversation::{
    count_image_items, read_jsonl, ConversationRecord, ImageRef, ImageSources,
};
use crate::data::image::RgbImage;
use crate::data::processor::Processor;
use crate::generation::GenerationRecord;
use crate::gpu::Gpu;
use crate::model::gpu::model::Gemma3Gpu;
use crate::Progress;

/// One conversation made into a prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub row: usize,
    /// The rendered chat template (generation prompt included, not stripped).
    pub text: String,
    /// The trailing assistant message's text, when the conversation ends with one.
    pub reference: Option<String>,
    /// Token ids as `collate` makes them (image placeholders expanded).
    pub input_ids: Vec<u32>,
    /// The prompt's images, in message order.
    pub images: Vec<ImageRef>,
}

/// The text of a message's content: a string, or the concatenated text items of a list.
fn content_text(content: &serde_json::Value) -> String {
    match content {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items
            .iter()
            .filter(|i| i.get("type").and_then(|t| t.as_str()) == Some("text"))
            .filter_map(|i| i.get("text").and_then(|t| t.as_str()))
            .collect(),
        _ => String::new(),
    }
}

/// The prompt of a conversation: every message but a trailing assistant one (the reference),
/// rendered with `add_generation_prompt = true` and tokenized with `add_special_tokens` as the
/// `collate` op does (the guide's collate_fn: the processor's default, true).
pub fn build_prompt(
    record: &ConversationRecord,
    template: &ChatTemplate,
    processor: &Processor,
    add_special_tokens: bool,
) -> Result<Prompt> {
    let messages = record
        .messages
        .as_array()
        .with_context(|| format!("row {}: `messages` is not a list", record.row))?;
    let (prompt_messages, reference) = match messages.last() {
        Some(last) if last.get("role").and_then(|r| r.as_str()) == Some("assistant") => (
            &messages[..messages.len() - 1],
            Some(content_text(
                last.get("content").unwrap_or(&serde_json::Value::Null),
            )),
        ),
        _ => (&messages[..], None),
    };
    ensure!(
        !prompt_messages.is_empty(),
        "row {}: the conversation has no message before its answer",
        record.row
    );
    let prompt_messages = serde_json::Value::Array(prompt_messages.to_vec());
    let n_images = count_image_items(&prompt_messages);
    ensure!(
        n_images <= record.images.len(),
        "row {}: the prompt has {n_images} image items but the conversation {} images",
        record.row,
        record.images.len()
    );
    let text = template
        .render(&prompt_messages, true)
        .with_context(|| format!("row {}", record.row))?
        .text;
    let placeholders = processor.count_images(&text);
    ensure!(
        placeholders == n_images,
        "row {}: the rendered prompt has {placeholders} image placeholders for {n_images} images",
        record.row
    );
    let (expanded, _) = processor.expand(&text, &[]);
    let (input_ids, _) = processor.encode(&expanded, add_special_tokens, false)?;
    Ok(Prompt {
        row: record.row,
        text,
        reference,
        input_ids,
        images: record.images[..n_images].to_vec(),
    })
}

/// The prompts of a `conversations` artifact (format's output), the first `max_rows` of them,
/// with the resolver of their images.
pub fn read_prompts(
    conversations_dir: &Path,
    template: &ChatTemplate,
    processor: &Processor,
    add_special_tokens: bool,
    max_rows: Option<usize>,
) -> Result<(Vec<Prompt>, ImageResolver)> {
    let records: Vec<ConversationRecord> =
        read_jsonl(&conversations_dir.join("conversations.jsonl"))
            .context("reading the conversations")?;
    let sources = ImageSources::read(conversations_dir)
        .context("the conversations artifact has no source.json")?;
    let rows: Option<Arc<dyn RowImages>> = match &sources.dataset_dir {
        Some(d) => Some(Arc::new(DatasetImages(crate::data::dataset::open(d)?))),
        None => None,
    };
    let limit = max_rows.unwrap_or(records.len()).min(records.len());
    let prompts = records[..limit]
        .iter()
        .map(|r| build_prompt(r, template, processor, add_special_tokens))
        .collect::<Result<Vec<Prompt>>>()?;
    Ok((prompts, ImageResolver { sources, rows }))
}

/// Left-pads prompts into one batch (transformers' `padding_side = "left"` for generation) with
/// their images resized and normalised as in training. Labels are all ignored.
pub fn left_padded_batch(
    processor: &Processor,
    prompts: &[Prompt],
    images: &[Vec<RgbImage>],
) -> Batch {
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let mut batch = Batch::padding(
        b,
        t,
        processor.ids.pad,
        processor.image.height,
        processor.image.width,
    );
    batch.images_per_sample = images.iter().map(Vec::len).collect();
    batch.rows = prompts.iter().map(|p| p.row).collect();
    for (i, p) in prompts.iter().enumerate() {
        let offset = t - p.input_ids.len();
        for (j, &id) in p.input_ids.iter().enumerate() {
            let k = i * t + offset + j;
            batch.input_ids[k] = id as i64;
            batch.attention_mask[k] = 1;
            batch.token_type_ids[k] = (id == processor.ids.image) as i64;
        }
    }
    let plane = 3 * processor.image.height * processor.image.width;
    let all: Vec<&RgbImage> = images.iter().flatten().collect();
    batch.pixel_values = zeroed_pixel_buffer(all.len() * plane);
    for (out, img) in batch.pixel_values.chunks_mut(plane.max(1)).zip(&all) {
        processor
            .image
            .normalize_into(&processor.image.resize(img), out);
    }
    batch.num_images = all.len();
    batch
}

/// Loads a prompt's images.
pub fn load_images(resolver: &ImageResolver, prompt: &Prompt) -> Result<Vec<RgbImage>> {
    prompt
        .images
        .iter()
        .map(|r| {
            resolver
                .load(r)
                .with_context(|| format!("row {}", prompt.row))
        })
        .collect()
}

/// How new tokens are chosen and when a row stops.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    pub max_new_tokens: usize,
    /// false: greedy (argmax, the lowest id on ties, as torch.argmax).
    pub do_sample: bool,
    pub temperature: f64,
    /// 0: no top-k filter.
    pub top_k: usize,
    /// 1.0: no top-p filter.
    pub top_p: f64,
    pub seed: u64,
    /// A row stops after producing one of these (generation_config.json's `eos_token_id`).
    pub stop_ids: Vec<u32>,
    /// Fed to rows that have stopped while the others go on (transformers does the same).
    pub pad_id: u32,
    /// Greedy only: keep one decode step in flight ahead of the host (`None`: [`runs_ahead`]).
    pub run_ahead: Option<bool>,
}

/// torch.argmax over one row (the first index of the largest value; a NaN above every number):
/// greedy decoding's choice, which the GPU makes in [`generate_batch`].
pub use crate::reference::greedy::argmax;

/// Samples from `logits` as transformers' sampling does: temperature, then top-k (ties with
/// the k-th value kept), then top-p (the smallest set of most probable tokens whose mass
/// exceeds `top_p`, at least one), then a draw from the renormalised distribution.
pub fn sample(logits: &[f32], opts: &DecodeOptions, rng: &mut ChaCha8Rng) -> u32 {
    let mut z: Vec<f64> = logits
        .iter()
        .map(|&v| v as f64 / opts.temperature)
        .collect();
    if opts.top_k > 0 && opts.top_k < z.len() {
        let mut sorted = z.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[opts.top_k - 1];
        for v in &mut z {
            if *v < kth {
                *v = f64::NEG_INFINITY;
            }
        }
    }
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut p: Vec<f64> = z.iter().map(|&v| (v - max).exp()).collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= total);
    if opts.top_p < 1.0 {
        // Ascending order, removing the tokens whose cumulative mass stays within 1 - top_p.
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
        let mut cumulative = 0.0;
        for (n, &i) in order.iter().enumerate() {
            cumulative += p[i];
            if cumulative <= 1.0 - opts.top_p && n + 1 < order.len() {
                p[i] = 0.0;
            }
        }
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
    }
    let u: f64 = rng.random::<f64>();
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            acc += pi;
            last = i;
            if u < acc {
                return i as u32;
            }
        }
    }
    last as u32
}

/// The random stream of one dataset row: the same row gets the same draws whatever the batch.
pub fn row_rng(seed: u64, row: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(row as u64);
    rng
}

/// One row's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New ids, the stop id included when the row stopped on one.
    pub token_ids: Vec<u32>,
    /// Stopped on a stop id (else `max_new_tokens` was reached).
    pub stopped: bool,
}

/// Generates for one left-padded batch; `on_tokens(n)` is told how many new tokens each step
/// produced (rows still going). Greedy decoding chooses on the GPU ([`Gemma3Gpu::start_greedy`];
/// one step ahead of the host where [`runs_ahead`]); sampling reads each step's logits.
pub fn generate_batch(
    model: &Gemma3Gpu,
    gpu: &Gpu,
    batch: &Batch,
    opts: &DecodeOptions,
    on_tokens: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    if opts.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    if opts.do_sample {
        sample_batch(model, gpu, batch, opts, on_tokens)
    } else {
        greedy_batch(model, gpu, batch, opts, on_tokens)
    }
}

/// Takes one step's ids: rows still going keep theirs and stop on a stop id. Returns how many
/// rows produced a token.
fn take_step(out: &mut [Generated], ids: &[u32], stop_ids: &[u32]) -> usize {
    let mut produced = 0;
    for (g, &id) in out.iter_mut().zip(ids) {
        if g.stopped {
            continue;
        }
        g.token_ids.push(id);
        g.stopped = stop_ids.contains(&id);
        produced += 1;
    }
    produced
}

fn empty_answers(rows: usize) -> Vec<Generated> {
    vec![
        Generated {
            token_ids: Vec::new(),
            stopped: false,
        };
        rows
    ]
}

/// Whether greedy decoding keeps a step in flight while the host reads the previous one's tokens
/// (`RUNNER_DECODE_AHEAD=1` or `0` decides; by default GPUs do and CPU adapters do not). On
/// lavapipe the host and the device share the cores and a submission waits on the CPU for the
/// one before it: measured with `generate_bench`, running ahead made the median step 11.4–12.4
/// → 14.6–17.5 ms, recording ahead and submitting after the wait as much.
pub fn runs_ahead(gpu: &Gpu) -> bool {
    match std::env::var("RUNNER_DECODE_AHEAD").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => gpu.adapter_info().device_type != wgpu::DeviceType::Cpu,
    }
}

/// Greedy: the device chooses each token and feeds it to the next step, so the logits never
/// come to the host. Running ahead ([`DecodeOptions::run_ahead`]), the host submits step s+1
/// before it reads step s's tokens (the last step is wasted when every row stops on it).
fn greedy_batch(
    model: &Gemma3Gpu,
    gpu: &Gpu,
    batch: &Batch,
    opts: &DecodeOptions,
    mut on_tokens: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    let mut out = empty_answers(batch.batch_size);
    let mut generation =
        model.start_greedy(gpu, batch, opts.max_new_tokens, &opts.stop_ids, opts.pad_id)?;
    let ahead = opts.run_ahead.unwrap_or_else(|| runs_ahead(gpu));
    for step in 0..opts.max_new_tokens {
        let more = step + 1 < opts.max_new_tokens;
        if ahead && more {
            model.submit_greedy_step(gpu, &mut generation)?;
        }
        let ids = generation.next_ids()?;
        let produced = take_step(&mut out, &ids, &opts.stop_ids);
        let done = out.iter().all(|g| g.stopped);
        if !ahead && more && !done {
            model.submit_greedy_step(gpu, &mut generation)?;
        }
        on_tokens(produced);
        if done {
            break;
        }
    }
    Ok(out)
}

/// Sampling: each step's logits come to the host, which draws every row's token.
fn sample_batch(
    model: &Gemma3Gpu,
    gpu: &Gpu,
    batch: &Batch,
    opts: &DecodeOptions,
    mut on_tokens: impl FnMut(usize),
) -> Result<Vec<Generated>> {
    let b = batch.batch_size;
    let vocab = model.dims.vocab;
    let mut rngs: Vec<ChaCha8Rng> = batch.rows.iter().map(|&r| row_rng(opts.seed, r)).collect();
    let (mut cache, mut logits) = model.start_generation(gpu, batch, opts.max_new_tokens)?;
    let mut out = empty_answers(b);
    for step in 0..opts.max_new_tokens {
        ensure!(
            logits.len() == b * vocab,
            "the model returned {} logits for {b} rows of {vocab}",
            logits.len()
        );
        let next: Vec<u32> = out
            .iter()
            .enumerate()
            .map(|(r, g)| match g.stopped {
                true => opts.pad_id,
                false => sample(&logits[r * vocab..(r + 1) * vocab], opts, &mut rngs[r]),
            })
            .collect();
        on_tokens(take_step(&mut out, &next, &opts.stop_ids));
        if step + 1 == opts.max_new_tokens || out.iter().all(|g| g.stopped) {
            break;
        }
        logits = model.decode_step(gpu, &mut cache, &next)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DecodeOptions {
        DecodeOptions {
            max_new_tokens: 1,
            do_sample: true,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 3,
            stop_ids: vec![],
            pad_id: 0,
            run_ahead: None,
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, -1.0, 2.0]), 1);
    }

    /// Top-k keeps only the k best (ties with the k-th kept), top-p the smallest head whose
    /// mass exceeds p; the draws follow the kept probabilities; the same seed and row give the
    /// same draws, another row others.
    #[test]
    fn sampling_filters_and_is_reproducible() {
        let logits = [3.0f32, 2.0, 2.0, 0.0, -1.0];
        let mut rng = row_rng(7, 0);
        let top2 = DecodeOptions { top_k: 2, ..opts() };
        let mut seen = [0usize; 5];
        for _ in 0..3000 {
            seen[sample(&logits, &top2, &mut rng) as usize] += 1;
        }
        // k = 2: the tie at 2.0 keeps ids 1 and 2 beside 0.
        assert_eq!(seen[3] + seen[4], 0, "{seen:?}");
        assert!(
            seen[1] > 300 && seen[2] > 300 && seen[0] > seen[1],
            "{seen:?}"
        );
        // p(0) = e^3 / (e^3 + 2e^2 + 1 + e^-1) ≈ 0.56: top_p 0.5 keeps id 0 alone.
        let top_p = DecodeOptions {
            top_p: 0.5,
            ..opts()
        };
        assert!((0..200).all(|_| sample(&logits, &top_p, &mut rng) == 0));
        // Temperature 1e-3 is almost greedy.
        let cold = DecodeOptions {
            temperature: 1e-3,
            ..opts()
        };
        assert!((0..200).all(|_| sample(&logits, &cold, &mut rng) == 0));
        let draws = |seed, row| -> Vec<u32> {
            let mut rng = row_rng(seed, row);
            (0..50)
                .map(|_| sample(&logits, &opts(), &mut rng))
                .collect()
        };
        assert_eq!(draws(1, 4), draws(1, 4));
        assert_ne!(draws(1, 4), draws(1, 5));
        assert_ne!(draws(1, 4), draws(2, 4));
    }
}

/// What [`answer_all`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerTotals {
    pub new_tokens: usize,
    /// Answers that ended on a stop id (the others reached `max_new_tokens`).
    pub stopped: usize,
    pub seconds: f64,
}

/// Answers `prompts` in batches of `batch_size`, writing one [`GenerationRecord`] per prompt, in
/// order, to `out` (JSON lines). `progress` counts new tokens against `max_new_tokens` per
/// prompt and shows the decode rate.
#[allow(clippy::too_many_arguments)]
pub fn answer_all(
    model: &Gemma3Gpu,
    gpu: &Gpu,
    processor: &Processor,
    resolver: &ImageResolver,
    prompts: &[Prompt],
    batch_size: usize,
    opts: &DecodeOptions,
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<AnswerTotals> {
    ensure!(batch_size > 0, "batch_size must be at least 1");
    progress.set_length((prompts.len() * opts.max_new_tokens) as u64);
    let started = Instant::now();
    let (mut new_tokens, mut stopped) = (0usize, 0usize);
    for chunk in prompts.chunks(batch_size) {
        let images = chunk
            .iter()
            .map(|p| load_images(resolver, p))
            .collect::<Result<Vec<_>>>()?;
        let batch = left_padded_batch(processor, chunk, &images);
        let before = new_tokens;
        let answers = generate_batch(model, gpu, &batch, opts, |n| {
            new_tokens += n;
            let secs = started.elapsed().as_secs_f64();
            progress.inc(n as u64);
            progress.message(format!(
                "{:.1} tokens/s",
                new_tokens as f64 / secs.max(1e-9)
            ));
        })
        .with_context(|| format!("rows {:?}", batch.rows))?;
        for (prompt, answer) in chunk.iter().zip(answers) {
            stopped += answer.stopped as usize;
            let record = GenerationRecord {
                row: prompt.row,
                prompt: prompt.text.clone(),
                reference: prompt.reference.clone(),
                text: processor
                    .tokenizer
                    .decode(&answer.token_ids, true)
                    .map_err(|e| {
                        anyhow::anyhow!("decoding the answer of row {}: {e}", prompt.row)
                    })?,
                token_ids: answer.token_ids,
                finish_reason: Some(if answer.stopped { "eos" } else { "length" }.into()),
                images: prompt.images.iter().map(image_name).collect(),
            };
            serde_json::to_writer(&mut *out, &record)?;
            out.write_all(b"\n")?;
        }
        // Rows that stopped early leave part of their budget: the bar counts it as done.
        progress
            .inc((chunk.len() * opts.max_new_tokens).saturating_sub(new_tokens - before) as u64);
    }
    out.flush()?;
    Ok(AnswerTotals {
        new_tokens,
        stopped,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// An image as the dataset names it (MMIU's task is the folder of its file path).
fn image_name(r: &ImageRef) -> String {
    match r {
        ImageRef::File { path } => path.clone(),
        other => other.describe(),
    }
}
