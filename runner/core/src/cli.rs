//! The command line: `runner validate|plan|graph|run|ops`.
//!
//! Exit codes: 0 success, 1 an op failed at run time, 2 an invalid recipe or usage.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use op_api::{ParamDefault, Registry};

use crate::cache::Cache;
use crate::diag::{suggestion, Diagnostic};
use crate::graph::{self, Pipeline};
use crate::recipe;
use crate::schedule::{self, RunOptions, Selection, Status};

/// `println!` that treats a closed stdout (`runner run r.toml | head -c1`: EPIPE) as the end of
/// output instead of a panic: the run's outcome is its exit code, not whether anyone still reads.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `print!` with [`outln!`]'s treatment of a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = write!(stdout, $($arg)*);
        let _ = stdout.flush();
    }};
}

pub const EXIT_OK: i32 = 0;
pub const EXIT_OP_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;

/// The environment variable that overrides the recipe's `cache_dir` (`--cache-dir` wins over it).
pub const CACHE_ENV: &str = "RUNNER_CACHE";

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "Fine-tune vision-language models from a declarative TOML recipe, on any GPU",
    after_help = "Exit codes: 0 success, 1 an op failed, 2 invalid recipe or usage."
)]
struct Cli {
    /// The GPU adapter to use, by name substring or index (`runner gpu` lists them);
    /// default: `$RUNNER_ADAPTER`, else discrete > integrated > CPU.
    #[arg(long, global = true, value_name = "NAME|INDEX")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and check a recipe (ops, params, ports, types, cycles); nothing runs.
    Validate(RecipeArgs),
    /// Show the ops in execution order, each `cached`, `will run` or `skipped`, with its cache key.
    Plan(RunArgs),
    /// Print the recipe's DAG as Graphviz DOT (`runner graph r.toml | dot -Tsvg > r.svg`).
    Graph(RecipeArgs),
    /// Run the recipe, reusing every cached op output.
    Run(RunArgs),
    /// List every op kind with its input ports, output type and params (with defaults).
    Ops {
        /// Show only this op kind.
        kind: Option<String>,
    },
    /// Show the GPU adapter the runner would use: backend, features and limits, and every adapter found.
    Gpu(GpuArgs),
}

#[derive(Args, Debug)]
struct GpuArgs {
    /// Time every candidate tiling of the matmuls a training step of a model runs on this
    /// adapter and keep the fastest per shape class (what the first use of a shape does on a
    /// GPU), in the tuning file it names.
    #[arg(long)]
    tune: bool,
    /// The model's config.json whose products `--tune` times (default: Gemma 3 4B-it, the
    /// guide's model).
    #[arg(long, requires = "tune")]
    config: Option<PathBuf>,
    /// Text tokens per micro-batch for `--tune`.
    #[arg(long, default_value_t = 2048, requires = "tune")]
    tokens: usize,
    /// Tune the products of an NF4 (QLoRA) base, as the guide's recipes train.
    #[arg(long, requires = "tune")]
    nf4: bool,
    /// Tune the products of a dense base stored in bf16 (Gemma 3's Hub checkpoints, which stay
    /// bf16 on the device).
    #[arg(long, requires = "tune", conflicts_with = "nf4")]
    bf16_weights: bool,
}

#[derive(Args, Debug)]
struct RecipeArgs {
    /// The recipe file (TOML).
    recipe: PathBuf,
    /// Override a recipe value: `ops.NAME.PARAM=VALUE`, `vars.NAME=VALUE` or `recipe.KEY=VALUE`.
    /// VALUE is a TOML value (`1e-4`, `true`, `[1, 2]`); anything else is taken as a string.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Rerun this op (and every op downstream of it) even if its output is cached. Repeatable.
    #[arg(long, value_name = "OP")]
    force: Vec<String>,
    /// Run only this op and the ops it needs (repeatable); nothing downstream of it.
    #[arg(long, value_name = "OP")]
    only: Vec<String>,
    /// The cache directory (default: `$RUNNER_CACHE`, else the recipe's `cache_dir`, else
    /// `.runner-cache` beside the recipe).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// How many CPU ops may run at once (default: the number of cores). GPU ops always run one at a time.
    #[arg(long, short, value_name = "N")]
    jobs: Option<usize>,
}

