//! Op `load`: a dataset, a model or a PEFT adapter from the Hub (through the standard cache) or a
//! local path, found by [`crate::sources`]. Writes `dataset.json` or `model.json` (the manifests
//! of `data::dataset` and `data::model_dir`), or the adapter's two files; data files are never
//! copied.

mod params;

use anyhow::{bail, Result};

use crate::data::dataset::{Dataset, DatasetManifest, KeptRows};
use crate::hub::cache::RepoType;
use crate::hub::download::Hub;
use crate::model::peft::import_adapter_folder;
use crate::params::{OpParams, ParamError, ParamSpec};
use crate::sources::{
    load_hub_adapter, load_hub_dataset, load_hub_model, load_local_dataset, load_local_model,
    local_fingerprint,
};
use crate::{ArtifactType, Op, Port, RecipeInfo, RunCtx};
pub use params::{LoadParams, Source};

pub struct Load;

impl Op for Load {
    fn kind(&self) -> &'static str {
        "load"
    }

    fn doc(&self) -> &'static str {
        "Load a dataset or model from the Hub (HF cache reused; HF_HUB_OFFLINE honoured) or a local path"
    }

    fn inputs(&self) -> Vec<Port> {
        vec![]
    }

    fn params(&self) -> Vec<ParamSpec> {
        LoadParams::specs()
    }

    fn version(&self) -> u32 {
        1
    }

    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        LoadParams::from_table(params)?.source()?;
        LoadParams::canonical(params)
    }

    fn output(&self, params: &toml::Table) -> ArtifactType {
        let repo_type = params.get("repo_type").and_then(|v| v.as_str());
        if repo_type == Some("adapter") {
            return ArtifactType::Adapter;
        }
        if params.contains_key("model") || repo_type == Some("model") {
            ArtifactType::Model
        } else {
            ArtifactType::Dataset
        }
    }

    /// The resolved commit of a Hub repo (so a moved branch invalidates the cache), or the
    /// size and modification time of every local file.
    fn fingerprint(&self, params: &toml::Table, recipe: &RecipeInfo) -> Result<Option<String>> {
        let p = LoadParams::from_table(params)?;
        let hub = || Hub::new(p.hub_env(recipe));
        Ok(Some(match p.source()? {
            Source::HubDataset(id) => format!(
                "commit {}",
                hub().commit_sha(&id, RepoType::Dataset, &p.revision)?
            ),
            Source::HubModel(id) | Source::HubAdapter(id) => format!(
                "commit {}",
                hub().commit_sha(&id, RepoType::Model, &p.revision)?
            ),
            Source::LocalDataset(path) | Source::LocalModel(path) | Source::LocalAdapter(path) => {
                local_fingerprint(&recipe.resolve(path))?
            }
        }))
    }

    fn run(&self, ctx: &RunCtx) -> Result<()> {
        let p = LoadParams::from_table(ctx.params)?;
        let env = p.hub_env(ctx.recipe);
        match p.source()? {
            Source::HubDataset(id) => {
                let manifest =
                    load_hub_dataset(&Hub::new(env), &id, &p.dataset_request()?, ctx.progress)?;
                finish_dataset(manifest, ctx)
            }
            Source::LocalDataset(path) => {
                let manifest =
                    load_local_dataset(&ctx.recipe.resolve(path), &p.dataset_request()?)?;
                finish_dataset(manifest, ctx)
            }
            Source::HubModel(id) => {
                load_hub_model(&Hub::new(env), &id, &p.revision, ctx.progress)?.write(ctx.out_dir)
            }
            Source::LocalModel(path) => {
                load_local_model(&ctx.recipe.resolve(path))?.write(ctx.out_dir)
            }
            Source::LocalAdapter(path) => {
                import_adapter_folder(&ctx.recipe.resolve(path), ctx.out_dir)
            }
            Source::HubAdapter(id) => {
                load_hub_adapter(&Hub::new(env), &id, &p.revision, ctx.out_dir, ctx.progress)
            }
        }
    }
}

