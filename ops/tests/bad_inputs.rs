//! Bad input through the real `format`, `template` and `collate` ops: a missing image file, a
//! corrupt JPEG, an image-count mismatch, a missing field and non-UTF-8 text. Each gives, with
//! `on_error = "fail"`, an error naming the row, its data file (and the image file), with no
//! complete-looking output in the op's folder; with `on_error = "skip"`, a counted skip whose
//! reason is reported. The bad data is made here from the shipped fixtures (the MMIU archives,
//! extracted by the real `unzip` op, copied and damaged in a temporary folder).

use std::path::{Path, PathBuf};

use ops::data::collate::{BatchStream, StreamOptions};
use ops::{Artifact, ArtifactType, Op};

use crate::common::*;

struct Env {
    h: OpHarness,
    root: PathBuf,
    model: Artifact,
    /// A copy of the extracted MMIU images, plus `damaged/corrupt.jpg`.
    files: Artifact,
    /// A good JPEG, relative to `files`.
    good_jpeg: String,
}

impl Env {
    fn new() -> Self {
        let h = OpHarness::new(7);
        let root = h.root.clone();
        let mut env = Self {
            model: Artifact {
                ty: ArtifactType::Model,
                dir: PathBuf::new(),
                key: String::new(),
            },
            files: Artifact {
                ty: ArtifactType::Files,
                dir: PathBuf::new(),
                key: String::new(),
            },
            good_jpeg: String::new(),
            h,
            root,
        };
        env.model = env
            .run(
                &ops::load::Load,
                "base",
                "model = \"runner-test/tiny-gemma-3\"",
                &[],
            )
            .unwrap()
            .0;
        let raw = env
            .run(
                &ops::load::Load,
                "mmiu",
                "dataset = \"FanqingM/MMIU-Benchmark\"\nsplit = \"test\"",
                &[],
            )
            .unwrap()
            .0;
        let extracted = env
            .run(&ops::unzip::Unzip, "images", "", &[("archives", &raw)])
            .unwrap()
            .0;
        let files_dir = env.root.join("files");
        copy_tree(&extracted.dir, &files_dir);
        let good = find_file(&files_dir, "jpg").expect("the MMIU fixture has a JPEG");
        let bytes = std::fs::read(&good).unwrap();
        // A JPEG signature (so it is recognised as JPEG) followed by garbage: undecodable.
        let mut corrupt = bytes[..4].to_vec();
        corrupt.extend(std::iter::repeat_n(0x5a, 200));
        std::fs::create_dir_all(files_dir.join("damaged")).unwrap();
        std::fs::write(files_dir.join("damaged/corrupt.jpg"), corrupt).unwrap();
        env.good_jpeg = good
            .strip_prefix(&files_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        env.files = Artifact {
            ty: ArtifactType::Files,
            dir: files_dir,
            key: "files".into(),
        };
        env
    }

    /// Runs an op into a fresh folder `name`; returns its artifact and the lines it printed.
    fn run(
        &self,
        op: &dyn Op,
        name: &str,
        params: &str,
        inputs: &[(&str, &Artifact)],
    ) -> anyhow::Result<(Artifact, Vec<String>)> {
        self.h.try_run_capturing(op, name, params, inputs)
    }

    /// A local JSON Lines dataset `name/data.jsonl` (raw bytes, so lines may be non-UTF-8),
    /// loaded by the `load` op.
    fn dataset(&self, name: &str, lines: &[Vec<u8>]) -> Artifact {
        let dir = self.root.join(format!("{name}-src"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l);
            bytes.push(b'\n');
        }
        std::fs::write(dir.join("data.jsonl"), bytes).unwrap();
        self.run(
            &ops::load::Load,
            &format!("{name}-raw"),
            &format!("path = {:?}", dir.display().to_string()),
            &[],
        )
        .unwrap()
        .0
    }

    /// An MMIU-shaped row (the guide's format_data fields).
    fn mmiu_row(&self, question: &str, images: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "context": "Look at the images.",
            "question": question,
            "output": "A",
            "input_image_path": images,
        }))
        .unwrap()
    }
}

const MMIU_MAPPING: &str = "system = \"{context}\"\nuser = { images = \"{input_image_path}\", text = \"{question}\" }\nassistant = \"{output}\"";

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn find_file(dir: &Path, ext: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    entries.into_iter().find_map(|p| {
        if p.is_dir() {
            find_file(&p, ext)
        } else {
            (p.extension().and_then(|e| e.to_str()) == Some(ext)).then_some(p)
        }
    })
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("conversations.json")).unwrap()).unwrap()
}

