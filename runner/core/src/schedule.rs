//! Planning (keys, what is cached: `schedule/plan.rs`) and execution (ready set, CPU ops in
//! parallel, GPU ops one at a time, progress, failure handling).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use op_api::{Artifact, Device, RunCtx};

use crate::cache::{self, Cache};
use crate::graph::Pipeline;

mod plan;

pub use plan::*;

/// What happened to each op in a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub ran: usize,
    pub reused: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Ops that would have run but did not start because an op failed.
    pub not_started: Vec<String>,
}

impl Summary {
    /// The last line `runner run` prints.
    pub fn line(&self) -> String {
        format!(
            "ran {}, reused {}, failed {}",
            self.ran, self.reused, self.failed
        )
    }
}

pub struct RunOptions {
    /// How many CPU ops may run at once.
    pub jobs: usize,
    /// No events, bars or op lines, only errors (a data-parallel rank other than 0).
    pub quiet: bool,
}

/// A data-parallel rank's plan (issue #17): every rank plans the recipe; rank 0 decides which
/// collective ops (`Op::collective`: `lora-train`) run. Rank 0 keeps its own plan and runs the
/// whole recipe. Another rank runs only the collective ops rank 0 runs, and the ops they need
/// (reusing its cache as usual: ranks that share a cache folder reuse each other's outputs,
/// ranks that do not recompute them); the rest is rank 0's. Fails when this rank planned other
/// cache keys than rank 0 (another recipe, `--set` or input file).
pub fn follow_rank_zero(
    pipeline: &Pipeline,
    cache: &Cache,
    selection: &Selection,
    plan: Plan,
    comm: &dyn dist::Comm,
) -> anyhow::Result<Plan> {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for p in &plan.steps {
        digest.update((p.step as u64).to_le_bytes());
        digest.update(p.key.as_bytes());
    }
    let digest = digest.finalize().to_vec();
    let mut message = digest.clone();
    if comm.world().is_main() {
        for p in &plan.steps {
            if pipeline.steps[p.step].op.collective() && matches!(p.status, Status::WillRun { .. })
            {
                message.extend_from_slice(&(p.step as u64).to_le_bytes());
            }
        }
    }
    comm.broadcast_bytes(0, &mut message);
    anyhow::ensure!(
        message.get(..digest.len()) == Some(&digest[..]),
        "this rank planned other cache keys than rank 0: every rank must run the same recipe with the same --set overrides and the same input files (a local file's key covers its size and modification time: copy inputs to other nodes with `rsync -a` or `cp -p`, or use a shared filesystem)"
    );
    if comm.world().is_main() {
        return Ok(plan);
    }
    let collective: BTreeSet<usize> = message[digest.len()..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
        .collect();
    if collective.is_empty() {
        // Rank 0 trains nothing (every collective output is cached): nothing here to do.
        let mut plan = plan;
        for p in &mut plan.steps {
            p.status = Status::NotSelected;
        }
        return Ok(plan);
    }
    let mine = Selection {
        force: selection.force.clone(),
        only: collective.clone(),
    };
    let mut plan = match super::schedule::plan(pipeline, cache, &mine) {
        Ok(plan) => plan,
        Err(e) => anyhow::bail!(
            "{}",
            e.diags
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    for p in &mut plan.steps {
        if pipeline.steps[p.step].op.collective() {
            p.status = if collective.contains(&p.step) {
                // Runs even where this rank's cache has it: rank 0 runs it, and it needs us.
                Status::WillRun {
                    forced: false,
                    stale: None,
                }
            } else {
                Status::NotSelected
            };
        }
    }
    Ok(plan)
}

/// Progress of one running op, drawn as an indicatif bar (on stderr, when it is a terminal);
/// its `println` lines go to stdout, prefixed with the op's name.
struct OpProgress {
    bar: ProgressBar,
    multi: MultiProgress,
    name: String,
    quiet: bool,
}

impl OpProgress {
    fn spinner_style() -> ProgressStyle {
        ProgressStyle::with_template("{spinner} {prefix:.bold} [{elapsed}] {msg}")
            .expect("valid template")
    }

    fn bar_style() -> ProgressStyle {
        ProgressStyle::with_template(
            "{spinner} {prefix:.bold} [{elapsed}] {wide_bar} {pos}/{len} (eta {eta}) {msg}",
        )
        .expect("valid template")
    }
}

/// Outputs a rank other than 0 made but does not publish (see [`run_one`]): kept until the run
/// ends, as the ops after them read them.
type Private = std::sync::Mutex<Vec<cache::Pending>>;

impl op_api::Progress for OpProgress {
    fn set_length(&self, len: u64) {
        self.bar.set_style(Self::bar_style());
        self.bar.set_length(len);
    }

    fn inc(&self, delta: u64) {
        self.bar.inc(delta);
    }

    fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }

    fn println(&self, line: String) {
        if self.quiet {
            return;
        }
        self.multi.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "[{}] {line}", self.name);
        });
    }
}

