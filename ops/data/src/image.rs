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
//! Pillow's order (see [`vertical_first`] for Pillow 13's order rule and where it is inferred);
//! the `image` crate's filters sample differently and do not match.

use std::path::Path;

use anyhow::{bail, Context, Result};

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

/// Pillow's `PRECISION_BITS` for 8-bit resampling: coefficients are fixed point with 22
/// fractional bits (32 - 8 bits of sample - 2 bits of headroom).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first source index and the coefficients (fixed point), as Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` make them for the bilinear (triangle) filter.
struct Coeffs {
    /// `[out_size]`: first source index of each output pixel's window.
    start: Vec<usize>,
    /// `[out_size]`: window length.
    len: Vec<usize>,
    /// `[out_size * ksize]`: fixed-point weights, zero past `len`.
    weights: Vec<i32>,
    ksize: usize,
}

fn bilinear_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 1.0;
    // Pillow passes the box edges as C floats; for a full-image box they are exact integers.
    let (in0, in1) = (0.0f32 as f64, in_size as f32 as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; both values are >= -0.5 here, as in Pillow.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let t = t.abs();
            let w = if t < 1.0 { 1.0 - t } else { 0.0 };
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Coeffs {
        start,
        len,
        weights,
        ksize,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Which implementation of the two passes runs. Both compute the same integer sums in the same
/// fixed point, so their outputs are identical byte for byte (tested); `Simd` falls back to
/// `Scalar` on CPUs without the instructions it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeKernel {
    /// Plain Rust, one sample at a time: Pillow's C loops transcribed.
    Scalar,
    /// x86-64 AVX2 (horizontal: 3 channels of one pixel in 4 rows at once; vertical: 16
    /// samples of a row at once), or SSE4.1 (horizontal, one row at a time), detected at run
    /// time.
    Simd,
}

/// Pillow's per-sample horizontal convolution for output pixel `xx` of one row.
#[inline]
fn horizontal_pixel_scalar(in_row: &[u8], c: &Coeffs, xx: usize, out_px: &mut [u8]) {
    let k = &c.weights[xx * c.ksize..xx * c.ksize + c.len[xx]];
    let base = c.start[xx] * 3;
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (x, &wt) in k.iter().enumerate() {
        let p = &in_row[base + x * 3..base + x * 3 + 3];
        acc[0] += p[0] as i32 * wt;
        acc[1] += p[1] as i32 * wt;
        acc[2] += p[2] as i32 * wt;
    }
    out_px[0] = clip8(acc[0]);
    out_px[1] = clip8(acc[1]);
    out_px[2] = clip8(acc[2]);
}

/// `rows`: `[n, w, 3]` -> `out`: `[n, out_w, 3]`.
fn horizontal_scalar(rows: &[u8], w: usize, c: &Coeffs, out: &mut [u8]) {
    let out_w = c.start.len();
    for (in_row, out_row) in rows
        .chunks_exact(w * 3)
        .zip(out.chunks_exact_mut(out_w * 3))
    {
        for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
            horizontal_pixel_scalar(in_row, c, xx, out_px);
        }
    }
}