/// One bad row after a good one, in an MMIU-shaped (`build`) or llava-shaped (`pass`) dataset.
struct Case {
    name: &'static str,
    mapping: String,
    bad_row: Vec<u8>,
    /// The per-reason count key in `conversations.json`.
    kind: &'static str,
    /// Text the error and the skip report must contain besides the row and data file.
    needles: Vec<String>,
}

#[test]
fn format_bad_rows_fail_with_row_and_file_or_are_counted_skips() {
    let env = Env::new();
    let good = env.mmiu_row("Which one?", &[&env.good_jpeg]);
    let mut non_utf8 = env.mmiu_row("Which one?", &[&env.good_jpeg]);
    let at = non_utf8.windows(5).position(|w| w == b"Which").unwrap();
    non_utf8[at] = 0xff; // a lone continuation-range byte: not UTF-8
    let pass_through = |images: &[&str], image_items: usize| {
        let mut content: Vec<serde_json::Value> = (0..image_items)
            .map(|_| serde_json::json!({"type": "image"}))
            .collect();
        content.push(serde_json::json!({"type": "text", "text": "What is shown?"}));
        serde_json::to_vec(&serde_json::json!({
            "messages": [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            ],
            "images": images,
        }))
        .unwrap()
    };
    let cases = [
        Case {
            name: "missing-image",
            mapping: MMIU_MAPPING.into(),
            bad_row: env.mmiu_row("Which one?", &[&env.good_jpeg, "./gone/missing.jpg"]),
            kind: "missing image",
            needles: vec!["missing.jpg".into()],
        },
        Case {
            name: "corrupt-jpeg",
            mapping: MMIU_MAPPING.into(),
            bad_row: env.mmiu_row("Which one?", &["./damaged/corrupt.jpg"]),
            kind: "undecodable image",
            needles: vec!["corrupt.jpg".into(), "undecodable".into()],
        },
        Case {
            name: "missing-field",
            mapping: MMIU_MAPPING.into(),
            bad_row: serde_json::to_vec(&serde_json::json!({
                "context": "c", "output": "A", "input_image_path": [&env.good_jpeg],
            }))
            .unwrap(),
            kind: "missing field",
            needles: vec!["missing field `question`".into()],
        },
        Case {
            name: "non-utf8",
            mapping: MMIU_MAPPING.into(),
            bad_row: non_utf8,
            kind: "invalid text",
            needles: vec!["UTF-8".into()],
        },
        Case {
            name: "image-count",
            mapping: String::new(),
            bad_row: pass_through(&[&env.good_jpeg], 2),
            kind: "image count mismatch",
            needles: vec!["2 image items".into(), "1 images".into()],
        },
    ];
    for case in cases {
        let name = case.name;
        let good_row = if case.mapping.is_empty() {
            pass_through(&[&env.good_jpeg], 1)
        } else {
            good.clone()
        };
        let raw = env.dataset(name, &[good_row.clone(), case.bad_row, good_row]);
        let inputs = [("rows", &raw), ("files", &env.files)];

        let failed = env.run(
            &ops::format::FormatOp,
            &format!("{name}-fail"),
            &format!("{}\non_error = \"fail\"", case.mapping),
            &inputs,
        );
        let Err(err) = failed else {
            panic!("{name}: a bad row must fail the op with on_error = \"fail\"")
        };
        let err = format!("{err:#}");
        assert!(err.contains("row 1 (data.jsonl)"), "{name}: {err}");
        for n in &case.needles {
            assert!(err.contains(n.as_str()), "{name}: no {n:?} in: {err}");
        }
        // Nothing that looks like a finished artifact is left behind.
        let out = env.root.join(format!("{name}-fail"));
        assert!(!out.join("conversations.jsonl").exists(), "{name}");
        assert!(!out.join("conversations.json").exists(), "{name}");

        let (chats, printed) = env
            .run(
                &ops::format::FormatOp,
                &format!("{name}-skip"),
                &format!("{}\non_error = \"skip\"", case.mapping),
                &inputs,
            )
            .unwrap_or_else(|e| panic!("{name}: skip mode failed: {e:#}"));
        let r = report(&chats.dir);
        assert_eq!(r["rows"], 3, "{name}: {r}");
        assert_eq!(r["conversations"], 2, "{name}: {r}");
        assert_eq!(r["skipped"], 1, "{name}: {r}");
        assert_eq!(
            r["skipped_by_reason"],
            serde_json::json!({case.kind: 1}),
            "{name}"
        );
        let first = r["skipped_examples"][0].as_str().unwrap();
        assert!(first.starts_with("row 1 (data.jsonl): "), "{name}: {first}");
        for n in &case.needles {
            assert!(first.contains(n.as_str()), "{name}: no {n:?} in: {first}");
        }
        assert!(
            printed
                .iter()
                .any(|l| l.contains("skipped row 1 (data.jsonl)"))
                && printed.iter().any(|l| l.contains("skipped 1 of 3 rows")),
            "{name}: {printed:?}"
        );
        let kept: Vec<usize> = ops::data::conversation::read_jsonl::<
            ops::data::conversation::ConversationRecord,
        >(&chats.dir.join("conversations.jsonl"))
        .unwrap()
        .iter()
        .map(|c| c.row)
        .collect();
        assert_eq!(kept, [0, 2], "{name}");
    }
}

