#include "cross_entropy/common"

@group(0) @binding(1) var<storage, read> LABELS: array<i32>;
@group(0) @binding(2) var<storage, read> STATE: array<f32>;
@group(0) @binding(3) var<storage, read_write> G: array<f32>;

// In place: G = scale · (exp(G − lse) − onehot(label)), zero on ignored rows.
@compute @workgroup_size(64, 1, 1)
fn ce_dlogits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_global(gid, nwg, 64u);
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