/// One output row of the vertical pass: `window` holds the source rows from the first one this
/// row reads (`[>= len, stride]`).
#[inline]
fn vertical_row_scalar(
    window: &[u8],
    stride: usize,
    k: &[i32],
    acc: &mut [i32],
    out_row: &mut [u8],
) {
    acc.fill(1 << (PRECISION_BITS - 1));
    for (y, &wt) in k.iter().enumerate() {
        let in_row = &window[y * stride..(y + 1) * stride];
        for (a, &p) in acc.iter_mut().zip(in_row) {
            *a += p as i32 * wt;
        }
    }
    for (o, &a) in out_row.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

/// `src` holds source rows `row0..` (`[rows, stride]`) -> `out`: `[out_h, stride]`.
fn vertical_scalar(src: &[u8], stride: usize, row0: usize, c: &Coeffs, out: &mut [u8]) {
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + c.len[yy]];
        let window = &src[(c.start[yy] - row0) * stride..];
        vertical_row_scalar(window, stride, k, &mut acc, out_row);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The same sums as the scalar passes, several samples per instruction. Integer addition
    //! is associative and nothing overflows (|sum| < 2^31: 255 times weights summing to 2^22),
    //! so the results are the scalar ones exactly. The final `>> PRECISION_BITS` with signed
    //! then unsigned saturating packs is `clip8`: negative sums become 0, sums of 255.x or
    //! more become 255.

    use std::arch::x86_64::*;

    use super::{clip8, horizontal_pixel_scalar, Coeffs, PRECISION_BITS};

    const BIAS: i32 = 1 << (PRECISION_BITS - 1);

    /// `horizontal_scalar` with one pixel's 3 channels (and a 4th lane holding the next
    /// pixel's red, computed and dropped) per SSE vector.
    ///
    /// # Safety
    /// The CPU must support SSE4.1.
    #[target_feature(enable = "sse4.1")]
    pub unsafe fn horizontal_one_row(rows: &[u8], w: usize, c: &Coeffs, out: &mut [u8]) {
        let out_w = c.start.len();
        for (in_row, out_row) in rows
            .chunks_exact(w * 3)
            .zip(out.chunks_exact_mut(out_w * 3))
        {
            for (xx, out_px) in out_row.chunks_exact_mut(3).enumerate() {
                let (start, len) = (c.start[xx], c.len[xx]);
                // A 4-byte load at tap x reads bytes 3(start+x) .. 3(start+x)+4, inside the row
                // only while start + len < w; the window touching the last pixel goes scalar.
                if start + len >= w {
                    horizontal_pixel_scalar(in_row, c, xx, out_px);
                    continue;
                }
                let k = &c.weights[xx * c.ksize..xx * c.ksize + len];
                let base = in_row.as_ptr().add(start * 3);
                let mut acc = _mm_set1_epi32(BIAS);
                for (x, &wt) in k.iter().enumerate() {
                    let px = (base.add(x * 3) as *const i32).read_unaligned();
                    let px = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px));
                    acc = _mm_add_epi32(acc, _mm_mullo_epi32(px, _mm_set1_epi32(wt)));
                }
                let v = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
                let v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
                let bytes = (_mm_cvtsi128_si32(v) as u32).to_le_bytes();
                out_px.copy_from_slice(&bytes[..3]);
            }
        }
    }

    /// `horizontal_scalar` on four rows at once: the four rows' pixels under the same tap share
    /// its weight, so two 8-lane AVX2 accumulators hold 4 rows x (3 channels + a discarded lane
    /// holding the next pixel's red), and the coefficient lookups are made once for four rows.
    /// Rows past the last multiple of four, and windows touching the last column, go through
    /// the one-row SSE4.1 path.
    ///
    /// # Safety
    /// The CPU must support AVX2 (and so SSE4.1).
    #[target_feature(enable = "avx2")]
    pub unsafe fn horizontal(rows: &[u8], w: usize, c: &Coeffs, out: &mut [u8]) {
        let out_w = c.start.len();
        let (in_stride, out_stride) = (w * 3, out_w * 3);
        let n_rows = rows.len() / in_stride;
        let grouped = n_rows - n_rows % 4;
        for (in_rows, out_rows) in rows[..grouped * in_stride]
            .chunks_exact(4 * in_stride)
            .zip(out.chunks_exact_mut(4 * out_stride))
        {
            let r = [0, 1, 2, 3].map(|i| in_rows.as_ptr().add(i * in_stride));
            for xx in 0..out_w {
                let (start, len) = (c.start[xx], c.len[xx]);
                if start + len >= w {
                    for i in 0..4 {
                        let in_row = &in_rows[i * in_stride..(i + 1) * in_stride];
                        let o = i * out_stride + xx * 3;
                        horizontal_pixel_scalar(in_row, c, xx, &mut out_rows[o..o + 3]);
                    }
                    continue;
                }
                let k = &c.weights[xx * c.ksize..xx * c.ksize + len];
                let mut acc01 = _mm256_set1_epi32(BIAS);
                let mut acc23 = acc01;
                let off = start * 3;
                for (x, &wt) in k.iter().enumerate() {
                    // Inside the row: 3(start + x) + 4 <= 3(start + len) + 1 <= 3w (checked above).
                    let at = off + x * 3;
                    let px = |i: usize| (r[i].add(at) as *const u32).read_unaligned() as u64;
                    let p01 = _mm_cvtsi64_si128((px(0) | px(1) << 32) as i64);
                    let p23 = _mm_cvtsi64_si128((px(2) | px(3) << 32) as i64);
                    let wv = _mm256_set1_epi32(wt);
                    acc01 =
                        _mm256_add_epi32(acc01, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(p01), wv));
                    acc23 =
                        _mm256_add_epi32(acc23, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(p23), wv));
                }
                let acc01 = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(acc01);
                let acc23 = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(acc23);
                let w01 = _mm_packs_epi32(
                    _mm256_castsi256_si128(acc01),
                    _mm256_extracti128_si256::<1>(acc01),
                );
                let w23 = _mm_packs_epi32(
                    _mm256_castsi256_si128(acc23),
                    _mm256_extracti128_si256::<1>(acc23),
                );
                let mut bytes = [0u8; 16];
                _mm_storeu_si128(
                    bytes.as_mut_ptr() as *mut __m128i,
                    _mm_packus_epi16(w01, w23),
                );
                for i in 0..4 {
                    let o = i * out_stride + xx * 3;
                    out_rows[o..o + 3].copy_from_slice(&bytes[i * 4..i * 4 + 3]);
                }
            }
        }
        horizontal_one_row(
            &rows[grouped * in_stride..],
            w,
            c,
            &mut out[grouped * out_stride..],
        );
    }

    /// `vertical_scalar` on 16 samples of a row at a time (two 8-lane AVX2 accumulators).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn vertical(src: &[u8], stride: usize, row0: usize, c: &Coeffs, out: &mut [u8]) {
        let vector_end = stride - stride % 16;
        for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let (first, len) = (c.start[yy] - row0, c.len[yy]);
            let k = &c.weights[yy * c.ksize..yy * c.ksize + len];
            let window = &src[first * stride..(first + len) * stride];
            for i in (0..vector_end).step_by(16) {
                let mut lo = _mm256_set1_epi32(BIAS);
                let mut hi = lo;
                for (y, &wt) in k.iter().enumerate() {
                    let v = _mm_loadu_si128(window.as_ptr().add(y * stride + i) as *const __m128i);
                    let wv = _mm256_set1_epi32(wt);
                    lo = _mm256_add_epi32(lo, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(v), wv));
                    let v_hi = _mm_srli_si128::<8>(v);
                    hi = _mm256_add_epi32(hi, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(v_hi), wv));
                }
                let lo = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(lo);
                let hi = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(hi);
                let lo16 = _mm_packs_epi32(
                    _mm256_castsi256_si128(lo),
                    _mm256_extracti128_si256::<1>(lo),
                );
                let hi16 = _mm_packs_epi32(
                    _mm256_castsi256_si128(hi),
                    _mm256_extracti128_si256::<1>(hi),
                );
                let bytes = _mm_packus_epi16(lo16, hi16);
                _mm_storeu_si128(out_row.as_mut_ptr().add(i) as *mut __m128i, bytes);
            }
            for (j, o) in out_row.iter_mut().enumerate().skip(vector_end) {
                let mut acc = BIAS;
                for (y, &wt) in k.iter().enumerate() {
                    acc += window[y * stride + j] as i32 * wt;
                }
                *o = clip8(acc);
            }
        }
    }
}

