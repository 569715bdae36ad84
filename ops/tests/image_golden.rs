//! ops::data::image against Pillow (golden files from tools/collate/make_image_golden.py).

use std::path::PathBuf;

use ops::data::image::{decode_rgb, resize_bilinear_pil, RgbImage};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/images")
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir().join("manifest.json")).unwrap()).unwrap()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap()
}

/// Resizing PIL's own decoded pixels must reproduce PIL's resize byte for byte.
#[test]
fn resize_is_bit_exact_with_pillow() {
    for case in manifest()["cases"].as_array().unwrap() {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let src = RgbImage::new(w, h, read(case["rgb"].as_str().unwrap())).unwrap();
        for r in case["resized"].as_array().unwrap() {
            let (ow, oh) = (
                r["width"].as_u64().unwrap() as usize,
                r["height"].as_u64().unwrap() as usize,
            );
            let want = read(r["file"].as_str().unwrap());
            let got = resize_bilinear_pil(&src, ow, oh);
            let diff = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff, 0,
                "{} {w}x{h} -> {ow}x{oh}: {diff} bytes differ",
                case["name"]
            );
        }
    }
}

/// Decoding + convert("RGB") is byte-exact: JPEGs go through libjpeg-turbo's decoder like
/// Pillow's (incl. progressive, 4:2:0/4:2:2, grey and CMYK), other formats through `image`.
#[test]
fn decode_matches_pillow() {
    for case in manifest()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let got = decode_rgb(&read(case["file"].as_str().unwrap())).unwrap();
        let want = read(case["rgb"].as_str().unwrap());
        assert_eq!(
            (got.width, got.height),
            (
                case["width"].as_u64().unwrap() as usize,
                case["height"].as_u64().unwrap() as usize
            )
        );
        let exact = got.data.iter().zip(&want).filter(|(a, b)| a == b).count();
        let within1 = got
            .data
            .iter()
            .zip(&want)
            .filter(|(a, b)| (**a as i32 - **b as i32).abs() <= 1)
            .count();
        let max = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        let n = want.len() as f64;
        eprintln!(
            "{name}: exact {:.4} within1 {:.5} max {max}",
            exact as f64 / n,
            within1 as f64 / n
        );
        if name.starts_with("png") {
            assert_eq!(exact, want.len(), "{name}");
        } else {
            assert!(
                within1 as f64 / n >= 0.999,
                "{name}: only {:.5} within one level",
                within1 as f64 / n
            );
        }
    }
}

/// The full pixel path (decode + convert + resize) against Pillow's, per resize target: what
/// collate feeds the model. Reports exact / within-one-level fractions.
#[test]
fn decode_and_resize_within_one_level() {
    let mut worst = 1.0f64;
    for case in manifest()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let got = decode_rgb(&read(case["file"].as_str().unwrap())).unwrap();
        for r in case["resized"].as_array().unwrap() {
            let (ow, oh) = (
                r["width"].as_u64().unwrap() as usize,
                r["height"].as_u64().unwrap() as usize,
            );
            let want = read(r["file"].as_str().unwrap());
            let out = resize_bilinear_pil(&got, ow, oh);
            let n = want.len() as f64;
            let exact = out.data.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / n;
            let within1 = out
                .data
                .iter()
                .zip(&want)
                .filter(|(a, b)| (**a as i32 - **b as i32).abs() <= 1)
                .count() as f64
                / n;
            eprintln!("{name} -> {ow}x{oh}: exact {exact:.4} within1 {within1:.5}");
            worst = worst.min(within1);
            assert_eq!(out.data, want, "{name} -> {ow}x{oh}: exact {exact:.4}");
        }
    }
    eprintln!("worst within-one-level fraction: {worst:.5}");
}
