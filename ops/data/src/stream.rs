//! [`BatchStream`]: the `batches` artifact's micro-batches made lazily, in each epoch's seeded
//! order, on worker threads ahead of the trainer; and the artifact's descriptor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::conversation::{read_json, ImageSources, TemplatedRecord};
use super::processor::Processor;

use super::collate::*;

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

pub(super) struct StreamShared {
    pub(super) desc: BatchesDescriptor,
    pub(super) processor: Processor,
    pub(super) resolver: ImageResolver,
    pub(super) records_path: PathBuf,
    pub(super) offsets: Vec<u64>,
    pub(super) orders: Mutex<BTreeMap<usize, Arc<Vec<u32>>>>,
    /// Next global batch number to claim, and the consumer's next expected one.
    pub(super) next: AtomicUsize,
    pub(super) consumed: Mutex<usize>,
    pub(super) wake: Condvar,
    pub(super) stop: AtomicBool,
    pub(super) end: usize,
    pub(super) prefetch: usize,
    pub(super) shard: dist::Shard,
    /// Batches of one epoch in this stream's share.
    pub(super) per_epoch: usize,
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
