//! Runs the real `runner` binary on a recipe, offline, against the miniature Hub cache the
//! project ships in tests/fixtures/hf-cache (shared by the end-to-end recipe tests).

// Each test crate includes this module and uses a different subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What one `runner run` printed.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `runner run recipes/<recipe> --cache-dir <work>/cache --set recipe.output_dir=<work>/out
/// --set <each of sets>`, with the fixture cache as HF_HUB_CACHE and HF_HUB_OFFLINE=1 (no
/// HF_HOME or HF_TOKEN of the machine running the tests leaks in).
pub fn run_recipe(recipe: &str, work: &Path, sets: &[&str]) -> Outcome {
    let root = repo_root();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("run")
        .arg(root.join("recipes").join(recipe))
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .args([
            "--set",
            &format!("recipe.output_dir={}", work.join("out").display()),
        ])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .env("HF_HUB_CACHE", root.join("tests/fixtures/hf-cache/hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN")
        .output()
        .expect("runner starts");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Op name -> cache key, from the lines of `runner plan` (`  1. name  kind  key  status`).
pub fn plan_keys(plan_stdout: &str) -> BTreeMap<String, String> {
    plan_stdout
        .lines()
        .filter(|l| {
            l.trim_start()
                .split('.')
                .next()
                .is_some_and(|n| n.parse::<usize>().is_ok())
        })
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words[1].to_string(), words[3].to_string())
        })
        .collect()
}
