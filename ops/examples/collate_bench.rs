//! Collate benchmark on MMIU-shaped data: several JPEGs per example at photo sizes, resized to
//! 896x896 with 256 image tokens each (Gemma 3 4B's processor settings), batch size 1 as the
//! guide uses for MMIU. Prints examples/s and peak memory for the Rust stream (1 worker and all
//! cores), then runs the Python baseline (the guide's collate_fn with the HF processor,
//! tools/bench/collate_baseline.py) on the same files when /work/venv/bin/python or $BENCH_PYTHON
//! has transformers; "skipped" otherwise.
//!
//! cargo run --release -p ops --example collate_bench -- [num_examples] [model_dir]
//! (model_dir: a Gemma 3 tokenizer folder; default: the tiny fixture model in tests/fixtures).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ops::data::chat_template::ChatTemplate;
use ops::data::collate::{
    prepare_batches, BatchStream, CollateOptions, PrepareSpec, StreamOptions,
};
use ops::data::conversation::{write_json, write_jsonl, ImageRef, ImageSources, TemplatedRecord};
use serde_json::json;

/// CPU seconds (user + system) this process has used so far (/proc counts in USER_HZ = 100 ticks).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// The 1-minute load average: the benchmark shares the machine, so note how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Photo-like content (smooth gradients, edges, noise) so JPEG sizes and decode costs are realistic.
fn synthetic_jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 24) as f32 - 12.0;
        let f = |c: f32| {
            let v = 128.0
                + 80.0
                    * ((x as f32 * (0.013 + c * 0.004) + seed as f32).sin()
                        * (y as f32 * (0.009 + c * 0.003)).cos())
                + if (x / 37 + y / 23) % 5 == 0 {
                    40.0
                } else {
                    0.0
                }
                + n;
            v.clamp(0.0, 255.0) as u8
        };
        image::Rgb([f(0.0), f(1.0), f(2.0)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("encode jpeg");
    out
}

/// Where the time goes: every stage of making the batches, timed separately on one thread over
/// the whole data set (ms per example). The pixel buffer's first touch (page faults) is timed
/// apart from normalising into it; the 4 KiB-page row shows what the huge-page advice saves and
/// is not part of the total.
fn profile_stages(records: &[TemplatedRecord], files: &Path, model: &Path) -> Result<()> {
    use ops::data::collate::zeroed_pixel_buffer;
    use ops::data::image::{decode_rgb, resize_bilinear_pil_with, ResizeKernel};
    let p = ops::data::processor::Processor::from_model_dir(model)?;
    let opts = CollateOptions::default();
    let (h, w) = p.image.out_size();
    let plane = 3 * h * w;
    let names = [
        "read file",
        "decode+RGB",
        "resize",
        "pixel buffer alloc+touch",
        "rescale+normalise+CHW",
        "tokenize",
        "pad+labels",
    ];
    let mut stages = [0f64; 7];
    let (mut resize_scalar, mut small_pages) = (0f64, 0f64);
    let timed = |slot: &mut f64, t: Instant| *slot += t.elapsed().as_secs_f64();
    for rec in records {
        let n = rec.images.len() * plane;
        let t = Instant::now();
        let mut plain = vec![0f32; n];
        plain.fill(1.0);
        std::hint::black_box(&plain);
        drop(plain);
        timed(&mut small_pages, t);
        let t = Instant::now();
        let mut pixels = zeroed_pixel_buffer(n);
        pixels.fill(1.0);
        timed(&mut stages[3], t);
        for (k, r) in rec.images.iter().enumerate() {
            let ImageRef::File { path } = r else {
                unreachable!("the bench writes files")
            };
            let t = Instant::now();
            let bytes = std::fs::read(files.join(path))?;
            timed(&mut stages[0], t);
            let t = Instant::now();
            let rgb = decode_rgb(&bytes)?;
            timed(&mut stages[1], t);
            let t = Instant::now();
            let resized = p.image.resize(&rgb);
            timed(&mut stages[2], t);
            let t = Instant::now();
            std::hint::black_box(resize_bilinear_pil_with(&rgb, w, h, ResizeKernel::Scalar));
            timed(&mut resize_scalar, t);
            let t = Instant::now();
            p.image
                .normalize_into(&resized, &mut pixels[k * plane..(k + 1) * plane]);
            timed(&mut stages[4], t);
        }
        let t = Instant::now();
        let tok = ops::data::collate::tokenize_example(
            &p,
            &rec.text,
            &rec.assistant_spans,
            rec.images.len(),
            &opts,
        )?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        timed(&mut stages[5], t);
        let t = Instant::now();
        let mut tok_no_images = tok.clone();
        tok_no_images.images_kept = 0;
        std::hint::black_box(ops::data::collate::collate(
            &p,
            &[tok_no_images],
            &[Vec::new()],
            &opts,
        ));
        timed(&mut stages[6], t);
        std::hint::black_box(&pixels);
    }
    let n = records.len() as f64;
    let total: f64 = stages.iter().sum();
    println!(
        "profile (1 thread, ms per example): total {:.1}",
        1e3 * total / n
    );
    for (name, s) in names.iter().zip(stages) {
        println!(
            "  {name:<26} {:7.2} ms  {:5.1}%",
            1e3 * s / n,
            100.0 * s / total
        );
    }
    println!(
        "  (resize, scalar kernel    {:7.2} ms; pixel buffer with 4 KiB pages {:.2} ms)",
        1e3 * resize_scalar / n,
        1e3 * small_pages / n
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(40);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tiny = repo.join("tests/fixtures/hf-cache/hub/models--runner-test--tiny-gemma-3/snapshots");
    let src_model = match args.get(2) {
        Some(p) => PathBuf::from(p),
        None => std::fs::read_dir(&tiny)
            .with_context(|| {
                format!(
                    "{} not found (merge the fixtures branch or pass a model dir)",
                    tiny.display()
                )
            })?
            .next()
            .context("no snapshot")??
            .path(),
    };
    let work = tempfile::tempdir()?;
    let root = work.path();

    // A model folder with Gemma 3 4B's processor settings (896x896, 256 tokens per image) and
    // the source model's tokenizer and chat template.
    let model = root.join("model");
    std::fs::create_dir_all(&model)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        if src_model.join(f).is_file() {
            std::fs::copy(src_model.join(f), model.join(f))?;
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src_model.join("config.json"))?)?;
    config["mm_tokens_per_image"] = json!(256);
    std::fs::write(
        model.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    std::fs::write(
        model.join("processor_config.json"),
        serde_json::to_vec_pretty(&json!({
            "image_processor": {"do_convert_rgb": null, "do_normalize": true, "do_rescale": true, "do_resize": true,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
                "rescale_factor": 0.00392156862745098, "size": {"height": 896, "width": 896},
                "image_processor_type": "Gemma3ImageProcessor"},
            "image_seq_length": 256, "processor_class": "Gemma3Processor"}))?,
    )?;

    // MMIU-shaped examples: 2-6 images each at typical photo sizes.
    let sizes = [
        (640u32, 480u32),
        (1024, 768),
        (800, 600),
        (500, 375),
        (1280, 720),
        (480, 640),
    ];
    let files = root.join("files");
    std::fs::create_dir_all(files.join("Cat/task"))?;
    let template = ChatTemplate::from_model_dir(&model, None)?;
    let mut templated = Vec::new();
    let mut examples_json = Vec::new();
    let mut total_images = 0;
    let mut jpeg_bytes = 0usize;
    for i in 0..n {
        let k = 2 + i % 5;
        let mut paths = Vec::new();
        for j in 0..k {
            let (w, h) = sizes[(i * 7 + j * 3) % sizes.len()];
            let rel = format!("Cat/task/img_{i}_{j}.jpg");
            let bytes = synthetic_jpeg(w, h, (i * 31 + j) as u32);
            jpeg_bytes += bytes.len();
            std::fs::write(files.join(&rel), bytes)?;
            paths.push(rel);
        }
        total_images += k;
        let context = "You are given several images. Select from the following choices.\nA: the first image\nB: the second image\n";
        let mut user: Vec<serde_json::Value> =
            paths.iter().map(|_| json!({"type": "image"})).collect();
        user.push(
            json!({"type": "text", "text": format!("Which image is the odd one out? ({i})")}),
        );
        let messages = json!([
            {"role": "system", "content": [{"type": "text", "text": context}]},
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ]);
        let r = template.render_stripped(&messages)?;
        templated.push(TemplatedRecord {
            row: i,
            file: "bench".into(),
            text: r.text,
            assistant_spans: vec![],
            images: paths
                .iter()
                .map(|p| ImageRef::File { path: p.clone() })
                .collect(),
        });
        examples_json.push(json!({"messages": messages, "images": paths}));
    }
    let tdir = root.join("templated");
    std::fs::create_dir_all(&tdir)?;
    write_jsonl(&tdir.join("templated.jsonl"), &templated)?;
    write_json(
        &tdir.join("source.json"),
        &ImageSources {
            dataset_dir: None,
            files_root: Some(files.clone()),
        },
    )?;
    std::fs::write(
        root.join("examples.json"),
        serde_json::to_vec(&json!({"files_root": files, "examples": examples_json}))?,
    )?;
    println!(
        "data: {n} examples, {total_images} JPEGs ({:.1} images/example, {:.0} KiB avg), resized to 896x896, batch_size 1",
        total_images as f64 / n as f64,
        jpeg_bytes as f64 / total_images as f64 / 1024.0
    );

    let bdir = root.join("batches");
    std::fs::create_dir_all(&bdir)?;
    let spec = PrepareSpec {
        options: CollateOptions::default(),
        batch_size: 1,
        shuffle: false,
        seed: 0,
        drop_last: false,
        fail_on_error: true,
        max_positions: ops::collate::max_positions(&model)?,
    };
    prepare_batches(&tdir, &model, &bdir, &spec, &|_| {})?;
    profile_stages(&templated, &files, &model)?;
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    println!(
        "{cores} cores, load average {}; each stream worker decodes and resizes its batch's images on the rayon pool ({} threads)",
        load_average(),
        rayon::current_num_threads()
    );
    let mut rust_rates = Vec::new();
    for workers in [1, cores] {
        let t0 = Instant::now();
        let cpu0 = cpu_seconds();
        let stream = BatchStream::open(
            &bdir,
            StreamOptions {
                workers,
                prefetch: 2 * workers,
                ..Default::default()
            },
        )?;
        let mut seen = 0;
        let mut checksum = 0f64;
        for b in stream {
            let b = b?;
            seen += b.batch_size;
            checksum += b.pixel_values[b.pixel_values.len() / 2] as f64;
        }
        let dt = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let rate = seen as f64 / dt;
        rust_rates.push((workers, rate));
        println!("rust   workers={workers}: {rate:8.2} examples/s ({dt:.2} s, CPU {cpu:.2} s = {:.2} cores busy, peak RSS {:.0} MiB, checksum {checksum:.3})", cpu / dt, peak_rss_mib());
    }

    let python = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| "/work/venv/bin/python".into());
    let script = repo.join("tools/bench/collate_baseline.py");
    let has_python = Path::new(&python).is_file()
        && std::process::Command::new(&python)
            .args(["-c", "import transformers, PIL"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    if !has_python {
        println!("python baseline: skipped ({python} with transformers not available)");
        return Ok(());
    }
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(root.join("examples.json"))
        .arg(&model)
        .env("HF_HUB_OFFLINE", "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        println!(
            "python baseline: failed\n{}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        return Ok(());
    }
    print!("{stdout}");
    println!("load average after the python run: {}", load_average());
    let py_rate: Option<f64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RATE "))
        .and_then(|s| s.trim().parse().ok());
    if let Some(py) = py_rate {
        for (w, r) in rust_rates {
            println!("ratio rust(workers={w}) / python(1 process, as the guide's DataLoader num_workers=0): {:.1}x", r / py);
        }
    }
    Ok(())
}
