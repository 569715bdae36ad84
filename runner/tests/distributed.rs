//! Data-parallel `lora-train` under `mpirun` (issue #17; `--features distributed`): two ranks on
//! lavapipe against the independent truth, one process whose gradient accumulation covers the
//! same micro-batches (W ranks × A micro-batches each = one process × W·A). Losses, gradient
//! norms and the trained adapter must agree; a killed or failing rank must end the whole run
//! within seconds, naming the rank.
//!
//! The recipe is the demo's training chain (NF4 base, LoRA all-linear with dropout, both
//! modules_to_save copies, gradient checkpointing) on the 6 MMIU-shaped rows, batch 1: 6
//! micro-batches an epoch, which 2 ranks split evenly, so no padding batch enters.
#![cfg(feature = "distributed")]

mod offline_run;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offline_run::repo_root;

fn runner_args(work: &Path, sets: &[String]) -> Vec<String> {
    let root = repo_root();
    let mut args = vec![
        env!("CARGO_BIN_EXE_runner").to_string(),
        "run".into(),
        root.join("recipes/demo.toml").display().to_string(),
        "--only".into(),
        "train".into(),
        "--cache-dir".into(),
        work.join("cache").display().to_string(),
        "--set".into(),
        format!("recipe.output_dir={}", work.join("out").display()),
    ];
    let fixed = [
        "ops.train.logging_steps=1".to_string(),
        "ops.train.save_strategy=\"no\"".to_string(),
        format!(
            "ops.train.checkpoint_dir={}",
            work.join("checkpoints").display()
        ),
    ];
    let key = |s: &String| s.split('=').next().unwrap_or_default().to_string();
    let given: Vec<String> = sets.iter().map(key).collect();
    for s in fixed
        .iter()
        .filter(|f| !given.contains(&key(f)))
        .chain(sets)
    {
        args.push("--set".into());
        args.push(s.clone());
    }
    args
}

