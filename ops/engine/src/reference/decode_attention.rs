//! Attention of one new query row per sequence against a KV cache (decoding), and the append
//! that writes the new row's keys and values into the cache.
//!
//! Cache layout: `[batch, kv_heads, capacity, head_dim]`; absolute position `p` lives in slot
//! `p % capacity`. A full-attention layer's cache holds every position (`capacity > pos`); a
//! sliding-window layer's holds only its window (`capacity = window`), as a ring.

pub use crate::shapes::DecodeShape;

/// `cache[b, g, pos % capacity, :] = new[b, g, :]`. new: [batch, kv_heads, head_dim].
pub fn append(cache: &mut [f32], new: &[f32], s: &DecodeShape) {
    for bg in 0..s.batch * s.kv_heads {
        let slot = (bg * s.capacity + s.pos % s.capacity) * s.head_dim;
        cache[slot..slot + s.head_dim]
            .copy_from_slice(&new[bg * s.head_dim..(bg + 1) * s.head_dim]);
    }
}

/// The prompt's keys or values into the cache: `new [batch, s.pos, kv_heads, head_dim]` (a
/// prompt forward's rows; `s.pos` is the prompt length), each position `p` to slot
/// `p % capacity`, as `s.pos` successive [`append`]s would leave the cache.
pub fn prefill(cache: &mut [f32], new: &[f32], s: &DecodeShape) {
    let n = s.pos;
    // In position order, so that a ring smaller than the prompt ends with its last positions.
    for t in 0..n {
        for b in 0..s.batch {
            for g in 0..s.kv_heads {
                let slot = ((b * s.kv_heads + g) * s.capacity + t % s.capacity) * s.head_dim;
                let src = ((b * n + t) * s.kv_heads + g) * s.head_dim;
                cache[slot..slot + s.head_dim].copy_from_slice(&new[src..src + s.head_dim]);
            }
        }
    }
}

/// out [batch, heads, head_dim] = softmax(q·Kᵀ·scale) V over the keys row `b` sees
/// ([`DecodeShape::first_key`] ..= pos); a row that sees no key gets zeros.
/// q: [batch, heads, head_dim]; k, v: the caches; start: [batch] (left padding per row).
pub fn decode(q: &[f32], k: &[f32], v: &[f32], start: &[u32], s: &DecodeShape) -> Vec<f32> {
    let group = s.heads / s.kv_heads;
    let mut out = vec![0.0f32; s.batch * s.heads * s.head_dim];
    for b in 0..s.batch {
        let lo = s.first_key(start[b]);
        for h in 0..s.heads {
            let g = h / group;
            let qrow = &q[(b * s.heads + h) * s.head_dim..][..s.head_dim];
            let key = |p: usize| ((b * s.kv_heads + g) * s.capacity + p % s.capacity) * s.head_dim;
            let scores: Vec<f32> = (lo..=s.pos)
                .map(|p| {
                    let kr = &k[key(p)..][..s.head_dim];
                    qrow.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * s.scale
                })
                .collect();
            if scores.is_empty() {
                continue;
            }
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
            let sum: f32 = w.iter().sum();
            let o = &mut out[(b * s.heads + h) * s.head_dim..][..s.head_dim];
            for (p, wj) in (lo..=s.pos).zip(&w) {
                let vr = &v[key(p)..][..s.head_dim];
                for (od, vd) in o.iter_mut().zip(vr) {
                    *od += wj * vd;
                }
            }
            for od in o.iter_mut() {
                *od /= sum;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a full cache and no padding, decoding the last position equals causal attention's
    /// last row computed the obvious way (a hand-sized case).
    #[test]
    fn one_head_by_hand() {
        let s = DecodeShape {
            batch: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            capacity: 4,
            pos: 2,
            window: 0,
            scale: 1.0,
        };
        let q = [1.0, 0.0];
        let k = [0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 9.0, 9.0];
        let v = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 5.0, 5.0];
        let e = [1.0f32, 1f32.exp(), 2f32.exp()];
        let z: f32 = e.iter().sum();
        let want = [(e[0] + e[2]) / z, (e[1] + e[2]) / z];
        let got = decode(&q, &k, &v, &[0], &s);
        assert!((got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6);
        // Window 2: positions 1 and 2 only; start 2: position 2 only.
        let w = decode(&q, &k, &v, &[0], &DecodeShape { window: 2, ..s });
        let z2 = e[1] + e[2];
        assert!((w[0] - e[2] / z2).abs() < 1e-6 && (w[1] - 1.0).abs() < 1e-6);
        assert_eq!(decode(&q, &k, &v, &[2], &s), vec![1.0, 1.0]);
        assert_eq!(decode(&q, &k, &v, &[3], &s), vec![0.0, 0.0]);
    }
}
