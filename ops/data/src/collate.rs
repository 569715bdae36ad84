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

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::conversation::{ImageRef, ImageSources};
use super::image::{decode_rgb, RgbImage};
use super::processor::Processor;

pub use super::prepare::{prepare_batches, read_templated, PrepareSpec, REPORTED_DROPS};
pub use super::stream::{
    epoch_order, BatchStream, BatchesDescriptor, StreamOptions, DESCRIPTOR_FILE, OFFSETS_FILE,
};

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
    /// `[batch_size, seq_len]` of nothing but padding (`pad_id`, masked out, ignored by the
    /// loss) and no images yet: the start of a batch that the caller writes its examples into,
    /// right-padded (training) or left-padded (generation).
    pub fn padding(
        batch_size: usize,
        seq_len: usize,
        pad_id: u32,
        image_height: usize,
        image_width: usize,
    ) -> Batch {
        let n = batch_size * seq_len;
        Batch {
            batch_size,
            seq_len,
            input_ids: vec![pad_id as i64; n],
            attention_mask: vec![0; n],
            token_type_ids: vec![0; n],
            labels: vec![IGNORE_INDEX; n],
            pixel_values: Vec::new(),
            num_images: 0,
            image_height,
            image_width,
            images_per_sample: vec![0; batch_size],
            rows: Vec::new(),
            epoch: 0,
            index_in_epoch: 0,
        }
    }

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
    let mut batch = Batch::padding(b, t, p.ids.pad, p.image.height, p.image.width);
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
