//! Test-only ops, registered only in the CLI test binary. They exercise the runner (ports and
//! types, params, caching, concurrency, failure, skipping, fingerprints) without any real data.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ops::params::OpParams;
use ops::{
    op_params, ArtifactType, Device, Op, ParamError, ParamSpec, Port, RecipeInfo, Registry, RunCtx,
};

/// The CLI tests' GPU commands. Their ops never touch a GPU; `--adapter` and `runner gpu` are
/// tested against the real binary (`hostile.rs`).
pub struct NoEngine;

impl runner_core::cli::GpuCommands for NoEngine {
    fn select_adapter(&self, spec: &str) -> anyhow::Result<()> {
        anyhow::bail!("the CLI test binary has no GPU engine (asked for adapter `{spec}`)")
    }

    fn describe(&self) -> anyhow::Result<String> {
        anyhow::bail!("the CLI test binary has no GPU engine")
    }

    fn tune(&self, _: &runner_core::cli::TuneRequest) -> anyhow::Result<String> {
        anyhow::bail!("the CLI test binary has no GPU engine")
    }
}

pub fn registry() -> Registry {
    let mut r = Registry::empty();
    r.register(Arc::new(Text))
        .register(Arc::new(Concat))
        .register(Arc::new(Sleep {
            device: Device::Cpu,
        }))
        .register(Arc::new(Sleep {
            device: Device::Gpu,
        }))
        .register(Arc::new(Fail))
        .register(Arc::new(ModelConsumer))
        .register(Arc::new(Maybe))
        .register(Arc::new(FileOp));
    r
}

const BLOB: &[ArtifactType] = &[ArtifactType::Blob];

fn read_value(dir: &Path) -> anyhow::Result<String> {
    fs::read_to_string(dir.join("value.txt")).with_context(|| format!("reading {}", dir.display()))
}

fn write_value(ctx: &RunCtx, value: &str) -> anyhow::Result<()> {
    fs::write(ctx.out_dir.join("value.txt"), value)?;
    Ok(())
}

fn micros_now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

op_params! {
    struct TextParams {
        /// The text to output.
        text: String,
    }
}

/// A source: outputs its `text` param.
struct Text;

impl Op for Text {
    fn kind(&self) -> &'static str {
        "text"
    }
    fn doc(&self) -> &'static str {
        "Outputs a fixed text."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![]
    }
    fn params(&self) -> Vec<ParamSpec> {
        TextParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        TextParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = TextParams::from_table(ctx.params)?;
        write_value(ctx, &p.text)
    }
}

op_params! {
    struct ConcatParams {
        /// Put between `a` and `b`.
        sep: String = "+".to_string(),
    }
}

/// Joins the texts on `a` and (optionally) `b`.
struct Concat;

impl Op for Concat {
    fn kind(&self) -> &'static str {
        "concat"
    }
    fn doc(&self) -> &'static str {
        "Joins two texts."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![
            Port {
                name: "a",
                accepts: BLOB,
                required: true,
                doc: "first text",
            },
            Port {
                name: "b",
                accepts: BLOB,
                required: false,
                doc: "second text",
            },
        ]
    }
    fn params(&self) -> Vec<ParamSpec> {
        ConcatParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        ConcatParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = ConcatParams::from_table(ctx.params)?;
        let mut value = read_value(&ctx.input("a")?.dir)?;
        if let Some(b) = ctx.optional_input("b") {
            value = format!("{value}{}{}", p.sep, read_value(&b.dir)?);
        }
        write_value(ctx, &value)
    }
}

op_params! {
    struct SleepParams {
        /// How long to sleep, in milliseconds.
        ms: u64 = 100,
        /// Also wait until this file exists (relative to the recipe).
        until_file: Option<String> = None,
    }
}

/// Writes `partial`, sleeps, then records when it ran in `interval.txt` (`start end`, in µs
/// since the epoch) and passes its input's text on.
struct Sleep {
    device: Device,
}

