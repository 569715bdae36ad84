//! Collation: templated conversations + images -> training batches, as the guide's `collate_fn`
//! does with the Gemma 3 processor, and [`BatchStream`], which produces them lazily on worker
//! threads for the trainer.
//!
//! Per batch (the guide): `processor(text=texts, images=images, padding=True)` with right
//! padding, then `labels = input_ids` with pad, boi and image soft tokens set to -100.
//!
//! `assistant_only_loss` (TRL 1.16 `DataCollatorForVisionLanguageModeling`): additionally -100
//! on every token outside the assistant mask that transformers' `processor.apply_chat_template(
//! ..., return_assistant_tokens_mask=True)` computes (`processing_utils.py`,
//! `_adjust_assistant_masks_indices`): the template's generation spans, shifted past the expanded
//! image placeholders, keep every token whose offsets overlap them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::conversation::{read_json, read_jsonl, ImageRef, ImageSources, TemplatedRecord};
use super::image::{decode_rgb, RgbImage};
use super::processor::Processor;

/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// How examples become token sequences and labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollateOptions {
    /// Let the tokenizer add its special tokens (a BOS) as the guide does; with Gemma's template,
    /// which already starts with `<bos>`, that gives the guide's double BOS. `false` drops it.
    pub add_special_tokens: bool,
    /// Mask `<start_of_image>` in the labels as the guide intends (`false` = the guide's literal
    /// code, whose boi masking is a no-op on current torch).
    pub mask_boi: bool,
    /// Only tokens overlapping the template's `{% generation %}` blocks keep their labels.
    pub assistant_only_loss: bool,
    /// Truncate longer sequences to this many tokens (never inside an image block).
    pub max_length: Option<usize>,
}

impl Default for CollateOptions {
    fn default() -> Self {
        Self {
            add_special_tokens: true,
            mask_boi: true,
            assistant_only_loss: false,
            max_length: None,
        }
    }
}

/// One example's tokens, ready to be padded into a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    /// Per token: whether its label is kept (false = -100) before the pad/boi/image masking.
    pub trainable: Vec<bool>,
    /// How many of the example's images survive truncation (their blocks are whole).
    pub images_kept: usize,
}

/// Why an example cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    ImageCountMismatch {
        placeholders: usize,
        images: usize,
    },
    TruncatedInsideImage {
        max_length: usize,
        length: usize,
    },
    /// Longer than the model's positions (found by `prepare_batches`, which knows the model).
    LongerThanPositions {
        length: usize,
        max_positions: usize,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::ImageCountMismatch {
                placeholders,
                images,
            } => {
                write!(f, "the text has {placeholders} image placeholders but the example has {images} images")
            }
            Rejection::LongerThanPositions {
                length,
                max_positions,
            } => write!(
                f,
                "{length} tokens, more than the model's max_position_embeddings = {max_positions} \
                 (set `max_length` on the collate op to truncate such rows)"
            ),
            Rejection::TruncatedInsideImage { max_length, length } => {
                write!(f, "max_length {max_length} would cut inside an image block (sequence has {length} tokens)")
            }
        }
    }
}

/// Tokenizes one templated example (text with one boi placeholder per image).
pub fn tokenize_example(
    p: &Processor,
    text: &str,
    assistant_spans: &[(usize, usize)],
    num_images: usize,
    opts: &CollateOptions,
) -> Result<std::result::Result<TokenizedExample, Rejection>> {
    let placeholders = p.count_images(text);
    if placeholders != num_images {
        return Ok(Err(Rejection::ImageCountMismatch {
            placeholders,
            images: num_images,
        }));
    }
    let (expanded, spans) = p.expand(text, assistant_spans);
    let (mut ids, offsets) =
        p.encode(&expanded, opts.add_special_tokens, opts.assistant_only_loss)?;
    let mut trainable: Vec<bool> = if opts.assistant_only_loss {
        assistant_token_mask(&offsets, &spans)
    } else {
        vec![true; ids.len()]
    };
    // Image blocks in token space: each boi id opens one, the next eoi closes it.
    let mut blocks = Vec::new();
    let mut open = None;
    for (i, &id) in ids.iter().enumerate() {
        if id == p.ids.boi {
            open = Some(i);
        } else if id == p.ids.eoi {
            if let Some(s) = open.take() {
                blocks.push((s, i));
            }
        }
    }
    if blocks.len() != num_images {
        bail!("tokenization produced {} image blocks for {num_images} images (is the boi token split by the tokenizer?)", blocks.len());
    }
    let mut images_kept = num_images;
    if let Some(max) = opts.max_length {
        if ids.len() > max {
            if blocks.iter().any(|&(s, e)| s < max && e >= max) {
                return Ok(Err(Rejection::TruncatedInsideImage {
                    max_length: max,
                    length: ids.len(),
                }));
            }
            images_kept = blocks.iter().filter(|&&(_, e)| e < max).count();
            ids.truncate(max);
            trainable.truncate(max);
        }
    }
    Ok(Ok(TokenizedExample {
        input_ids: ids,
        trainable,
        images_kept,
    }))
}

