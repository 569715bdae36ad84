//! Image decoding and the Gemma 3 image processor's pixel pipeline, reproducing what the guide
//! runs in Python: `PIL.Image.open(...).convert("RGB")`, then transformers' PIL backend
//! (`Gemma3ImageProcessorPil`): `Image.resize((W, H), BILINEAR)` on the 8-bit image, rescale by
//! `rescale_factor` in f64 then cast to f32, `(x - mean) / std` in f32, channels-first.
//!
//! The resize is Pillow's `ImagingResample` (src/libImaging/Resample.c) transcribed: a separable
//! convolution whose triangle filter support is widened by the downscale factor (so downscaling
//! averages over the whole source footprint instead of sampling two pixels), with coefficients
//! normalised per output pixel and then quantised to 22-bit fixed point, accumulated in i32 with a
//! rounding bias and clipped to 8 bits after each pass. Because every step is integer arithmetic
//! on the same coefficients, the output equals Pillow's byte for byte when the two passes run in
//! Pillow's order (see `resize::vertical_first` for Pillow 13's order rule and where it is inferred);
//! the `image` crate's filters sample differently and do not match.

use std::path::Path;

use anyhow::{bail, Context, Result};

pub use crate::resize::{resize_bilinear_pil, resize_bilinear_pil_with, ResizeKernel};

/// An 8-bit RGB image, row-major, 3 bytes per pixel (what `convert("RGB")` yields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `[height, width, 3]`.
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * 3 {
            bail!(
                "RGB buffer of {} bytes does not hold {width}x{height}x3",
                data.len()
            );
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }
}

/// Decodes an encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF) and converts it to 8-bit RGB the
/// way PIL's `convert("RGB")` does: alpha is dropped (not composited), grey is replicated,
/// palettes are expanded, 16-bit samples keep their high byte, CMYK goes through Pillow's
/// `cmyk2rgb`.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let format = image::guess_format(bytes).context("unrecognised image format")?;
    if format == image::ImageFormat::Jpeg {
        return decode_jpeg_rgb(bytes);
    }
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .with_context(|| format!("cannot decode {format:?} image"))?;
    check_pixel_count(w as u64, h as u64)?;
    let decoded = image::load_from_memory_with_format(bytes, format)
        .with_context(|| format!("cannot decode {format:?} image"))?;
    Ok(dynamic_to_rgb(decoded))
}

/// Pillow's `Image.MAX_IMAGE_PIXELS`: an image of more than twice this many pixels is refused
/// before it is decoded (Pillow's `DecompressionBombError`), whatever its format: a 23 KB JPEG can
/// declare 20000×20000 pixels (1.2 GB decoded).
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;
/// Overrides [`MAX_IMAGE_PIXELS`] (a positive integer; `0` removes the limit), as setting
/// `Image.MAX_IMAGE_PIXELS` does in Pillow.
pub const MAX_IMAGE_PIXELS_ENV: &str = "RUNNER_MAX_IMAGE_PIXELS";

/// The pixel limit in force: [`MAX_IMAGE_PIXELS`] unless [`MAX_IMAGE_PIXELS_ENV`] overrides it.
pub fn max_image_pixels() -> Result<Option<u64>> {
    match std::env::var(MAX_IMAGE_PIXELS_ENV) {
        Err(_) => Ok(Some(MAX_IMAGE_PIXELS)),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(_) => bail!(
                "{MAX_IMAGE_PIXELS_ENV}={v:?} is not a whole number of pixels (0 removes the limit)"
            ),
        },
    }
}

/// Refuses, from its header, an image of more than twice the pixel limit.
fn check_pixel_count(width: u64, height: u64) -> Result<()> {
    match max_image_pixels()? {
        Some(max) if width.saturating_mul(height) > max.saturating_mul(2) => {
            Err(bomb_error(width, height, max))
        }
        _ => Ok(()),
    }
}

fn bomb_error(width: u64, height: u64, max: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "image size ({width}x{height} = {} pixels) exceeds twice the limit of {max} pixels: \
         a possible decompression bomb (Pillow's DecompressionBombError); \
         if the image is trusted, raise {MAX_IMAGE_PIXELS_ENV}",
        width.saturating_mul(height)
    )
}

/// Reads and decodes an image file.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("image {}", path.display()))
}

