//! Where the training loop's micro-batches come from: the `batches` artifact's lazy stream (one
//! rank's share of it), or batches held in memory (tests).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use data::collate::{Batch, BatchStream, BatchesDescriptor, StreamOptions};
use dist::Shard;

/// Micro-batches, epoch after epoch, from any position.
pub trait BatchSource {
    fn batches_per_epoch(&self) -> usize;
    /// Batches from batch `start_batch` of epoch `start_epoch` to the end of epoch `epochs − 1`,
    /// each carrying its `epoch` and `index_in_epoch`.
    fn open(
        &self,
        epochs: usize,
        start_epoch: usize,
        start_batch: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>>;
}

/// The `batches` artifact: batches made lazily by [`BatchStream`] on worker threads.
pub struct StreamSource {
    pub dir: PathBuf,
    pub descriptor: BatchesDescriptor,
    /// Which of the epoch's batches this process trains on (all of them in one process).
    pub shard: Shard,
}

impl StreamSource {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_shard(dir, Shard::default())
    }

    /// This rank's share of the stream ([`Shard`]).
    pub fn open_shard(dir: &Path, shard: Shard) -> Result<Self> {
        let descriptor = BatchesDescriptor::read(dir)?;
        let source = Self {
            dir: dir.to_path_buf(),
            descriptor,
            shard,
        };
        ensure!(
            source.batches_per_epoch() > 0,
            "{} examples in batches of {} (drop_last = {}) give rank {} of {} no batch: use fewer ranks or a smaller batch_size",
            source.descriptor.num_examples,
            source.descriptor.batch_size,
            source.descriptor.drop_last,
            shard.rank,
            shard.world
        );
        Ok(source)
    }
}

impl BatchSource for StreamSource {
    fn batches_per_epoch(&self) -> usize {
        if self.shard.world <= 1 {
            return self.descriptor.batches_per_epoch;
        }
        self.shard.batches_per_epoch(
            self.descriptor.num_examples,
            self.descriptor.batch_size,
            self.descriptor.drop_last,
        )
    }
    fn open(
        &self,
        epochs: usize,
        start_epoch: usize,
        start_batch: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        let stream = BatchStream::open(
            &self.dir,
            StreamOptions {
                epochs,
                start_epoch,
                start_batch,
                shard: self.shard,
                ..Default::default()
            },
        )?;
        Ok(Box::new(stream))
    }
}

/// Batches held in memory, one list per epoch (tests, replays of a recorded order). Epochs
/// past the last list repeat the lists cyclically.
pub struct VecSource {
    pub epochs: Vec<Vec<Batch>>,
}

impl BatchSource for VecSource {
    fn batches_per_epoch(&self) -> usize {
        self.epochs.first().map_or(0, Vec::len)
    }
    fn open(
        &self,
        epochs: usize,
        start_epoch: usize,
        start_batch: usize,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch>> + '_>> {
        ensure!(
            !self.epochs.is_empty() && self.epochs.iter().all(|e| e.len() == self.epochs[0].len()),
            "every epoch must hold the same number of batches"
        );
        let bpe = self.batches_per_epoch();
        Ok(Box::new(
            (start_epoch * bpe + start_batch..epochs * bpe).map(move |g| {
                let (e, i) = (g / bpe, g % bpe);
                let mut b = self.epochs[e % self.epochs.len()][i].clone();
                b.epoch = e;
                b.index_in_epoch = i;
                Ok(b)
            }),
        ))
    }
}