/// transformers' assistant mask: token `[start, end)` is an assistant token when it overlaps a
/// span `[a, b)`, `start < b && end > a` (`processing_utils.py`, `_adjust_assistant_masks_indices`:
/// "Mask every token overlapping the span"). So a token that straddles a span boundary, such as
/// a merged `"\nB"` whose `"\n"` ends the `<start_of_turn>model\n` cue, is kept; a token that
/// only touches a span (ends where it starts) is not, nor is the tokenizer's added BOS (0..0).
/// Offsets and spans must be in the same units (bytes here; transformers uses characters, which
/// gives the same answer because both lie on character boundaries).
pub fn assistant_token_mask(offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, end)| spans.iter().any(|&(a, b)| start < b && end > a))
        .collect()
}

/// A collated batch. Shapes: `[batch, seq_len]` row-major for the token tensors;
/// `pixel_values` is `[num_images, 3, height, width]`, the images of all samples in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub pixel_values: Vec<f32>,
    pub num_images: usize,
    pub image_height: usize,
    pub image_width: usize,
    /// `[batch]`: images of each sample (their planes follow each other in `pixel_values`).
    pub images_per_sample: Vec<usize>,
    /// `[batch]`: the dataset row of each sample.
    pub rows: Vec<usize>,
    /// Position of this batch in the stream (for logging and resuming).
    pub epoch: usize,
    pub index_in_epoch: usize,
}

impl Batch {
    /// Number of label tokens that count in the loss.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Pads tokenized examples (right, to the longest) and attaches the processed images.
/// `images[i]` are sample i's images, already RGB; they are resized and normalised here.
pub fn collate(
    p: &Processor,
    examples: &[TokenizedExample],
    images: &[Vec<RgbImage>],
    opts: &CollateOptions,
) -> Batch {
    assert_eq!(examples.len(), images.len(), "one image list per example");
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let pad = p.ids.pad as i64;
    let mut batch = Batch {
        batch_size: b,
        seq_len: t,
        input_ids: vec![pad; b * t],
        attention_mask: vec![0; b * t],
        token_type_ids: vec![0; b * t],
        labels: vec![IGNORE_INDEX; b * t],
        pixel_values: Vec::new(),
        num_images: 0,
        image_height: p.image.height,
        image_width: p.image.width,
        images_per_sample: Vec::with_capacity(b),
        rows: Vec::new(),
        epoch: 0,
        index_in_epoch: 0,
    };
    for (i, ex) in examples.iter().enumerate() {
        for (j, (&id, &keep)) in ex.input_ids.iter().zip(&ex.trainable).enumerate() {
            let k = i * t + j;
            let id = id as i64;
            batch.input_ids[k] = id;
            batch.attention_mask[k] = 1;
            batch.token_type_ids[k] = (id == p.ids.image as i64) as i64;
            let masked = !keep
                || id == pad
                || id == p.ids.image as i64
                || (opts.mask_boi && id == p.ids.boi as i64);
            batch.labels[k] = if masked { IGNORE_INDEX } else { id };
        }
    }
    let plane = 3 * p.image.height * p.image.width;
    let total: usize = examples.iter().map(|e| e.images_kept).sum();
    batch.pixel_values = zeroed_pixel_buffer(total * plane);
    let kept: Vec<&RgbImage> = examples
        .iter()
        .zip(images)
        .flat_map(|(ex, imgs)| imgs.iter().take(ex.images_kept))
        .collect();
    // Images are independent: each is resized and normalised into its own plane on the rayon
    // pool, so one batch's images use every core.
    {
        use rayon::prelude::*;
        batch
            .pixel_values
            .par_chunks_mut(plane.max(1))
            .zip(kept.par_iter())
            .for_each(|(out, img)| p.image.normalize_into(&p.image.resize(img), out));
    }
    batch.images_per_sample = examples.iter().map(|e| e.images_kept).collect();
    batch.num_images = total;
    batch
}

/// A zeroed buffer of `n` pixel values. A batch's pixels are tens of MB (9.6 MB per 896x896
/// image), so each buffer is a fresh mapping whose 4 KiB pages fault in one at a time as the
/// images are written: measured in the collate benchmark, that cost more than normalising the
/// pixels. Asking for transparent huge pages (honoured when THP is in `madvise` or `always`
/// mode) makes that one fault per 2 MiB; the advice changes no contents and is ignored elsewhere.
pub fn zeroed_pixel_buffer(n: usize) -> Vec<f32> {
    let buffer = vec![0f32; n];
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let start = buffer.as_ptr() as usize;
        let end = start + n * std::mem::size_of::<f32>();
        let first = start.next_multiple_of(HUGE_PAGE);
        if end >= first + HUGE_PAGE {
            let len = (end - first) / HUGE_PAGE * HUGE_PAGE;
            // SAFETY: [first, first + len) lies inside `buffer`'s allocation and is page
            // aligned; MADV_HUGEPAGE only changes how its pages are backed, never their contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
            }
        }
    }
    buffer
}

