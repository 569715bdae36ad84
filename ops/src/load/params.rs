//! `load`'s params and what they ask for: one source (a Hub dataset, model or adapter, or a
//! local one), checked against the params that apply only to some sources.

use anyhow::Result;

use crate::data::data_files::DataFilesSpec;
use crate::data::holdout::Holdout;
use crate::hub::cache::HubEnv;
use crate::params::ParamError;
use crate::sources::DatasetRequest;
use crate::{op_params, RecipeInfo};

op_params! {
    pub struct LoadParams {
        /// Hub dataset `org/name`. Exactly one of `dataset`, `model`, `path`.
        dataset: Option<String> = None,
        /// Hub model `org/name`: config.json, safetensors (single or sharded), tokenizer,
        /// chat template, processor and generation configs — whatever the repo has.
        model: Option<String> = None,
        /// Local file or folder (relative to the recipe); a dataset unless `repo_type` says otherwise.
        path: Option<String> = None,
        /// What `path` holds: "dataset" (default), "model", or "adapter" (a PEFT LoRA folder: adapter_config.json + adapter_model.safetensors). With `model = "org/name"`, "adapter" loads a Hub adapter repo.
        repo_type: Option<String> = None,
        /// Branch, tag or commit sha of a Hub repo.
        revision: String = "main".to_string(),
        /// Dataset split (default: `train` when the dataset has one, else its only split).
        split: Option<String> = None,
        /// Dataset card config (`name` of `datasets.load_dataset`).
        config: Option<String> = None,
        /// Data files: a glob, a list of globs (read for the requested split), or a table
        /// split → glob(s). Overrides the dataset card and the default file-name rules.
        data_files: Option<toml::Value> = None,
        /// Hugging Face cache folder for a Hub `dataset`/`model` (relative to the recipe), instead of HF_HUB_CACHE / HF_HOME: `cache_dir` of `from_pretrained` and `load_dataset`.
        cache_dir: Option<String> = None,
        /// Never use the network for a Hub `dataset`/`model`, only the cache (`local_files_only` of `from_pretrained`; HF_HUB_OFFLINE=1 for this op alone).
        local_files_only: bool = false,
        /// Keep only one side of a deterministic split: `{ fraction = 0.05, seed = 0, take = "train" | "holdout" }`. A row is held out when sha256(seed ‖ the row's content) falls in the lowest `fraction` of the hash range, so the split ignores row order and duplicates stay together; "train" and "holdout" partition the dataset.
        holdout: Option<toml::Value> = None,
    }
}

/// What a `load` loads, from its params ([`LoadParams::source`], which checks that the params
/// agree with it).
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    HubDataset(String),
    HubModel(String),
    LocalDataset(String),
    LocalModel(String),
    HubAdapter(String),
    LocalAdapter(String),
}

impl LoadParams {
    pub fn source(&self) -> Result<Source, ParamError> {
        let given: Vec<&str> = [
            self.dataset.as_ref().map(|_| "dataset"),
            self.model.as_ref().map(|_| "model"),
            self.path.as_ref().map(|_| "path"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() != 1 {
            return Err(ParamError {
                key: given.get(1).map(|s| s.to_string()),
                message: format!(
                    "set exactly one of `dataset`, `model`, `path` (got {})",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(", ")
                    }
                ),
            });
        }
        let repo_type = self.repo_type.as_deref();
        if let Some(t) = repo_type {
            if !["dataset", "model", "adapter"].contains(&t) {
                return Err(ParamError {
                    key: Some("repo_type".into()),
                    message: format!(
                        "`repo_type` must be \"dataset\", \"model\" or \"adapter\", got \"{t}\""
                    ),
                });
            }
            let hub_adapter = self.model.is_some() && t == "adapter";
            if self.path.is_none() && !hub_adapter {
                let implied = if self.dataset.is_some() {
                    "dataset"
                } else {
                    "model"
                };
                if t != implied {
                    return Err(ParamError {
                        key: Some("repo_type".into()),
                        message: format!("`repo_type = \"{t}\"` contradicts `{implied} = ...`"),
                    });
                }
            }
        }
        let source = match (&self.dataset, &self.model, &self.path) {
            (Some(d), _, _) => Source::HubDataset(d.clone()),
            (_, Some(m), _) if repo_type == Some("adapter") => Source::HubAdapter(m.clone()),
            (_, Some(m), _) => Source::HubModel(m.clone()),
            (_, _, Some(p)) if repo_type == Some("model") => Source::LocalModel(p.clone()),
            (_, _, Some(p)) if repo_type == Some("adapter") => Source::LocalAdapter(p.clone()),
            (_, _, Some(p)) => Source::LocalDataset(p.clone()),
            _ => unreachable!(),
        };
        if !matches!(source, Source::HubDataset(_) | Source::LocalDataset(_)) {
            for (key, set) in [
                ("split", self.split.is_some()),
                ("config", self.config.is_some()),
                ("data_files", self.data_files.is_some()),
                ("holdout", self.holdout.is_some()),
            ] {
                if set {
                    return Err(ParamError {
                        key: Some(key.into()),
                        message: format!("`{key}` applies to datasets, not models or adapters"),
                    });
                }
            }
        }
        if matches!(source, Source::LocalDataset(_) | Source::LocalModel(_)) {
            for (key, set) in [
                ("cache_dir", self.cache_dir.is_some()),
                ("local_files_only", self.local_files_only),
            ] {
                if set {
                    return Err(ParamError {
                        key: Some(key.into()),
                        message: format!(
                            "`{key}` applies to Hub datasets and models (`dataset`, `model`), not to `path`"
                        ),
                    });
                }
            }
        }
        if let Some(v) = &self.data_files {
            DataFilesSpec::from_toml(v).map_err(|e| ParamError {
                key: Some("data_files".into()),
                message: format!("`data_files`: {e:#}"),
            })?;
        }
        self.holdout_spec().map_err(|e| ParamError {
            key: Some("holdout".into()),
            message: format!("{e:#}"),
        })?;
        Ok(source)
    }

    /// The recipe's Hugging Face environment with this op's `cache_dir` and
    /// `local_files_only` on top.
    pub fn hub_env(&self, recipe: &RecipeInfo) -> HubEnv {
        let mut env = HubEnv::from_vars(|name| recipe.env.var(name));
        if let Some(dir) = &self.cache_dir {
            env.cache_dir = recipe.resolve(dir);
        }
        env.offline |= self.local_files_only;
        env
    }

    pub fn holdout_spec(&self) -> Result<Option<Holdout>> {
        self.holdout.as_ref().map(Holdout::from_toml).transpose()
    }

    /// The rows of a dataset these params ask for.
    pub fn dataset_request(&self) -> Result<DatasetRequest> {
        Ok(DatasetRequest {
            revision: self.revision.clone(),
            config: self.config.clone(),
            split: self.split.clone(),
            data_files: self.data_files_spec()?,
        })
    }

    pub fn data_files_spec(&self) -> Result<Option<DataFilesSpec>> {
        self.data_files
            .as_ref()
            .map(DataFilesSpec::from_toml)
            .transpose()
    }
}
