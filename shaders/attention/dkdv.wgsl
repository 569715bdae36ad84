#include "attention/common"

@group(0) @binding(1) var<storage, read> Q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> K: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> V: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read> STATS: array<vec2<f32>>;
@group(0) @binding(6) var<storage, read> MASK: array<i32>;
@group(0) @binding(7) var<storage, read_write> DK: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> DV: array<vec4<f32>>;

// One workgroup: ROWS key rows (k0 ..) of kv head kvh; streams the queries of every q head the
// kv head serves that can see them, and writes dK and dV (no atomics: each key row has one owner).
@compute @workgroup_size(8, 1, 1)
fn attention_dkdv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let b = wg.z;
    let kvh = wg.y;
    let k0 = wg.x * ROWS;
    let group = p.q_heads / p.kv_heads;
    let d4 = p.head_dim / 4u;
    let last = p.seq - 1u;

    var kr: array<vec4<f32>, 128>;   // pre-scaled key rows
    var vr: array<vec4<f32>, 128>;
    var dk: array<vec4<f32>, 128>;
    var dv: array<vec4<f32>, 128>;
    var kinfo: array<i32, MAX_ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        kinfo[r] = token_info(b, k0 + r);
        let t = min(k0 + r, last);
        for (var s = 0u; s < SLOTS; s++) {
            let c = lane + LANES * s;
            let at = kv_index(b, t, kvh, min(c, d4 - 1u));
            kr[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), K[at] * p.scale, c < d4);
            vr[r * MAX_SLOTS + s] = select(vec4<f32>(0.0), V[at], c < d4);
            dk[r * MAX_SLOTS + s] = vec4<f32>(0.0);
            dv[r * MAX_SLOTS + s] = vec4<f32>(0.0);
        }
    }

    let range_at = p.k_ranges_off + (b * p.k_blocks + wg.x) * 2u;
    let range = block_range(range_at, lane);
    let lo = range.x;
    let hi = range.y;
    for (var h = kvh * group; h < kvh * group + group; h++) {
        for (var i0 = lo; i0 < hi; i0 += KB) {
            var qb: array<vec4<f32>, 64>;
            var dob: array<vec4<f32>, 64>;
            var lse: array<f32, KB>;
            var delta: array<f32, KB>;
            var qinfo: array<i32, KB>;
            for (var j = 0u; j < KB; j++) {
                qinfo[j] = token_info(b, i0 + j);
                let t = min(i0 + j, last);
                for (var s = 0u; s < SLOTS; s++) {
                    let c = lane + LANES * s;
                    let at = q_index(b, t, h, min(c, d4 - 1u));
                    qb[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), Q[at], c < d4);
                    dob[j * MAX_SLOTS + s] = select(vec4<f32>(0.0), DO[at], c < d4);
                }
                let st = STATS[(b * p.q_heads + h) * p.seq + t];
                lse[j] = st.x;
                delta[j] = st.y;
            }
            for (var r = 0u; r < ROWS; r++) {
                for (var j = 0u; j < KB; j++) {
                    var part_s = 0.0;
                    var part_dp = 0.0;
                    for (var s = 0u; s < SLOTS; s++) {
                        part_s += dot(qb[j * MAX_SLOTS + s], kr[r * MAX_SLOTS + s]);
                        part_dp += dot(dob[j * MAX_SLOTS + s], vr[r * MAX_SLOTS + s]);
                    }
                    let score = lane_sum(part_s, lane);
                    let dp = lane_sum(part_dp, lane);
                    let pj = select(0.0, exp(score - lse[j]), allowed(qinfo[j], kinfo[r], i0 + j, k0 + r));
                    let ds = pj * (dp - delta[j]);
                    for (var s = 0u; s < SLOTS; s++) {
                        dv[r * MAX_SLOTS + s] += pj * dob[j * MAX_SLOTS + s];
                        dk[r * MAX_SLOTS + s] += ds * qb[j * MAX_SLOTS + s];
                    }
                }
            }
        }
    }

    for (var r = 0u; r < ROWS; r++) {
        let t = k0 + r;
        if (t < p.seq) {
            for (var s = 0u; s < SLOTS; s++) {
                let c = lane + LANES * s;
                if (c < d4) {
                    DK[kv_index(b, t, kvh, c)] = dk[r * MAX_SLOTS + s] * p.scale;
                    DV[kv_index(b, t, kvh, c)] = dv[r * MAX_SLOTS + s];
                }
            }
        }
    }
}