/// Source of images stored inside dataset rows (`ImageRef::Row`); implemented over the
/// `dataset` artifact reader.
pub trait RowImages: Send + Sync {
    /// The encoded bytes of image `index` of field `column` in global row `row`.
    fn image_bytes(&self, row: usize, column: &str, index: usize) -> Result<Vec<u8>>;
}

/// Images inside the rows of a `dataset` artifact (HF `Image` columns: `{bytes, path}` structs,
/// or raw bytes), read by random access so shuffled batches never load the dataset whole.
pub struct DatasetImages(pub super::dataset::Dataset);

impl RowImages for DatasetImages {
    fn image_bytes(&self, row: usize, column: &str, index: usize) -> Result<Vec<u8>> {
        let r = self.0.row(row)?;
        let v = r.field(column)?;
        let item = match v {
            super::value::Value::List(items) => items.get(index).with_context(|| {
                format!("row {row} ({}): `{column}` has no image {index}", r.file)
            })?,
            single if index == 0 => single,
            _ => bail!("row {row} ({}): `{column}` is not a list", r.file),
        };
        match item {
            super::value::Value::Bytes(b) => Ok(b.clone()),
            super::value::Value::Struct(s) => match s.get("bytes") {
                Some(super::value::Value::Bytes(b)) => Ok(b.clone()),
                _ => bail!(
                    "row {row} ({}): image {index} of `{column}` has no bytes",
                    r.file
                ),
            },
            other => bail!(
                "row {row} ({}): image {index} of `{column}` is a {}",
                r.file,
                other.type_name()
            ),
        }
    }
}

/// Resolves image references to decoded RGB images.
pub struct ImageResolver {
    pub sources: ImageSources,
    pub rows: Option<Arc<dyn RowImages>>,
}

impl ImageResolver {
    pub fn bytes(&self, r: &ImageRef) -> Result<Vec<u8>> {
        match r {
            ImageRef::File { path } => {
                let full = self.sources.file_path(path);
                std::fs::read(&full)
                    .with_context(|| format!("cannot read image {}", full.display()))
            }
            ImageRef::Row { row, column, index } => self
                .rows
                .as_ref()
                .context("image stored in a dataset row, but no dataset is attached")?
                .image_bytes(*row, column, *index),
        }
    }

    pub fn load(&self, r: &ImageRef) -> Result<RgbImage> {
        let bytes = self.bytes(r)?;
        decode_rgb(&bytes).with_context(|| match r {
            ImageRef::File { path } => format!("image {}", self.sources.file_path(path).display()),
            ImageRef::Row { row, column, index } => {
                format!("image {index} of `{column}` in row {row}")
            }
        })
    }
}

