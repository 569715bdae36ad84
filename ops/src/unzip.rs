//! Op `unzip`: extracts a dataset's zip archives into a `files` artifact, each `X.zip` into `X/`
//! (see [`crate::data::archive`] for the extraction and its safety checks); archives a Hub
//! dataset's snapshot lacks are downloaded first ([`crate::sources::locate_archives`]).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::data::archive::{extract_all, select_archives, Limits, FILES_MANIFEST};
use crate::data::dataset::DatasetManifest;
use crate::hub::cache::HubEnv;
use crate::hub::download::Hub;
use crate::params::{OpParams, ParamError, ParamSpec};
use crate::sources::locate_archives;
use crate::{op_params, ArtifactType, Op, Port, RunCtx};

op_params! {
    pub struct UnzipParams {
        /// Archives to extract: file names or globs over the dataset's files (default: every `*.zip`).
        archives: Option<Vec<String>> = None,
        /// Refuse to extract more than this many bytes in all (zip-bomb guard); default 200 GiB.
        max_total_bytes: u64 = 200 << 30,
        /// Refuse an archive whose entries declare more than this many times its own size, once they pass 16 MiB (zip-bomb guard: images barely compress; a deflate bomb reaches 1000).
        max_compression_ratio: f64 = 100.0,
    }
}

pub struct Unzip;

impl Op for Unzip {
    fn kind(&self) -> &'static str {
        "unzip"
    }

    fn doc(&self) -> &'static str {
        "Extract a dataset's zip archives (each X.zip into X/), in parallel, refusing unsafe entries and zip bombs"
    }

    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "archives",
            accepts: &[ArtifactType::Dataset],
            required: true,
            doc: "the dataset whose zip archives to extract",
        }]
    }

    fn params(&self) -> Vec<ParamSpec> {
        UnzipParams::specs()
    }

    fn version(&self) -> u32 {
        1
    }

    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        let p = UnzipParams::from_table(params)?;
        for pattern in p.archives.iter().flatten() {
            glob::Pattern::new(pattern).map_err(|e| ParamError {
                key: Some("archives".into()),
                message: format!("invalid pattern `{pattern}`: {e}"),
            })?;
        }
        if !(p.max_compression_ratio.is_finite() && p.max_compression_ratio >= 1.0) {
            return Err(ParamError {
                key: Some("max_compression_ratio".into()),
                message: format!(
                    "`max_compression_ratio` must be a finite number of at least 1, got {}",
                    p.max_compression_ratio
                ),
            });
        }
        UnzipParams::canonical(params)
    }

    fn output(&self, _params: &toml::Table) -> ArtifactType {
        ArtifactType::Files
    }

    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = UnzipParams::from_table(ctx.params)?;
        let dataset = DatasetManifest::read(&ctx.input("archives")?.dir)?;
        let names = select_archives(&dataset.files, p.archives.as_deref())?;
        let mut env = HubEnv::from_vars(|name| ctx.recipe.env.var(name));
        // A Hub dataset's root is `<hub cache>/datasets--…/snapshots/<sha>`: archives it lacks
        // come into the cache `load` used (its `cache_dir` or the environment's).
        if let (Some(_), Some(cache)) = (&dataset.repo_id, dataset.root.ancestors().nth(3)) {
            env.cache_dir = cache.to_path_buf();
        }
        let hub = Hub::new(env);
        let paths = locate_archives(&dataset, &names, &hub, ctx.progress)?;
        let archives: Vec<(String, PathBuf)> = names.into_iter().zip(paths).collect();
        let limits = Limits {
            max_total_bytes: p.max_total_bytes,
            max_compression_ratio: p.max_compression_ratio,
        };
        let manifest = extract_all(&archives, ctx.out_dir, &limits, ctx.progress)?;
        let path = ctx.out_dir.join(FILES_MANIFEST);
        std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::archive::{ArchiveSummary, FilesManifest};
    use crate::load::tests::zip_bytes;
    use crate::NoProgress;

    #[test]
    fn op_extracts_a_local_dataset_and_writes_files_json() {
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("A.zip"), zip_bytes(&[("t/1.jpg", b"one")])).unwrap();
        std::fs::write(data.path().join("B.zip"), zip_bytes(&[("u/2.jpg", b"two")])).unwrap();
        let input = tempfile::tempdir().unwrap();
        DatasetManifest {
            repo_id: None,
            revision: None,
            root: data.path().to_path_buf(),
            split: None,
            data_files: vec![],
            files: vec!["A.zip".into(), "B.zip".into(), "x.parquet".into()],
        }
        .write(input.path())
        .unwrap();
        let inputs = std::collections::BTreeMap::from([(
            "archives".to_string(),
            crate::Artifact {
                ty: ArtifactType::Dataset,
                dir: input.path().to_path_buf(),
                key: "k".into(),
            },
        )]);
        let params = Unzip
            .check(&"archives = [\"B.zip\"]".parse().unwrap())
            .unwrap();
        assert_eq!(
            params.get("max_total_bytes").and_then(|v| v.as_integer()),
            Some(200 << 30)
        );
        let out = tempfile::tempdir().unwrap();
        let recipe = crate::RecipeInfo {
            name: "r".into(),
            seed: 0,
            path: "r.toml".into(),
            output_dir: "o".into(),
            env: crate::Environment::process(),
        };
        Unzip
            .run(&RunCtx {
                name: "images",
                params: &params,
                inputs: &inputs,
                out_dir: out.path(),
                recipe: &recipe,
                progress: &NoProgress,
            })
            .unwrap();
        // Only the selected archive is extracted, beside the listing.
        let mut top: Vec<String> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(top, ["B", "files.json"]);
        assert_eq!(std::fs::read(out.path().join("B/u/2.jpg")).unwrap(), b"two");
        let listing = FilesManifest::read(out.path()).unwrap();
        assert_eq!(
            listing.archives,
            [ArchiveSummary {
                archive: "B.zip".into(),
                dir: "B".into(),
                entries: 1,
                files: 1,
                bytes: 3
            }]
        );
    }
}
