//! Runs ops as the runner does (params checked, a fresh output folder, `run`), in a temporary
//! folder, offline against the fixture Hub cache. The Hub variables reach the ops through
//! `RecipeInfo::env`, so no test changes the process environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use ops::{Artifact, Environment, Op, Progress, RecipeInfo, RunCtx};

use super::fixtures;

/// Progress that keeps the lines an op prints (skip reports, warnings).
#[derive(Default)]
pub struct Captured(Mutex<Vec<String>>);

impl Progress for Captured {
    fn set_length(&self, _: u64) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: String) {}
    fn println(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }
}

pub struct OpHarness {
    _tmp: tempfile::TempDir,
    /// Each op writes into `root/<name>`.
    pub root: PathBuf,
    pub recipe: RecipeInfo,
}

impl OpHarness {
    /// A harness whose recipe has `seed`; Hub reads go to the fixture cache, offline.
    pub fn new(seed: u64) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let env = Environment::process()
            .with(
                "HF_HUB_CACHE",
                fixtures().join("hf-cache/hub").to_string_lossy(),
            )
            .with("HF_HUB_OFFLINE", "1");
        Self {
            recipe: RecipeInfo {
                name: "t".into(),
                seed,
                path: root.join("r.toml"),
                output_dir: root.join("out"),
                env,
            },
            _tmp: tmp,
            root,
        }
    }

    /// Runs `op` with `params` (TOML) into a fresh folder `name`; returns its artifact and the
    /// lines it printed.
    pub fn try_run_capturing(
        &self,
        op: &dyn Op,
        name: &str,
        params: &str,
        inputs: &[(&str, &Artifact)],
    ) -> anyhow::Result<(Artifact, Vec<String>)> {
        let table: toml::Table = params.parse().unwrap();
        let canonical = op.check(&table).map_err(|e| anyhow::anyhow!("{e}"))?;
        let out = self.root.join(name);
        std::fs::create_dir_all(&out).unwrap();
        let inputs: BTreeMap<String, Artifact> = inputs
            .iter()
            .map(|(k, a)| (k.to_string(), (*a).clone()))
            .collect();
        let progress = Captured::default();
        op.run(&RunCtx {
            name,
            params: &canonical,
            inputs: &inputs,
            out_dir: &out,
            recipe: &self.recipe,
            progress: &progress,
        })?;
        Ok((
            Artifact {
                ty: op.output(&canonical),
                dir: out,
                key: name.into(),
            },
            progress.0.into_inner().unwrap(),
        ))
    }

    pub fn try_run(
        &self,
        op: &dyn Op,
        name: &str,
        params: &str,
        inputs: &[(&str, &Artifact)],
    ) -> anyhow::Result<Artifact> {
        Ok(self.try_run_capturing(op, name, params, inputs)?.0)
    }

    /// [`Self::try_run`], panicking with the op's name and error.
    pub fn run(
        &self,
        op: &dyn Op,
        name: &str,
        params: &str,
        inputs: &[(&str, &Artifact)],
    ) -> Artifact {
        self.try_run(op, name, params, inputs)
            .unwrap_or_else(|e| panic!("op {name}: {e:#}"))
    }
}
