//! End-to-end tests of the `runner` CLI, with test-only ops.
//!
//! This binary has its own `main`: started with `RUNNER_TEST_CLI=1` it *is* the CLI
//! (`runner_core::cli::main_with` over the test ops), otherwise it runs the tests, each of which
//! starts the binary again as the CLI — so every test sees real exit codes, stdout and stderr,
//! and can SIGKILL a run.

mod offline_run;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};

const AS_CLI: &str = "RUNNER_TEST_CLI";

fn main() {
    if std::env::var_os(AS_CLI).is_some() {
        std::process::exit(runner_core::cli::main_with(
            support::testops::registry(),
            &support::testops::NoEngine,
            std::env::args_os(),
        ));
    }
    let args = Arguments::from_args();
    let mut trials = vec![
        Trial::test(
            "validate_accepts_a_good_recipe",
            validate_accepts_a_good_recipe,
        ),
        Trial::test("usage_errors_exit_2", usage_errors_exit_2),
        Trial::test("second_run_reuses_everything", second_run_reuses_everything),
        Trial::test(
            "set_reruns_exactly_the_op_and_its_descendants",
            set_reruns_op_and_descendants,
        ),
        Trial::test(
            "killed_run_leaves_nothing_reused",
            killed_run_leaves_nothing_reused,
        ),
        Trial::test("identical_ops_run_once", identical_ops_run_once),
        Trial::test(
            "concurrent_runs_share_one_cache",
            concurrent_runs_share_one_cache,
        ),
        Trial::test("independent_cpu_ops_overlap", independent_cpu_ops_overlap),
        Trial::test("gpu_ops_run_one_at_a_time", gpu_ops_run_one_at_a_time),
        Trial::test(
            "failure_stops_new_ops_and_exits_1",
            failure_stops_new_ops_and_exits_1,
        ),
        Trial::test("force_and_only", force_and_only),
        Trial::test("plan_order_is_topological_then_file_order", plan_order),
        Trial::test(
            "skipped_ops_and_their_consumers",
            skipped_ops_and_their_consumers,
        ),
        Trial::test("fingerprint_change_reruns", fingerprint_change_reruns),
        Trial::test("cache_dir_precedence", cache_dir_precedence),
        Trial::test(
            "closed_stdout_is_not_a_failure",
            closed_stdout_is_not_a_failure,
        ),
        Trial::test(
            "damaged_entry_names_the_force_to_rebuild_it",
            damaged_entry_names_the_force_to_rebuild_it,
        ),
        Trial::test("graph_is_valid_dot", graph_is_valid_dot),
        Trial::test(
            "ops_lists_params_with_defaults",
            ops_lists_params_with_defaults,
        ),
    ];
    for case in invalid_cases() {
        let name = format!("invalid_recipe_{}", case.name);
        trials.push(Trial::test(name, move || {
            check_invalid(&case);
            Ok(())
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}

type Result = std::result::Result<(), libtest_mimic::Failed>;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }

    /// The ops a `run` ran (its `done NAME (...)` lines), sorted.
    fn done(&self) -> Vec<String> {
        self.names_after("done ")
    }

    fn reused(&self) -> Vec<String> {
        self.names_after("reused ")
    }

    fn names_after(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split_whitespace().next().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A temporary folder holding `recipe.toml`; the CLI runs with it as the current directory.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new(recipe: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("recipe.toml"), recipe).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(AS_CLI, "1")
            .env_remove(runner_core::cli::CACHE_ENV)
            .current_dir(self.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    }

    /// Op name -> cache key, from `runner plan`.
    fn keys(&self, extra: &[&str]) -> BTreeMap<String, String> {
        let mut args = vec!["plan", "recipe.toml"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert_eq!(out.code, 0, "{out:?}");
        offline_run::plan_keys(&out.stdout)
    }

    fn cache(&self) -> PathBuf {
        self.path().join(".runner-cache")
    }

    /// Complete entries in the default cache.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.cache())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".tmp")
            .collect();
        names.sort();
        names
    }
}

fn strs(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn validate_accepts_a_good_recipe() -> Result {
    let ws = Workspace::new(
        r#"
[recipe]
name = "good"

[vars]
greeting = "hello"

[ops.first]
op = "text"
text = "${vars.greeting}"

[ops.second]
op = "concat"
inputs = { a = "first", b = "first" }
"#,
    );
    let out = ws.run(&["validate", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.trim(),
        "recipe.toml: ok: recipe `good`, 2 ops, 2 edges"
    );
    assert!(!ws.cache().exists(), "validate must not create the cache");
    Ok(())
}

fn usage_errors_exit_2() -> Result {
    let ws = Workspace::new("");
    let out = ws.run(&["run"]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = ws.run(&["frobnicate"]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = ws.run(&["--help"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("validate") && out.stdout.contains("plan"),
        "{out:?}"
    );
    let out = ws.run(&["validate", "missing.toml"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .starts_with("missing.toml: cannot read the recipe"),
        "{out:?}"
    );
    Ok(())
}

const CHAIN: &str = r#"
[ops.first]
op = "text"
text = "one"

[ops.second]
op = "concat"
inputs = { a = "first", b = "first" }
sep = "-"

[ops.third]
op = "sleep"
inputs = { after = "second" }
ms = 20
"#;

fn second_run_reuses_everything() -> Result {
    let ws = Workspace::new(CHAIN);
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.last_line(), "ran 3, reused 0, failed 0", "{out:?}");
    assert_eq!(out.done(), strs(&["first", "second", "third"]));
    assert!(
        out.stdout.contains("[third] slept 20 ms"),
        "op println reaches stdout: {out:?}"
    );

    let keys = ws.keys(&[]);
    let second = ws.cache().join(&keys["second"]);
    assert_eq!(
        fs::read_to_string(second.join("value.txt")).unwrap(),
        "one-one"
    );
    let mut expected: Vec<String> = keys.values().cloned().collect();
    expected.sort();
    assert_eq!(ws.entries(), expected, "one entry per op, named by its key");
    assert_eq!(
        fs::read_dir(ws.cache().join(".tmp")).unwrap().count(),
        0,
        "nothing left in .tmp"
    );

    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.last_line(), "ran 0, reused 3, failed 0", "{out:?}");
    assert_eq!(out.reused(), strs(&["first", "second", "third"]));

    let plan = ws.run(&["plan", "recipe.toml"]);
    assert_eq!(
        plan.last_line(),
        "3 cached, 0 will run, 0 skipped",
        "{plan:?}"
    );
    // Writing a default explicitly does not change any key.
    let out = ws.run(&[
        "run",
        "recipe.toml",
        "--set",
        "ops.third.until_file=\"recipe.toml\"",
    ]);
    assert_eq!(
        out.last_line(),
        "ran 1, reused 2, failed 0",
        "a new param value reruns: {out:?}"
    );
    let out = ws.run(&["run", "recipe.toml", "--set", "ops.second.sep=-"]);
    assert_eq!(out.last_line(), "ran 0, reused 3, failed 0", "{out:?}");
    Ok(())
}

const DIAMOND: &str = r#"
[ops.a]
op = "text"
text = "a"

[ops.b]
op = "text"
text = "b"

[ops.c]
op = "concat"
inputs = { a = "a", b = "b" }

[ops.d]
op = "concat"
inputs = { a = "c" }

[ops.e]
op = "concat"
inputs = { a = "b" }
"#;

fn set_reruns_op_and_descendants() -> Result {
    let ws = Workspace::new(DIAMOND);
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.last_line(), "ran 5, reused 0, failed 0", "{out:?}");
    let before = ws.keys(&[]);

    let set = ["--set", "ops.a.text=changed"];
    let after = ws.keys(&set);
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert_eq!(
        changed,
        ["a", "c", "d"],
        "only the keys downstream of `a` change"
    );
    let plan = ws.run(&["plan", "recipe.toml", set[0], set[1]]);
    assert_eq!(
        plan.last_line(),
        "2 cached, 3 will run, 0 skipped",
        "{plan:?}"
    );

    let out = ws.run(&["run", "recipe.toml", set[0], set[1]]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.done(), strs(&["a", "c", "d"]), "{out:?}");
    assert_eq!(out.reused(), strs(&["b", "e"]), "{out:?}");
    assert_eq!(out.last_line(), "ran 3, reused 2, failed 0");
    let d = ws.cache().join(&after["d"]).join("value.txt");
    assert_eq!(fs::read_to_string(d).unwrap(), "changed+b");

    // Both versions stay cached: going back reruns nothing.
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.last_line(), "ran 0, reused 5, failed 0", "{out:?}");
    Ok(())
}

fn killed_run_leaves_nothing_reused() -> Result {
    let ws = Workspace::new(
        r#"
[ops.first]
op = "text"
text = "x"

[ops.slow]
op = "sleep"
inputs = { after = "first" }
ms = 0
until_file = "release"
"#,
    );
    let keys = ws.keys(&[]);
    let mut child = ws.command(&["run", "recipe.toml"]).spawn().unwrap();
    // Wait until `slow` has written part of its output.
    let tmp = ws.cache().join(".tmp");
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = loop {
        let found = fs::read_dir(&tmp).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("partial"))
                .find(|p| p.exists())
        });
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "the sleep op never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(partial.starts_with(&tmp));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert_eq!(
        ws.entries(),
        vec![keys["first"].clone()],
        "only the finished op is in the cache"
    );
    assert!(!ws.cache().join(&keys["slow"]).exists());
    let plan = ws.run(&["plan", "recipe.toml"]);
    assert!(
        plan.stdout
            .lines()
            .any(|l| l.contains(" slow ") && l.ends_with("will run")),
        "{plan:?}"
    );

    fs::write(ws.path().join("release"), "").unwrap();
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.done(), strs(&["slow"]));
    assert_eq!(out.reused(), strs(&["first"]));
    assert_eq!(out.last_line(), "ran 1, reused 1, failed 0");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "the killed run's temporary output was cleaned up"
    );
    assert!(ws.cache().join(&keys["slow"]).join("interval.txt").exists());
    Ok(())
}

