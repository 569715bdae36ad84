#include "attention/common"

// transformers' eager attention adds finfo.min to blocked scores, so a query that may see no key
// (lse = +inf here, output 0) averages V over the whole sequence instead. This writes that mean
// into such rows of O (reference: ops/engine/src/reference/attention.rs eager_fully_masked_rows).
// Flat f32 views; one invocation per element of O.
@group(0) @binding(1) var<storage, read> V: array<f32>;
@group(0) @binding(2) var<storage, read> LSE: array<f32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;
// Not bound by this kernel: declared only because `token_info` in the header names it.
@group(0) @binding(4) var<storage, read> MASK: array<i32>;

@compute @workgroup_size(64)
fn attention_masked_rows(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) l: u32) {
    let i = flat_invocation(wid, nwg, l, 64u);
    let hd = p.head_dim;
    if (i >= p.batch * p.seq * p.q_heads * hd) { return; }
    let d = i % hd;
    let h = (i / hd) % p.q_heads;
    let t = (i / (hd * p.q_heads)) % p.seq;
    let b = i / (hd * p.q_heads * p.seq);
    if (LSE[(b * p.q_heads + h) * p.seq + t] != pos_inf()) { return; }
    let kvh = h / (p.q_heads / p.kv_heads);
    var sum = 0.0;
    for (var j = 0u; j < p.seq; j++) {
        sum += V[((b * p.seq + j) * p.kv_heads + kvh) * hd + d];
    }
    O[i] = sum / f32(p.seq);
}