/// The `batches` artifact: a descriptor; batches are made on demand by [`BatchStream`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchesDescriptor {
    /// The `templated` artifact (holding `templated.jsonl` and `source.json`).
    pub templated_dir: PathBuf,
    /// The model folder (tokenizer, processor and config files).
    pub model_dir: PathBuf,
    pub options: CollateOptions,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
    /// Examples kept (after max_length drops).
    pub num_examples: usize,
    pub batches_per_epoch: usize,
    /// Examples dropped, and the first few with their reasons.
    pub dropped: usize,
    pub dropped_examples: Vec<String>,
    /// Label tokens over one epoch (for logging `num_tokens`-style totals).
    pub total_tokens: u64,
    /// Tokens of the longest kept example and images of the kept example with the most: what
    /// the memory plan sizes a micro-batch by.
    #[serde(default)]
    pub max_tokens: usize,
    #[serde(default)]
    pub max_images: usize,
}

pub const DESCRIPTOR_FILE: &str = "batches.json";

impl BatchesDescriptor {
    /// The descriptor of the `batches` artifact at `dir`, its folders resolved (they may be
    /// recorded relative to it: [`op_api::artifact::entry_ref`]).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut d: Self = read_json(&dir.join(DESCRIPTOR_FILE))?;
        d.templated_dir = op_api::artifact::resolve_entry_ref(dir, &d.templated_dir);
        d.model_dir = op_api::artifact::resolve_entry_ref(dir, &d.model_dir);
        Ok(d)
    }
}
/// `[num_examples]` u64 LE: byte offset of each kept example's line in `templated.jsonl`.
pub const OFFSETS_FILE: &str = "offsets.bin";

impl BatchesDescriptor {
    pub fn batches_for(num_examples: usize, batch_size: usize, drop_last: bool) -> usize {
        if drop_last {
            num_examples / batch_size
        } else {
            num_examples.div_ceil(batch_size)
        }
    }
}

/// Where a stream starts and how it is produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOptions {
    /// Number of epochs to produce in total (the stream ends after the last).
    pub epochs: usize,
    /// Resume position: the first batch produced is batch `start_batch` of epoch `start_epoch`.
    pub start_epoch: usize,
    pub start_batch: usize,
    /// Worker threads decoding and resizing.
    pub workers: usize,
    /// Batches made ahead of the consumer at most.
    pub prefetch: usize,
    /// The share of every epoch this stream makes (a data-parallel rank's: every
    /// `world`-th batch, see [`dist::Shard`]); batch numbers count this share.
    pub shard: dist::Shard,
}

impl Default for StreamOptions {
    fn default() -> Self {
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        Self {
            epochs: 1,
            start_epoch: 0,
            start_batch: 0,
            workers,
            prefetch: 2 * workers,
            shard: dist::Shard::default(),
        }
    }
}

/// The example order of one epoch: identity, or a permutation seeded by (seed, epoch) with
/// ChaCha8 (deterministic across runs and platforms, independent of the worker count).
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
    }
    order
}

struct StreamShared {
    desc: BatchesDescriptor,
    processor: Processor,
    resolver: ImageResolver,
    records_path: PathBuf,
    offsets: Vec<u64>,
    orders: Mutex<BTreeMap<usize, Arc<Vec<u32>>>>,
    /// Next global batch number to claim, and the consumer's next expected one.
    next: AtomicUsize,
    consumed: Mutex<usize>,
    wake: Condvar,
    stop: AtomicBool,
    end: usize,
    prefetch: usize,
    shard: dist::Shard,
    /// Batches of one epoch in this stream's share.
    per_epoch: usize,
}

impl StreamShared {
    fn order(&self, epoch: usize) -> Arc<Vec<u32>> {
        let mut orders = self.orders.lock().unwrap();
        orders.retain(|&e, _| e + 1 >= epoch);
        orders
            .entry(epoch)
            .or_insert_with(|| {
                Arc::new(epoch_order(
                    self.desc.num_examples,
                    self.desc.shuffle,
                    self.desc.seed,
                    epoch,
                ))
            })
            .clone()
    }