#[test]
fn format_skips_are_reported_up_to_the_limit_and_all_bad_is_an_error() {
    let env = Env::new();
    let good = env.mmiu_row("q", &[&env.good_jpeg]);
    let missing = |i: usize| env.mmiu_row("q", &[&format!("./gone/{i}.jpg")]);
    let mut lines = vec![good];
    lines.extend((0..5).map(missing));
    let raw = env.dataset("many", &lines);
    let (chats, printed) = env
        .run(
            &ops::format::FormatOp,
            "many-skip",
            &format!("{MMIU_MAPPING}\nreport = 3"),
            &[("rows", &raw), ("files", &env.files)],
        )
        .unwrap();
    let r = report(&chats.dir);
    assert_eq!(r["skipped"], 5);
    assert_eq!(r["skipped_by_reason"]["missing image"], 5);
    let examples: Vec<&str> = r["skipped_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(examples.len(), 3, "{examples:?}");
    assert!(examples[0].starts_with("row 1 (data.jsonl)") && examples[0].contains("0.jpg"));
    assert_eq!(
        printed.iter().filter(|l| l.contains("skipped row")).count(),
        3
    );

    // Every row bad: an error, not an empty artifact.
    let raw = env.dataset("none", &(0..3).map(missing).collect::<Vec<_>>());
    let err = env
        .run(
            &ops::format::FormatOp,
            "none-skip",
            MMIU_MAPPING,
            &[("rows", &raw), ("files", &env.files)],
        )
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("no usable rows") && err.contains("row 0 (data.jsonl)"),
        "{err}"
    );
    assert!(!env.root.join("none-skip/conversations.jsonl").exists());
}

/// Regression: a field missing from the FIRST row was taken for a field missing from the
/// dataset, failing the op even with `on_error = "skip"`; only a field no row of the first
/// chunk has is a mapping mistake.
#[test]
fn format_missing_field_in_the_first_row_is_a_row_error() {
    let env = Env::new();
    let no_question = serde_json::to_vec(&serde_json::json!({
        "context": "c", "output": "A", "input_image_path": [&env.good_jpeg],
    }))
    .unwrap();
    let raw = env.dataset(
        "first",
        &[no_question, env.mmiu_row("q", &[&env.good_jpeg])],
    );
    let inputs = [("rows", &raw), ("files", &env.files)];
    let (chats, _) = env
        .run(&ops::format::FormatOp, "first-skip", MMIU_MAPPING, &inputs)
        .unwrap();
    assert_eq!(report(&chats.dir)["skipped_by_reason"]["missing field"], 1);
    // A field no row has (a typo in the mapping) is still an early error listing the fields.
    let err = env
        .run(
            &ops::format::FormatOp,
            "typo",
            &MMIU_MAPPING.replace("{question}", "{questoin}"),
            &inputs,
        )
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("no field `questoin`")
            && err.contains("row 0 (data.jsonl)")
            && err.contains("input_image_path"),
        "{err}"
    );
}

/// Format, template and collate one dataset; returns the templated artifact.
fn templated(env: &Env, name: &str, lines: &[Vec<u8>], format_params: &str) -> Artifact {
    let raw = env.dataset(name, lines);
    let (chats, _) = env
        .run(
            &ops::format::FormatOp,
            &format!("{name}-chats"),
            format_params,
            &[("rows", &raw), ("files", &env.files)],
        )
        .unwrap();
    env.run(
        &ops::template::TemplateOp,
        &format!("{name}-templated"),
        "",
        &[("conversations", &chats), ("model", &env.model)],
    )
    .unwrap()
    .0
}

