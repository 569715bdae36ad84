//! Pillow's bilinear resize (`ImagingResample`, src/libImaging/Resample.c) transcribed: the
//! separable fixed-point convolution whose output equals Pillow's byte for byte (see the
//! [`crate::image`] module docs), with an x86-64 SIMD path for the passes.

use crate::image::RgbImage;

/// Pillow's `PRECISION_BITS` for 8-bit resampling: coefficients are fixed point with 22
/// fractional bits (32 - 8 bits of sample - 2 bits of headroom).
pub(crate) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first source index and the coefficients (fixed point), as Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` make them for the bilinear (triangle) filter.
pub(crate) struct Coeffs {
    /// `[out_size]`: first source index of each output pixel's window.
    pub(crate) start: Vec<usize>,
    /// `[out_size]`: window length.
    pub(crate) len: Vec<usize>,
    /// `[out_size * ksize]`: fixed-point weights, zero past `len`.
    pub(crate) weights: Vec<i32>,
    pub(crate) ksize: usize,
}

pub(crate) fn bilinear_coeffs(in_size: usize, out_size: usize) -> Coeffs {
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
pub(crate) fn clip8(v: i32) -> u8 {
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
pub(crate) fn horizontal_pixel_scalar(in_row: &[u8], c: &Coeffs, xx: usize, out_px: &mut [u8]) {
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
pub(crate) fn horizontal_scalar(rows: &[u8], w: usize, c: &Coeffs, out: &mut [u8]) {
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
pub(crate) fn vertical_row_scalar(
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
pub(crate) fn vertical_scalar(src: &[u8], stride: usize, row0: usize, c: &Coeffs, out: &mut [u8]) {
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
pub(crate) fn pass_horizontal(
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
pub(crate) fn pass_vertical(
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
pub(crate) fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
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
