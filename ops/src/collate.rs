//! `collate`: fixes how templated conversations become training batches (Gemma 3 processor
//! semantics + the guide's label masking) and writes the `batches` descriptor; the batches
//! themselves are produced lazily by `data::collate::BatchStream` while training runs.

use anyhow::Result;

use crate::data::collate::{prepare_batches, CollateOptions, PrepareSpec};
use crate::params::OpParams;
use crate::{op_params, ArtifactType, Op, ParamError, ParamSpec, Port, RunCtx};

op_params! {
    pub struct CollateParams {
        /// Examples per batch (the guide: 8 for llava, 1 for MMIU).
        batch_size: usize = 8,
        /// Shuffle every epoch (seeded; the DataLoader of the Trainer shuffles).
        shuffle: bool = true,
        /// Shuffle seed; unset = the recipe's seed.
        seed: Option<u64> = None,
        /// Drop the last incomplete batch of an epoch.
        drop_last: bool = false,
        /// Let the tokenizer add its BOS as the guide does (with Gemma's template: a double BOS); false drops the duplicate. Unset with `assistant_only_loss = true`, it becomes false, as TRL's collator passes add_special_tokens=False.
        add_special_tokens: bool = true,
        /// Mask <start_of_image> in the labels, as the guide intends; false reproduces the guide's literal code (a no-op mask).
        mask_boi: bool = true,
        /// Train only on assistant turns, as TRL 1.16's SFTTrainer(assistant_only_loss=True): a token keeps its label when its text overlaps a {% generation %} block (render with the template op's `assistant_only_loss = true`).
        assistant_only_loss: bool = false,
        /// Truncate sequences to this many tokens; an example whose cut falls inside an image block is dropped (or fails, per on_error).
        max_length: Option<usize> = None,
        /// An example that cannot be collated: "skip" (dropped, counted, reported) or "fail".
        on_error: String = "skip".to_string(),
    }
}

/// Far past any batch a device holds; larger values only overflow the stream's arithmetic.
pub const MAX_BATCH_SIZE: usize = 1 << 16;

pub struct CollateOp;

impl Op for CollateOp {
    fn kind(&self) -> &'static str {
        "collate"
    }
    fn doc(&self) -> &'static str {
        "Templated conversations -> a lazy stream of batches (Gemma 3 processor: images resized/normalised, image tokens expanded, labels masked)"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "templated",
                accepts: &[ArtifactType::Templated],
                required: true,
                doc: "templated conversations",
            },
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the model whose tokenizer and processor settings are used",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        CollateParams::specs()
    }
    fn version(&self) -> u32 {
        // 2: assistant tokens by span overlap (transformers' rule), add_special_tokens default.
        // 3: rows longer than max_position_embeddings are bad rows.
        // 4: the descriptor records the longest example and the most images in one.
        4
    }
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &crate::RecipeInfo,
    ) -> anyhow::Result<Option<String>> {
        // Without its own `seed` the op takes the recipe's, which is not among its params.
        let p = CollateParams::from_table(params)?;
        Ok(p.seed
            .is_none()
            .then(|| format!("recipe seed {}", recipe.seed)))
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = CollateParams::from_table(params)?;
        let mut table = params.clone();
        if p.assistant_only_loss && !table.contains_key("add_special_tokens") {
            table.insert("add_special_tokens".into(), toml::Value::Boolean(false));
        }
        let params = &table;
        if !(1..=MAX_BATCH_SIZE).contains(&p.batch_size) {
            return Err(ParamError {
                key: Some("batch_size".into()),
                message: format!(
                    "batch_size must be between 1 and {MAX_BATCH_SIZE}, got {}; use gradient_accumulation_steps on lora-train for larger effective batches",
                    p.batch_size
                ),
            });
        }
        if !matches!(p.on_error.as_str(), "skip" | "fail") {
            return Err(ParamError {
                key: Some("on_error".into()),
                message: format!(
                    "on_error must be \"skip\" or \"fail\", got {:?}",
                    p.on_error
                ),
            });
        }
        if p.max_length == Some(0) {
            return Err(ParamError {
                key: Some("max_length".into()),
                message: "max_length must be at least 1".into(),
            });
        }
        CollateParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Batches
    }
    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = CollateParams::from_table(ctx.params)?;
        let model = crate::data::model_dir::open(&ctx.input("model")?.dir)?;
        let templated = ctx.input("templated")?;
        let spec = PrepareSpec {
            options: CollateOptions {
                add_special_tokens: p.add_special_tokens,
                mask_boi: p.mask_boi,
                assistant_only_loss: p.assistant_only_loss,
                max_length: p.max_length,
            },
            batch_size: p.batch_size,
            shuffle: p.shuffle,
            seed: p.seed.unwrap_or(ctx.recipe.seed),
            drop_last: p.drop_last,
            fail_on_error: p.on_error == "fail",
            max_positions: max_positions(model.root())?,
        };
        let desc = prepare_batches(&templated.dir, model.root(), ctx.out_dir, &spec, &|n| {
            ctx.progress.inc(n as u64)
        })?;
        if desc.dropped > 0 {
            ctx.progress.println(format!(
                "collate `{}`: dropped {} examples; first: {}",
                ctx.name,
                desc.dropped,
                desc.dropped_examples.join("; ")
            ));
        }
        if desc.batches_per_epoch == 0 {
            anyhow::bail!(
                "no batches: {} usable examples with batch_size {} (drop_last = {})",
                desc.num_examples,
                desc.batch_size,
                desc.drop_last
            );
        }
        Ok(())
    }
}

/// The model's `max_position_embeddings`, when the model folder has a config.json (a tokenizer
/// alone collates without the check).
pub fn max_positions(model_dir: &std::path::Path) -> Result<Option<usize>> {
    let config_path = model_dir.join("config.json");
    if !config_path.is_file() {
        return Ok(None);
    }
    Ok(Some(
        crate::model::ModelConfig::from_file(&config_path)?
            .text()
            .max_position_embeddings,
    ))
}