fn dynamic_to_rgb(img: image::DynamicImage) -> RgbImage {
    use image::DynamicImage as D;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let n = width * height;
    let mut data = Vec::with_capacity(n * 3);
    match img {
        D::ImageRgb8(b) => data = b.into_raw(),
        D::ImageRgba8(b) => {
            for px in b.into_raw().chunks_exact(4) {
                data.extend_from_slice(&px[..3]);
            }
        }
        D::ImageLuma8(b) => {
            for &l in b.as_raw() {
                data.extend_from_slice(&[l, l, l]);
            }
        }
        D::ImageLumaA8(b) => {
            for px in b.as_raw().chunks_exact(2) {
                data.extend_from_slice(&[px[0], px[0], px[0]]);
            }
        }
        D::ImageRgb16(b) => data.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        D::ImageRgba16(b) => {
            for px in b.as_raw().chunks_exact(4) {
                data.extend(px[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        D::ImageLuma16(b) => {
            for &l in b.as_raw() {
                let l = (l >> 8) as u8;
                data.extend_from_slice(&[l, l, l]);
            }
        }
        D::ImageLumaA16(b) => {
            for px in b.as_raw().chunks_exact(2) {
                let l = (px[0] >> 8) as u8;
                data.extend_from_slice(&[l, l, l]);
            }
        }
        other => data = other.to_rgb8().into_raw(),
    }
    debug_assert_eq!(data.len(), n * 3);
    RgbImage {
        width,
        height,
        data,
    }
}

/// JPEG through libjpeg-turbo's decoder (the `mozjpeg` crate vendors its C sources), which is
/// what Pillow links: with the same defaults (integer slow DCT, fancy upsampling) the pixels are
/// the same, where pure-Rust decoders round chroma upsampling and the IDCT differently (up to 3
/// levels on 4:2:0 files). CMYK/YCCK files are read as CMYK and converted with Pillow's formula.
fn decode_jpeg_rgb(bytes: &[u8]) -> Result<RgbImage> {
    use mozjpeg::ColorSpace as Cs;
    // Pillow refuses a truncated file ("image file is truncated"); libjpeg would pad it with grey.
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
        bail!("corrupt JPEG: truncated (no end-of-image marker)");
    }
    let limit = max_image_pixels()?;
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, bool, Vec<u8>)> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        // The header alone is read: refuse a bomb before libjpeg allocates its pixels.
        let pixels = (d.width() as u64).saturating_mul(d.height() as u64);
        if limit.is_some_and(|max| pixels > max.saturating_mul(2)) {
            return Err(std::io::Error::other(BombSize(
                d.width() as u64,
                d.height() as u64,
            )));
        }
        let cmyk = matches!(d.color_space(), Cs::JCS_CMYK | Cs::JCS_YCCK);
        let mut started = if cmyk {
            d.to_colorspace(Cs::JCS_CMYK)?
        } else {
            d.rgb()?
        };
        let (w, h) = (started.width(), started.height());
        let data = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok((w, h, cmyk, data))
    });
    let (width, height, cmyk, raw) = match decoded {
        Ok(Ok(v)) => v,
        Ok(Err(e)) if e.get_ref().is_some_and(|inner| inner.is::<BombSize>()) => {
            let bomb = e.get_ref().and_then(|i| i.downcast_ref::<BombSize>());
            let &BombSize(w, h) = bomb.expect("checked by the guard");
            return Err(bomb_error(w, h, limit.unwrap_or(MAX_IMAGE_PIXELS)));
        }
        Ok(Err(e)) => bail!("corrupt JPEG: {e}"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "decoder error".into());
            bail!("corrupt JPEG: {msg}")
        }
    };
    let n = width * height;
    let data = if cmyk {
        // Pillow reads CMYK JPEGs (written with an Adobe marker, as libjpeg requires for CMYK)
        // with rawmode "CMYK;I", i.e. inverted, then `cmyk2rgb`: channel = clip(nk - nk*c/255)
        // with nk = 255 - k. Inverting the raw samples first gives exactly that.
        if raw.len() != n * 4 {
            bail!("corrupt JPEG: CMYK buffer of unexpected size");
        }
        let mut out = Vec::with_capacity(n * 3);
        for px in raw.chunks_exact(4) {
            let nk = px[3] as i32; // 255 - (255 - raw k)
            for &c in &px[..3] {
                out.push((nk - muldiv255(255 - c as i32, nk)).clamp(0, 255) as u8);
            }
        }
        out
    } else {
        raw
    };
    if data.len() != n * 3 {
        bail!(
            "corrupt JPEG: decoded {} bytes for {width}x{height}",
            data.len()
        );
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// A JPEG header over the pixel limit, carried out of the decoder closure.
#[derive(Debug)]
struct BombSize(u64, u64);

impl std::fmt::Display for BombSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{} pixels", self.0, self.1)
    }
}

impl std::error::Error for BombSize {}

