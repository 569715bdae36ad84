#include "attention/common"

@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> MASK: array<i32>;
@group(0) @binding(5) var<storage, read_write> O: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> LSE: array<f32>;

// One workgroup: ROWS query rows (q0 ..) of head h, sample b. Writes O and LSE.
@compute @workgroup_size(8, 1, 1)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let h = wg.y;
    let q0 = wg.x * ROWS;
    let kvh = h / (p.q_heads / p.kv_heads);
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var qv: array<vec4<f32>, 128>;   // [MAX_ROWS][MAX_SLOTS], pre-scaled
    var acc: array<vec4<f32>, 128>;  // unnormalised output rows
    var m: array<f32, MAX_ROWS>;
    var l: array<f32, MAX_ROWS>;
    var qinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        let t = min(q0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            qv[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[q_index(b, t, h, min(c, d4 - 1u))] * p.scale, c < d4);
            acc[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
        m[r] = NEG;
        l[r] = 0.0;
        qinfo[r] = token_info(b, q0 + r);
    }

    let range_at = p.q_ranges_off + (b * p.q_blocks + wg.x) * 2u;
    let range = block_range(range_at, lane);
    let lo = range.x;
    let hi = range.y;
    for (var k0 = lo; k0 < hi; k0 += KB) {
        var kv: array<vec4<f32>, 64>;     // [KB][MAX_SLOTS]: K block, then V block
        var sc: array<f32, 128>;          // [MAX_ROWS][KB]: scores, then probabilities
        var kinfo: array<i32, KB>;
        for (var j = 0u; j < KB; j++) {
            kinfo[j] = token_info(b, k0 + j);
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                kv[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[kv_index(b, t, kvh, min(c, d4 - 1u))], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var j = 0u; j < KB; j++) {
                var part = 0.0;
                for (var s = 0u; s < SLOTS; s++) {
                    part += dot(qv[r * MAX_SLOTS + s], kv[j * MAX_SLOTS + s]);
                }
                let score = lane_sum(part, lane);
                sc[r * KB + j] = select(NEG, score, allowed(qinfo[r], kinfo[j], q0 + r, k0 + j));
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            var block_max = NEG;
            for (var j = 0u; j < KB; j++) { block_max = max(block_max, sc[r * KB + j]); }
            let m_new = max(m[r], block_max);
            let alpha = exp(m[r] - m_new);
            var sum = 0.0;
            for (var j = 0u; j < KB; j++) {
                let s = sc[r * KB + j];
                let pj = select(0.0, exp(s - m_new), s > 0.5 * NEG);
                sc[r * KB + j] = pj;
                sum += pj;
            }
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            for (var s = 0u; s < SLOTS; s++) { acc[r * MAX_SLOTS + s] *= alpha; }
        }
        for (var j = 0u; j < KB; j++) {
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                kv[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[kv_index(b, t, kvh, min(c, d4 - 1u))], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var s = 0u; s < SLOTS; s++) {
                var o = acc[r * MAX_SLOTS + s];
                for (var j = 0u; j < KB; j++) { o += sc[r * KB + j] * kv[j * MAX_SLOTS + s]; }
                acc[r * MAX_SLOTS + s] = o;
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = q0 + r;
        if (t < p.seq) {
            // A row that saw no key (l = 0) outputs 0 and gets lse = +inf (see the reference).
            let inv = select(0.0, 1.0 / l[r], l[r] > 0.0);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) { O[q_index(b, t, h, c)] = acc[r * MAX_SLOTS + s] * inv; }
            }
            if (lane == 0u) {
                LSE[(b * p.q_heads + h) * p.seq + t] = select(pos_inf(), m[r] + log(l[r]), l[r] > 0.0);
            }
        }
    }
}