/// Horizontal pass over rows `first..last` of `src` (`[h, w, 3]`) into `[last - first, out_w, 3]`.
fn pass_horizontal(
    src: &[u8],
    w: usize,
    first: usize,
    last: usize,
    out_w: usize,
    kernel: ResizeKernel,
) -> Vec<u8> {
    let c = bilinear_coeffs(w, out_w);
    let mut out = vec![0u8; (last - first) * out_w * 3];
    let rows = &src[first * w * 3..last * w * 3];
    #[cfg(target_arch = "x86_64")]
    if kernel == ResizeKernel::Simd {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { simd::horizontal(rows, w, &c, &mut out) };
            return out;
        }
        if std::arch::is_x86_feature_detected!("sse4.1") {
            // SAFETY: SSE4.1 is present (checked just above).
            unsafe { simd::horizontal_one_row(rows, w, &c, &mut out) };
            return out;
        }
    }
    let _ = kernel;
    horizontal_scalar(rows, w, &c, &mut out);
    out
}

/// Vertical pass: `src` holds source rows `row0..` (`[rows, w, 3]`); coefficients are for the
/// full source height `in_h`.
fn pass_vertical(
    src: &[u8],
    w: usize,
    row0: usize,
    in_h: usize,
    out_h: usize,
    kernel: ResizeKernel,
) -> Vec<u8> {
    let c = bilinear_coeffs(in_h, out_h);
    let stride = w * 3;
    let mut out = vec![0u8; out_h * stride];
    let last = c.start[out_h - 1] + c.len[out_h - 1];
    assert!(
        src.len() >= (last - row0) * stride,
        "vertical pass: source rows {row0}..{last} not all present"
    );
    #[cfg(target_arch = "x86_64")]
    if kernel == ResizeKernel::Simd && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above); every window the coefficients name
        // lies inside `src` (asserted above: windows end at or before `last`).
        unsafe { simd::vertical(src, stride, row0, &c, &mut out) };
        return out;
    }
    let _ = kernel;
    vertical_scalar(src, stride, row0, &c, &mut out);
    out
}