/// Checks that the data files open (footers, JSON) before publishing, applies `holdout`, and
/// says how many rows.
fn finish_dataset(manifest: DatasetManifest, ctx: &RunCtx) -> Result<()> {
    let dataset = Dataset::from_manifest(manifest.clone())?;
    let p = LoadParams::from_table(ctx.params)?;
    let mut kept = String::new();
    if let Some(holdout) = p.holdout_spec()? {
        let rows = holdout.select(&dataset)?;
        kept = format!("{} of ", rows.len());
        if rows.is_empty() {
            bail!(
                "op `{}`: `holdout` keeps none of the {} rows (take = {:?}, fraction {}); \
                 raise `fraction` or use more rows",
                ctx.name,
                dataset.len(),
                holdout.take,
                holdout.fraction
            );
        }
        KeptRows { holdout, rows }.write(ctx.out_dir)?;
    }
    ctx.progress.println(format!(
        "{}: {kept}{} rows from {} data file(s){}",
        ctx.name,
        dataset.len(),
        manifest.data_files.len(),
        manifest
            .split
            .as_ref()
            .map(|s| format!(", split `{s}`"))
            .unwrap_or_default()
    ));
    manifest.write(ctx.out_dir)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    use sha2::{Digest, Sha256};

    use crate::data::model_dir;
    use crate::sources::read_json;
    use crate::Progress;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::Duration;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{Field, Schema};
    use parquet::arrow::ArrowWriter;

    use crate::data::archive::{extract_all, select_archives, Limits};
    use crate::data::dataset;
    use crate::data::model_dir::ModelDir;
    use crate::hub::cache::HubEnv;
    use crate::hub::download::RetryPolicy;
    use crate::hub::test_server::{repo_reply, serve, Response};
    use crate::sources::locate_archives;
    use crate::{Artifact, NoProgress};

    const SHA: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcd";

    /// Puts a file into a Hub cache the way huggingface_hub lays it out.
    fn put(cache: &Path, repo_folder: &str, path: &str, bytes: &[u8]) {
        let repo = cache.join(repo_folder);
        let etag = hex::encode(Sha256::digest(bytes));
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs").join(&etag), bytes).unwrap();
        let pointer = repo.join("snapshots").join(SHA).join(path);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        let ups = "../".repeat(1 + path.split('/').count());
        std::os::unix::fs::symlink(format!("{ups}blobs/{etag}"), &pointer).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), SHA).unwrap();
    }

    /// An MMIU-shaped all.parquet: `question`, `input_image_path` list<string>.
    fn mmiu_parquet(rows: &[(&str, &[&str])]) -> Vec<u8> {
        let questions: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)));
        let mut paths = ListBuilder::new(StringBuilder::new());
        for (_, ps) in rows {
            for p in *ps {
                paths.values().append_value(p);
            }
            paths.append(true);
        }
        let paths: ArrayRef = Arc::new(paths.finish());
        let schema = Arc::new(Schema::new(vec![
            Field::new("question", questions.data_type().clone(), false),
            Field::new("input_image_path", paths.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![questions, paths]).unwrap();
        let mut out = Vec::new();
        let mut w = ArrowWriter::try_new(&mut out, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        out
    }

    /// A zip archive of `entries` (name, bytes), in memory.
    pub(crate) fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data) in entries {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    fn params(toml_text: &str) -> LoadParams {
        LoadParams::from_table(&toml_text.parse().unwrap()).unwrap()
    }

    const CARD: &[u8] = b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: all.parquet\n---\n";

    #[test]
    fn mmiu_shaped_hub_dataset_offline_then_unzip() {
        let cache = tempfile::tempdir().unwrap();
        let folder = "datasets--FanqingM--MMIU-Benchmark";
        put(cache.path(), folder, "README.md", CARD);
        put(
            cache.path(),
            folder,
            "all.parquet",
            &mmiu_parquet(&[
                (
                    "q0",
                    &[
                        "./Low-level-semantic/blink/b_0_0.jpg",
                        "./Low-level-semantic/blink/b_0_1.jpg",
                    ],
                ),
                ("q1", &[]),
            ]),
        );
        put(
            cache.path(),
            folder,
            "Low-level-semantic.zip",
            &zip_bytes(&[("blink/b_0_0.jpg", b"jpg0"), ("blink/b_0_1.jpg", b"jpg1")]),
        );
        let hub = Hub::new(HubEnv::offline_at(cache.path()));

        let manifest = load_hub_dataset(
            &hub,
            "FanqingM/MMIU-Benchmark",
            &params(r#"dataset = "FanqingM/MMIU-Benchmark""#)
                .dataset_request()
                .unwrap(),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(
            manifest.split.as_deref(),
            Some("test"),
            "the card's only split"
        );
        assert_eq!(manifest.revision.as_deref(), Some(SHA));
        assert_eq!(manifest.data_files, ["all.parquet"]);
        assert_eq!(
            manifest.files,
            ["Low-level-semantic.zip", "README.md", "all.parquet"]
        );
        assert_eq!(
            manifest.root,
            cache.path().join(folder).join("snapshots").join(SHA)
        );

        let out = tempfile::tempdir().unwrap();
        manifest.write(out.path()).unwrap();
        let ds = dataset::open(out.path()).unwrap();
        assert_eq!(ds.len(), 2);
        let row = ds.row(0).unwrap();
        let first_image = row.field("input_image_path").unwrap().as_list().unwrap()[0]
            .as_str()
            .unwrap()
            .to_string();

        // unzip: the archive comes from the same cache; `./X/...` paths resolve in its output.
        let names = select_archives(&manifest.files, None).unwrap();
        let paths = locate_archives(&manifest, &names, &hub, &NoProgress).unwrap();
        let extracted = tempfile::tempdir().unwrap();
        let listing = extract_all(
            &names.into_iter().zip(paths).collect::<Vec<_>>(),
            extracted.path(),
            &Limits {
                max_total_bytes: 1 << 20,
                max_compression_ratio: 100.0,
            },
            &NoProgress,
        )
        .unwrap();
        assert_eq!(listing.archives[0].files, 2);
        assert_eq!(
            std::fs::read(extracted.path().join(first_image.trim_start_matches("./"))).unwrap(),
            b"jpg0"
        );

        let err = format!(
            "{:#}",
            load_hub_dataset(
                &hub,
                "FanqingM/MMIU-Benchmark",
                &params("dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"train\"")
                    .dataset_request()
                    .unwrap(),
                &NoProgress
            )
            .unwrap_err()
        );
        assert!(
            err.contains("split `train` not found") && err.contains("`test`"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load_hub_dataset(
                &hub,
                "org/absent",
                &params(r#"dataset = "org/absent""#)
                    .dataset_request()
                    .unwrap(),
                &NoProgress
            )
            .unwrap_err()
        );
        assert!(
            err.contains("org/absent") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
    }

    #[test]
    fn hub_model_downloads_only_model_files() {
        let index = br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        let files: Vec<(&'static str, &'static [u8])> = vec![
            ("config.json", b"{\"model_type\": \"gemma3\"}"),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", b"shard1"),
            ("model-00002-of-00002.safetensors", b"shard2"),
            ("tokenizer.json", b"{}"),
            ("chat_template.jinja", b"{{ x }}"),
            ("pytorch_model.bin", b"pickle"),
            ("original/consolidated.safetensors", b"dup"),
        ];
        let server = serve(move |req, _| {
            repo_reply(req, "models", "org/m", SHA, &files)
                .unwrap_or_else(|| Response::new(404, ""))
        });
        let cache = tempfile::tempdir().unwrap();
        let hub = Hub::new(HubEnv {
            cache_dir: cache.path().to_path_buf(),
            endpoint: server.url.clone(),
            token: None,
            token_source: None,
            hf_home: cache.path().to_path_buf(),
            token_error: None,
            offline: false,
        })
        .with_retry(RetryPolicy {
            attempts: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        });
        let manifest = load_hub_model(&hub, "org/m", "main", &NoProgress).unwrap();
        assert_eq!(
            manifest.files,
            [
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "chat_template.jinja",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let fetched: Vec<String> = server
            .paths()
            .into_iter()
            .filter(|p| p.contains("/resolve/"))
            .collect();
        assert_eq!(fetched.len(), 6, "{fetched:?}");
        assert!(fetched
            .iter()
            .all(|p| !p.contains(".bin") && !p.contains("original")));
        let out = tempfile::tempdir().unwrap();
        manifest.write(out.path()).unwrap();
        let model = model_dir::open(out.path()).unwrap();
        assert_eq!(model.revision(), Some(SHA));
        let shards = model.safetensors().unwrap();
        assert_eq!(std::fs::read(&shards[1]).unwrap(), b"shard2");
        assert_eq!(model.config().unwrap()["model_type"], "gemma3");
    }

    struct Captured(std::sync::Mutex<Vec<String>>);
    impl Progress for Captured {
        fn set_length(&self, _: u64) {}
        fn inc(&self, _: u64) {}
        fn message(&self, _: String) {}
        fn println(&self, line: String) {
            self.0.lock().unwrap().push(line);
        }
    }

    #[test]
    fn local_folder_through_the_op() {
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("data")).unwrap();
        std::fs::write(
            data.path().join("data/train-00000-of-00001.jsonl"),
            "{\"q\": \"a\"}\n{\"q\": \"b\"}\n",
        )
        .unwrap();
        std::fs::write(
            data.path().join("data/test-00000-of-00001.jsonl"),
            "{\"q\": \"c\"}\n",
        )
        .unwrap();
        let recipe_dir = tempfile::tempdir().unwrap();
        let recipe = RecipeInfo {
            name: "t".into(),
            seed: 0,
            path: recipe_dir.path().join("r.toml"),
            output_dir: recipe_dir.path().join("out"),
            env: crate::Environment::process(),
        };
        let op = Load;
        let table: toml::Table = format!("path = \"{}\"\nsplit = \"test\"", data.path().display())
            .parse()
            .unwrap();
        let canonical = op.check(&table).unwrap();
        assert_eq!(
            canonical.get("revision").and_then(|v| v.as_str()),
            Some("main")
        );
        assert_eq!(op.output(&canonical), ArtifactType::Dataset);
        let fp1 = op.fingerprint(&canonical, &recipe).unwrap().unwrap();
        let out = tempfile::tempdir().unwrap();
        let inputs = BTreeMap::<String, Artifact>::new();
        let progress = Captured(Default::default());
        op.run(&RunCtx {
            name: "raw",
            params: &canonical,
            inputs: &inputs,
            out_dir: out.path(),
            recipe: &recipe,
            progress: &progress,
        })
        .unwrap();
        let ds = dataset::open(out.path()).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.row(0).unwrap().get("q").unwrap().as_str(), Some("c"));
        assert!(
            progress.0.lock().unwrap()[0].contains("1 rows"),
            "{:?}",
            progress.0.lock().unwrap()
        );

        // The fingerprint follows the data.
        std::fs::write(
            data.path().join("data/test-00000-of-00001.jsonl"),
            "{\"q\": \"c\"}\n{\"q\": \"d\"}\n",
        )
        .unwrap();
        assert_ne!(op.fingerprint(&canonical, &recipe).unwrap().unwrap(), fp1);
    }

    #[test]
    fn param_checks() {
        let op = Load;
        let check = |s: &str| op.check(&s.parse::<toml::Table>().unwrap());
        let err = check("dataset = \"a/b\"\nmodel = \"c/d\"").unwrap_err();
        assert!(err.message.contains("exactly one"), "{}", err.message);
        assert!(check("").unwrap_err().message.contains("got none"));
        let err = check("model = \"a/b\"\nsplit = \"test\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("split"));
        let err = check("path = \"x\"\nrepo_type = \"space\"").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("repo_type"));
        let err = check("dataset = \"a/b\"\ndata_files = 3").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("data_files"));
        let model = check("path = \"m\"\nrepo_type = \"model\"").unwrap();
        assert_eq!(op.output(&model), ArtifactType::Model);
        assert_eq!(
            op.output(&check("model = \"a/b\"").unwrap()),
            ArtifactType::Model
        );
        assert_eq!(
            op.output(
                &check("dataset = \"a/b\"\ndata_files = { test = \"x/*.parquet\" }").unwrap()
            ),
            ArtifactType::Dataset
        );
    }

    fn fixture_hub() -> Hub {
        let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf-cache/hub");
        Hub::new(HubEnv::offline_at(cache))
    }

    fn fixture_json(name: &str) -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/golden")
            .join(name);
        read_json(&path).unwrap()
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// The fixture cache (made by Python's datasets/huggingface_hub), HF_HUB_OFFLINE: llava's
    /// images read back byte-exact (sha256 from golden/assets.json), and rows in the order
    /// the golden templated texts were made from.
    #[test]
    fn fixture_llava_offline() {
        let hub = fixture_hub();
        let assets = fixture_json("assets.json");
        let templated = fixture_json("templated.json");
        for (split, rows) in [("train", 6), ("test", 2)] {
            let p = params(&format!(
                "dataset = \"HuggingFaceH4/llava-instruct-mix-vsft\"\nsplit = \"{split}\""
            ));
            let manifest = load_hub_dataset(
                &hub,
                "HuggingFaceH4/llava-instruct-mix-vsft",
                &p.dataset_request().unwrap(),
                &NoProgress,
            )
            .unwrap();
            assert_eq!(
                manifest.data_files,
                [format!("data/{split}-00000-of-00001.parquet")]
            );
            assert_eq!(
                manifest.revision.as_deref(),
                assets["repos"]["llava"]["commit"].as_str()
            );
            let ds = dataset::Dataset::from_manifest(manifest).unwrap();
            assert_eq!(ds.len(), rows);
            for image in assets["images"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["dataset"] == "llava" && i["split"] == split)
            {
                let row = ds.row(image["row"].as_u64().unwrap() as usize).unwrap();
                let images = row.field("images").unwrap().as_list().unwrap();
                let item = &images[image["index"].as_u64().unwrap() as usize];
                assert_eq!(item.get("path"), Some(&crate::data::value::Value::Null));
                assert_eq!(
                    sha256_hex(item.get("bytes").unwrap().as_bytes().unwrap()),
                    image["sha256"].as_str().unwrap()
                );
            }
            for golden in templated["llava"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["split"] == split)
            {
                let row = ds.row(golden["row"].as_u64().unwrap() as usize).unwrap();
                let messages = row.field("messages").unwrap().as_list().unwrap();
                for message in messages {
                    for item in message.get("content").unwrap().as_list().unwrap() {
                        if let Some(text) = item.get("text").and_then(|t| t.as_str()) {
                            assert!(
                                golden["text"].as_str().unwrap().contains(text.trim()),
                                "row {}: {text:?}",
                                row.index
                            );
                        }
                    }
                }
            }
        }
    }

    /// MMIU from the fixture cache: split `test` from the card, 6 rows with 4,2,3,2,2,3
    /// images, and every `input_image_path` present after unzip with the sha256 that
    /// golden/assets.json records.
    #[test]
    fn fixture_mmiu_offline_load_and_unzip() {
        let hub = fixture_hub();
        let assets = fixture_json("assets.json");
        let manifest = load_hub_dataset(
            &hub,
            "FanqingM/MMIU-Benchmark",
            &params("dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"test\"")
                .dataset_request()
                .unwrap(),
            &NoProgress,
        )
        .unwrap();
        let ds = dataset::Dataset::from_manifest(manifest.clone()).unwrap();
        let rows: Vec<_> = ds.rows().collect::<Result<_>>().unwrap();
        let counts: Vec<usize> = rows
            .iter()
            .map(|r| {
                r.field("input_image_path")
                    .unwrap()
                    .as_list()
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(counts, [4, 2, 3, 2, 2, 3]);
        assert!(rows[0]
            .field("context")
            .unwrap()
            .as_str()
            .unwrap()
            .ends_with('\n'));

        let names = select_archives(&manifest.files, None).unwrap();
        assert_eq!(
            names,
            [
                "2D-spatial.zip",
                "Discrete-temporal.zip",
                "Low-level-semantic.zip"
            ]
        );
        let paths = locate_archives(&manifest, &names, &hub, &NoProgress).unwrap();
        let out = tempfile::tempdir().unwrap();
        extract_all(
            &names.into_iter().zip(paths).collect::<Vec<_>>(),
            out.path(),
            &Limits {
                max_total_bytes: 1 << 30,
                max_compression_ratio: 100.0,
            },
            &NoProgress,
        )
        .unwrap();
        let mut checked = 0;
        for row in &rows {
            for (index, path) in row
                .field("input_image_path")
                .unwrap()
                .as_list()
                .unwrap()
                .iter()
                .enumerate()
            {
                let path = path.as_str().unwrap();
                let bytes = std::fs::read(out.path().join(path.trim_start_matches("./"))).unwrap();
                let asset = assets["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| {
                        a["dataset"] == "mmiu" && a["row"] == row.index && a["index"] == index
                    })
                    .unwrap();
                assert_eq!(asset["path"].as_str(), Some(path));
                assert_eq!(sha256_hex(&bytes), asset["sha256"].as_str().unwrap());
                checked += 1;
            }
        }
        assert_eq!(checked, 16);
    }

    #[test]
    fn fixture_models_offline() {
        let hub = fixture_hub();
        let manifest = load_hub_model(
            &hub,
            "runner-test/tiny-gemma-3-hub-layout",
            "main",
            &NoProgress,
        )
        .unwrap();
        assert!(manifest
            .files
            .contains(&"model.safetensors.index.json".to_string()));
        assert!(!manifest.files.contains(&"README.md".to_string()));
        let model = ModelDir::new(manifest);
        assert_eq!(model.safetensors().unwrap().len(), 3);
        assert!(
            model.file("tokenizer.json").is_some()
                && model.file("preprocessor_config.json").is_some()
        );
        let manifest =
            load_hub_model(&hub, "runner-test/tiny-gemma-3", "main", &NoProgress).unwrap();
        let model = ModelDir::new(manifest);
        assert!(model.file("chat_template.jinja").is_some());
        assert_eq!(model.config().unwrap()["model_type"], "gemma3");
        assert!(!model.safetensors().unwrap().is_empty());
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    /// The tiny model the PEFT fixture adapter (`golden/lora/adapter_step3`) was trained on.
    fn tiny_model_config() -> crate::model::ModelConfig {
        let dir = fixtures().join("hf-cache/hub/models--runner-test--tiny-gemma-3/snapshots");
        let snap = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        crate::model::ModelConfig::from_file(&snap.join("config.json")).unwrap()
    }

    /// `load` with `holdout` on a local JSON Lines file: the two takes partition the rows, the
    /// dataset artifact yields only its side (rows keep their global numbers), and the split
    /// follows the content when the file's rows are reordered.
    #[test]
    fn holdout_through_the_load_op() {
        let data = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (0..300)
            .map(|i| format!("{{\"q\": \"question {i}\"}}"))
            .collect();
        let file = data.path().join("rows.jsonl");
        let recipe = RecipeInfo {
            name: "t".into(),
            seed: 0,
            path: data.path().join("r.toml"),
            output_dir: data.path().join("out"),
            env: crate::Environment::process(),
        };
        let load = |take: &str| -> Vec<(usize, String)> {
            let table: toml::Table = format!(
                "path = \"{}\"\nholdout = {{ fraction = 0.1, seed = 5, take = \"{take}\" }}",
                file.display()
            )
            .parse()
            .unwrap();
            let params = Load.check(&table).unwrap();
            let out = tempfile::tempdir().unwrap();
            Load.run(&RunCtx {
                name: "raw",
                params: &params,
                inputs: &std::collections::BTreeMap::<String, Artifact>::new(),
                out_dir: out.path(),
                recipe: &recipe,
                progress: &NoProgress,
            })
            .unwrap();
            let ds = dataset::open(out.path()).unwrap();
            let rows: Vec<(usize, String)> = ds
                .rows()
                .map(|r| {
                    let r = r.unwrap();
                    (r.index, r.get("q").unwrap().as_str().unwrap().to_string())
                })
                .collect();
            assert_eq!(ds.len(), rows.len());
            rows
        };
        std::fs::write(&file, lines.join("\n")).unwrap();
        let train = load("train");
        let held = load("holdout");
        assert_eq!(train.len() + held.len(), 300);
        assert!((10..=55).contains(&held.len()), "{} held out", held.len());
        for (index, q) in held.iter().chain(&train) {
            assert_eq!(q, &format!("question {index}"));
        }
        let mut all: Vec<usize> = train.iter().chain(&held).map(|(i, _)| *i).collect();
        all.sort();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        // Reversed file: the same questions are held out, at other row numbers.
        let mut reversed = lines.clone();
        reversed.reverse();
        std::fs::write(&file, reversed.join("\n")).unwrap();
        let mut again: Vec<String> = load("holdout").into_iter().map(|(_, q)| q).collect();
        let mut before: Vec<String> = held.into_iter().map(|(_, q)| q).collect();
        again.sort();
        before.sort();
        assert_eq!(again, before);
        // Holdout is for datasets only.
        let err = Load
            .check(
                &"path = \"m\"\nrepo_type = \"model\"\nholdout = { fraction = 0.1, take = \"train\" }"
                    .parse::<toml::Table>()
                    .unwrap(),
            )
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("holdout"));
    }

    /// `load` with `repo_type = "adapter"`: a local folder and the same files as a Hub repo
    /// (offline, from a cache made here) give an `adapter` artifact with the two files.
    #[test]
    fn adapter_through_the_load_op() {
        use crate::hub::cache::HubEnv;
        use crate::model::peft::{check_against_base, ADAPTER_FILES};

        let src = fixtures().join("golden/lora/adapter_step3");
        let tmp = tempfile::tempdir().unwrap();
        let recipe = RecipeInfo {
            name: "t".into(),
            seed: 0,
            path: tmp.path().join("r.toml"),
            output_dir: tmp.path().join("out"),
            env: crate::Environment::process(),
        };
        let run = |toml_text: String| -> anyhow::Result<tempfile::TempDir> {
            let params = Load
                .check(&toml_text.parse::<toml::Table>().unwrap())
                .map_err(anyhow::Error::msg)?;
            assert_eq!(Load.output(&params), ArtifactType::Adapter);
            let out = tempfile::tempdir().unwrap();
            Load.run(&RunCtx {
                name: "adapter",
                params: &params,
                inputs: &std::collections::BTreeMap::<String, Artifact>::new(),
                out_dir: out.path(),
                recipe: &recipe,
                progress: &NoProgress,
            })?;
            Ok(out)
        };
        let out = run(format!(
            "path = \"{}\"\nrepo_type = \"adapter\"",
            src.display()
        ))
        .unwrap();
        check_against_base(out.path(), &tiny_model_config()).unwrap();
        let err = run(format!(
            "path = \"{}\"\nrepo_type = \"adapter\"",
            tmp.path().display()
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("not a PEFT LoRA adapter"),
            "{err:#}"
        );

        // A Hub adapter repo in an offline cache: models--me--tiny-adapter/snapshots/<sha>/.
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let repo = tmp.path().join("hub/models--me--tiny-adapter");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), sha).unwrap();
        let snap = repo.join("snapshots").join(sha);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ADAPTER_FILES {
            std::fs::copy(src.join(f), snap.join(f)).unwrap();
        }
        let hub = Hub::new(HubEnv::offline_at(tmp.path().join("hub")));
        let out = tempfile::tempdir().unwrap();
        load_hub_adapter(&hub, "me/tiny-adapter", "main", out.path(), &NoProgress).unwrap();
        let err = load_hub_adapter(&hub, "me/other", "main", out.path(), &NoProgress).unwrap_err();
        assert!(format!("{err:#}").contains("me/other"), "{err:#}");
        check_against_base(out.path(), &tiny_model_config()).unwrap();
    }
}
