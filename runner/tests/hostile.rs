//! Hostile and faulty inputs through the real `runner` binary (issue 14): what a recipe's cache
//! keys cover, datasets that name files outside themselves, decompression and zip bombs, hostile
//! model files, over-long rows, extreme params, Hub failures and a quiet stderr.

mod offline_run;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use offline_run::repo_root;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn fixture_hub() -> PathBuf {
    repo_root().join("tests/fixtures/hf-cache/hub")
}

/// The binary in `dir`, offline on the fixture Hub cache, with `envs` on top.
fn runner(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner"));
    cmd.current_dir(dir)
        .args(args)
        .env("HF_HUB_CACHE", fixture_hub())
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN")
        .env_remove("RUNNER_CACHE")
        .env_remove("RUNNER_MAX_IMAGE_PIXELS");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runner starts");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Op name -> key, from a successful `runner plan`.
fn plan_keys(out: &Out) -> BTreeMap<String, String> {
    assert_eq!(out.code, 0, "{out:?}");
    offline_run::plan_keys(&out.stdout)
}

fn changed(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    a.iter()
        .filter(|(name, key)| b[*name] != **key)
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn recipe_seed_and_output_dir_reach_the_keys_of_the_ops_they_change() {
    let work = tempfile::tempdir().unwrap();
    let recipe = repo_root().join("recipes/demo.toml");
    let recipe = recipe.to_str().unwrap();
    let cache = work.path().join("cache");
    let plan = |sets: &[&str]| {
        let mut args = vec!["plan", recipe, "--cache-dir", cache.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", s]);
        }
        plan_keys(&runner(work.path(), &args, &[]))
    };
    let base = plan(&[]);
    // The seed shuffles the batches and initialises the LoRA weights and dropout (the greedy
    // answers and their scores change only as the trained adapter does).
    assert_eq!(
        changed(&base, &plan(&["recipe.seed=7"])),
        ["answers", "batches", "eval", "push", "save", "scores", "train"]
    );
    // Sampling without its own seed takes the recipe's (the other seeds fixed here).
    let sampling = [
        "ops.answers.do_sample=true",
        "ops.batches.seed=1",
        "ops.train.seed=1",
    ];
    let mut reseeded = sampling.to_vec();
    reseeded.push("recipe.seed=7");
    assert_eq!(
        changed(&plan(&sampling), &plan(&reseeded)),
        ["answers", "scores"]
    );
    // The output folder is what `save` writes (and `push` uploads from it).
    assert_eq!(
        changed(&base, &plan(&["recipe.output_dir=other"])),
        ["push", "save"]
    );
    // An op's own seed wins over the recipe's: the recipe's then changes nothing of it.
    let own = plan(&["ops.batches.seed=1", "ops.train.seed=1"]);
    let own_and_recipe = plan(&["ops.batches.seed=1", "ops.train.seed=1", "recipe.seed=7"]);
    assert_eq!(changed(&own, &own_and_recipe), Vec::<String>::new());
}

/// A folder with `recipe.toml` and a local dataset `data/train.jsonl`.
struct Dataset {
    dir: tempfile::TempDir,
}

const FORMAT_RECIPE: &str = r#"
[ops.raw]
op = "load"
path = "data"

[ops.chats]
op = "format"
inputs = { rows = "raw" }
user = { images = "{image}", text = "{q}" }
assistant = "{a}"
"#;

impl Dataset {
    fn new(recipe: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("recipe.toml"), recipe).unwrap();
        fs::create_dir_all(dir.path().join("data")).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    fn rows(&self, rows: &[serde_json::Value]) {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        fs::write(self.data().join("train.jsonl"), text).unwrap();
    }

    fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Out {
        let mut all = vec!["run", "recipe.toml"];
        all.extend_from_slice(args);
        runner(self.path(), &all, envs)
    }
}

fn row(image: &str, q: &str) -> serde_json::Value {
    serde_json::json!({"image": [image], "q": q, "a": "an answer"})
}

fn png(path: &Path, side: u32) {
    image::RgbImage::from_fn(side, side, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .save_with_format(path, image::ImageFormat::Png)
        .unwrap();
}

/// A valid 8x8 JPEG whose header then claims `side`x`side` pixels: a few hundred bytes that
/// would decode into gigabytes.
fn jpeg_bomb(path: &Path, side: u16) {
    let mut bytes = Vec::new();
    image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([x as u8 * 30, 0, 0]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let sof = bytes
        .windows(2)
        .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2))
        .expect("a SOF marker");
    // FF Cn, length (2), precision (1), height (2), width (2)
    bytes[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
    fs::write(path, bytes).unwrap();
}

#[test]
fn absolute_image_paths_outside_the_dataset_are_skipped_unless_allowed() {
    let ds = Dataset::new(FORMAT_RECIPE);
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("host-secret.png");
    png(&outside, 8);
    png(&ds.data().join("inside.png"), 8);
    let inside_abs = ds.data().join("inside.png").canonicalize().unwrap();
    ds.rows(&[
        row("inside.png", "relative, in the dataset"),
        row(inside_abs.to_str().unwrap(), "absolute, in the dataset"),
        row(outside.to_str().unwrap(), "absolute, elsewhere"),
    ]);
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("is absolute and outside the dataset's folder")
            && out.stdout.contains("host-secret.png")
            && out.stdout.contains("allow_paths_outside = true"),
        "{out:?}"
    );
    assert!(out.stdout.contains("skipped 1"), "{out:?}");

    let out = ds.run(&["--set", "ops.chats.allow_paths_outside=true"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains("skipped 1"), "{out:?}");
    assert!(!out.stdout.contains("is absolute"), "{out:?}");
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let ds = Dataset::new(FORMAT_RECIPE);
    jpeg_bomb(&ds.data().join("bomb.jpg"), 20000);
    png(&ds.data().join("small.png"), 8);
    ds.rows(&[row("bomb.jpg", "a bomb"), row("small.png", "fine")]);
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("DecompressionBombError") && out.stdout.contains("20000x20000"),
        "{out:?}"
    );
    assert!(out.stdout.contains("skipped 1"), "{out:?}");

    // The limit is Pillow's MAX_IMAGE_PIXELS, configurable (and part of the key): 20 pixels
    // refuses the 8x8 PNG too, and then no row is left.
    let out = ds.run(&[], &[("RUNNER_MAX_IMAGE_PIXELS", "20")]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("8x8 = 64 pixels"), "{out:?}");
    assert!(out.stderr.contains("no usable rows"), "{out:?}");
}

fn zip_file(path: &Path, entries: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(fs::File::create(path).unwrap());
    for (name, data) in entries {
        w.start_file(
            *name,
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
}

const UNZIP_RECIPE: &str = r#"
[ops.raw]
op = "load"
path = "data"

[ops.images]
op = "unzip"
inputs = { archives = "raw" }
"#;

/// A zip's entries: name and content.
type Entries<'a> = &'a [(&'a str, &'a [u8])];

fn unzip_case(archives: &[(&str, Entries)]) -> Out {
    let ds = Dataset::new(UNZIP_RECIPE);
    ds.rows(&[row("x.png", "q")]);
    for (name, entries) in archives {
        let path = ds.data().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        zip_file(&path, entries);
    }
    ds.run(&[], &[])
}

#[test]
fn zip_bombs_and_colliding_entries_are_refused() {
    // A nested archive would overwrite the outer one's file: a/b.zip extracts into a/b/.
    let out = unzip_case(&[
        ("a.zip", &[("b/x.png", b"outer")]),
        ("a/b.zip", &[("x.png", b"nested")]),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("collides with entry") && out.stderr.contains("a/b/x.png"),
        "{out:?}"
    );
    // `a` is a file and `a/b` needs it to be a folder.
    let out = unzip_case(&[("c.zip", &[("a", b"file"), ("a/b", b"below the file")])]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("collides with entry `a`"), "{out:?}");
    // An archive named `.zip` would extract into the output's root.
    let out = unzip_case(&[(".zip", &[("x.png", b"x")])]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no usable name"), "{out:?}");
    // 64 MiB of zeros deflate to about 64 KB: a ratio of 1000.
    let zeros = vec![0u8; 64 << 20];
    let out = unzip_case(&[("z.zip", &[("zeros.bin", &zeros)])]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("max_compression_ratio"), "{out:?}");
}

/// A copy of the tiny fixture model, files resolved out of the Hub cache's symlinks.
fn copy_model(to: &Path) {
    let snapshots = fixture_hub().join("models--runner-test--tiny-gemma-3/snapshots");
    let snapshot = fs::read_dir(snapshots)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(snapshot).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

const MODEL_RECIPE: &str = r#"
[ops.raw]
op = "load"
path = "data"

[ops.chats]
op = "format"
inputs = { rows = "raw" }
user = { images = "{image}", text = "{q}" }
assistant = "{a}"

[ops.base]
op = "load"
path = "model"
repo_type = "model"

[ops.texts]
op = "template"
inputs = { conversations = "chats", model = "base" }

[ops.batches]
op = "collate"
inputs = { templated = "texts", model = "base" }
batch_size = 1
"#;

fn model_case() -> Dataset {
    let ds = Dataset::new(MODEL_RECIPE);
    png(&ds.data().join("x.png"), 8);
    ds.rows(&[row("x.png", "what is it?")]);
    copy_model(&ds.path().join("model"));
    ds
}

fn edit_processor(ds: &Dataset, edit: impl Fn(&mut serde_json::Value)) {
    let path = ds.path().join("model/processor_config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    edit(&mut v["image_processor"]);
    fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn hostile_model_files_fail_clearly() {
    let ds = model_case();
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 0, "the unmodified copy works: {out:?}");

    // A template that would loop 10^15 times stops at its fuel.
    let ds = model_case();
    fs::write(
        ds.path().join("model/chat_template.jinja"),
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
    )
    .unwrap();
    // Before the fuel it never ended: give it two minutes, then fail the test.
    let mut child = Command::new(env!("CARGO_BIN_EXE_runner"))
        .current_dir(ds.path())
        .args(["run", "recipe.toml"])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed().as_secs() > 120 {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "the hostile template still runs after {:?}",
                started.elapsed()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("template instructions"), "{stderr}");

    let ds = model_case();
    edit_processor(&ds, |p| {
        p["size"] = serde_json::json!({"height": 1000000, "width": 1000000})
    });
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("`size.height` = 1000000 is out of range"),
        "{out:?}"
    );

    let ds = model_case();
    edit_processor(&ds, |p| p["image_std"] = serde_json::json!([0.5, 0.0, 0.5]));
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("`image_std` holds 0; every value must be positive"),
        "{out:?}"
    );
}

#[test]
fn rows_longer_than_the_models_positions_are_bad_rows() {
    let ds = model_case();
    let long = "word ".repeat(3000);
    ds.rows(&[row("x.png", &long), row("x.png", "short")]);
    let out = ds.run(&[], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("more than the model's max_position_embeddings = 2048")
            && out.stdout.contains("dropped 1"),
        "{out:?}"
    );
    let out = ds.run(&["--set", "ops.batches.on_error=\"fail\""], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("max_position_embeddings"), "{out:?}");
    // Truncation makes the row fit.
    let out = ds.run(&["--set", "ops.batches.max_length=512"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stdout.contains("dropped"), "{out:?}");
}

#[test]
fn extreme_params_are_refused_by_validate() {
    let work = tempfile::tempdir().unwrap();
    let recipe = repo_root().join("recipes/demo.toml");
    let recipe = recipe.to_str().unwrap();
    for (set, wanted) in [
        ("ops.train.r=4294967296", "r must be between 1 and 65536"),
        (
            "ops.batches.batch_size=4611686018427387904",
            "batch_size must be between 1 and 65536",
        ),
        (
            "ops.train.learning_rate=inf",
            "learning_rate must be a positive finite number",
        ),
        (
            "ops.train.learning_rate=nan",
            "learning_rate must be a positive finite number",
        ),
        ("ops.train.adam_beta2=1.0", "adam_beta2 must be in [0, 1)"),
        (
            "ops.train.max_grad_norm=-inf",
            "max_grad_norm must be a finite number",
        ),
        (
            "ops.images.max_compression_ratio=0.5",
            "max_compression_ratio",
        ),
    ] {
        let out = runner(work.path(), &["validate", recipe, "--set", set], &[]);
        assert_eq!(out.code, 2, "{set}: {out:?}");
        assert!(out.stderr.contains(wanted), "{set}: {out:?}");
        assert!(
            out.stderr.contains("demo.toml:"),
            "names the recipe's line: {out:?}"
        );
    }
    // Written in the recipe, an integer past 64 bits is a range error, not a type error.
    let text = fs::read_to_string(recipe)
        .unwrap()
        .replace("\nr = 8\n", "\nr = 99999999999999999999\n");
    fs::write(work.path().join("big.toml"), text).unwrap();
    let out = runner(work.path(), &["validate", "big.toml"], &[]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("op `train`: integer 99999999999999999999 is out of range")
            && !out.stderr.contains("i128"),
        "{out:?}"
    );
}

#[test]
fn hub_unreachable_while_planning_is_a_run_time_failure() {
    let work = tempfile::tempdir().unwrap();
    fs::write(
        work.path().join("recipe.toml"),
        "[ops.raw]\nop = \"load\"\ndataset = \"someone/some-dataset\"\n",
    )
    .unwrap();
    let empty_cache = work.path().join("hub");
    let out = runner(
        work.path(),
        &["plan", "recipe.toml"],
        &[
            ("HF_HUB_OFFLINE", "0"),
            ("HF_HUB_CACHE", empty_cache.to_str().unwrap()),
            // Nothing listens on the discard port: the connection is refused at once.
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("check the network"), "{out:?}");
}

/// Mesa's device-select layer probes Wayland while adapters are enumerated; without a
/// XDG_RUNTIME_DIR libwayland printed `error: XDG_RUNTIME_DIR is invalid…` twice per GPU op.
#[test]
fn gpu_probe_is_quiet_on_a_headless_machine() {
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .arg("gpu")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .env_remove("MESA_VK_DEVICE_SELECT")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("DISPLAY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// `runner run recipes/demo.toml` needs no environment: from another folder, with an empty HF
/// home and an unreachable Hub, the loads and the unzip run from the shipped miniatures.
#[test]
fn demo_recipe_is_self_contained() {
    let work = tempfile::tempdir().unwrap();
    let recipe = repo_root().join("recipes/demo.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .current_dir(work.path())
        .args([
            "run",
            recipe.to_str().unwrap(),
            "--only",
            "images",
            "--only",
            "base",
        ])
        .args(["--cache-dir", work.path().join("cache").to_str().unwrap()])
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env_remove("HF_TOKEN")
        .env("HF_HOME", work.path().join("hf-home"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some("ran 3, reused 0, failed 0"),
        "{stdout}"
    );
}

/// Entries record the entries they read relative to themselves: a cache folder moved
/// elsewhere is reused as it is, and what reads through it (the batch stream) still works.
#[test]
fn a_moved_cache_keeps_working() {
    let ds = model_case();
    let recipe = format!(
        "{MODEL_RECIPE}\n[ops.eval]\nop = \"eval\"\ninputs = {{ model = \"base\", batches = \"batches\" }}\n"
    );
    fs::write(ds.path().join("recipe.toml"), recipe).unwrap();
    let out = ds.run(&["--cache-dir", "first", "--only", "batches"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    fs::rename(ds.path().join("first"), ds.path().join("moved")).unwrap();
    let out = ds.run(&["--cache-dir", "moved"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.lines().last(),
        Some("ran 1, reused 5, failed 0"),
        "{out:?}"
    );
}

/// `runner gpu --tune` times the candidate tilings of a model's products on this adapter and
/// keeps the fastest per shape class in the tuning folder, which a second run reads back.
#[test]
fn gpu_tune_keeps_the_fastest_tiling_per_shape_class() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo_root().join("recipes/configs/bench-small-gemma-3.config.json");
    let tune = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_runner"))
            .args(["gpu", "--tune", "--tokens", "24", "--config"])
            .arg(config)
            .env("RUNNER_TUNE_DIR", dir.path())
            .output()
            .unwrap()
    };
    let out = tune(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("| text down_proj, forward | 24×640×2048 |"),
        "{stdout}"
    );
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let path = files[0].as_ref().unwrap().path();
    assert!(
        stdout.contains(&format!("kept in {}", path.display())),
        "{stdout}"
    );
    let table: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let classes = table["classes"].as_object().unwrap();
    // 14 products of the bench config fall into 13 classes (q_proj and o_proj share theirs)
    assert!(classes.len() >= 10, "{table}");
    for (key, entry) in classes {
        let times = entry["times"].as_array().unwrap();
        let best = times
            .iter()
            .map(|t| t[1].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        let kept = times.iter().find(|t| t[0] == entry["tiling"]).unwrap();
        assert_eq!(kept[1].as_f64().unwrap(), best, "{key}: {entry}");
    }

    // a dense bf16 base: its products' classes are the bf16-weight kernels' (BF16B), kept
    // beside the f32 ones in the same file
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args([
            "gpu",
            "--tune",
            "--bf16-weights",
            "--tokens",
            "24",
            "--config",
        ])
        .arg(&config)
        .env("RUNNER_TUNE_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let bf16_classes = table["classes"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.contains("BF16B"))
        .count();
    assert!(bf16_classes >= 10, "{table}");
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["gpu", "--tune", "--nf4", "--bf16-weights"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--bf16-weights"),
        "{stderr}"
    );

    // a file that is not a model config is refused with its name
    let bad = dir.path().join("not-a-config.json");
    std::fs::write(&bad, "{\"model_type\": \"llama\"}").unwrap();
    let out = tune(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("not-a-config.json"), "{stderr}");
}

/// Started by an MPI launcher as one of several ranks, a build without the `distributed`
/// feature refuses at once, naming the feature, instead of training alone on the whole dataset
/// beside copies of itself that overwrite its outputs.
#[cfg(not(feature = "distributed"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_several_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = repo_root().join("recipes/demo.toml");
    let recipe = recipe.to_str().unwrap();
    for env in [
        [("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2")],
        [("PMIX_RANK", "0"), ("SLURM_NTASKS", "4")],
    ] {
        let out = runner(dir.path(), &["validate", recipe], &env);
        assert_eq!(out.code, 2, "{out:?}");
        assert!(
            out.stderr.contains("built without MPI")
                && out.stderr.contains("--features distributed"),
            "{out:?}"
        );
    }
    // One rank (`mpirun -n 1`) is a single process: it runs.
    let out = runner(
        dir.path(),
        &["validate", recipe],
        &[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "1")],
    );
    assert_eq!(out.code, 0, "{out:?}");
}