/// The GPU side of the command line, supplied by the binary. `--adapter` and `runner gpu` need
/// the compute engine; the recipe machinery in this crate does not, so it builds with the op API
/// alone (no wgpu, arrow or tokenizers) and its tests link only that.
pub trait GpuCommands {
    /// `--adapter NAME|INDEX`: the adapter every GPU op of this process uses.
    fn select_adapter(&self, spec: &str) -> anyhow::Result<()>;
    /// `runner gpu`: the adapter that would be used (backend, features, limits) and every
    /// adapter found.
    fn describe(&self) -> anyhow::Result<String>;
    /// `runner gpu --tune`: times the candidate tilings of a model's training-step products and
    /// keeps the fastest; returns the table.
    fn tune(&self, request: &TuneRequest) -> anyhow::Result<String>;
}

/// What `runner gpu --tune` was asked to tune.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneRequest {
    /// The model's config.json; `None`: the guide's model (Gemma 3 4B-it).
    pub config: Option<PathBuf>,
    /// Text tokens per micro-batch.
    pub tokens: usize,
    /// The products of an NF4 (QLoRA) base.
    pub nf4: bool,
    /// The products of a dense bf16 base.
    pub bf16_weights: bool,
}

/// Runs the CLI with `args` (the first item is the program name) against `registry`, with `gpu`
/// for the GPU commands; returns the exit code. Tests call it with test-only ops registered.
pub fn main_with<I, T>(registry: Registry, gpu: &dyn GpuCommands, args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                EXIT_INVALID
            } else {
                EXIT_OK
            };
            let _ = e.print();
            return code;
        }
    };
    if let Some(adapter) = &cli.adapter {
        if let Err(e) = gpu.select_adapter(adapter) {
            eprintln!("runner: --adapter {adapter}: {e:#}");
            return EXIT_INVALID;
        }
    }
    match dispatch(&registry, gpu, cli.command) {
        Ok(code) => code,
        Err(diags) => {
            for d in diags {
                eprintln!("{}{d}", dist::rank_prefix());
            }
            EXIT_INVALID
        }
    }
}

type Outcome = Result<i32, Vec<Diagnostic>>;

fn dispatch(registry: &Registry, gpu: &dyn GpuCommands, command: Command) -> Outcome {
    match command {
        Command::Validate(args) => {
            let pipeline = load(registry, &args)?;
            outln!(
                "{}: ok: recipe `{}`, {} ops, {} edges",
                pipeline.recipe.file.display,
                pipeline.recipe.name,
                pipeline.steps.len(),
                pipeline.graph.edge_count()
            );
            Ok(EXIT_OK)
        }
        Command::Graph(args) => {
            let pipeline = load(registry, &args)?;
            out!("{}", graph::to_dot(&pipeline));
            Ok(EXIT_OK)
        }
        Command::Plan(args) => plan_command(registry, &args),
        Command::Run(args) => run_command(registry, &args),
        Command::Ops { kind } => ops_command(registry, kind.as_deref()),
        Command::Gpu(args) => {
            let result = match args.tune {
                false => gpu.describe(),
                true => gpu.tune(&TuneRequest {
                    config: args.config,
                    tokens: args.tokens,
                    nf4: args.nf4,
                    bf16_weights: args.bf16_weights,
                }),
            };
            match result {
                Ok(text) => {
                    out!("{text}");
                    Ok(EXIT_OK)
                }
                Err(e) => {
                    eprintln!("runner gpu: {e:#}");
                    Ok(EXIT_OP_FAILED)
                }
            }
        }
    }
}

fn load(registry: &Registry, args: &RecipeArgs) -> Result<Pipeline, Vec<Diagnostic>> {
    let recipe = recipe::load(&args.recipe, &args.set)?;
    graph::build(recipe, registry)
}