#[test]
fn collate_image_placeholder_mismatch_fails_or_is_dropped() {
    let env = Env::new();
    // The question itself holds the image token: the text then has two image placeholders for
    // one image (the HF processor raises on this); format cannot see it, collate must.
    let lines = [
        env.mmiu_row("Which one?", &[&env.good_jpeg]),
        env.mmiu_row("Is <start_of_image> a token?", &[&env.good_jpeg]),
        env.mmiu_row("Which two?", &[&env.good_jpeg]),
    ];
    let t = templated(&env, "boi", &lines, MMIU_MAPPING);
    let inputs = [("templated", &t), ("model", &env.model)];

    let err = env
        .run(
            &ops::collate::CollateOp,
            "boi-fail",
            "batch_size = 1\non_error = \"fail\"",
            &inputs,
        )
        .err()
        .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("row 1 (data.jsonl)")
            && err.contains("2 image placeholders but the example has 1 images"),
        "{err}"
    );
    let out = env.root.join("boi-fail");
    assert!(!out.join("batches.json").exists() && !out.join("offsets.bin").exists());

    let (batches, printed) = env
        .run(
            &ops::collate::CollateOp,
            "boi-skip",
            "batch_size = 1\nshuffle = false",
            &inputs,
        )
        .unwrap();
    let stream = BatchStream::open(&batches.dir, StreamOptions::default()).unwrap();
    let desc = stream.descriptor().clone();
    assert_eq!((desc.num_examples, desc.dropped), (2, 1));
    assert!(desc.dropped_examples[0].starts_with("row 1 (data.jsonl): "));
    assert!(
        printed
            .iter()
            .any(|l| l.contains("dropped 1 examples") && l.contains("row 1 (data.jsonl)")),
        "{printed:?}"
    );
    let rows: Vec<usize> = stream.map(|b| b.unwrap().rows[0]).collect();
    assert_eq!(rows, [0, 2]);
}

#[test]
fn collate_stream_names_row_and_image_of_a_corrupt_or_vanished_image() {
    let env = Env::new();
    // verify_images = "exists" lets a corrupt JPEG through format; decoding happens in the
    // batch stream, whose error must name the row, its data file and the image file.
    let lines = [
        env.mmiu_row("Which one?", &[&env.good_jpeg]),
        env.mmiu_row("Which one?", &["./damaged/corrupt.jpg"]),
    ];
    let t = templated(
        &env,
        "late",
        &lines,
        &format!("{MMIU_MAPPING}\nverify_images = \"exists\""),
    );
    let (batches, _) = env
        .run(
            &ops::collate::CollateOp,
            "late-batches",
            "batch_size = 1\nshuffle = false",
            &[("templated", &t), ("model", &env.model)],
        )
        .unwrap();
    let mut stream = BatchStream::open(&batches.dir, StreamOptions::default()).unwrap();
    assert_eq!(stream.next().unwrap().unwrap().rows, [0]);
    let err = format!("{:#}", stream.next().unwrap().unwrap_err());
    assert!(
        err.contains("row 1 (data.jsonl)") && err.contains("damaged/corrupt.jpg"),
        "{err}"
    );

    // An image deleted after formatting: the same, with the missing path.
    let vanished = env.files.dir.join("damaged/vanishing.jpg");
    std::fs::copy(env.files.dir.join(&env.good_jpeg), &vanished).unwrap();
    let t = templated(
        &env,
        "gone",
        &[env.mmiu_row("Which one?", &["./damaged/vanishing.jpg"])],
        MMIU_MAPPING,
    );
    let (batches, _) = env
        .run(
            &ops::collate::CollateOp,
            "gone-batches",
            "batch_size = 1",
            &[("templated", &t), ("model", &env.model)],
        )
        .unwrap();
    std::fs::remove_file(&vanished).unwrap();
    let mut stream = BatchStream::open(&batches.dir, StreamOptions::default()).unwrap();
    let err = format!("{:#}", stream.next().unwrap().unwrap_err());
    assert!(
        err.contains("row 0 (data.jsonl)") && err.contains("damaged/vanishing.jpg"),
        "{err}"
    );
}
