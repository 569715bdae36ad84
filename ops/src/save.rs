//! Op `save`: the trained adapter as a folder `PeftModel.from_pretrained(base, folder)` loads,
//! with the processor files, a model card and the recipe — and optionally the merged model.
//!
//! Where things go:
//! - the op's cache output (`saved` artifact) holds the complete adapter folder (what `push`
//!   uploads) plus `saved.json` (where it was written, the file list);
//! - `output_dir` (default `[recipe] output_dir`) gets a copy of that folder plus the marker
//!   `.runner-save.json`, and with `merge = true` the merged model under `merged/` (gigabytes,
//!   so it lives only there, not in the cache).
//!
//! `output_dir` is built in a temporary folder beside it and renamed into place only when
//! complete. An existing non-empty `output_dir` without the marker is refused unless
//! `overwrite = true`; even then nothing runner did not write is deleted: a foreign folder is
//! moved aside (and the move printed), and files a user added to a folder runner wrote are
//! carried over into the new one. An `output_dir` that holds the recipe, the cache or the
//! current directory is refused outright.
//!
//! The folder is a side effect the cache does not hold: the cache key covers the resolved
//! `output_dir`, the recipe's name and text, and a cached `save` whose folder was deleted or
//! changed (a file missing or of another size) runs again.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::data::model_dir;
use crate::params::{OpParams, ParamError, ParamSpec};
use crate::publish::folder::{normalize, save, written_folder_problem, SaveOptions};
use crate::publish::merge;
use crate::{op_params, ArtifactType, Op, Port, RecipeInfo, RunCtx};

op_params! {
    pub struct SaveParams {
        /// Folder to write (relative paths resolve against the recipe's folder); default: `[recipe] output_dir`.
        output_dir: Option<String> = None,
        /// Replace an existing non-empty `output_dir` that runner did not write.
        overwrite: bool = false,
        /// Also write the base model with the adapter merged in (bf16 safetensors, sharded like the Hub's) under `<output_dir>/merged`.
        merge: bool = false,
        /// Write README.md: base model, datasets, hyperparameters, final metrics and the recipe.
        model_card: bool = true,
        /// Largest shard of the merged model (huggingface_hub's default, decimal units).
        max_shard_size: String = "5GB".to_string(),
    }
}

pub struct SaveOp;

impl Op for SaveOp {
    fn kind(&self) -> &'static str {
        "save"
    }
    fn doc(&self) -> &'static str {
        "Write the adapter as a PEFT folder (adapter, processor files, model card, recipe) to output_dir; optionally the merged model"
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "adapter",
                accepts: &[ArtifactType::Adapter],
                required: true,
                doc: "the trained adapter (lora-train)",
            },
            Port {
                name: "model",
                accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
                required: true,
                doc: "the base model: its repo id, processor files and (merge = true) weights",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        SaveParams::specs()
    }
    fn version(&self) -> u32 {
        2
    }
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &RecipeInfo,
    ) -> anyhow::Result<Option<String>> {
        let p = SaveParams::from_table(params)?;
        // The folder's place, the card's name and the recipe copied into the folder are all
        // part of what save writes.
        let recipe_text = fs::read(&recipe.path).unwrap_or_default();
        Ok(Some(
            json!({
                "output_dir": resolved_output_dir(&p, recipe),
                "recipe_name": recipe.name,
                "recipe_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&recipe_text)),
            })
            .to_string(),
        ))
    }
    fn side_effects_missing(
        &self,
        entry: &Path,
        _params: &toml::Table,
        _recipe: &RecipeInfo,
    ) -> Option<String> {
        written_folder_problem(entry)
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = SaveParams::from_table(params)?;
        merge::parse_size(&p.max_shard_size).map_err(|e| ParamError {
            key: Some("max_shard_size".into()),
            message: format!("{e:#}"),
        })?;
        SaveParams::canonical(params)
    }
    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Saved
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = SaveParams::from_table(ctx.params)?;
        let output_dir = resolved_output_dir(&p, ctx.recipe);
        let mut protected = vec![ctx.recipe.path.clone(), ctx.out_dir.to_path_buf()];
        protected.extend(std::env::current_dir().ok());
        let adapter_dir = ctx.input("adapter")?.dir.clone();
        let model = model_dir::open(&ctx.input("model")?.dir)?
            .manifest()
            .clone();
        let opts = SaveOptions {
            output_dir,
            overwrite: p.overwrite,
            merge: p.merge,
            model_card: p.model_card,
            max_shard_bytes: merge::parse_size(&p.max_shard_size)?,
            recipe_name: ctx.recipe.name.clone(),
            recipe_path: Some(ctx.recipe.path.clone()),
            hub_repo: None,
            protected,
        };
        let report = save(&adapter_dir, &model, ctx.out_dir, &opts, &|line| {
            ctx.progress.println(line)
        })?;
        ctx.progress.println(format!(
            "op `{}`: adapter saved to {}",
            ctx.name,
            report.output_dir.display()
        ));
        Ok(())
    }
}

fn resolved_output_dir(p: &SaveParams, recipe: &RecipeInfo) -> PathBuf {
    let dir = match &p.output_dir {
        Some(d) => recipe.resolve(d),
        None => recipe.output_dir.clone(),
    };
    normalize(&dir)
}