fn identical_ops_run_once() -> Result {
    let ws = Workspace::new(
        r#"
[ops.one]
op = "sleep"
ms = 50

[ops.two]
op = "sleep"
ms = 50

[ops.both]
op = "concat"
inputs = { a = "one", b = "two" }
"#,
    );
    let out = ws.run(&["run", "recipe.toml", "--jobs", "2"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.done(), strs(&["both", "one"]), "{out:?}");
    assert!(out.stdout.contains("reused two (sleep) "), "{out:?}");
    assert!(out.stdout.contains(": same output as `one`"), "{out:?}");
    assert_eq!(out.last_line(), "ran 2, reused 1, failed 0");
    Ok(())
}

/// Processes running one recipe on one cache at the same time (the ranks of a data-parallel run
/// sharing a cache folder): each makes the outputs it does not find, the first to publish an
/// output wins and the others drop their copies, a process starting meanwhile cleans up nothing
/// that a live writer holds, every run succeeds, and the cache ends with one complete entry per
/// op and no temporary folder.
fn concurrent_runs_share_one_cache() -> Result {
    let ws = Workspace::new(
        r#"
[ops.one]
op = "sleep"
ms = 300

[ops.two]
op = "sleep"
ms = 200

[ops.both]
op = "concat"
inputs = { a = "one", b = "two" }
"#,
    );
    let children: Vec<_> = (0..4)
        .map(|_| ws.command(&["run", "recipe.toml"]).spawn().unwrap())
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let out = Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        };
        assert_eq!(out.code, 0, "{out:?}");
        assert!(out.last_line().ends_with(", failed 0"), "{out:?}");
    }
    let keys = ws.keys(&[]);
    let mut want: Vec<String> = keys.values().cloned().collect();
    want.sort();
    assert_eq!(ws.entries(), want);
    assert_eq!(fs::read_dir(ws.cache().join(".tmp"))?.count(), 0);
    let again = ws.run(&["run", "recipe.toml"]);
    assert_eq!(again.last_line(), "ran 0, reused 3, failed 0", "{again:?}");
    Ok(())
}

