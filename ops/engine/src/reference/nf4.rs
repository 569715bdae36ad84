//! NF4 and double quantization exactly as bitsandbytes lays them out (0.50.2,
//! `backends/default/ops.py` `quantize_4bit` / `quantize_blockwise`, `functional.py`
//! `create_dynamic_map`, `quantize_4bit(compress_statistics=True)`).
//!
//! - Weight flattened row-major; blocks of `blocksize` (64); `absmax` per block (f32).
//! - Full blocks are scaled by the f32 reciprocal of absmax (`x * (1/absmax)`), a final partial
//!   block by division (`x / absmax`), both clamped to [-1, 1]; absmax is floored at 1e-38 for
//!   the scaling (and, as bitsandbytes does, in the stored absmax of a partial block).
//! - Code = `torch.bucketize(scaled, midpoints)` with f32 midpoints `(c[i] + c[i+1]) / 2`: the
//!   number of midpoints strictly below the value, so an exact midpoint goes to the lower code.
//! - Two codes per byte, the first element in the HIGH nibble; an odd tail is padded with the
//!   code of 0.0 (7).

/// bitsandbytes `get_4bit_type("nf4")` (sorted, so the 4-bit index is the table position).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// `torch.linspace(start, end, steps, dtype=float32)` as torch's CPU kernel computes it: the
/// first half counts up from `start`, the second half down from `end`, in f32.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `create_dynamic_map(signed=True)` as bitsandbytes 0.50.2 computes it (torch 2.x on x86-64),
/// f32 bits. torch's vectorised `linspace` rounds differently with the CPU's vector width, so
/// recomputing the map can differ by one ulp in a few entries; the table is what checkpoints
/// store in `nested_quant_map`.
const BNB_DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`.
pub fn dynamic_map_signed() -> [f32; 256] {
    BNB_DYNAMIC_MAP_BITS.map(f32::from_bits)
}

/// The map recomputed from `create_dynamic_map`'s algorithm (scalar torch linspace); equal to
/// [`dynamic_map_signed`] within 1e-6 relative (torch's vectorised linspace rounds differently).
pub fn dynamic_map_signed_computed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let b = linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let scale = 10f64.powi(-6 + i) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-(scale * mean));
        }
    }
    data.push(0.0);
    data.push(1.0);
    assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    data.try_into().expect("256 entries")
}

/// f32 midpoints between consecutive codes, as `(code[:-1] + code[1:]) / 2`.
pub fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// `torch.bucketize(x, bounds)` (right=False): how many bounds are strictly below `x`.
fn bucketize(x: f32, bounds: &[f32]) -> usize {
    bounds.partition_point(|&b| b < x)
}

/// Blockwise absmax scaling shared by the 4-bit and 8-bit quantizers: returns the scaled
/// values (in [-1, 1]) and the per-block absmax.
fn scale_blocks(x: &[f32], blocksize: usize) -> (Vec<f32>, Vec<f32>) {
    assert!(blocksize > 0);
    let full = x.len() - x.len() % blocksize;
    let mut scaled = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x[..full].chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let recip = 1.0 / am.max(1e-38);
        scaled.extend(block.iter().map(|v| (v * recip).clamp(-1.0, 1.0)));
        absmax.push(am);
    }
    if full < x.len() {
        let tail = &x[full..];
        let am = tail.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        scaled.extend(tail.iter().map(|v| (v / am).clamp(-1.0, 1.0)));
        absmax.push(am);
    }
    (scaled, absmax)
}

/// The 4-bit index of a scaled value in [-1, 1].
pub fn nf4_index(scaled: f32) -> u8 {
    static BOUNDS: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    bucketize(scaled, BOUNDS.get_or_init(|| midpoints(&NF4_CODE))) as u8
}

/// x: [n] row-major flattened weight. Returns (packed [ceil(n/2)] first element in the HIGH
/// nibble, absmax [ceil(n/blocksize)]).
pub fn quantize_nf4(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let (scaled, absmax) = scale_blocks(x, blocksize);
    let packed = scaled
        .chunks(2)
        .map(|pair| {
            let hi = nf4_index(pair[0]);
            let lo = pair.get(1).map_or(7, |&v| nf4_index(v));
            (hi << 4) | lo
        })
        .collect();
    (packed, absmax)
}

/// The 4-bit code of element `i` of a packed buffer.
pub fn nf4_nibble(packed: &[u8], i: usize) -> u8 {
    let byte = packed[i / 2];
    if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0xF
    }
}

/// `code[nibble] * absmax[block]` in f32, for the first `n` elements.
pub fn dequantize_nf4(packed: &[u8], absmax: &[f32], n: usize, blocksize: usize) -> Vec<f32> {
    assert!(
        packed.len() >= n.div_ceil(2),
        "packed holds {} bytes, need {}",
        packed.len(),
        n.div_ceil(2)
    );
    assert!(absmax.len() >= n.div_ceil(blocksize));
    (0..n)
        .map(|i| NF4_CODE[nf4_nibble(packed, i) as usize] * absmax[i / blocksize])
        .collect()
}

/// Double quant of absmax: returns (q8 [len], nested_absmax [ceil(len/nested_blocksize)],
/// offset = mean(absmax)). 8-bit codes index [`dynamic_map_signed`].
///
/// This follows bitsandbytes' native CPU `quantize_blockwise` (what `quantize_4bit` calls for
/// the statistics on CPU): every block, partial or not, is scaled by the f32 reciprocal of its
/// absmax, and a block whose absmax is 0 (e.g. a weight with a single 64-block, where
/// absmax − offset = 0) stores nested absmax 0 and codes 0 (its 0/0).
pub fn double_quantize(absmax: &[f32], nested_blocksize: usize) -> (Vec<u8>, Vec<f32>, f32) {
    assert!(!absmax.is_empty(), "double quantization of an empty absmax");
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let centered: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let bounds = midpoints(&dynamic_map_signed());
    let mut q8 = Vec::with_capacity(centered.len());
    let mut nested = Vec::with_capacity(centered.len().div_ceil(nested_blocksize));
    for block in centered.chunks(nested_blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested.push(am);
        if am == 0.0 {
            q8.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let recip = 1.0 / am;
        q8.extend(
            block
                .iter()
                .map(|&v| bucketize((v * recip).clamp(-1.0, 1.0), &bounds) as u8),
        );
    }
    (q8, nested, offset)
}

/// `absmax = map[q8] * nested_absmax[i / nested_blocksize] + offset` (f32).
pub fn dequantize_absmax(
    q8: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    nested_blocksize: usize,
) -> Vec<f32> {
    let map = dynamic_map_signed();
    q8.iter()
        .enumerate()
        .map(|(i, &q)| map[q as usize] * nested_absmax[i / nested_blocksize] + offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_algorithm_matches_bitsandbytes_closely() {
        let ours = dynamic_map_signed_computed();
        for (i, (&o, &b)) in ours.iter().zip(BNB_DYNAMIC_MAP_BITS.iter()).enumerate() {
            let b = f32::from_bits(b);
            assert!(
                (o - b).abs() <= 1e-6 * b.abs(),
                "entry {i}: ours {o} bitsandbytes {b}"
            );
        }
    }

    #[test]
    fn nf4_midpoint_ties_go_to_the_lower_code_and_packing_is_high_nibble_first() {
        let mids = midpoints(&NF4_CODE);
        assert_eq!(nf4_index(mids[7]), 7); // exactly the midpoint between 0.0 and 0.0796
        assert_eq!(nf4_index(f32::from_bits(mids[7].to_bits() + 1)), 8);
        assert_eq!(nf4_index(-1.0), 0);
        assert_eq!(nf4_index(1.0), 15);
        // Block of 4 with absmax 2: values 2 (code 15), -2 (code 0), 0 (7), 1 → 0.5 → below the 0.5017 midpoint (12).
        let (packed, absmax) = quantize_nf4(&[2.0, -2.0, 0.0, 1.0, 0.3], 4);
        assert_eq!(absmax, vec![2.0, 0.3]);
        assert_eq!(packed, vec![0xF0, 0x7C, 0xF7]);
        let back = dequantize_nf4(&packed, &absmax, 5, 4);
        assert_eq!(back, vec![2.0, -2.0, 0.0, 0.440_709_83 * 2.0, 0.3]);
    }

    #[test]
    fn double_quant_roundtrip_is_close() {
        let absmax: Vec<f32> = (0..1000)
            .map(|i| 0.01 + ((i * 37) % 101) as f32 * 1e-3)
            .collect();
        let (q8, nested, offset) = double_quantize(&absmax, 256);
        assert_eq!(q8.len(), 1000);
        assert_eq!(nested.len(), 4);
        let back = dequantize_absmax(&q8, &nested, offset, 256);
        for (a, b) in absmax.iter().zip(&back) {
            assert!((a - b).abs() < 5e-4, "{a} vs {b}");
        }
    }
}