#[derive(Clone)]
enum State {
    Waiting,
    Running,
    Done(Artifact),
    Failed,
    Inactive,
}

/// Runs the plan. Ops whose output is cached are reused; the others run as soon as their inputs
/// exist, CPU ops up to `jobs` at once and GPU ops one at a time. After a failure no new op
/// starts; running ones finish (and their outputs are kept).
pub fn execute(pipeline: &Pipeline, plan: &Plan, cache: &Cache, options: &RunOptions) -> Summary {
    let multi = MultiProgress::with_draw_target(if options.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let quiet = options.quiet;
    let private = Private::default();
    let say = |line: String| {
        if quiet {
            return;
        }
        multi.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        })
    };
    let info = pipeline.recipe.info();
    let mut summary = Summary::default();
    let mut states: Vec<State> = vec![State::Inactive; pipeline.steps.len()];

    for planned in &plan.steps {
        let step = &pipeline.steps[planned.step];
        states[planned.step] = match &planned.status {
            Status::Cached => {
                summary.reused += 1;
                say(format!(
                    "reused {} ({}) {}",
                    step.name, step.kind, planned.key
                ));
                State::Done(Artifact {
                    ty: step.output,
                    dir: cache.entry_dir(&planned.key),
                    key: planned.key.clone(),
                })
            }
            Status::WillRun {
                stale: Some(reason),
                ..
            } => {
                say(format!(
                    "stale {} ({}) {}: {reason}; running it again",
                    step.name, step.kind, planned.key
                ));
                State::Waiting
            }
            Status::WillRun { .. } => State::Waiting,
            Status::Skipped(reason) => {
                summary.skipped += 1;
                say(format!("skipped {} ({}): {reason}", step.name, step.kind));
                State::Inactive
            }
            Status::NotSelected => State::Inactive,
        };
    }

    let (tx, rx) = mpsc::channel::<(usize, anyhow::Result<Artifact>, Duration)>();
    let mut running_cpu = 0usize;
    let mut gpu_busy = false;
    let mut failing = false;
    std::thread::scope(|scope| loop {
        if !failing {
            for planned in &plan.steps {
                let i = planned.step;
                let step = &pipeline.steps[i];
                if !matches!(states[i], State::Waiting) {
                    continue;
                }
                let inputs: Option<BTreeMap<String, Artifact>> = step
                    .inputs
                    .iter()
                    .map(|(port, &from)| match &states[from] {
                        State::Done(a) => Some((port.clone(), a.clone())),
                        _ => None,
                    })
                    .collect();
                let Some(inputs) = inputs else { continue };
                // Every rank must enter the collective ops in one order: plan order.
                if step.op.collective()
                    && dist::world().is_distributed()
                    && plan.steps.iter().take_while(|o| o.step != i).any(|o| {
                        pipeline.steps[o.step].op.collective()
                            && matches!(states[o.step], State::Waiting | State::Running)
                    })
                {
                    continue;
                }
                // Two ops with the same key make the same output: the second waits for the
                // first and reuses it instead of computing it again.
                let twin = plan.steps.iter().find(|other| {
                    other.step != i
                        && other.key == planned.key
                        && matches!(other.status, Status::WillRun { .. })
                        && matches!(states[other.step], State::Running | State::Done(_))
                });
                if let Some(twin) = twin {
                    if let State::Done(artifact) = &states[twin.step] {
                        summary.reused += 1;
                        say(format!(
                            "reused {} ({}) {}: same output as `{}`",
                            step.name, step.kind, planned.key, pipeline.steps[twin.step].name
                        ));
                        states[i] = State::Done(artifact.clone());
                    }
                    continue;
                }
                match step.device {
                    Device::Gpu if gpu_busy => continue,
                    Device::Gpu => gpu_busy = true,
                    Device::Cpu if running_cpu >= options.jobs.max(1) => continue,
                    Device::Cpu => running_cpu += 1,
                }
                states[i] = State::Running;
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(OpProgress::spinner_style());
                bar.set_prefix(format!("{} ({})", step.name, step.kind));
                bar.enable_steady_tick(Duration::from_millis(120));
                say(format!("start {} ({})", step.name, step.kind));
                let progress = OpProgress {
                    bar,
                    multi: multi.clone(),
                    name: step.name.clone(),
                    quiet,
                };
                let private = &private;
                let tx = tx.clone();
                let info = &info;
                let key = planned.key.clone();
                let replace = matches!(planned.status, Status::WillRun { forced: true, .. });
                scope.spawn(move || {
                    let started = Instant::now();
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run_one(
                            pipeline, i, &key, replace, &inputs, info, cache, &progress, private,
                        )
                    }))
                    .unwrap_or_else(|panic| {
                        Err(anyhow::anyhow!("panicked: {}", panic_message(&panic)))
                    });
                    if let (Err(e), Some(comm)) = (&result, dist::comm()) {
                        if step.op.collective() {
                            // The other ranks are inside this op's collectives: waiting for the
                            // running ops to finish first could leave them waiting forever.
                            eprintln!(
                                "{}error: op `{}` ({}) failed: {e:#}",
                                dist::rank_prefix(),
                                step.name,
                                step.kind
                            );
                            comm.abort(crate::cli::EXIT_OP_FAILED);
                        }
                    }
                    progress.bar.finish_and_clear();
                    let _ = tx.send((i, result, started.elapsed()));
                });
            }
        }
        if running_cpu == 0 && !gpu_busy {
            break;
        }
        let (i, result, elapsed) = rx.recv().expect("a running op always reports back");
        let step = &pipeline.steps[i];
        match step.device {
            Device::Gpu => gpu_busy = false,
            Device::Cpu => running_cpu -= 1,
        }
        match result {
            Ok(artifact) => {
                summary.ran += 1;
                say(format!(
                    "done {} ({}) in {:.2}s",
                    step.name,
                    step.kind,
                    elapsed.as_secs_f64()
                ));
                states[i] = State::Done(artifact);
            }
            Err(e) => {
                summary.failed += 1;
                failing = true;
                states[i] = State::Failed;
                say(format!(
                    "failed {} ({}) after {:.2}s",
                    step.name,
                    step.kind,
                    elapsed.as_secs_f64()
                ));
                multi.suspend(|| {
                    eprintln!(
                        "{}error: op `{}` ({}) failed: {e:#}",
                        dist::rank_prefix(),
                        step.name,
                        step.kind
                    );
                });
            }
        }
    });

    for planned in &plan.steps {
        if matches!(states[planned.step], State::Waiting) {
            summary
                .not_started
                .push(pipeline.steps[planned.step].name.clone());
        }
    }
    if !summary.not_started.is_empty() {
        say(format!(
            "not started because an op failed: {} (fix the failure and run again; completed outputs are kept)",
            summary.not_started.join(", ")
        ));
    }
    summary
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    pipeline: &Pipeline,
    i: usize,
    key: &str,
    replace: bool,
    inputs: &BTreeMap<String, Artifact>,
    info: &op_api::RecipeInfo,
    cache: &Cache,
    progress: &OpProgress,
    private: &Private,
) -> anyhow::Result<Artifact> {
    let step = &pipeline.steps[i];
    let world = dist::world();
    if let (true, Some(comm)) = (step.op.collective(), dist::comm()) {
        // Waits, sleeping, for every rank to reach this op (rank 0 may still be running other
        // ops), then checks that they all entered the same one.
        comm.idle_barrier();
        let mut mine = key.as_bytes().to_vec();
        comm.broadcast_bytes(0, &mut mine);
        anyhow::ensure!(
            mine == key.as_bytes(),
            "rank 0 started another collective op (key {}) than this rank (`{}`, key {key})",
            String::from_utf8_lossy(&mine),
            step.name
        );
    }
    let pending = cache.begin(key)?;
    let ctx = RunCtx {
        name: &step.name,
        params: &step.params,
        inputs,
        out_dir: pending.dir(),
        recipe: info,
        progress,
    };
    step.op
        .run(&ctx)
        .map_err(|e| with_damaged_input_hint(e, pipeline, i, inputs))?;
    // A rank other than 0 never replaces an entry (rank 0 may be reading it) and never
    // publishes a collective op's output (rank 0's is the one kept): it keeps those private.
    if !world.is_main() && (replace || step.op.collective()) {
        let dir = pending.dir().to_path_buf();
        private.lock().unwrap().push(pending);
        return Ok(Artifact {
            ty: step.output,
            dir,
            key: key.to_string(),
        });
    }
    let dir = pending.publish(replace)?;
    Ok(Artifact {
        ty: step.output,
        dir,
        key: key.to_string(),
    })
}

/// An error that names a file of an input's cache entry may come from a damaged entry (a
/// truncated file, a disk error): say how to rebuild it.
fn with_damaged_input_hint(
    e: anyhow::Error,
    pipeline: &Pipeline,
    i: usize,
    inputs: &BTreeMap<String, Artifact>,
) -> anyhow::Error {
    let text = format!("{e:#}");
    let step = &pipeline.steps[i];
    let suspects: Vec<&str> = step
        .inputs
        .iter()
        .filter(|(port, _)| {
            inputs
                .get(*port)
                .is_some_and(|a| text.contains(&*a.dir.to_string_lossy()))
        })
        .map(|(_, &from)| pipeline.steps[from].name.as_str())
        .collect();
    match suspects.as_slice() {
        [] => e,
        names => {
            let force: Vec<String> = names.iter().map(|n| format!("--force {n}")).collect();
            e.context(format!(
                "reading the cached output of `{}`; if that entry is damaged (a truncated file), rerun with {}",
                names.join("`, `"),
                force.join(" ")
            ))
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