/// `--cache-dir`, then `$RUNNER_CACHE`, then `[recipe] cache_dir`, then `.runner-cache` beside the recipe.
fn cache_dir(pipeline: &Pipeline, args: &RunArgs) -> PathBuf {
    if let Some(dir) = &args.cache_dir {
        return dir.clone();
    }
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = &pipeline.recipe.cache_dir {
        return dir.clone();
    }
    pipeline.recipe.dir().join(".runner-cache")
}

fn selection(pipeline: &Pipeline, args: &RunArgs) -> Result<Selection, Vec<Diagnostic>> {
    let names: Vec<&str> = pipeline.steps.iter().map(|s| s.name.as_str()).collect();
    let mut diags = Vec::new();
    let mut resolve = |flag: &str, wanted: &[String]| -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for name in wanted {
            match pipeline.index_of(name) {
                Some(i) => {
                    out.insert(i);
                }
                None => diags.push(Diagnostic {
                    path: pipeline.recipe.file.display.clone(),
                    position: None,
                    message: format!(
                        "`--{flag} {name}`: the recipe has no op `{name}`{}",
                        suggestion(name, names.iter().copied())
                    ),
                }),
            }
        }
        out
    };
    let force = resolve("force", &args.force);
    let only = resolve("only", &args.only);
    if diags.is_empty() {
        Ok(Selection { force, only })
    } else {
        Err(diags)
    }
}

/// The plan; a run-time failure while making it (the Hub unreachable) is printed and gives
/// `Ok(Err(1))`, a fault of the recipe is returned as diagnostics (exit 2).
fn plan_checked(
    pipeline: &Pipeline,
    cache: &Cache,
    selection: &Selection,
) -> Result<Result<schedule::Plan, i32>, Vec<Diagnostic>> {
    match schedule::plan(pipeline, cache, selection) {
        Ok(plan) => Ok(Ok(plan)),
        Err(e) if e.run_time => {
            for d in e.diags {
                eprintln!("{}{d}", dist::rank_prefix());
            }
            Ok(Err(EXIT_OP_FAILED))
        }
        Err(e) => Err(e.diags),
    }
}

fn plan_command(registry: &Registry, args: &RunArgs) -> Outcome {
    let pipeline = load(registry, &args.recipe)?;
    let selection = selection(&pipeline, args)?;
    let cache = Cache::new(cache_dir(&pipeline, args));
    let plan = match plan_checked(&pipeline, &cache, &selection)? {
        Ok(plan) => plan,
        Err(code) => return Ok(code),
    };
    outln!(
        "plan for `{}` ({}), cache {}",
        pipeline.recipe.name,
        pipeline.recipe.file.display,
        cache.root().display()
    );
    let name_width = pipeline
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    let kind_width = pipeline
        .steps
        .iter()
        .map(|s| s.kind.len())
        .max()
        .unwrap_or(0);
    let (mut cached, mut will_run, mut skipped) = (0, 0, 0);
    for (n, planned) in plan.steps.iter().enumerate() {
        let step = &pipeline.steps[planned.step];
        let status = match &planned.status {
            Status::Cached => {
                cached += 1;
                "cached".to_string()
            }
            Status::WillRun { forced, stale } => {
                will_run += 1;
                if let Some(reason) = stale {
                    format!("will run ({reason})")
                } else if *forced {
                    "will run (forced)".to_string()
                } else {
                    "will run".to_string()
                }
            }
            Status::Skipped(reason) => {
                skipped += 1;
                format!("skipped ({reason})")
            }
            Status::NotSelected => "not selected (--only)".to_string(),
        };
        outln!(
            "{:>3}. {:name_width$}  {:kind_width$}  {}  {status}",
            n + 1,
            step.name,
            step.kind,
            planned.key
        );
    }
    outln!("{cached} cached, {will_run} will run, {skipped} skipped");
    Ok(EXIT_OK)
}