/// Whether Pillow runs the vertical pass first. Pillow 13 (`ImagingResampleInner` in 13.0.0's
/// Resample.c, from python-pillow/Pillow#9549) does so when the height shrinks by more than
/// twice as many pixels as the width:
/// `horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)`.
/// Each pass rounds to 8 bits, so the order changes results by up to one level; Pillow 12 and
/// older always ran the horizontal pass first.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    dh > 0 && dh > dw * 2
}

/// `Image.resize((out_w, out_h), Image.BILINEAR)` of Pillow on an RGB image.
pub fn resize_bilinear_pil(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bilinear_pil_with(src, out_w, out_h, ResizeKernel::Simd)
}

/// [`resize_bilinear_pil`] with a chosen implementation (the results are identical; for tests
/// and benchmarks).
pub fn resize_bilinear_pil_with(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    kernel: ResizeKernel,
) -> RgbImage {
    assert!(out_w > 0 && out_h > 0, "resize to an empty image");
    let (w, h) = (src.width, src.height);
    if w == out_w && h == out_h {
        return src.clone();
    }
    let need_h = w != out_w;
    let need_v = h != out_h;
    let data = if !need_v {
        pass_horizontal(&src.data, w, 0, h, out_w, kernel)
    } else if !need_h {
        pass_vertical(&src.data, w, 0, h, out_h, kernel)
    } else if vertical_first(w, h, out_w, out_h) {
        let tmp = pass_vertical(&src.data, w, 0, h, out_h, kernel);
        pass_horizontal(&tmp, w, 0, out_h, out_w, kernel)
    } else {
        // Only the source rows the vertical pass reads (Pillow's ybox_first..ybox_last).
        let cv = bilinear_coeffs(h, out_h);
        let (first, last) = (cv.start[0], cv.start[out_h - 1] + cv.len[out_h - 1]);
        let tmp = pass_horizontal(&src.data, w, first, last, out_w, kernel);
        pass_vertical(&tmp, out_w, first, h, out_h, kernel)
    };
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
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
