//! The README's first command runs `recipes/demo.toml`: this runs the real binary on it, offline,
//! against the miniature Hub cache the project ships, and checks that a second run reuses it all.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_demo(cache: &std::path::Path) -> (i32, String, String) {
    let root = repo_root();
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("run")
        .arg(root.join("recipes/demo.toml"))
        .arg("--cache-dir")
        .arg(cache)
        .env("HF_HUB_CACHE", root.join("tests/fixtures/hf-cache/hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .output()
        .expect("runner starts");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_recipe_runs_offline_then_reuses_every_output() {
    let cache = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_demo(cache.path());
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let ops_in_recipe = std::fs::read_to_string(repo_root().join("recipes/demo.toml"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("[ops."))
        .count();
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran {ops_in_recipe}, reused 0, failed 0")
    );
    assert!(stdout.contains("6 rows"), "{stdout}");
    assert!(stdout.contains("quantized 40 Linear weights"), "{stdout}");

    let (code, stdout, stderr) = run_demo(cache.path());
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("ran 0, reused {ops_in_recipe}, failed 0")
    );
}
