//! The Gemma 3 processor's text side (placeholder expansion, tokenization, token type ids) and
//! the special-token ids that the guide's label masking needs, all read from the model folder.
//!
//! transformers `processing_gemma3.py`: every `boi_token` in the text becomes
//! `full_image_sequence = "\n\n" + boi + image_token * image_seq_length + eoi + "\n\n"`, the
//! expanded text is tokenized whole (with the tokenizer's post-processor, i.e. a BOS prepended,
//! unless `add_special_tokens = false`), and `token_type_ids` is 1 exactly on `image_token`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::image::ImageProcessorConfig;

/// Token ids the collator needs; every one is read from the model's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub bos: Option<u32>,
    /// `<start_of_image>` (`boi_token_index`).
    pub boi: u32,
    /// `<end_of_image>` (`eoi_token_index`).
    pub eoi: u32,
    /// `<image_soft_token>` (`image_token_index`).
    pub image: u32,
}

/// Token ids and, when requested, each token's byte range in the text.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

pub struct Processor {
    pub tokenizer: tokenizers::Tokenizer,
    pub image: ImageProcessorConfig,
    /// Image soft tokens per image (`image_seq_length`, = config `mm_tokens_per_image`).
    pub image_seq_length: usize,
    pub boi_token: String,
    pub eoi_token: String,
    pub image_token: String,
    pub ids: SpecialIds,
    full_image_sequence: String,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
        format!("{} is not valid JSON", path.display())
    })?))
}

fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Processor {
    /// Reads tokenizer.json, tokenizer_config.json, config.json and processor_config.json (or
    /// preprocessor_config.json, the Hub's older layout) from a model folder.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let config = read_json(&dir.join("config.json"))?.unwrap_or_default();
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let processor_config = read_json(&dir.join("processor_config.json"))?;
        let preprocessor_config = read_json(&dir.join("preprocessor_config.json"))?;
        let image_cfg_json = processor_config
            .as_ref()
            .and_then(|p| p.get("image_processor").cloned())
            .or_else(|| preprocessor_config.clone())
            .with_context(|| {
                format!("model folder {} has no image processor settings (processor_config.json or preprocessor_config.json)", dir.display())
            })?;
        let image = ImageProcessorConfig::from_json(&image_cfg_json)?;
        let image_seq_length = processor_config
            .as_ref()
            .and_then(|p| p.get("image_seq_length"))
            .or_else(|| preprocessor_config.as_ref().and_then(|p| p.get("image_seq_length")))
            .or_else(|| config.get("mm_tokens_per_image"))
            .and_then(|v| v.as_u64())
            .context("neither processor_config.json `image_seq_length` nor config.json `mm_tokens_per_image` is set")?
            as usize;
        if let Some(mm) = config.get("mm_tokens_per_image").and_then(|v| v.as_u64()) {
            if mm as usize != image_seq_length {
                bail!("processor image_seq_length {image_seq_length} != config mm_tokens_per_image {mm}");
            }
        }

        // Token strings: the tokenizer's named special tokens (what `tokenizer.boi_token` etc.
        // return), else the token at the config's index.
        let named = |key: &str| -> Option<String> {
            token_text(tok_config.get(key))
                .or_else(|| {
                    token_text(
                        tok_config
                            .get("extra_special_tokens")
                            .and_then(|e| e.get(key)),
                    )
                })
                .or_else(|| token_text(special_map.get(key)))
        };
        let by_index = |key: &str| -> Option<u32> {
            config.get(key).and_then(|v| v.as_u64()).map(|v| v as u32)
        };
        let resolve = |name_key: &str, index_key: &str| -> Result<(String, u32)> {
            let from_name = named(name_key).map(|t| {
                let id = tokenizer.token_to_id(&t);
                (t, id)
            });
            match (from_name, by_index(index_key)) {
                (Some((t, Some(id))), idx) => {
                    if let Some(idx) = idx {
                        if idx != id {
                            bail!("tokenizer `{name_key}` {t:?} has id {id} but config.json `{index_key}` is {idx}");
                        }
                    }
                    Ok((t, id))
                }
                (Some((t, None)), _) => bail!("tokenizer `{name_key}` {t:?} is not in the vocabulary"),
                (None, Some(idx)) => {
                    let t = tokenizer
                        .id_to_token(idx)
                        .with_context(|| format!("config.json `{index_key}` {idx} is not in the vocabulary"))?;
                    Ok((t, idx))
                }
                (None, None) => bail!("the model defines neither tokenizer `{name_key}` nor config.json `{index_key}`"),
            }
        };
        let (boi_token, boi) = resolve("boi_token", "boi_token_index")?;
        let (eoi_token, eoi) = resolve("eoi_token", "eoi_token_index")?;
        let (image_token, image_id) = resolve("image_token", "image_token_index")?;
        let pad_token = named("pad_token").context("tokenizer has no pad_token")?;
        let pad = tokenizer
            .token_to_id(&pad_token)
            .with_context(|| format!("pad token {pad_token:?} not in vocabulary"))?;
        let bos = named("bos_token").and_then(|t| tokenizer.token_to_id(&t));
        let full_image_sequence = format!(
            "\n\n{boi_token}{}{eoi_token}\n\n",
            image_token.repeat(image_seq_length)
        );
        Ok(Self {
            tokenizer,
            image,
            image_seq_length,
            boi_token,
            eoi_token,
            image_token,
            ids: SpecialIds {
                pad,
                bos,
                boi,
                eoi,
                image: image_id,
            },
            full_image_sequence,
        })
    }

    /// Number of image placeholders (`boi_token`) in a templated text.
    pub fn count_images(&self, text: &str) -> usize {
        text.matches(&self.boi_token).count()
    }

    /// Replaces every `boi_token` with the full image sequence; byte spans of `text` (assistant
    /// spans) are moved to the expanded text.
    pub fn expand(&self, text: &str, spans: &[(usize, usize)]) -> (String, Vec<(usize, usize)>) {
        let grow = self.full_image_sequence.len() - self.boi_token.len();
        let positions: Vec<usize> = text
            .match_indices(&self.boi_token)
            .map(|(p, _)| p)
            .collect();
        let shift = |x: usize| x + grow * positions.iter().filter(|&&p| p < x).count();
        let expanded = text.replace(&self.boi_token, &self.full_image_sequence);
        (
            expanded,
            spans.iter().map(|&(s, e)| (shift(s), shift(e))).collect(),
        )
    }

    /// Tokenizes an expanded text: the ids, and with `offsets` each token's byte range (empty
    /// otherwise; offset tracking costs time).
    pub fn encode(
        &self,
        expanded: &str,
        add_special_tokens: bool,
        offsets: bool,
    ) -> Result<Encoded> {
        let enc = if offsets {
            self.tokenizer.encode(expanded, add_special_tokens)
        } else {
            self.tokenizer.encode_fast(expanded, add_special_tokens)
        }
        .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
        let offs = if offsets {
            enc.get_offsets().to_vec()
        } else {
            Vec::new()
        };
        Ok((enc.get_ids().to_vec(), offs))
    }
}
