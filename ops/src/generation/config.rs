//! What a model folder says about generation: generation_config.json (transformers' `generate`
//! reads the same file) and the ids an answer stops on.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::model::ModelConfig;
use crate::params::OneOrMany;

/// The fields of generation_config.json that generation uses; each unset when absent.
#[derive(Debug, Default, Deserialize)]
pub struct GenerationConfig {
    pub eos_token_id: Option<OneOrMany<i64>>,
    pub pad_token_id: Option<i64>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

impl GenerationConfig {
    /// The model folder's generation_config.json; a folder without one sets nothing.
    pub fn read(root: &Path) -> Result<Self> {
        match std::fs::read(root.join("generation_config.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("reading generation_config.json"),
            Err(_) => Ok(Self::default()),
        }
    }

    /// The ids a row stops on: this file's `eos_token_id`, else config.json's (the outer
    /// config's, then the text config's), as transformers resolves them. A model that names
    /// none is an error: its answers would never stop before `max_new_tokens`.
    pub fn stop_ids(&self, config: &ModelConfig) -> Result<Vec<u32>> {
        let stop_ids: Vec<u32> = self
            .eos_token_id
            .as_ref()
            .or(match config {
                ModelConfig::ConditionalGeneration(g) => g.eos_token_id.as_ref(),
                _ => None,
            })
            .or(config.text().eos_token_id.as_ref())
            .map(|e| e.to_vec().into_iter().map(|v| v as u32).collect())
            .unwrap_or_default();
        if stop_ids.is_empty() {
            bail!(
                "the model names no `eos_token_id` (generation_config.json or config.json): \
                 answers would never stop before max_new_tokens; add it to the model folder"
            );
        }
        Ok(stop_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_wins_over_config_json_and_none_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig::from_json(
            r#"{"model_type": "gemma3_text", "vocab_size": 16, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                "num_key_value_heads": 1, "head_dim": 8, "eos_token_id": 1}"#,
        )
        .unwrap();
        assert_eq!(
            GenerationConfig::read(dir.path())
                .unwrap()
                .stop_ids(&config)
                .unwrap(),
            [1]
        );
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [1, 106], "top_k": 64}"#,
        )
        .unwrap();
        let gen = GenerationConfig::read(dir.path()).unwrap();
        assert_eq!(gen.top_k, Some(64));
        assert_eq!(gen.stop_ids(&config).unwrap(), [1, 106]);
        // config.json's text config defaults to Gemma's <eos> (1), as transformers' does; an
        // empty list names no stop id at all
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": []}"#,
        )
        .unwrap();
        let err = GenerationConfig::read(dir.path())
            .unwrap()
            .stop_ids(&config)
            .unwrap_err();
        assert!(err.to_string().contains("eos_token_id"), "{err}");
    }
}
