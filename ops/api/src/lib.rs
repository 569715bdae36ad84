//! The op API: what an op is ([`Op`]: ports, params, output type, `run`), what it gets
//! ([`RunCtx`]), the artifacts that flow between ops, and the registry the runner schedules from.
//! The runner's pipeline machinery (`runner-core`) needs only this crate and `dist`; the ops
//! themselves live in the `ops` crate.

pub mod artifact;
pub mod atomic_file;
pub mod params;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use artifact::{Artifact, ArtifactType};
pub use params::{OpParams, ParamDefault, ParamError, ParamSpec};

/// Marks an error (as `anyhow` context) that is no fault of the recipe, e.g. the Hub unreachable
/// while `Op::fingerprint` resolves a revision: the runner exits 1 (a run-time failure), not 2.
#[derive(Debug)]
pub struct RunTimeFailure(pub String);

impl std::fmt::Display for RunTimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An input port of an op.
#[derive(Debug, Clone, PartialEq)]
pub struct Port {
    pub name: &'static str,
    /// The artifact types this port accepts.
    pub accepts: &'static [ArtifactType],
    pub required: bool,
    pub doc: &'static str,
}

/// Where an op's work runs: CPU ops may run concurrently; GPU ops run one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Gpu,
}

/// What the runner knows about the recipe, handed to every op.
#[derive(Debug, Clone)]
pub struct RecipeInfo {
    pub name: String,
    pub seed: u64,
    /// The recipe file; relative paths in params resolve against its folder.
    pub path: PathBuf,
    /// `[recipe] output_dir`, resolved against the recipe's folder.
    pub output_dir: PathBuf,
    /// The environment variables ops read (the Hugging Face ones: `HF_HUB_CACHE`, `HF_TOKEN`,
    /// `HF_HUB_OFFLINE`, ...), both when they run and in `Op::fingerprint`.
    pub env: Environment,
}

/// Environment variables as ops read them: the process's, with overrides on top. The runner
/// passes the process's; tests pass overrides (an offline fixture Hub cache, a token) instead of
/// changing the process environment, which other threads may be reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// name -> value, or `None` for a variable that reads as unset whatever the process has.
    overrides: BTreeMap<String, Option<String>>,
}

impl Environment {
    /// The process environment, unchanged.
    pub fn process() -> Self {
        Self::default()
    }

    /// `name` reads as `value`.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.overrides.insert(name.to_string(), Some(value.into()));
        self
    }

    /// `name` reads as unset.
    pub fn without(mut self, name: &str) -> Self {
        self.overrides.insert(name.to_string(), None);
        self
    }

    /// The value of `name` (`None` when unset or not valid UTF-8).
    pub fn var(&self, name: &str) -> Option<String> {
        match self.overrides.get(name) {
            Some(value) => value.clone(),
            None => std::env::var(name).ok(),
        }
    }
}

impl RecipeInfo {
    /// Resolves a path written in the recipe against the recipe's folder.
    pub fn resolve(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        if p.is_absolute() {
            return p.to_path_buf();
        }
        self.path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Progress reporting for a running op (the runner draws it with indicatif).
pub trait Progress: Send + Sync {
    /// Sets the total amount of work (units are the op's: rows, bytes, steps).
    fn set_length(&self, len: u64);
    fn inc(&self, delta: u64);
    /// A short status line (e.g. `loss 1.234`).
    fn message(&self, msg: String);
    /// A line printed above the progress bars (warnings, skipped-row reports, metrics).
    fn println(&self, line: String);
}

/// Progress that goes nowhere (library use and tests).
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _: u64) {}
    fn inc(&self, _: u64) {}
    fn message(&self, _: String) {}
    fn println(&self, _: String) {}
}