/// Pillow's `MULDIV255`: a*b/255 rounded, in integer arithmetic.
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// The image processor settings collate needs (from `preprocessor_config.json`, or the
/// `image_processor` table of `processor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub height: usize,
    pub width: usize,
    /// PIL resample id; only 2 (BILINEAR) is implemented.
    pub resample: u32,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub do_pan_and_scan: bool,
}

/// The largest processed image side accepted from a processor config.
const MAX_PROCESSOR_SIDE: usize = 4096;

impl ImageProcessorConfig {
    /// Parses the JSON object holding the image processor's settings.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let size = v
            .get("size")
            .context("image processor config has no `size`")?;
        let dim = |k: &str| -> Result<usize> {
            size.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .with_context(|| format!("image processor `size` has no integer `{k}` (only height/width sizes are supported)"))
        };
        let triple = |k: &str, default: f32| -> Result<[f32; 3]> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok([default; 3]),
                Some(serde_json::Value::Number(n)) => {
                    Ok([n.as_f64().unwrap_or(default as f64) as f32; 3])
                }
                Some(serde_json::Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .with_context(|| format!("`{k}` must hold numbers"))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(other) => {
                    bail!("image processor `{k}` must be a number or 3 numbers, got {other}")
                }
            }
        };
        let flag = |k: &str, default: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(default);
        let cfg = Self {
            height: dim("height")?,
            width: dim("width")?,
            resample: v.get("resample").and_then(|x| x.as_u64()).unwrap_or(2) as u32,
            do_resize: flag("do_resize", true),
            do_rescale: flag("do_rescale", true),
            rescale_factor: v
                .get("rescale_factor")
                .and_then(|x| x.as_f64())
                .unwrap_or(1.0 / 255.0),
            do_normalize: flag("do_normalize", true),
            // transformers' IMAGENET_STANDARD_MEAN/STD, the Gemma 3 image processor's defaults.
            image_mean: triple("image_mean", 0.5)?,
            image_std: triple("image_std", 0.5)?,
            do_pan_and_scan: flag("do_pan_and_scan", false),
        };
        // A hostile or broken processor config must fail here, clearly, not as a terabyte
        // allocation or a run that trains on NaN.
        for (k, n) in [("height", cfg.height), ("width", cfg.width)] {
            if !(1..=MAX_PROCESSOR_SIDE).contains(&n) {
                bail!(
                    "image processor `size.{k}` = {n} is out of range (1 to {MAX_PROCESSOR_SIDE} pixels); fix the model's processor config (Gemma 3 uses 896)"
                );
            }
        }
        if !(cfg.rescale_factor.is_finite() && cfg.rescale_factor > 0.0) {
            bail!(
                "image processor `rescale_factor` = {} must be a positive finite number (1/255 for 8-bit images)",
                cfg.rescale_factor
            );
        }
        for (k, t) in [("image_mean", cfg.image_mean), ("image_std", cfg.image_std)] {
            if let Some(x) = t.iter().find(|x| !x.is_finite()) {
                bail!("image processor `{k}` holds {x}; every value must be finite");
            }
        }
        if let Some(x) = cfg.image_std.iter().find(|&&x| x <= 0.0) {
            bail!("image processor `image_std` holds {x}; every value must be positive (pixels are divided by it)");
        }
        if cfg.resample != 2 {
            bail!(
                "image processor resample = {} is not supported (only 2, PIL BILINEAR)",
                cfg.resample
            );
        }
        if cfg.do_pan_and_scan {
            bail!("image processor do_pan_and_scan = true is not supported");
        }
        if v.get("do_convert_rgb").and_then(|x| x.as_bool()) == Some(false) {
            bail!("image processor do_convert_rgb = false is not supported (images are always RGB-converted)");
        }
        Ok(cfg)
    }

    pub fn out_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// Resizes an RGB image as the processor does (8-bit, before rescale/normalise).
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        if self.do_resize {
            resize_bilinear_pil(img, self.width, self.height)
        } else {
            img.clone()
        }
    }

    /// Writes the processed pixels channels-first into `out` (`[3, H, W]`), as numpy does:
    /// `f32(f64(u8) * rescale_factor)`, then `(x - f32(mean)) / f32(std)` in f32.
    pub fn normalize_into(&self, img: &RgbImage, out: &mut [f32]) {
        let (h, w) = (img.height, img.width);
        assert_eq!(out.len(), 3 * h * w, "pixel buffer is not [3, {h}, {w}]");
        let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| {
                let mut x = if self.do_rescale {
                    (v as f64 * self.rescale_factor) as f32
                } else {
                    v as f32
                };
                if self.do_normalize {
                    x = (x - self.image_mean[c]) / self.image_std[c];
                }
                x
            })
        });
        let (red, rest) = out.split_at_mut(h * w);
        let (green, blue) = rest.split_at_mut(h * w);
        // Zipped iterators: no index arithmetic or bounds checks in the per-pixel loop.
        for (((px, r), g), b) in img.data.chunks_exact(3).zip(red).zip(green).zip(blue) {
            *r = lut[0][px[0] as usize];
            *g = lut[1][px[1] as usize];
            *b = lut[2][px[2] as usize];
        }
    }

    /// Maps a processed value back to its 8-bit level (for comparisons before normalisation).
    pub fn unnormalize(&self, channel: usize, x: f32) -> f64 {
        let mut v = x as f64;
        if self.do_normalize {
            v = v * self.image_std[channel] as f64 + self.image_mean[channel] as f64;
        }
        if self.do_rescale {
            v /= self.rescale_factor;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resize::{bilinear_coeffs, PRECISION_BITS};

    /// Hand-checked: downscaling 4 -> 2 widens the triangle to support 2; output 0 (center 1.0)
    /// takes taps 0..3 (`(int)(1 - 2 + 0.5)` = 0, `(int)(1 + 2 + 0.5)` = 3) with triangle weights
    /// 0.75, 0.75, 0.25 renormalised; output 1 (center 3.0) takes taps 1..4. An upscale by 2
    /// weights 3/4, 1/4.
    #[test]
    fn coefficients_match_hand_computation() {
        let c = bilinear_coeffs(4, 2);
        assert_eq!(c.start, vec![0, 1]);
        assert_eq!(c.len, vec![3, 3]);
        let one = (1u32 << PRECISION_BITS) as f64;
        let q = |w: f64| (0.5 + w * one) as i32;
        // Output 0: center 1.0, taps at 0,1,2 -> triangle(|x+0.5-1|/2) = 0.75, 0.75, 0.25 -> /1.75.
        assert_eq!(
            &c.weights[..3],
            &[q(0.75 / 1.75), q(0.75 / 1.75), q(0.25 / 1.75)]
        );
        let up = bilinear_coeffs(2, 4);
        // Output 1: center 0.75 -> taps 0 (w 0.75) and 1 (w 0.25).
        assert_eq!(up.start[1], 0);
        assert_eq!(&up.weights[up.ksize..up.ksize + 2], &[q(0.75), q(0.25)]);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(37, 23, [17u8, 200, 99].repeat(37 * 23)).unwrap();
        for (w, h) in [(8, 8), (50, 41), (37, 5), (3, 23)] {
            let out = resize_bilinear_pil(&img, w, h);
            assert!(
                out.data.chunks_exact(3).all(|p| p == [17, 200, 99]),
                "{w}x{h}"
            );
        }
    }

    /// The SIMD passes against the scalar transcription of Pillow, on random pixels (every
    /// level reachable, so clipping at 0 and 255 is exercised by the rounding bias) and sizes
    /// that are not multiples of the vector widths: up- and downscaling, one-pass resizes, both
    /// pass orders, windows touching the last column and row.
    #[test]
    fn simd_kernels_equal_scalar() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let shapes = [
            ((37, 23), (50, 41)),
            ((37, 23), (8, 8)),
            ((101, 67), (29, 96)),
            ((64, 129), (61, 31)),
            ((13, 200), (13, 17)),
            ((200, 13), (19, 13)),
            ((5, 3), (17, 22)),
            ((211, 157), (96, 96)),
        ];
        for ((w, h), (ow, oh)) in shapes {
            let mut data: Vec<u8> = (0..w * h * 3).map(|_| rng.random::<u8>()).collect();
            // Flat 0 and 255 patches: sums land exactly on the clipping bounds.
            for v in data.iter_mut().take(w * 3 * (h / 4)) {
                *v = if *v > 127 { 255 } else { 0 };
            }
            let img = RgbImage::new(w, h, data).unwrap();
            let scalar = resize_bilinear_pil_with(&img, ow, oh, ResizeKernel::Scalar);
            let simd = resize_bilinear_pil_with(&img, ow, oh, ResizeKernel::Simd);
            assert_eq!((simd.width, simd.height), (ow, oh));
            let diff = scalar
                .data
                .iter()
                .zip(&simd.data)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diff, 0, "{w}x{h} -> {ow}x{oh}: {diff} bytes differ");
        }
    }

    #[test]
    fn cmyk_formula_is_pillows() {
        // Pillow: nk = 255 - k; out = clip(nk - MULDIV255(c, nk)).
        assert_eq!(muldiv255(255, 255), 255);
        assert_eq!(muldiv255(128, 255), 128);
        assert_eq!(muldiv255(100, 155), (100 * 155 + 127) / 255);
    }
}
