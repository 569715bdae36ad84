//! Planning: each step's cache key from its op, params, fingerprint and inputs' keys, and what is
//! cached, stale or to run.

use std::collections::{BTreeMap, BTreeSet};

use crate::cache::{self, Cache};
use crate::diag::Diagnostic;
use crate::graph::Pipeline;

/// What `run` will do with one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Its output is in the cache and will be reused.
    Cached,
    /// It runs (`forced`: although its output is cached, because of `--force`, or because
    /// `stale` says what the cached output wrote outside the cache is gone).
    WillRun { forced: bool, stale: Option<String> },
    /// It will not run: `Op::skip_reason`, or an input comes from a skipped op.
    Skipped(String),
    /// Outside `--only`.
    NotSelected,
}

pub struct PlannedStep {
    pub step: usize,
    pub key: String,
    pub status: Status,
}

/// The steps in execution order, with their keys and what will happen to each.
pub struct Plan {
    pub steps: Vec<PlannedStep>,
}

impl Plan {
    pub fn get(&self, step: usize) -> &PlannedStep {
        self.steps
            .iter()
            .find(|p| p.step == step)
            .expect("every step is planned")
    }
}

/// `--force` and `--only`, as step indices.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub force: BTreeSet<usize>,
    pub only: BTreeSet<usize>,
}

/// Why a plan could not be made: the diagnostics, and whether any is a run-time failure (the
/// Hub unreachable: exit 1) rather than a fault of the recipe (a local path missing: exit 2).
pub struct PlanError {
    pub diags: Vec<Diagnostic>,
    pub run_time: bool,
}

/// Computes every key (in topological order: a key covers its inputs' keys) and the status of
/// each op. Fails when an op's fingerprint cannot be taken, e.g. a local path is missing.
pub fn plan(pipeline: &Pipeline, cache: &Cache, selection: &Selection) -> Result<Plan, PlanError> {
    let info = pipeline.recipe.info();
    let mut keys: Vec<Option<String>> = vec![None; pipeline.steps.len()];
    let mut diags = Vec::new();
    let mut run_time = false;
    for &i in &pipeline.order {
        let step = &pipeline.steps[i];
        let fingerprint = match step.op.fingerprint(&step.params, &info) {
            Ok(f) => f,
            Err(e) => {
                run_time |= e.downcast_ref::<op_api::RunTimeFailure>().is_some();
                diags.push(pipeline.recipe.file.at(
                    &pipeline.recipe.ops[i].header,
                    format!("op `{}` ({}): {e:#}", step.name, step.kind),
                ));
                continue;
            }
        };
        let Some(inputs) = step
            .inputs
            .iter()
            .map(|(port, &from)| keys[from].clone().map(|k| (port.clone(), k)))
            .collect::<Option<BTreeMap<String, String>>>()
        else {
            continue; // an input's fingerprint failed: already reported
        };
        keys[i] = Some(cache::key(&cache::KeyParts {
            kind: step.kind,
            version: step.op.version(),
            params: &step.params,
            inputs: &inputs,
            fingerprint: fingerprint.as_deref(),
        }));
    }
    if !diags.is_empty() {
        return Err(PlanError { diags, run_time });
    }

    let selected: BTreeSet<usize> = if selection.only.is_empty() {
        (0..pipeline.steps.len()).collect()
    } else {
        selection
            .only
            .iter()
            .flat_map(|&o| pipeline.ancestors(o))
            .collect()
    };
    // A forced op's consumers rerun too: the point of forcing is that the old output is suspect.
    let forced: BTreeSet<usize> = selection
        .force
        .iter()
        .flat_map(|&f| pipeline.descendants(f))
        .collect();

    let mut statuses: Vec<Option<Status>> = vec![None; pipeline.steps.len()];
    for &i in &pipeline.order {
        let step = &pipeline.steps[i];
        let key = keys[i].as_deref().expect("all keys computed");
        let skipped_input = step
            .inputs
            .iter()
            .find(|(_, &from)| matches!(statuses[from], Some(Status::Skipped(_))));
        let status = if !selected.contains(&i) {
            Status::NotSelected
        } else if let Some(reason) = step.op.skip_reason(&step.params) {
            Status::Skipped(reason)
        } else if let Some((port, &from)) = skipped_input {
            Status::Skipped(format!(
                "input `{port}` comes from skipped op `{}`",
                pipeline.steps[from].name
            ))
        } else if forced.contains(&i) {
            Status::WillRun {
                forced: cache.contains(key),
                stale: None,
            }
        } else if cache.contains(key) {
            match step
                .op
                .side_effects_missing(&cache.entry_dir(key), &step.params, &info)
            {
                Some(reason) => Status::WillRun {
                    forced: true,
                    stale: Some(reason),
                },
                None => Status::Cached,
            }
        } else {
            Status::WillRun {
                forced: false,
                stale: None,
            }
        };
        statuses[i] = Some(status);
    }
    Ok(Plan {
        steps: pipeline
            .order
            .iter()
            .map(|&i| PlannedStep {
                step: i,
                key: keys[i].clone().expect("computed"),
                status: statuses[i].clone().expect("computed"),
            })
            .collect(),
    })
}
