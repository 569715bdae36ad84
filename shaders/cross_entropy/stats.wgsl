#include "cross_entropy/common"

@group(0) @binding(1) var<storage, read> G: array<f32>;
@group(0) @binding(2) var<storage, read> LABELS: array<i32>;
@group(0) @binding(3) var<storage, read_write> STATE: array<f32>;

var<workgroup> red_max: array<f32, 64>;
var<workgroup> red_idx: array<u32, 64>;
var<workgroup> red_sum: array<f32, 64>;

// One workgroup per token row: merges this chunk's max / argmax / sum-exp into STATE.
@compute @workgroup_size(64, 1, 1)
fn ce_stats(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let n = flat_workgroup(wg, nwg);   // uniform per workgroup
    let row_ok = n < p.tokens;
    let row = min(n, p.tokens - 1u);
    var best = NEG;
    var best_idx = 0xffffffffu;
    for (var j = lane; j < p.vc; j += 64u) {
        let z = G[row * p.ldg + j];
        if (z > best) { best = z; best_idx = j; }   // j increases: the first maximum stays
    }
    red_max[lane] = best;
    red_idx[lane] = best_idx;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            let ov = red_max[lane + stride];
            let oi = red_idx[lane + stride];
            if (ov > red_max[lane] || (ov == red_max[lane] && oi < red_idx[lane])) {
                red_max[lane] = ov;
                red_idx[lane] = oi;
            }
        }
        workgroupBarrier();
    }
    let chunk_max = red_max[0];
    var sum = 0.0;
    for (var j = lane; j < p.vc; j += 64u) {
        sum += exp(G[row * p.ldg + j] - chunk_max);
    }
    red_sum[lane] = sum;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (lane < stride) { red_sum[lane] += red_sum[lane + stride]; }
        workgroupBarrier();
    }
    if (lane == 0u && row_ok) {
        let s = row * 8u;
        var m = NEG;
        var l = 0.0;
        var z_label = 0.0;
        var top = NEG;
        var top_idx = 0u;
        if (p.first == 0u) {
            m = STATE[s];
            l = STATE[s + 1u];
            z_label = STATE[s + 2u];
            top = STATE[s + 3u];
            top_idx = bitcast<u32>(STATE[s + 4u]);
        }
        let m_new = max(m, chunk_max);
        l = l * exp(m - m_new) + red_sum[0] * exp(chunk_max - m_new);
        // earlier chunks hold lower indices, so only a strictly larger logit takes over
        if (p.first != 0u || chunk_max > top) {
            top = chunk_max;
            top_idx = p.v0 + red_idx[0];
        }
        let label = LABELS[row];
        if (label >= i32(p.v0) && label < i32(p.v0 + p.vc)) {
            z_label = G[row * p.ldg + u32(label) - p.v0];
        }
        STATE[s] = m_new;
        STATE[s + 1u] = l;
        STATE[s + 2u] = z_label;
        STATE[s + 3u] = top;
        STATE[s + 4u] = bitcast<f32>(top_idx);
    }
}
