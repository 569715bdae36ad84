#include "cross_entropy/common"

@group(0) @binding(1) var<storage, read> LABELS: array<i32>;
@group(0) @binding(2) var<storage, read_write> STATE: array<f32>;
@group(0) @binding(3) var<storage, read_write> TOTALS: array<u32>;   // loss sum (f32 bits), counted, correct

var<workgroup> red_loss: array<f32, 256>;
var<workgroup> red_count: array<u32, 256>;
var<workgroup> red_correct: array<u32, 256>;

// One workgroup: per-row lse into STATE, and the sums over counted rows into TOTALS.
@compute @workgroup_size(256, 1, 1)
fn ce_finish(@builtin(local_invocation_index) lane: u32) {
    var loss = 0.0;
    var count = 0u;
    var correct = 0u;
    for (var n = lane; n < p.tokens; n += 256u) {
        let s = n * 8u;
        let lse = STATE[s] + log(STATE[s + 1u]);
        STATE[s + 5u] = lse;
        let label = LABELS[n];
        if (label != IGNORE) {
            loss += lse - STATE[s + 2u];
            count += 1u;
            if (bitcast<u32>(STATE[s + 4u]) == u32(label)) { correct += 1u; }
        }
    }
    red_loss[lane] = loss;
    red_count[lane] = count;
    red_correct[lane] = correct;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            red_loss[lane] += red_loss[lane + stride];
            red_count[lane] += red_count[lane + stride];
            red_correct[lane] += red_correct[lane + stride];
        }
        workgroupBarrier();
    }
    if (lane == 0u) {
        TOTALS[0] = bitcast<u32>(red_loss[0]);
        TOTALS[1] = red_count[0];
        TOTALS[2] = red_correct[0];
        TOTALS[3] = 0u;
    }
}
