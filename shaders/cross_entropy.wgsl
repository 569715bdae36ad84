// Fused lm_head + cross-entropy over vocabulary chunks. Reference: ops/src/reference/cross_entropy.rs.
//
// The wrapper (ops/src/gpu/kernels/cross_entropy.rs) walks the vocabulary in blocks of at most
// `vc` rows of W (inside the engine's storage chunks of W), so only a [tokens, vc] block of
// logits ever exists (G, row stride ldg, a multiple of 8). The three products run on the matmul
// kernels (shaders/matmul.wgsl); this file holds the softmax parts. Forward per block: G = X·W_cᵀ
// (matmul), ce_stats (merge the block into each row's running max / sum-exp / argmax / label
// logit). Then ce_finish (per-row lse and the three sums). Backward per block, last block first
// (its logits are still in G): G = X·W_cᵀ again, ce_dlogits (G = scale·(softmax − onehot), 0 on
// ignored rows), then the matmuls dX (+)= G·W_c and optionally dW_c += Gᵀ·X.
//
// LABELS [tokens] i32 (-100 = ignored). STATE is [tokens, 8] f32:
// (max, sum exp(z - max), label logit, best logit, best index (bits), lse, -, -).

struct Params {
    tokens: u32, hidden: u32, vc: u32, ldg: u32,
    w_row0: u32,   // first W row of this vocabulary chunk, within the bound storage chunk
    v0: u32,       // global vocabulary index of that row
    first: u32,    // 1 for the first vocabulary chunk (the state starts fresh)
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

const NEG: f32 = -3.0e38;
const IGNORE: i32 = -100;

//== kernel stats
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
    let n = wg.x + wg.y * nwg.x;   // uniform per workgroup
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

//== kernel finish
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

//== kernel dlogits
@group(0) @binding(1) var<storage, read> LABELS: array<i32>;
@group(0) @binding(2) var<storage, read> STATE: array<f32>;
@group(0) @binding(3) var<storage, read_write> G: array<f32>;

// In place: G = scale · (exp(G − lse) − onehot(label)), zero on ignored rows.
@compute @workgroup_size(64, 1, 1)
fn ce_dlogits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.tokens * p.vc) { return; }
    let n = i / p.vc;
    let j = i % p.vc;
    let label = LABELS[n];
    let at = n * p.ldg + j;
    var g = 0.0;
    if (label != IGNORE) {
        g = exp(G[at] - STATE[n * 8u + 5u]);
        if (u32(label) == p.v0 + j) { g -= 1.0; }
        g *= p.scale;
    }
    G[at] = g;
}