/// Everything an op's `run` gets.
pub struct RunCtx<'a> {
    /// The op's name in the recipe (`[ops.NAME]`), for messages.
    pub name: &'a str,
    /// The canonical params (defaults filled in), as checked by [`Op::check`].
    pub params: &'a toml::Table,
    /// The artifacts connected to the op's input ports, by port name.
    pub inputs: &'a BTreeMap<String, Artifact>,
    /// An empty directory: the op writes its whole output here. The runner publishes it into
    /// the cache (atomically) only when `run` returns `Ok`.
    pub out_dir: &'a Path,
    pub recipe: &'a RecipeInfo,
    pub progress: &'a dyn Progress,
}

impl RunCtx<'_> {
    /// The artifact on a required port (the graph checker guarantees it is connected).
    pub fn input(&self, port: &str) -> anyhow::Result<&Artifact> {
        self.inputs
            .get(port)
            .ok_or_else(|| anyhow::anyhow!("op `{}`: input `{port}` is not connected", self.name))
    }

    pub fn optional_input(&self, port: &str) -> Option<&Artifact> {
        self.inputs.get(port)
    }
}

/// An op kind. The runner's own are registered by `ops::builtin()`.
pub trait Op: Send + Sync {
    /// The name recipes use: `op = "<kind>"`.
    fn kind(&self) -> &'static str;
    /// One line for `runner ops`.
    fn doc(&self) -> &'static str;
    fn inputs(&self) -> Vec<Port>;
    fn params(&self) -> Vec<ParamSpec>;
    /// Bumped whenever a change to the op changes its output; part of every cache key.
    fn version(&self) -> u32;
    fn device(&self) -> Device {
        Device::Cpu
    }
    /// An op that every rank of a data-parallel run (under `mpirun`, see the `dist` crate) runs
    /// together, exchanging data as it goes (`lora-train`). Rank 0 decides whether it runs;
    /// every rank starts the collective ops in the same order; only rank 0's output is kept.
    /// Every other op runs on rank 0 alone, except the ones a collective op needs as input.
    fn collective(&self) -> bool {
        false
    }
    /// Validates params strictly and returns them canonical (defaults filled).
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError>;
    /// The type of the output, given valid params (e.g. `load` yields a dataset or a model).
    fn output(&self, params: &toml::Table) -> ArtifactType;
    /// Extra content the cache key must cover beyond params and inputs, e.g. a local file's
    /// size and modification time. Called at plan time; must be cheap.
    fn fingerprint(
        &self,
        _params: &toml::Table,
        _recipe: &RecipeInfo,
    ) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// `Some(reason)` when the op will not do anything with these params (e.g. `push` with
    /// `enabled = false`); `runner plan` shows it as skipped.
    fn skip_reason(&self, _params: &toml::Table) -> Option<String> {
        None
    }
    /// For an op that writes outside the cache (`save`'s output folder): `Some(reason)` when
    /// what its cached output `entry` recorded writing is no longer there as written, so the op
    /// runs again instead of being reused. Called at plan time on cached entries; must be cheap.
    fn side_effects_missing(
        &self,
        _entry: &Path,
        _params: &toml::Table,
        _recipe: &RecipeInfo,
    ) -> Option<String> {
        None
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()>;
}

/// Name → op.
#[derive(Clone, Default)]
pub struct Registry {
    ops: BTreeMap<&'static str, Arc<dyn Op>>,
}

impl Registry {
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn register(&mut self, op: Arc<dyn Op>) -> &mut Self {
        self.ops.insert(op.kind(), op);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Op>> {
        self.ops.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.keys().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Op>> {
        self.ops.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overrides win over the process environment in both directions; other names read the
    /// process's (PATH is set in every environment tests run in).
    #[test]
    fn environment_overrides_the_process_variables() {
        let path = std::env::var("PATH").expect("PATH is set");
        let env = Environment::process()
            .with("RUNNER_TEST_ONLY_VARIABLE", "x")
            .without("PATH");
        assert_eq!(env.var("RUNNER_TEST_ONLY_VARIABLE").as_deref(), Some("x"));
        assert_eq!(env.var("PATH"), None);
        assert_eq!(Environment::process().var("PATH"), Some(path));
        assert_eq!(
            Environment::process().var("RUNNER_TEST_ONLY_VARIABLE"),
            None
        );
    }
}