fn run_command(registry: &Registry, args: &RunArgs) -> Outcome {
    let pipeline = load(registry, &args.recipe)?;
    let selection = selection(&pipeline, args)?;
    let cache = Cache::new(cache_dir(&pipeline, args));
    let plan = match plan_checked(&pipeline, &cache, &selection)? {
        Ok(plan) => plan,
        Err(code) => return Ok(code),
    };
    if let Err(e) = cache.prepare() {
        eprintln!("error: {e:#}");
        return Ok(EXIT_OP_FAILED);
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let world = dist::world();
    let plan = match dist::comm() {
        Some(comm) => match schedule::follow_rank_zero(&pipeline, &cache, &selection, plan, comm) {
            Ok(plan) => plan,
            Err(e) => {
                eprintln!("rank {}: error: {e:#}", world.rank);
                return Ok(EXIT_OP_FAILED);
            }
        },
        None => plan,
    };
    // Rank 0 speaks for the run; the other ranks only report their errors.
    let quiet = !world.is_main();
    if !quiet {
        outln!(
            "running `{}` ({}), cache {}{}",
            pipeline.recipe.name,
            pipeline.recipe.file.display,
            cache.root().display(),
            if world.is_distributed() {
                format!(", rank 0 of {} (data-parallel)", world.size)
            } else {
                String::new()
            }
        );
    }
    let summary = schedule::execute(&pipeline, &plan, &cache, &RunOptions { jobs, quiet });
    if !quiet {
        outln!("{}", summary.line());
    }
    Ok(if summary.failed > 0 {
        EXIT_OP_FAILED
    } else {
        EXIT_OK
    })
}

fn ops_command(registry: &Registry, kind: Option<&str>) -> Outcome {
    let ops: Vec<_> = match kind {
        Some(k) => match registry.get(k) {
            Some(op) => vec![op.clone()],
            None => {
                return Err(vec![Diagnostic {
                    path: "runner ops".into(),
                    position: None,
                    message: format!("unknown op kind `{k}`{}", suggestion(k, registry.kinds())),
                }])
            }
        },
        None => registry.iter().cloned().collect(),
    };
    if ops.is_empty() {
        outln!("no op kinds are registered in this build");
    }
    out!("{}", describe_ops(&ops));
    Ok(EXIT_OK)
}

/// The `runner ops` listing, generated from the op definitions themselves.
pub fn describe_ops(ops: &[std::sync::Arc<dyn op_api::Op>]) -> String {
    let mut out = String::new();
    for (n, op) in ops.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let device = match op.device() {
            op_api::Device::Cpu => "cpu",
            op_api::Device::Gpu => "gpu",
        };
        out.push_str(&format!("{} — {}\n", op.kind(), op.doc()));
        out.push_str(&format!("  device: {device}, version: {}\n", op.version()));
        let ports = op.inputs();
        if ports.is_empty() {
            out.push_str("  inputs: none\n");
        } else {
            out.push_str("  inputs:\n");
            for p in ports {
                let accepts: Vec<&str> = p.accepts.iter().map(|t| t.name()).collect();
                let required = if p.required { "required" } else { "optional" };
                out.push_str(&format!(
                    "    {}: {} ({required}) — {}\n",
                    p.name,
                    accepts.join(" | "),
                    p.doc
                ));
            }
        }
        // The output type can depend on params; it is shown when the defaults alone determine it.
        match op.check(&toml::Table::new()) {
            Ok(params) => out.push_str(&format!("  output: {}\n", op.output(&params))),
            Err(_) => out.push_str("  output: depends on params (see above)\n"),
        }
        let specs = op.params();
        if specs.is_empty() {
            out.push_str("  params: none\n");
        } else {
            out.push_str("  params:\n");
            let width = specs.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for s in specs {
                let default = match &s.default {
                    ParamDefault::Required => "required".to_string(),
                    ParamDefault::Unset => "optional, unset".to_string(),
                    ParamDefault::Value(v) => format!("default {v}"),
                };
                out.push_str(&format!(
                    "    {:width$}  {} ({default}) — {}\n",
                    s.name, s.ty, s.doc
                ));
            }
        }
    }
    out
}