    fn read_record(&self, file: &mut std::fs::File, example: usize) -> Result<TemplatedRecord> {
        use std::io::{BufRead, Seek, SeekFrom};
        file.seek(SeekFrom::Start(self.offsets[example]))?;
        let mut line = String::new();
        std::io::BufReader::new(file).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| {
            format!(
                "{}: bad record at byte {}",
                self.records_path.display(),
                self.offsets[example]
            )
        })
    }

    fn make_batch(&self, global: usize, file: &mut std::fs::File) -> Result<Batch> {
        let per_epoch = self.per_epoch;
        let (epoch, index) = (global / per_epoch, global % per_epoch);
        let order = self.order(epoch);
        // Positions past the epoch's order wrap to its start (a rank's padding batches).
        let positions = self
            .shard
            .positions(index, order.len(), self.desc.batch_size);
        let mut examples = Vec::with_capacity(positions.len());
        let mut images = Vec::with_capacity(positions.len());
        let mut rows = Vec::with_capacity(positions.len());
        for pos in positions {
            let ex = order[pos % order.len()];
            let rec = self.read_record(file, ex as usize)?;
            let tok = tokenize_example(
                &self.processor,
                &rec.text,
                &rec.assistant_spans,
                rec.images.len(),
                &self.desc.options,
            )?
            .map_err(|r| anyhow::anyhow!("row {} ({}): {r}", rec.row, rec.file))?;
            // Decoded in parallel on the rayon pool (the batch's images are independent).
            let imgs = {
                use rayon::prelude::*;
                rec.images[..tok.images_kept]
                    .par_iter()
                    .map(|r| self.resolver.load(r))
                    .collect::<Result<Vec<_>>>()
            }
            .with_context(|| format!("row {} ({})", rec.row, rec.file))?;
            examples.push(tok);
            images.push(imgs);
            rows.push(rec.row);
        }
        let mut batch = collate(&self.processor, &examples, &images, &self.desc.options);
        batch.rows = rows;
        batch.epoch = epoch;
        batch.index_in_epoch = index;
        Ok(batch)
    }

    fn worker(&self, tx: mpsc::Sender<(usize, Result<Batch>)>) {
        let mut file = match std::fs::File::open(&self.records_path) {
            Ok(f) => f,
            Err(e) => {
                let g = self.next.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send((
                    g,
                    Err(anyhow::anyhow!(
                        "cannot open {}: {e}",
                        self.records_path.display()
                    )),
                ));
                return;
            }
        };
        loop {
            // Claim the next batch, waiting while the consumer is `prefetch` batches behind.
            let g = {
                let mut consumed = self.consumed.lock().unwrap();
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let g = self.next.load(Ordering::SeqCst);
                    if g >= self.end {
                        return;
                    }
                    if g < *consumed + self.prefetch {
                        self.next.store(g + 1, Ordering::SeqCst);
                        break g;
                    }
                    consumed = self.wake.wait(consumed).unwrap();
                }
            };
            let result = self.make_batch(g, &mut file);
            if tx.send((g, result)).is_err() {
                return;
            }
        }
    }
}