/// (start, end) in µs of a sleep op's run, from its output.
fn interval(ws: &Workspace, key: &str) -> (u128, u128) {
    let text = fs::read_to_string(ws.cache().join(key).join("interval.txt")).unwrap();
    let mut parts = text.split_whitespace().map(|p| p.parse::<u128>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

fn independent_cpu_ops_overlap() -> Result {
    let ws = Workspace::new(
        r#"
[ops.left]
op = "sleep"
ms = 600

[ops.right]
op = "sleep"
ms = 601

[ops.joined]
op = "concat"
inputs = { a = "left", b = "right" }
"#,
    );
    let started = Instant::now();
    let out = ws.run(&["run", "recipe.toml", "--jobs", "2"]);
    let elapsed = started.elapsed();
    assert_eq!(out.last_line(), "ran 3, reused 0, failed 0", "{out:?}");
    let keys = ws.keys(&[]);
    let (l0, l1) = interval(&ws, &keys["left"]);
    let (r0, r1) = interval(&ws, &keys["right"]);
    assert!(
        l0 < r1 && r0 < l1,
        "the two sleeps overlap: left {l0}..{l1}, right {r0}..{r1}"
    );
    assert!(
        elapsed < Duration::from_millis(1150),
        "took {elapsed:?}: the sleeps ran one after the other"
    );
    Ok(())
}

fn gpu_ops_run_one_at_a_time() -> Result {
    let ws = Workspace::new(
        r#"
[ops.one]
op = "gpu-sleep"
ms = 150

[ops.two]
op = "gpu-sleep"
ms = 160

[ops.cpu]
op = "sleep"
ms = 150
"#,
    );
    let out = ws.run(&["run", "recipe.toml", "--jobs", "4"]);
    assert_eq!(out.last_line(), "ran 3, reused 0, failed 0", "{out:?}");
    let keys = ws.keys(&[]);
    let (a0, a1) = interval(&ws, &keys["one"]);
    let (b0, b1) = interval(&ws, &keys["two"]);
    let (c0, c1) = interval(&ws, &keys["cpu"]);
    assert!(
        a1 <= b0 || b1 <= a0,
        "GPU ops overlapped: {a0}..{a1} and {b0}..{b1}"
    );
    assert!(
        c0 < a1.max(b1) && a0.min(b0) < c1,
        "a CPU op runs beside the GPU queue"
    );
    Ok(())
}

fn failure_stops_new_ops_and_exits_1() -> Result {
    let ws = Workspace::new(
        r#"
[ops.bad]
op = "fail"
message = "the data is broken"

[ops.slow]
op = "sleep"
ms = 400

[ops.after_slow]
op = "concat"
inputs = { a = "slow" }

[ops.after_bad]
op = "concat"
inputs = { a = "bad" }
"#,
    );
    let out = ws.run(&["run", "recipe.toml", "--jobs", "2"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("error: op `bad` (fail) failed: the test op gave up: the data is broken"),
        "{out:?}"
    );
    assert_eq!(
        out.done(),
        strs(&["slow"]),
        "the running op finished: {out:?}"
    );
    assert!(
        out.stdout
            .contains("not started because an op failed: after_slow, after_bad"),
        "{out:?}"
    );
    assert_eq!(out.last_line(), "ran 1, reused 0, failed 1");
    let keys = ws.keys(&[]);
    assert_eq!(
        ws.entries(),
        vec![keys["slow"].clone()],
        "the failed op's output was not published"
    );

    // The next run resumes: `slow` is reused.
    let out = ws.run(&[
        "run",
        "recipe.toml",
        "--set",
        "ops.bad.message=still broken",
    ]);
    assert_eq!(out.code, 1);
    assert_eq!(out.reused(), strs(&["slow"]));
    assert_eq!(out.done(), strs(&["after_slow"]), "{out:?}");
    assert_eq!(out.last_line(), "ran 1, reused 1, failed 1");
    Ok(())
}

fn force_and_only() -> Result {
    let ws = Workspace::new(DIAMOND);
    let out = ws.run(&["run", "recipe.toml", "--only", "c"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.done(),
        strs(&["a", "b", "c"]),
        "--only runs the op and what it needs"
    );
    let plan = ws.run(&["plan", "recipe.toml", "--only", "e"]);
    assert!(plan.stdout.contains("not selected (--only)"), "{plan:?}");
    assert_eq!(
        plan.last_line(),
        "1 cached, 1 will run, 0 skipped",
        "{plan:?}"
    );

    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.done(), strs(&["d", "e"]));
    let out = ws.run(&["run", "recipe.toml", "--force", "c"]);
    assert_eq!(
        out.done(),
        strs(&["c", "d"]),
        "--force reruns the op and its consumers: {out:?}"
    );
    assert_eq!(out.last_line(), "ran 2, reused 3, failed 0");
    let out = ws.run(&["run", "recipe.toml", "--force", "cc"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("`--force cc`: the recipe has no op `cc`; did you mean `c`?"),
        "{out:?}"
    );
    Ok(())
}

fn plan_order() -> Result {
    // Consumers written before their producers; `z` and `m` are independent sources.
    let ws = Workspace::new(
        r#"
[ops.last]
op = "concat"
inputs = { a = "mid" }

[ops.mid]
op = "concat"
inputs = { a = "z", b = "m" }

[ops.z]
op = "text"
text = "z"

[ops.m]
op = "text"
text = "m"
"#,
    );
    let out = ws.run(&["plan", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    let order: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(". "))
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(order, ["z", "m", "mid", "last"], "{out:?}");
    let out = ws.run(&["run", "recipe.toml", "--jobs", "1"]);
    let started: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("start "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(started, ["z", "m", "mid", "last"], "{out:?}");
    Ok(())
}

fn skipped_ops_and_their_consumers() -> Result {
    let ws = Workspace::new(
        r#"
[ops.opt]
op = "maybe"
enabled = false

[ops.user]
op = "concat"
inputs = { a = "opt" }

[ops.other]
op = "text"
text = "t"
"#,
    );
    let plan = ws.run(&["plan", "recipe.toml"]);
    assert!(
        plan.stdout.contains("skipped (enabled = false)"),
        "{plan:?}"
    );
    assert!(
        plan.stdout
            .contains("skipped (input `a` comes from skipped op `opt`)"),
        "{plan:?}"
    );
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.done(), strs(&["other"]));
    assert_eq!(out.last_line(), "ran 1, reused 0, failed 0");
    let out = ws.run(&["run", "recipe.toml", "--set", "ops.opt.enabled=true"]);
    assert_eq!(out.done(), strs(&["opt", "user"]), "{out:?}");
    Ok(())
}

fn fingerprint_change_reruns() -> Result {
    let ws = Workspace::new("[ops.f]\nop = \"file\"\npath = \"data.txt\"\n");
    fs::write(ws.path().join("data.txt"), "v1").unwrap();
    assert_eq!(
        ws.run(&["run", "recipe.toml"]).last_line(),
        "ran 1, reused 0, failed 0"
    );
    assert_eq!(
        ws.run(&["run", "recipe.toml"]).last_line(),
        "ran 0, reused 1, failed 0"
    );
    fs::write(ws.path().join("data.txt"), "version 2").unwrap();
    assert_eq!(
        ws.run(&["run", "recipe.toml"]).last_line(),
        "ran 1, reused 0, failed 0"
    );
    Ok(())
}

/// `runner run r.toml | head -c1`: the reader goes away, and the run must still succeed (the
/// write of its last line meets EPIPE).
fn closed_stdout_is_not_a_failure() -> Result {
    let ws = Workspace::new(CHAIN);
    for args in [
        &["run", "recipe.toml"][..],
        &["plan", "recipe.toml"],
        &["ops"],
        &["validate", "recipe.toml"],
    ] {
        let mut child = ws.command(args).spawn().unwrap();
        drop(child.stdout.take());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    Ok(())
}

fn damaged_entry_names_the_force_to_rebuild_it() -> Result {
    let ws = Workspace::new(CHAIN);
    assert_eq!(ws.run(&["run", "recipe.toml"]).code, 0);
    let keys = ws.keys(&[]);
    fs::remove_file(ws.cache().join(&keys["first"]).join("value.txt")).unwrap();
    let out = ws.run(&["run", "recipe.toml", "--force", "second"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("rerun with --force first"), "{out:?}");
    let out = ws.run(&["run", "recipe.toml", "--force", "first"]);
    assert_eq!(out.code, 0, "{out:?}");
    Ok(())
}

fn cache_dir_precedence() -> Result {
    let ws = Workspace::new(
        "[recipe]\ncache_dir = \"from-recipe\"\n[ops.t]\nop = \"text\"\ntext = \"x\"\n",
    );
    let out = ws.run(&["run", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(ws.path().join("from-recipe").is_dir());
    let out = ws
        .command(&["run", "recipe.toml"])
        .env(runner_core::cli::CACHE_ENV, ws.path().join("from-env"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        ws.path().join("from-env").is_dir(),
        "RUNNER_CACHE wins over the recipe"
    );
    let out = ws
        .command(&["run", "recipe.toml", "--cache-dir", "from-flag"])
        .env(runner_core::cli::CACHE_ENV, ws.path().join("from-env2"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        ws.path().join("from-flag").is_dir(),
        "--cache-dir wins over everything"
    );
    assert!(!ws.path().join("from-env2").exists());
    Ok(())
}

fn graph_is_valid_dot() -> Result {
    let ws = Workspace::new(&format!("{DIAMOND}\n[ops.\"quoted \\\"name\\\"\"]\nop = \"gpu-sleep\"\ninputs = {{ after = \"e\" }}\n"));
    let out = ws.run(&["graph", "recipe.toml"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("\"a\" -> \"c\" [label=\"a\"]"),
        "{out:?}"
    );
    let dot = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut dot = match dot {
        Ok(d) => d,
        Err(e) => {
            return Err(format!(
                "cannot start Graphviz `dot` ({e}): install graphviz (tools/test.sh does)"
            )
            .into())
        }
    };
    dot.stdin
        .take()
        .unwrap()
        .write_all(out.stdout.as_bytes())
        .unwrap();
    let svg = dot.wait_with_output().unwrap();
    assert!(
        svg.status.success(),
        "dot rejected the graph: {}",
        String::from_utf8_lossy(&svg.stderr)
    );
    let svg = String::from_utf8(svg.stdout).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("quoted &quot;name&quot;"),
        "{svg}"
    );
    assert_eq!(svg.matches("class=\"edge\"").count(), 5);
    Ok(())
}

fn ops_lists_params_with_defaults() -> Result {
    let ws = Workspace::new("");
    let out = ws.run(&["ops"]);
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        "sleep — Sleeps, then records when it ran.",
        "  device: cpu, version: 1",
        "    after: blob (optional) — runs after this op",
        "  output: blob",
        "    ms          u64 (default 100) — How long to sleep, in milliseconds.",
        "    until_file  Option<String> (optional, unset) — Also wait until this file exists (relative to the recipe).",
        "gpu-sleep — Sleeps, then records when it ran.",
        "  device: gpu, version: 1",
        "    text  String (required) — The text to output.",
        "    sep  String (default \"+\") — Put between `a` and `b`.",
        "    model: model | quantized-model (required) — a model",
        "  output: depends on params (see above)",
    ] {
        assert!(out.stdout.lines().any(|l| l == line), "missing line {line:?} in\n{}", out.stdout);
    }
    let one = ws.run(&["ops", "concat"]);
    assert!(
        one.stdout.starts_with("concat — Joins two texts.\n") && !one.stdout.contains("sleep"),
        "{one:?}"
    );
    let bad = ws.run(&["ops", "slep"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr
            .contains("unknown op kind `slep`; did you mean `sleep`?"),
        "{bad:?}"
    );
    Ok(())
}

/// One invalid recipe: `validate` (or `plan` where the problem is found at plan time) must
/// exit 2 with a first error `recipe.toml:LINE:...` that contains every `expect` string.
struct Invalid {
    name: &'static str,
    recipe: &'static str,
    args: &'static [&'static str],
    command: &'static str,
    /// `None`: the error has no line (a command-line problem).
    line: Option<usize>,
    expect: &'static [&'static str],
}

fn invalid_cases() -> Vec<Invalid> {
    vec![
        Invalid {
            name: "bad_toml",
            recipe: "[ops.a]\nop = \"text\"\ntext = \"unterminated\n",
            args: &[],
            command: "validate",
            line: Some(3),
            expect: &["invalid TOML in op `a`"],
        },
        Invalid {
            name: "unknown_op_kind",
            recipe: "[ops.a]\nop = \"txt\"\ntext = \"x\"\n",
            args: &[],
            command: "validate",
            line: Some(2),
            expect: &["op `a`: unknown op kind `txt`; did you mean `text`?"],
        },
        Invalid {
            name: "unknown_param_near_miss",
            recipe: "[ops.a]\nop = \"sleep\"\nms = 1\nuntil_fil = \"x\"\n",
            args: &[],
            command: "validate",
            line: Some(4),
            expect: &["op `a` (sleep): unknown parameter `until_fil`; did you mean `until_file`?"],
        },
        Invalid {
            name: "unknown_input_op",
            recipe: "[ops.first]\nop = \"text\"\ntext = \"x\"\n\n[ops.b]\nop = \"concat\"\ninputs = { a = \"frist\" }\n",
            args: &[],
            command: "validate",
            line: Some(7),
            expect: &["op `b`: input `a` names `frist`, which is not an op in this recipe; did you mean `first`?"],
        },
        Invalid {
            name: "unknown_input_port",
            recipe: "[ops.first]\nop = \"text\"\ntext = \"x\"\n\n[ops.b]\nop = \"concat\"\ninputs = { a = \"first\", bb = \"first\" }\n",
            args: &[],
            command: "validate",
            line: Some(7),
            expect: &["op `b` (concat): unknown input port `bb`; did you mean `b`?"],
        },
        Invalid {
            name: "cycle_of_three",
            recipe: "[ops.x]\nop = \"concat\"\ninputs = { a = \"z\" }\n\n[ops.y]\nop = \"concat\"\ninputs = { a = \"x\" }\n\n[ops.z]\nop = \"concat\"\ninputs = { a = \"y\" }\n",
            args: &[],
            command: "validate",
            line: Some(3),
            expect: &[
                "ops form a cycle x -> z -> y -> x",
                "`x` takes `a` from `z`, `z` takes `a` from `y`, `y` takes `a` from `x`",
            ],
        },
        Invalid {
            name: "self_loop",
            recipe: "[ops.x]\nop = \"concat\"\ninputs = { a = \"x\" }\n",
            args: &[],
            command: "validate",
            line: Some(3),
            expect: &["ops form a cycle x -> x: `x` takes `a` from `x`"],
        },
        Invalid {
            name: "port_type_mismatch",
            recipe: "[ops.t]\nop = \"text\"\ntext = \"x\"\n\n[ops.m]\nop = \"model-consumer\"\ninputs = { model = \"t\" }\n",
            args: &[],
            command: "validate",
            line: Some(7),
            expect: &["op `m` (model-consumer): input `model` accepts model or quantized-model, but op `t` (text) produces blob"],
        },
        Invalid {
            name: "duplicate_op_name",
            recipe: "[ops.a]\nop = \"text\"\ntext = \"x\"\n\n[ops.a]\nop = \"text\"\ntext = \"y\"\n",
            args: &[],
            command: "validate",
            line: Some(5),
            expect: &["op `a` is defined twice (first at line 1)"],
        },
        Invalid {
            name: "set_unknown_param",
            recipe: "[ops.a]\nop = \"sleep\"\n",
            args: &["--set", "ops.a.mss=5"],
            command: "validate",
            line: Some(1),
            expect: &["op `a` (sleep): unknown parameter `mss`; did you mean `ms`?", "(from `--set ops.a.mss=5`)"],
        },
        Invalid {
            name: "set_unknown_op",
            recipe: "[ops.alpha]\nop = \"sleep\"\n",
            args: &["--set", "ops.alpah.ms=5"],
            command: "validate",
            line: None,
            expect: &["`--set ops.alpah.ms=5`: the recipe has no op `alpah`; did you mean `alpha`?"],
        },
        Invalid {
            name: "set_bad_path",
            recipe: "[ops.alpha]\nop = \"sleep\"\n",
            args: &["--set", "ms=5"],
            command: "validate",
            line: None,
            expect: &["`--set ms=5`: a path starts with `ops`, `vars` or `recipe`"],
        },
        Invalid {
            name: "undefined_var",
            recipe: "[vars]\nmodel = \"m\"\n\n[ops.a]\nop = \"text\"\ntext = \"${vars.modle}\"\n",
            args: &[],
            command: "validate",
            line: Some(6),
            expect: &["undefined variable `${vars.modle}`; did you mean `model`?"],
        },
        Invalid {
            name: "wrong_value_type",
            recipe: "[ops.a]\nop = \"sleep\"\nms = \"soon\"\n",
            args: &[],
            command: "validate",
            line: Some(3),
            expect: &["op `a` (sleep): parameter `ms` must be u64, got string"],
        },
        Invalid {
            name: "wrong_value_type_through_var",
            recipe: "[vars]\nwait = -3\n[ops.a]\nop = \"sleep\"\nms = \"${vars.wait}\"\n",
            args: &[],
            command: "validate",
            line: Some(5),
            expect: &["op `a` (sleep): parameter `ms` must be u64, got integer `-3`"],
        },
        Invalid {
            name: "missing_required_param",
            recipe: "[ops.ok]\nop = \"sleep\"\n\n[ops.a]\nop = \"text\"\n",
            args: &[],
            command: "validate",
            line: Some(4),
            expect: &["op `a` (text): missing required parameter `text`; add `text = ...` (String) under [ops.a]"],
        },
        Invalid {
            name: "missing_required_input",
            recipe: "[ops.a]\nop = \"concat\"\n",
            args: &[],
            command: "validate",
            line: Some(1),
            expect: &["op `a` (concat): missing required input `a` (first text); add `inputs = { a = \"OP\" }`"],
        },
        Invalid {
            name: "empty_recipe",
            recipe: "# nothing here\n",
            args: &[],
            command: "validate",
            line: Some(1),
            expect: &["the recipe defines no ops; add an `[ops.NAME]` table"],
        },
        Invalid {
            name: "missing_op_kind",
            recipe: "[ops.a]\nop = \"sleep\"\n\n[ops.b]\nkind = \"text\"\n",
            args: &[],
            command: "validate",
            line: Some(4),
            expect: &["op `b` has no `op = \"KIND\"`"],
        },
        Invalid {
            name: "input_not_a_name",
            recipe: "[ops.a]\nop = \"sleep\"\n\n[ops.b]\nop = \"sleep\"\ninputs = { after = 3 }\n",
            args: &[],
            command: "validate",
            line: Some(6),
            expect: &["op `b`: input `after` must name another op as a string"],
        },
        Invalid {
            name: "unknown_recipe_key",
            recipe: "[recipe]\nname = \"r\"\nsed = 1\n\n[ops.a]\nop = \"sleep\"\n",
            args: &[],
            command: "validate",
            line: Some(3),
            expect: &["unknown key `sed` in `[recipe]`; did you mean `seed`?"],
        },
        Invalid {
            name: "fingerprint_fails_at_plan",
            recipe: "[ops.a]\nop = \"sleep\"\n\n[ops.data]\nop = \"file\"\npath = \"no-such-file.txt\"\n",
            args: &[],
            command: "plan",
            line: Some(4),
            expect: &["op `data` (file): cannot read `", "no-such-file.txt`"],
        },
    ]
}

fn check_invalid(case: &Invalid) {
    let ws = Workspace::new(case.recipe);
    let mut args = vec![case.command, "recipe.toml"];
    args.extend_from_slice(case.args);
    let out = ws.run(&args);
    assert_eq!(out.code, 2, "{}: {out:?}", case.name);
    assert_eq!(out.stdout, "", "nothing on stdout: {out:?}");
    let first = out.stderr.lines().next().unwrap_or("");
    match case.line {
        Some(line) => assert!(
            first.starts_with(&format!("recipe.toml:{line}:")),
            "{}: expected an error at line {line}: {out:?}",
            case.name
        ),
        None => assert!(first.starts_with("recipe.toml: "), "{}: {out:?}", case.name),
    }
    for expect in case.expect {
        assert!(
            first.contains(expect),
            "{}: expected {expect:?} in {first:?}",
            case.name
        );
    }
    assert!(!ws.cache().exists(), "{}: nothing may run", case.name);
}
