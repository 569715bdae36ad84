#include "attention/common"

@group(0) @binding(1) var<storage, read> O: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> DO: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> LSE: array<f32>;
@group(0) @binding(4) var<storage, read_write> STATS: array<vec2<f32>>;
@group(0) @binding(5) var<storage, read> MASK: array<i32>;

// STATS[b, h, t] = (lse, dO·O): one invocation per (b, t, h) row.
@compute @workgroup_size(64, 1, 1)
fn attention_delta(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat_global(gid, nwg, 64u);
    if (row >= p.batch * p.seq * p.q_heads) { return; }
    let h = row % p.q_heads;
    let bt = row / p.q_heads;
    let d4 = p.head_dim / 4u;
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < d4; c++) {
        acc += O[row * d4 + c] * DO[row * d4 + c];
    }
    let b = bt / p.seq;
    let t = bt % p.seq;
    let at = (b * p.q_heads + h) * p.seq + t;
    STATS[at] = vec2<f32>(LSE[at], acc.x + acc.y + acc.z + acc.w);
}