/// Training batches produced lazily: records are read by offset, tokenized, and their images
/// decoded and resized on `workers` threads, at most `prefetch` batches ahead of the consumer;
/// batches come out in order. Memory is bounded by the prefetch window, not the dataset.
pub struct BatchStream {
    shared: Arc<StreamShared>,
    rx: mpsc::Receiver<(usize, Result<Batch>)>,
    pending: BTreeMap<usize, Result<Batch>>,
    next_out: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BatchStream {
    /// Opens the `batches` artifact at `descriptor_dir` (the dataset is opened too when images
    /// live in its rows).
    pub fn open(descriptor_dir: &Path, opts: StreamOptions) -> Result<Self> {
        let desc = BatchesDescriptor::read(descriptor_dir)?;
        let raw = std::fs::read(descriptor_dir.join(OFFSETS_FILE))
            .context("batches artifact has no offsets.bin")?;
        let offsets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if offsets.len() != desc.num_examples {
            bail!(
                "batches artifact is inconsistent: {} offsets for {} examples",
                offsets.len(),
                desc.num_examples
            );
        }
        if desc.batches_per_epoch == 0 {
            bail!(
                "the batch stream is empty ({} examples, batch_size {})",
                desc.num_examples,
                desc.batch_size
            );
        }
        let sources = ImageSources::read(&desc.templated_dir)?;
        let rows: Option<Arc<dyn RowImages>> = match &sources.dataset_dir {
            Some(d) => Some(Arc::new(DatasetImages(super::dataset::open(d)?))),
            None => None,
        };
        let processor = Processor::from_model_dir(&desc.model_dir)?;
        let per_epoch = if opts.shard.world <= 1 {
            desc.batches_per_epoch
        } else {
            opts.shard
                .batches_per_epoch(desc.num_examples, desc.batch_size, desc.drop_last)
        };
        if per_epoch == 0 {
            bail!(
                "{} examples in batches of {} give rank {} of {} no batch: use fewer ranks or a smaller batch_size",
                desc.num_examples,
                desc.batch_size,
                opts.shard.rank,
                opts.shard.world
            );
        }
        let start = opts.start_epoch * per_epoch + opts.start_batch;
        let end = opts.epochs * per_epoch;
        if opts.start_batch >= per_epoch && start < end {
            bail!(
                "start_batch {} is past the {per_epoch} batches of an epoch",
                opts.start_batch,
            );
        }
        let shared = Arc::new(StreamShared {
            records_path: desc.templated_dir.join("templated.jsonl"),
            desc,
            processor,
            resolver: ImageResolver { sources, rows },
            offsets,
            orders: Mutex::new(BTreeMap::new()),
            next: AtomicUsize::new(start),
            consumed: Mutex::new(start),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            end,
            prefetch: opts.prefetch.max(1),
            shard: opts.shard,
            per_epoch,
        });
        let (tx, rx) = mpsc::channel();
        let threads = (0..opts.workers.max(1))
            .map(|_| {
                let s = shared.clone();
                let tx = tx.clone();
                std::thread::spawn(move || s.worker(tx))
            })
            .collect();
        Ok(Self {
            shared,
            rx,
            pending: BTreeMap::new(),
            next_out: start,
            threads,
        })
    }

    pub fn descriptor(&self) -> &BatchesDescriptor {
        &self.shared.desc
    }

    pub fn processor(&self) -> &Processor {
        &self.shared.processor
    }

    /// Batches left to produce.
    pub fn remaining(&self) -> usize {
        self.shared.end.saturating_sub(self.next_out)
    }
}

impl Iterator for BatchStream {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next_out >= self.shared.end {
            return None;
        }
        loop {
            if let Some(b) = self.pending.remove(&self.next_out) {
                self.next_out += 1;
                *self.shared.consumed.lock().unwrap() = self.next_out;
                self.shared.wake.notify_all();
                return Some(b);
            }
            match self.rx.recv() {
                Ok((g, b)) => {
                    self.pending.insert(g, b);
                }
                Err(_) => return Some(Err(anyhow::anyhow!("batch workers stopped unexpectedly"))),
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        // Unblock workers stuck on send by dropping the receiver side first.
        let (_tx, rx) = mpsc::channel();
        drop(std::mem::replace(&mut self.rx, rx));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

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
type Scanned = std::result::Result<(usize, usize), String>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assistant_mask_keeps_tokens_that_overlap_a_span() {
        // "<start_of_turn>model\nB<end_of_turn>\n" as the fixture tokenizer splits it, byte offsets
        // by hand: <start_of_turn> 0..15, "mo" 15..17, "d" 17..18, "el" 18..20, "\nB" 20..22,
        // <end_of_turn> 22..35, "\n" 35..36. The generation block of TRL's Gemma 3 training
        // template starts after "model\n": span 21..36. The added BOS is 0..0.
        let offsets = [
            (0, 0),
            (0, 15),
            (15, 17),
            (17, 18),
            (18, 20),
            (20, 22),
            (22, 35),
            (35, 36),
        ];
        let spans = [(21, 36)];
        assert_eq!(
            assistant_token_mask(&offsets, &spans),
            [false, false, false, false, false, true, true, true],
            "\\nB straddles the span start and is kept, as transformers keeps it"
        );
        // A span from 0 still skips the zero-width BOS; a token ending where a span starts, or
        // starting where it ends, is outside; an empty span at a token boundary keeps nothing
        // (inside a token it keeps that token, by the same formula, as transformers does).
        assert_eq!(
            assistant_token_mask(&offsets, &[(0, 15)]),
            [false, true, false, false, false, false, false, false]
        );
        assert_eq!(
            assistant_token_mask(&offsets, &[(20, 22), (36, 40)]),
            [false, false, false, false, false, true, false, false]
        );
        assert_eq!(assistant_token_mask(&offsets, &[(22, 22)]), [false; 8]);
        assert_eq!(
            assistant_token_mask(&offsets, &[(21, 21)]),
            [false, false, false, false, false, true, false, false]
        );
        // A token covering a whole short span (span inside one token) is kept.
        assert_eq!(
            assistant_token_mask(&offsets, &[(16, 17)]),
            [false, false, true, false, false, false, false, false]
        );
    }
}
