#include "attention/common"

@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DQ: array<vec4<f32>>;

// One workgroup: ROWS query rows of head h; recomputes P from the saved lse and writes dQ.
@compute @workgroup_size(8, 1, 1)
fn attention_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let h = wg.y;
    let q0 = wg.x * ROWS;
    let kvh = h / (p.q_heads / p.kv_heads);
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var qv: array<vec4<f32>, 128>;   // pre-scaled query rows
    var dov: array<vec4<f32>, 128>;  // dO rows
    var dq: array<vec4<f32>, 128>;
    var lse: array<f32, MAX_ROWS>;
    var delta: array<f32, MAX_ROWS>;
    var qinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        qinfo[r] = token_info(b, q0 + r);
        let t = min(q0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            let at = q_index(b, t, h, min(c, d4 - 1u));
            qv[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[at] * p.scale, c < d4);
            dov[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), DO[at], c < d4);
            dq[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
        let st = STATS[(b * p.q_heads + h) * p.seq + t];
        lse[r] = st.x;
        delta[r] = st.y;
    }

    let range_at = p.q_ranges_off + (b * p.q_blocks + wg.x) * 2u;
    let range = block_range(range_at, lane);
    let lo = range.x;
    let hi = range.y;
    for (var k0 = lo; k0 < hi; k0 += KB) {
        var kb: array<vec4<f32>, 64>;
        var vb: array<vec4<f32>, 64>;
        var kinfo: array<i32, KB>;
        for (var j = 0u; j < KB; j++) {
            kinfo[j] = token_info(b, k0 + j);
            let t = min(k0 + j, last);
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                let at = kv_index(b, t, kvh, min(c, d4 - 1u));
                kb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[at], c < d4);
                vb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[at], c < d4);
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            for (var j = 0u; j < KB; j++) {
                var part_s = 0.0;
                var part_dp = 0.0;
                for (var s = 0u; s < SLOTS; s++) {
                    part_s += dot(qv[r * MAX_SLOTS + s], kb[j * MAX_SLOTS + s]);
                    part_dp += dot(dov[r * MAX_SLOTS + s], vb[j * MAX_SLOTS + s]);
                }
                let score = lane_sum(part_s, lane);
                let dp = lane_sum(part_dp, lane);
                let pj = select(0.0, exp(score - lse[r]), allowed(qinfo[r], kinfo[j], q0 + r, k0 + j));
                let ds = pj * (dp - delta[r]);
                for (var s = 0u; s < SLOTS; s++) { dq[r * MAX_SLOTS + s] += ds * kb[j * MAX_SLOTS + s]; }
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = q0 + r;
        if (t < p.seq) {
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) { DQ[q_index(b, t, h, c)] = dq[r * MAX_SLOTS + s] * p.scale; }
            }
        }
    }
}