fn command(program: &str, args: &[String]) -> Command {
    let root = repo_root();
    let mut c = Command::new(program);
    c.args(args)
        .env("HF_HUB_CACHE", root.join("tests/fixtures/hf-cache/hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN")
        // mpirun refuses root without these; on a 2-core CI machine 2 ranks oversubscribe.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    c
}

fn mpirun_args(ranks: usize) -> Vec<String> {
    ["-n", &ranks.to_string(), "--oversubscribe"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

struct Run {
    stdout: String,
    stderr: String,
    seconds: f64,
}

fn run(mut c: Command, what: &str) -> Run {
    let started = Instant::now();
    let out = c.output().unwrap_or_else(|e| {
        panic!("{what}: cannot start ({e}); is mpirun installed (openmpi-bin)?")
    });
    let run = Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: started.elapsed().as_secs_f64(),
    };
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        run.stdout,
        run.stderr
    );
    run
}

/// The one lora-train entry of a cache.
fn train_entry(work: &Path) -> PathBuf {
    let entries: Vec<PathBuf> = std::fs::read_dir(work.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("metrics.jsonl").is_file())
        .collect();
    assert_eq!(entries.len(), 1, "one lora-train output: {entries:?}");
    entries[0].clone()
}

fn metrics(entry: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(entry.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn adapter(entry: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(entry.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => bytemuck_f32(view.data()),
                // The modules_to_save copies under bf16 = true.
                safetensors::Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                d => panic!("{name}: {d:?}"),
            };
            (name, values)
        })
        .collect()
}

fn bytemuck_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

/// `ranks` ranks with `per_rank` micro-batches per step against one process with
/// `ranks × per_rank`: same steps, losses, gradient norms, learning rates, token counts and
/// accuracies, and the same adapter to 1e-6.
fn ranks_equal_one_process(ranks: usize, per_rank: usize, steps: u64) {
    let (dist, single) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The guide's learning rate, not the demo's 5e-3: the runs' gradients agree to rounding
    // (their sums group the micro-batches' terms differently), and AdamW turns a rounding-level
    // change of a near-zero gradient into a change of up to the learning rate in its value.
    let common = [
        format!("ops.train.max_steps={steps}"),
        "ops.train.learning_rate=2e-4".to_string(),
    ];
    let mut a = mpirun_args(ranks);
    a.extend(runner_args(
        dist.path(),
        &[
            common[0].clone(),
            common[1].clone(),
            format!("ops.train.gradient_accumulation_steps={per_rank}"),
        ],
    ));
    let d = run(command("mpirun", &a), "mpirun");
    let s = run(
        command(
            env!("CARGO_BIN_EXE_runner"),
            &runner_args(
                single.path(),
                &[
                    common[0].clone(),
                    common[1].clone(),
                    format!("ops.train.gradient_accumulation_steps={}", ranks * per_rank),
                ],
            )[1..],
        ),
        "runner",
    );
    eprintln!(
        "{ranks} ranks x {per_rank}: {:.1} s; one process x {}: {:.1} s",
        d.seconds,
        ranks * per_rank,
        s.seconds
    );
    assert!(
        d.stdout
            .contains(&format!("data-parallel step on {ranks} ranks")),
        "{}",
        d.stdout
    );
    assert!(
        d.stdout
            .contains(&format!("global batch 1 x {ranks} x {per_rank}")),
        "{}",
        d.stdout
    );
    gradient_bytes_are_the_plans(&d.stdout);
    // Rank 1 prints nothing; rank 0's summary line is the last.
    assert_eq!(
        d.stdout.lines().filter(|l| l.starts_with("ran ")).count(),
        1,
        "{}",
        d.stdout
    );

    let (de, se) = (train_entry(dist.path()), train_entry(single.path()));
    let (dm, sm) = (metrics(&de), metrics(&se));
    assert_eq!(dm.len() as u64, steps, "{dm:?}");
    assert_eq!(dm.len(), sm.len());
    for (x, y) in dm.iter().zip(&sm) {
        assert_eq!(x["step"], y["step"]);
        for key in ["loss", "grad_norm", "mean_token_accuracy"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(close(p, q, 1e-6), "step {}: {key} {p} vs {q}", x["step"]);
        }
        for key in ["learning_rate", "num_tokens", "epoch"] {
            assert_eq!(x[key], y[key], "step {}: {key}", x["step"]);
        }
    }
    let (da, sa) = (adapter(&de), adapter(&se));
    assert_eq!(da.keys().collect::<Vec<_>>(), sa.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (k, v) in &da {
        let w = &sa[k];
        assert_eq!(v.len(), w.len(), "{k}");
        for (p, q) in v.iter().zip(w) {
            let diff = (*p as f64 - *q as f64).abs();
            worst = worst.max(diff);
            assert!(diff <= 1e-6, "{k}: {p} vs {q}");
        }
    }
    eprintln!("largest adapter difference {worst:e}");
    // Only rank 0 wrote outputs outside the cache: no checkpoints were asked for, and the
    // cache holds one lora-train entry (rank 1 publishes none).
    assert!(!dist.path().join("checkpoints").exists());

    // Run again on the shared cache: rank 0 reuses everything, so rank 1 has nothing to do.
    let again = run(command("mpirun", &a), "mpirun, cached");
    assert_eq!(
        again.stdout.lines().last(),
        Some("ran 0, reused 8, failed 0"),
        "{}",
        again.stdout
    );
}

/// The gradient bytes the first step printed are what `model::memory::allreduce_payload` (the
/// README's 4B figures) gives for the tiny model's LoRA (r 8, all-linear with the tower) and f32
/// copies, with the embed_tokens rows the step reported.
fn gradient_bytes_are_the_plans(stdout: &str) {
    let line = stdout
        .lines()
        .find(|l| l.contains("data-parallel step on"))
        .expect("the first step's all-reduce line");
    let number_before = |marker: &str| -> u64 {
        let head = &line[..line
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} in {line}"))];
        head.split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches('(')
            .parse()
            .unwrap()
    };
    let gradients = number_before(" bytes of gradients");
    let rows = number_before(" embed_tokens rows");
    let snapshots =
        repo_root().join("tests/fixtures/hf-cache/hub/models--runner-test--tiny-gemma-3/snapshots");
    let snapshot = std::fs::read_dir(&snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let config = ops::model::config::ModelConfig::from_file(&snapshot.join("config.json")).unwrap();
    let payload = ops::model::memory::allreduce_payload(
        &config,
        &ops::model::memory::LoraPlan {
            r: 8,
            modules_to_save: vec!["lm_head".into(), "embed_tokens".into()],
            modules_to_save_dtype: ops::model::config::FloatDtype::F32,
            vision: true,
            dropout: true,
            optimizer_offload: false,
        },
        rows,
    )
    .unwrap();
    assert_eq!(gradients, payload.total(), "{line}\n{payload:?}");
}

#[test]
fn two_ranks_of_one_micro_batch_equal_one_process_accumulating_two() {
    ranks_equal_one_process(2, 1, 3);
}

#[test]
fn two_ranks_of_two_micro_batches_equal_one_process_accumulating_four() {
    // 6 micro-batches an epoch: steps of 4 then 2 (the short last cycle) in both runs.
    ranks_equal_one_process(2, 2, 3);
}

/// The pid of the process whose environment holds `OMPI_COMM_WORLD_RANK=<rank>` and `mark`.
fn rank_pid(rank: usize, mark: &str) -> Option<u32> {
    let want_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()? {
        let path = entry.ok()?.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(path.join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&want_rank.as_bytes()) && vars.contains(&mark.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_run_within_seconds_naming_the_rank() {
    let work = tempfile::tempdir().unwrap();
    let mark = format!("RUNNER_KILL_TEST={}", std::process::id());
    let mut a = mpirun_args(2);
    a.extend(runner_args(
        work.path(),
        &["ops.train.max_steps=10000".to_string()],
    ));
    let mut child = command("mpirun", &a)
        .env("RUNNER_KILL_TEST", std::process::id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s).unwrap();
        s
    });
    // Training is under way once rank 0 reports the first data-parallel step.
    let mut out = String::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        out.push_str(&line);
        out.push('\n');
        if line.contains("data-parallel step on 2 ranks") {
            break;
        }
    }
    assert!(
        out.contains("data-parallel step"),
        "training never started:\n{out}"
    );
    let pid = rank_pid(1, &mark).expect("rank 1's process");
    let killed = Instant::now();
    // SAFETY-free: kill(1) through the shell's utility, no libc in this crate.
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the run did not end within 60 s of rank 1's death");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seconds = killed.elapsed().as_secs_f64();
    let err = err_reader.join().unwrap();
    eprintln!("run ended {seconds:.2} s after rank 1 was killed ({code})");
    assert!(!code.success());
    assert!(seconds < 15.0, "took {seconds:.1} s");
    let all = format!("{out}{}\n{err}", rest.join("\n"));
    // Open MPI: "mpirun noticed that process rank 1 with PID … exited on signal 9 (Killed)".
    assert!(
        all.contains("process rank 1"),
        "the rank is not named:\n{all}"
    );
}

#[test]
fn a_rank_that_fails_aborts_every_rank_with_its_error() {
    // MPMD launch: rank 1 gets another learning rate, so its plan differs from rank 0's: it
    // must say so, prefixed with its rank, and end the job (MPI_Abort), not leave rank 0
    // waiting in a collective.
    let work = tempfile::tempdir().unwrap();
    let mut a = vec!["-n".to_string(), "1".to_string()];
    a.extend(runner_args(work.path(), &[]));
    a.extend([":".to_string(), "-n".to_string(), "1".to_string()]);
    a.extend(runner_args(
        work.path(),
        &["ops.train.learning_rate=1e-3".to_string()],
    ));
    let started = Instant::now();
    let out = command("mpirun", &a).output().expect("mpirun starts");
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rank 1: error: this rank planned other cache keys than rank 0"),
        "{stderr}"
    );
    assert!(seconds < 60.0, "took {seconds:.1} s");
}

#[test]
fn resume_needs_the_same_ranks_and_continues_the_run_exactly() {
    let work = tempfile::tempdir().unwrap();
    let checkpoints = work.path().join("checkpoints");
    let sets = |resume: bool| {
        vec![
            "ops.train.max_steps=3".to_string(),
            "ops.train.learning_rate=2e-4".to_string(),
            "ops.train.save_strategy=\"steps\"".to_string(),
            "ops.train.save_steps=1".to_string(),
            format!("ops.train.checkpoint_dir={}", checkpoints.display()),
            format!("ops.train.resume_from_checkpoint={resume}"),
        ]
    };
    let full = work.path().join("full");
    let mut a = mpirun_args(2);
    a.extend(runner_args(&full, &sets(false)));
    run(command("mpirun", &a), "2 ranks, 3 steps");
    for step in 1..=3 {
        assert!(checkpoints.join(format!("checkpoint-{step}")).is_dir());
    }
    // Back to step 1: the run resumes from there.
    for step in 2..=3 {
        std::fs::remove_dir_all(checkpoints.join(format!("checkpoint-{step}"))).unwrap();
    }

    // One process cannot take over a 2-rank run's checkpoint.
    let one = work.path().join("one");
    let out = command(
        env!("CARGO_BIN_EXE_runner"),
        &runner_args(&one, &sets(true))[1..],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("was written by a run on 2 rank(s) and this run has 1")
            && stderr.contains("mpirun -n 2"),
        "{stderr}"
    );

    // Two ranks resume (rank 1 gets the checkpoint from rank 0) and end where the full run did.
    let resumed = work.path().join("resumed");
    let mut a = mpirun_args(2);
    a.extend(runner_args(&resumed, &sets(true)));
    let r = run(command("mpirun", &a), "2 ranks resuming");
    assert!(r.stdout.contains("resuming from"), "{}", r.stdout);
    let (fa, ra) = (
        adapter(&train_entry(&full)),
        adapter(&train_entry(&resumed)),
    );
    for (k, v) in &fa {
        for (p, q) in v.iter().zip(&ra[k]) {
            assert!((p - q).abs() <= 1e-7, "{k}: {p} vs {q}");
        }
    }
    let (fm, rm) = (
        metrics(&train_entry(&full)),
        metrics(&train_entry(&resumed)),
    );
    assert_eq!(fm.len(), rm.len());
    for (x, y) in fm.iter().zip(&rm) {
        let (p, q) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(close(p, q, 1e-6), "step {}: {p} vs {q}", x["step"]);
    }
}

/// Under `bf16 = true` the copies' gradients are bf16 and travel as bf16 (summed pairwise in f32
/// and rounded: the user-defined MPI op): one rounding more than one process makes when it adds
/// its second micro-batch's f32 block gradient into the bf16 sum, so the runs agree to bf16
/// rounding, not to f32's. Bounds: losses and gradient norms to 1e-4 relative; the f32 LoRA
/// tensors to 1e-5; a bf16 copy's values to what AdamW can make of a one-ulp gradient change
/// (at most 2 x learning rate per step: each step moves a value by at most about the learning
/// rate) plus one bf16 ulp of the value.
#[test]
fn two_ranks_in_bf16_agree_with_one_process_to_bf16_rounding() {
    let (dist, single) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (steps, lr) = (3u64, 2e-4);
    let sets = |ga: usize| {
        vec![
            format!("ops.train.max_steps={steps}"),
            format!("ops.train.learning_rate={lr}"),
            "ops.train.bf16=true".to_string(),
            format!("ops.train.gradient_accumulation_steps={ga}"),
        ]
    };
    let mut a = mpirun_args(2);
    a.extend(runner_args(dist.path(), &sets(1)));
    let d = run(command("mpirun", &a), "mpirun, bf16");
    run(
        command(
            env!("CARGO_BIN_EXE_runner"),
            &runner_args(single.path(), &sets(2))[1..],
        ),
        "runner, bf16",
    );
    assert!(
        d.stdout.contains("data-parallel step on 2 ranks"),
        "{}",
        d.stdout
    );
    let (de, se) = (train_entry(dist.path()), train_entry(single.path()));
    for (x, y) in metrics(&de).iter().zip(&metrics(&se)) {
        for key in ["loss", "grad_norm"] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(close(p, q, 1e-4), "step {}: {key} {p} vs {q}", x["step"]);
        }
        assert_eq!(x["num_tokens"], y["num_tokens"]);
    }
    let (da, sa) = (adapter(&de), adapter(&se));
    for (k, v) in &da {
        let copy = k.ends_with("lm_head.weight") || k.ends_with("embed_tokens.weight");
        for (p, q) in v.iter().zip(&sa[k]) {
            let bound = if copy {
                2.0 * lr as f32 * steps as f32 + p.abs().max(q.abs()) / 128.0
            } else {
                1e-5
            };
            assert!((p - q).abs() <= bound, "{k}: {p} vs {q} (bound {bound:e})");
        }
    }
}
