//! What the `collate` op does when it runs: tokenizes every templated example once (in
//! parallel) to find those that cannot be collated, then writes the descriptor and the offsets
//! of the kept examples. Images are not touched here.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::conversation::{read_json, read_jsonl, TemplatedRecord};
use super::processor::Processor;

use super::collate::*;
use super::stream::*;

/// What the `collate` op fixes when it runs (the stream is made later, lazily).
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSpec {
    pub options: CollateOptions,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
    /// `true`: an example that cannot be collated fails the op; `false`: it is dropped and counted.
    pub fail_on_error: bool,
    /// The model's `max_position_embeddings` when its config is known. A row longer than the
    /// model's positions cannot be trained on (RoPE past its range, and a 60k-token row takes
    /// minutes and gigabytes before anything says so): it is a bad row.
    pub max_positions: Option<usize>,
}

/// A scanned example: (tokens, images kept), or why it is dropped (naming its row and file).
pub(super) type Scanned = std::result::Result<(usize, usize), String>;

/// How many dropped examples are listed by reason in the descriptor and in messages.
pub const REPORTED_DROPS: usize = 10;

/// Tokenizes every templated example once (in parallel) to find those that cannot be collated
/// (image count mismatch, `max_length` cutting an image), then writes the descriptor and the
/// offsets of the kept examples into `out_dir`. Images are not touched here.
pub fn prepare_batches(
    templated_dir: &Path,
    model_dir: &Path,
    out_dir: &Path,
    spec: &PrepareSpec,
    on_chunk: &dyn Fn(usize),
) -> Result<BatchesDescriptor> {
    use rayon::prelude::*;
    use std::io::{BufRead, Write};

    if spec.batch_size == 0 {
        bail!("batch_size must be at least 1");
    }
    let processor = Processor::from_model_dir(model_dir)?;
    let max_positions = spec.max_positions;
    if spec.options.assistant_only_loss {
        let has_spans = read_json::<serde_json::Value>(&templated_dir.join("templated.json"))
            .ok()
            .and_then(|m| m.get("generation_tags").and_then(|v| v.as_bool()))
            .unwrap_or(false);
        if !has_spans {
            bail!(
                "assistant_only_loss = true needs templated text with assistant spans, but the `template` op's \
                 template has no {{% generation %}} blocks: set `assistant_only_loss = true` on the `template` op \
                 too (it swaps in TRL's training template, as SFTTrainer does), or give it a `chat_template` \
                 with such blocks"
            );
        }
    }
    let records_path = templated_dir.join("templated.jsonl");
    let file = std::fs::File::open(&records_path)
        .with_context(|| format!("cannot open {}", records_path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut offsets: Vec<u64> = Vec::new();
    let mut dropped = 0usize;
    let mut dropped_examples = Vec::new();
    let mut total_tokens = 0u64;
    let (mut max_tokens, mut max_images) = (0usize, 0usize);
    let mut pos = 0u64;
    let mut line_no = 0usize;
    loop {
        // A chunk of lines, processed in parallel.
        let mut chunk: Vec<(u64, usize, String)> = Vec::with_capacity(4096);
        while chunk.len() < 4096 {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .with_context(|| format!("{}: cannot read", records_path.display()))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if !line.trim().is_empty() {
                chunk.push((pos, line_no, line));
            }
            pos += n as u64;
        }
        if chunk.is_empty() {
            break;
        }
        let results: Vec<Result<(u64, Scanned)>> = chunk
            .par_iter()
            .map(|(off, ln, line)| {
                let rec: TemplatedRecord = serde_json::from_str(line).with_context(|| {
                    format!(
                        "{}: line {ln} is not a templated record",
                        records_path.display()
                    )
                })?;
                let r = tokenize_example(
                    &processor,
                    &rec.text,
                    &rec.assistant_spans,
                    rec.images.len(),
                    &spec.options,
                )
                .with_context(|| format!("row {} ({})", rec.row, rec.file))?;
                let r = r.and_then(|t| match max_positions {
                    Some(max) if t.input_ids.len() > max => Err(Rejection::LongerThanPositions {
                        length: t.input_ids.len(),
                        max_positions: max,
                    }),
                    _ => Ok((t.input_ids.len(), t.images_kept)),
                });
                Ok((
                    *off,
                    r.map_err(|why| format!("row {} ({}): {why}", rec.row, rec.file)),
                ))
            })
            .collect();
        for r in results {
            let (off, r) = r?;
            match r {
                Ok((len, images)) => {
                    offsets.push(off);
                    total_tokens += len as u64;
                    max_tokens = max_tokens.max(len);
                    max_images = max_images.max(images);
                }
                Err(why) => {
                    if spec.fail_on_error {
                        bail!("{why} (on_error = \"fail\"; set on_error = \"skip\" to drop such examples)");
                    }
                    dropped += 1;
                    if dropped_examples.len() < REPORTED_DROPS {
                        dropped_examples.push(why);
                    }
                }
            }
        }
        on_chunk(chunk.len());
    }
    let num_examples = offsets.len();
    let desc = BatchesDescriptor {
        templated_dir: op_api::artifact::entry_ref(templated_dir, out_dir),
        model_dir: op_api::artifact::entry_ref(model_dir, out_dir),
        options: spec.options.clone(),
        batch_size: spec.batch_size,
        shuffle: spec.shuffle,
        seed: spec.seed,
        drop_last: spec.drop_last,
        num_examples,
        batches_per_epoch: BatchesDescriptor::batches_for(
            num_examples,
            spec.batch_size,
            spec.drop_last,
        ),
        dropped,
        dropped_examples,
        total_tokens,
        max_tokens,
        max_images,
    };
    let mut w = std::io::BufWriter::new(std::fs::File::create(out_dir.join(OFFSETS_FILE))?);
    for o in &offsets {
        w.write_all(&o.to_le_bytes())?;
    }
    w.flush()?;
    super::conversation::write_json(&out_dir.join(DESCRIPTOR_FILE), &desc)?;
    Ok(desc)
}

/// Loads all templated records of a `templated` artifact (small datasets, tests).
pub fn read_templated(templated_dir: &Path) -> Result<Vec<TemplatedRecord>> {
    read_jsonl(&templated_dir.join("templated.jsonl"))
}