impl Op for Sleep {
    fn kind(&self) -> &'static str {
        match self.device {
            Device::Cpu => "sleep",
            Device::Gpu => "gpu-sleep",
        }
    }
    fn doc(&self) -> &'static str {
        "Sleeps, then records when it ran."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "after",
            accepts: BLOB,
            required: false,
            doc: "runs after this op",
        }]
    }
    fn params(&self) -> Vec<ParamSpec> {
        SleepParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn device(&self) -> Device {
        self.device
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        SleepParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = SleepParams::from_table(ctx.params)?;
        let start = micros_now();
        fs::write(ctx.out_dir.join("partial"), "written before the sleep")?;
        ctx.progress.set_length(p.ms);
        let step = 10.min(p.ms.max(1));
        let mut slept = 0;
        while slept < p.ms {
            std::thread::sleep(Duration::from_millis(step));
            ctx.progress.inc(step);
            slept += step;
        }
        if let Some(file) = &p.until_file {
            let file = ctx.recipe.resolve(file);
            while !file.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let end = micros_now();
        ctx.progress.println(format!("slept {} ms", p.ms));
        fs::write(ctx.out_dir.join("interval.txt"), format!("{start} {end}"))?;
        let value = match ctx.optional_input("after") {
            Some(a) => read_value(&a.dir)?,
            None => String::new(),
        };
        write_value(ctx, &value)
    }
}

op_params! {
    struct FailParams {
        /// The error to fail with.
        message: String = "boom".to_string(),
    }
}

/// Always fails.
struct Fail;

impl Op for Fail {
    fn kind(&self) -> &'static str {
        "fail"
    }
    fn doc(&self) -> &'static str {
        "Always fails."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![]
    }
    fn params(&self) -> Vec<ParamSpec> {
        FailParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        FailParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = FailParams::from_table(ctx.params)?;
        fs::write(ctx.out_dir.join("partial"), "never published")?;
        Err(anyhow::anyhow!("{}", p.message)).context("the test op gave up")
    }
}

op_params! {
    struct NoParams {}
}

/// Has a port that only accepts models, for type-mismatch errors.
struct ModelConsumer;

impl Op for ModelConsumer {
    fn kind(&self) -> &'static str {
        "model-consumer"
    }
    fn doc(&self) -> &'static str {
        "Takes a model."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port {
            name: "model",
            accepts: &[ArtifactType::Model, ArtifactType::QuantizedModel],
            required: true,
            doc: "a model",
        }]
    }
    fn params(&self) -> Vec<ParamSpec> {
        NoParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        NoParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        write_value(ctx, "model")
    }
}

op_params! {
    struct MaybeParams {
        /// When false the op is skipped.
        enabled: bool = true,
    }
}

/// Skipped unless `enabled`.
struct Maybe;

impl Op for Maybe {
    fn kind(&self) -> &'static str {
        "maybe"
    }
    fn doc(&self) -> &'static str {
        "Runs only when enabled."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![]
    }
    fn params(&self) -> Vec<ParamSpec> {
        MaybeParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        MaybeParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn skip_reason(&self, params: &toml::Table) -> Option<String> {
        let p = MaybeParams::from_table(params).ok()?;
        (!p.enabled).then(|| "enabled = false".to_string())
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        write_value(ctx, "maybe")
    }
}

op_params! {
    struct FileParams {
        /// A local file, relative to the recipe.
        path: String,
    }
}

/// Reads a local file; its fingerprint (size and modification time) is part of the cache key.
struct FileOp;

impl Op for FileOp {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn doc(&self) -> &'static str {
        "Reads a local file."
    }
    fn inputs(&self) -> Vec<Port> {
        vec![]
    }
    fn params(&self) -> Vec<ParamSpec> {
        FileParams::specs()
    }
    fn version(&self) -> u32 {
        1
    }
    fn check(&self, params: &toml::Table) -> Result<toml::Table, ParamError> {
        FileParams::canonical(params)
    }
    fn output(&self, _: &toml::Table) -> ArtifactType {
        ArtifactType::Blob
    }
    fn fingerprint(
        &self,
        params: &toml::Table,
        recipe: &RecipeInfo,
    ) -> anyhow::Result<Option<String>> {
        let p = FileParams::from_table(params)?;
        let path = recipe.resolve(&p.path);
        let meta =
            fs::metadata(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
        Ok(Some(format!("{} {:?}", meta.len(), meta.modified()?)))
    }
    fn run(&self, ctx: &RunCtx) -> anyhow::Result<()> {
        let p = FileParams::from_table(ctx.params)?;
        write_value(ctx, &fs::read_to_string(ctx.recipe.resolve(&p.path))?)
    }
}
